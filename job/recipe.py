"""Which recipe a run belongs to: ``recipe.json`` at the run URI (or, with none, in the work directory).

The first process of a run records the recipe (``ResolvedConfig.recipe``: what decides the weights) before
it fetches anything. A later process with the same recipe continues the run, and finds a finished run's
output instead of training again. One with a different recipe is refused (exit 2, naming the keys that
differ), because continuing the old checkpoints, or handing back the old adapter, would give the user
something other than what the config asks for, unless ``--recipe-change`` says what they want:

- ``new-run``: the old run's ``checkpoints/``, ``output/`` and record are moved to
  ``previous/<old recipe hash>-<UTC time>/`` beside them (kept, never deleted) and a new run starts;
- ``continue``: the old checkpoints are continued under the new settings, deliberately; the record notes
  the recipes it went through.

With a run URI, the work directory is only a copy of it: checkpoints and output left there by another
recipe are moved aside locally, with a warning, so they are never resumed into this run.
"""

from __future__ import annotations

import json
import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from job.config.loader import ResolvedConfig
from job.errors import ConfigError
from job.lease import fence
from job.redact import redact
from job.storage import join, storage_for
from job.workdir import WorkDir

log = logging.getLogger("lokr")

RECIPE_FILE = "recipe.json"
PREVIOUS = "previous"
RUN_FOLDERS = ("checkpoints", "output")
RecipeChange = Literal["refuse", "new-run", "continue"]
RECIPE_CHANGES: tuple[RecipeChange, ...] = ("refuse", "new-run", "continue")
_SHOWN_DIFFERENCES = 12
# Changing only how long a run trains continues it (train on to the new end), as SimpleTuner does.
LENGTH_KEYS = frozenset({"max_train_steps", "num_train_epochs", "strict_epoch_limit"})


def recipe_record(cfg: ResolvedConfig, previous: list[str] | None = None) -> dict[str, Any]:
    return {
        "config_hash": cfg.hash,
        "recorded_at": _now(),
        "previous_hashes": previous or [],
        "recipe": _redacted(cfg.recipe),
    }


def read_record(run_store: str) -> dict[str, Any] | None:
    """The recipe record of ``run_store`` (a run URI or a work directory path), or None if it has none."""
    uri = join(run_store, RECIPE_FILE)
    storage = storage_for(uri)
    if storage.stat(uri) is None:
        return None
    raw = storage.read_bytes(uri)
    try:
        record = json.loads(raw)
    except ValueError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("config_hash"), str):
        raise ConfigError(f"{redact(uri)} is not a lokr-job recipe record; remove it or pick another run URI")
    return record


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old → new`` for every leaf that differs between two recipes, keys as a user writes them."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(flat_old.keys() | flat_new.keys()):
        before, after = flat_old.get(key, "(unset)"), flat_new.get(key, "(unset)")
        if before != after:
            lines.append(f"{key}: {json.dumps(before)} → {json.dumps(after)}")
    return lines


def only_length_changed(record: dict[str, Any], cfg: ResolvedConfig) -> bool:
    """True when the recorded recipe and ``cfg`` differ in the run's length alone."""
    changed = differences(record.get("recipe") or {}, cfg.recipe)
    return bool(changed) and all(line.split(":", 1)[0] in LENGTH_KEYS for line in changed)


def recipe_problem(cfg: ResolvedConfig, record: dict[str, Any] | None, where: str) -> str | None:
    """Why ``cfg`` may not run against ``record`` as is, or None when it may (no record, same recipe,
    or the same recipe trained for longer or shorter)."""
    if record is None or record["config_hash"] == cfg.hash or only_length_changed(record, cfg):
        return None
    changed = differences(record.get("recipe") or {}, cfg.recipe)
    shown = "; ".join(changed[:_SHOWN_DIFFERENCES]) or "the recipe hash"
    more = f" and {len(changed) - _SHOWN_DIFFERENCES} more" if len(changed) > _SHOWN_DIFFERENCES else ""
    return (
        f"{where} holds a run of another recipe ({record['config_hash']}, this config is {cfg.hash}); "
        f"changed: {shown}{more}. Use another run URI, or pass --recipe-change new-run to start a new run "
        f"there (the old run is moved to {PREVIOUS}/, not deleted) or --recipe-change continue to continue "
        "its checkpoints with the new settings"
    )


def claim_run(cfg: ResolvedConfig, run_uri: str | None, workdir: WorkDir, change: RecipeChange) -> None:
    """Record this config's recipe where the run lives, applying the ``--recipe-change`` rule to a
    different one; clear the work directory of another recipe's checkpoints when a run URI is the store."""
    if run_uri:
        accepted = _claim(cfg, run_uri, change, where=f"run URI {redact(run_uri)}")
        _sync_workdir(cfg, workdir, accepted)
    else:
        _claim(cfg, str(workdir.root), change, where=f"work directory {workdir.root}")


def _claim(cfg: ResolvedConfig, store: str, change: RecipeChange, *, where: str) -> set[str]:
    """Apply the rule; return the recipe hashes whose checkpoints belong to this run from now on."""
    record = read_record(store)
    problem = recipe_problem(cfg, record, where)
    if record is not None and record["config_hash"] == cfg.hash:
        return {cfg.hash, *record.get("previous_hashes", [])}
    previous: list[str] = []
    if record is not None and problem is None:
        previous = [*record.get("previous_hashes", []), record["config_hash"]]
        log.info(
            "the run's length changed (%s): continuing it in %s",
            "; ".join(differences(record.get("recipe") or {}, cfg.recipe)),
            where,
        )
    elif record is not None and problem is not None:
        if change == "refuse":
            raise ConfigError(problem)
        if change == "new-run":
            fence(f"moving the previous run aside in {where}")
            moved = move_run_aside(store, record["config_hash"])
            log.warning("recipe changed: the previous run in %s moved to %s", where, redact(moved))
        else:
            previous = [*record.get("previous_hashes", []), record["config_hash"]]
            log.warning(
                "recipe changed: continuing the checkpoints of recipe %s in %s with the new settings (%s)",
                record["config_hash"],
                where,
                "; ".join(differences(record.get("recipe") or {}, cfg.recipe)[:_SHOWN_DIFFERENCES]),
            )
    uri = join(store, RECIPE_FILE)
    data = (json.dumps(recipe_record(cfg, previous), indent=1, sort_keys=True) + "\n").encode()
    fence(f"{RECIPE_FILE} in {where}")
    storage_for(uri).write_bytes(uri, data, commit_message=f"lokr-job: recipe {cfg.hash}")
    log.info("recipe %s recorded in %s", cfg.hash, where)
    return {cfg.hash, *previous}


def _sync_workdir(cfg: ResolvedConfig, workdir: WorkDir, accepted: set[str]) -> None:
    """The work directory follows the run URI: another recipe's local run is moved aside, not resumed."""
    store = str(workdir.root)
    record = read_record(store)
    if record is not None and record["config_hash"] not in accepted and not only_length_changed(record, cfg):
        moved = move_run_aside(store, record["config_hash"])
        log.warning(
            "work directory held a run of recipe %s: moved to %s (the run URI decides the run)",
            record["config_hash"],
            moved,
        )
    if record is None or record["config_hash"] != cfg.hash:
        workdir.root.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(recipe_record(cfg), indent=1, sort_keys=True) + "\n").encode()
        storage_for(store).write_bytes(join(store, RECIPE_FILE), data)


def move_run_aside(store: str, old_hash: str) -> str:
    """Move the run's folders and record to ``previous/<hash>-<time>/`` in the same store; return it."""
    target = join(store, PREVIOUS, f"{old_hash}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}")
    storage = storage_for(store)
    if not _is_local(store):
        _copy_remote(store, target)
    for name in (*RUN_FOLDERS, RECIPE_FILE):
        source = join(store, name)
        if _is_local(store):
            path = Path(source.removeprefix("file://"))
            if path.exists():
                Path(target.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
                path.rename(Path(target.removeprefix("file://")) / name)
        else:
            storage.delete(source)
    return target


def _copy_remote(store: str, target: str) -> None:
    """S3 and the Hub have no rename: the run's objects go through a local folder to their new place,
    before anything is deleted (a failure half-way leaves both copies, never none)."""
    storage = storage_for(store)
    with tempfile.TemporaryDirectory(prefix="lokr-previous-run-") as temp:
        folder = Path(temp)
        for name in RUN_FOLDERS:
            storage.download_prefix(join(store, name), folder / name, progress=False)
        if storage.stat(join(store, RECIPE_FILE)) is not None:
            storage.download_file(join(store, RECIPE_FILE), folder / RECIPE_FILE)
        for manifest in folder.rglob(".lokr-manifest.json"):
            manifest.unlink()
        if any(p.is_file() for p in folder.rglob("*")):
            storage.upload_folder(folder, target, commit_message="lokr-job: previous run", progress=False)


def _is_local(store: str) -> bool:
    return "://" not in store or store.startswith("file://")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            name = key if prefix in ("", "job") else f"{prefix}.{key}"
            out.update(_flatten(item, name))
        return out
    if isinstance(value, list) and all(isinstance(v, dict) and "id" in v for v in value):
        out = {}
        for item in value:
            out.update(_flatten({k: v for k, v in item.items() if k != "id"}, f"{prefix}[{item['id']}]"))
        return out
    return {prefix: value}


def _redacted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return redact(value) if isinstance(value, str) else value


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def recipe_check(
    cfg: ResolvedConfig, run_uri: str | None, workdir: WorkDir, change: RecipeChange
) -> str | None:
    """What ``claim_run`` would refuse, found without changing anything (``lokr-job check``)."""
    if change != "refuse":
        return None
    if run_uri:
        return recipe_problem(cfg, read_record(run_uri), f"run URI {redact(run_uri)}")
    return recipe_problem(cfg, read_record(str(workdir.root)), f"work directory {workdir.root}")
