"""The webhook against a real local HTTP receiver: delivery, retries, giving up quietly, no secrets."""

import logging
import socket
import time
from collections.abc import Iterator

import pytest
from servers.webhook import WebhookReceiver

from job.track.webhook import Webhook

HF = "hf_plantedWEBHOOKtoken0123456789"


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as server:
        yield server


def test_events_arrive_as_json_with_a_summary(receiver: WebhookReceiver) -> None:
    hook = Webhook(receiver.url, run_name="tiny")
    assert hook.post("start", {"max_train_steps": 24})
    assert hook.post("checkpoint", {"step": 8, "loss": 0.123456})
    assert hook.post("validation", {"step": 8, "images": ["step-8/validation.png"]})
    assert hook.post("finish", {"step": 24})
    assert receiver.events == ["start", "checkpoint", "validation", "finish"]
    checkpoint = receiver.bodies[1]
    assert (checkpoint["run"], checkpoint["step"], checkpoint["loss"]) == ("tiny", 8, 0.123456)
    assert checkpoint["content"] == checkpoint["text"] == "lokr-job tiny: checkpoint (step=8, loss=0.1235)"
    assert receiver.bodies[2]["images"] == ["step-8/validation.png"]
    assert receiver.headers[0]["content-type"] == "application/json"


def test_server_errors_and_dropped_connections_are_retried(receiver: WebhookReceiver) -> None:
    receiver.faults.configure(rate=1.0, kinds=["500", "drop"], limit=2)
    assert Webhook(receiver.url, backoff_s=0.01).post("checkpoint", {"step": 1})
    assert len(receiver.raw) == 3
    assert receiver.events == ["checkpoint"]


def test_rate_limit_is_retried(receiver: WebhookReceiver) -> None:
    receiver.faults.configure(rate=1.0, kinds=["429"], limit=1)
    assert Webhook(receiver.url, backoff_s=0.01).post("finish")
    assert receiver.events == ["finish"]


def test_persistent_failure_is_a_warning_not_an_error(
    receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.faults.configure(rate=1.0, kinds=["503"])
    assert not Webhook(receiver.url, attempts=3, backoff_s=0.01).post("failure", {"error": "boom"})
    assert len(receiver.raw) == 3
    (warning,) = [r for r in caplog.records if r.name == "lokr.webhook"]
    assert warning.levelno == logging.WARNING
    assert "failure event not delivered" in warning.getMessage() and "HTTP 503" in warning.getMessage()
    # The path of a Discord/Slack webhook URL is its secret.
    assert receiver.path not in warning.getMessage()


def test_client_errors_are_not_retried(receiver: WebhookReceiver) -> None:
    wrong = receiver.url.replace(receiver.path, "/not-the-hook")
    assert not Webhook(wrong, backoff_s=0.01).post("start")
    assert len(receiver.raw) == 1


def test_unreachable_receiver_gives_up_quickly(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    assert not Webhook(f"http://127.0.0.1:{port}/hook", backoff_s=0.01).post("start")
    assert time.monotonic() - started < 5
    assert any("not delivered" in r.getMessage() for r in caplog.records)


def test_no_url_posts_nothing() -> None:
    assert not Webhook(None).post("start", {"step": 0})


def test_payload_secrets_are_masked(receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", HF)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "plantedAWSsecret0123456789")
    Webhook(receiver.url).post("failure", {"error": f"401 for token {HF} and key plantedAWSsecret0123456789"})
    raw = b"".join(receiver.raw)
    assert HF.encode() not in raw and b"plantedAWSsecret" not in raw
    assert receiver.bodies[0]["error"] == "401 for token *** and key ***"
