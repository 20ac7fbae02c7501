"""The run lease and the work-directory lock, on real stores: a local folder, moto's S3 (conditional
writes) and the test Hub server (commits with a parent commit)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from job import lease
from job.errors import ExitCode, TransientError
from job.lease import LeaseRecord, LeaseSettings, RunLease
from job.storage import storage_for
from job.workdir import WorkdirLock

# Short enough to see takeovers in a test, long enough that a loaded machine renews in time.
FAST = LeaseSettings(ttl=3.0, heartbeat=0.5, wait=0.0)


@pytest.fixture(params=["local", "s3", "hub"])
def run_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    if request.param == "s3":
        return request.getfixturevalue("s3").uri("run")
    request.getfixturevalue("hub")
    return "hf://someone/runs/run"


def test_conditional_writes(run_uri: str) -> None:
    uri = f"{run_uri}/lease.json"
    store = storage_for(uri)
    assert store.read_versioned(uri) is None
    assert store.create_exclusive(uri, b"one")
    assert not store.create_exclusive(uri, b"two")  # already there: nothing written
    first = store.read_versioned(uri)
    assert first is not None and first.data == b"one"
    assert store.replace_if(uri, b"three", first.version)
    assert not store.replace_if(uri, b"four", first.version)  # stale version: the race is lost
    latest = store.read_versioned(uri)
    assert latest is not None and latest.data == b"three" and latest.version != first.version


def test_one_holder_then_takeover_after_the_ttl(run_uri: str) -> None:
    first = RunLease(run_uri, "run", FAST)
    first.acquire()
    try:
        second = RunLease(run_uri, "run", FAST)
        with pytest.raises(TransientError) as refused:
            second.acquire()
        assert refused.value.exit_code == ExitCode.TRANSIENT
        assert f"pid {first._record(1, 0, acquired_at=0).pid}" in refused.value.message
        assert "is held by another lokr-job process" in refused.value.message
        first.check("a test write")  # still ours while it is renewed

        # The holder stops renewing (as if SIGKILLed): after its TTL the next process takes it over.
        first._stop.set()
        first._heartbeat.join()
        patient = RunLease(run_uri, "run", LeaseSettings(ttl=3.0, heartbeat=0.5, wait=60.0))
        patient.acquire()
        try:
            assert patient.generation == first.generation + 1
            with pytest.raises(TransientError, match="took it over") as fenced:
                first.check("checkpoint-00000008")
            assert "not writing checkpoint-00000008" in fenced.value.message
            assert first.lost_reason is not None
            patient.check("a test write")
        finally:
            patient.release()
    finally:
        first.release()


def test_release_frees_it_at_once(run_uri: str) -> None:
    slow = LeaseSettings(ttl=600.0, heartbeat=200.0, wait=0.0)
    first = RunLease(run_uri, "train", slow)
    first.acquire()
    first.release()
    record = LeaseRecord.decode(storage_for(first.uri).read_bytes(first.uri))
    assert record is not None and record.released and record.command == "train"
    second = RunLease(run_uri, "run", slow)
    second.acquire()  # no wait although the TTL is ten minutes
    assert second.generation == 2
    second.release()


def test_heartbeat_keeps_it_past_its_ttl(tmp_path: Path) -> None:
    run_uri = str(tmp_path / "run")
    holder = RunLease(run_uri, "run", LeaseSettings(ttl=2.0, heartbeat=0.3, wait=0.0))
    holder.acquire()
    try:
        time.sleep(3.0)
        with pytest.raises(TransientError):
            RunLease(run_uri, "run", LeaseSettings(ttl=2.0, heartbeat=0.3, wait=0.0)).acquire()
        holder.check("a test write")
    finally:
        holder.release()


def test_lost_lease_is_reported_by_the_helpers(tmp_path: Path) -> None:
    run_uri = str(tmp_path / "run")
    guard = lease.RunGuard(run_uri, "run")
    lease._guard = guard
    holder = RunLease(run_uri, "run", FAST)
    try:
        # Waiting for the lease: status writes are skipped, anything else is refused.
        assert not lease.may_write()
        with pytest.raises(TransientError, match="does not hold the lease"):
            lease.fence("checkpoint-00000008")
        holder.acquire()
        guard.lease = holder
        lease.fence("status.json")
        assert lease.may_write() and not lease.lost()
        # Someone rewrites the lease as theirs (a takeover after a pause longer than the TTL).
        store = storage_for(holder.uri)
        current = store.read_versioned(holder.uri)
        assert current is not None
        other = LeaseRecord("elsewhere", 4242, "t", 9, "run", 0.0, 0.0, time.time() + 60, 3.0)
        assert store.replace_if(holder.uri, other.encode(), current.version)
        with pytest.raises(TransientError, match=r"host elsewhere, pid 4242 took it over \(generation 9\)"):
            lease.fence("status.json")
        assert lease.lost() and not lease.may_write()
    finally:
        lease._guard = None
        holder.release()
    record = LeaseRecord.decode(storage_for(holder.uri).read_bytes(holder.uri))
    assert record is not None and record.pid == 4242  # a lost lease is never "released" by its loser


def test_a_torn_lease_file_is_free_to_take(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "lease.json").write_text('{"holder": {"ho')
    taker = RunLease(str(run), "run", FAST)
    taker.acquire()
    assert taker.generation == 1
    taker.release()


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (lease.TTL_ENV, lease.WAIT_ENV, lease.HEARTBEAT_ENV):
        monkeypatch.delenv(name, raising=False)
    assert LeaseSettings.from_env("s3://b/run") == LeaseSettings(ttl=120.0, heartbeat=40.0, wait=180.0)
    assert LeaseSettings.from_env("hf://o/r").ttl == 600.0
    monkeypatch.setenv(lease.TTL_ENV, "10")
    monkeypatch.setenv(lease.WAIT_ENV, "5")
    assert LeaseSettings.from_env("s3://b/run") == LeaseSettings(ttl=10.0, heartbeat=10 / 3, wait=5.0)
    monkeypatch.setenv(lease.HEARTBEAT_ENV, "20")
    with pytest.raises(Exception, match="heartbeat shorter"):
        LeaseSettings.from_env("s3://b/run")
    monkeypatch.setenv(lease.TTL_ENV, "soon")
    with pytest.raises(Exception, match="LOKR_LEASE_TTL_SECONDS='soon' is not a number"):
        LeaseSettings.from_env("s3://b/run")


def test_workdir_lock_names_the_holder_pid(tmp_path: Path) -> None:
    work = tmp_path / "work"
    # Another process holds the lock (flock is per open file: a second open in this process would
    # conflict too, but a real second process is what the lock is for).
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import sys, time
                from job.workdir import WorkdirLock
                WorkdirLock({str(work)!r}).acquire()
                print("locked", flush=True)
                sys.stdin.read()
            """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(TransientError) as refused:
            WorkdirLock(work).acquire()
        assert f"in use by another lokr-job process (pid {holder.pid} on host" in refused.value.message
    finally:
        holder.communicate("", timeout=60)
    mine = WorkdirLock(work)
    mine.acquire()  # the holder exited: the kernel dropped its lock
    assert (work / ".lock").read_text().startswith(f"pid {os.getpid()} on host")
    mine.release()
