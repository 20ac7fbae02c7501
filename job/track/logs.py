"""Log setup for the whole job: human-readable lines by default, JSON lines for log collectors.

``LOKR_LOG_FORMAT=json`` gives one JSON object per line (``ts``, ``level``, ``logger``, ``msg`` and any
``extra=`` fields); ``LOKR_LOG_LEVEL`` sets the level (default INFO). Every record passes a filter that
masks credentials, and the formatted line is masked again so that exception text and structured extras
are covered too. Only the standard library is imported here at module level (the settings, pydantic, when
logging is set up): the CLI imports this before it parses ``--help``.
"""

import json
import logging
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO

from job.redact import redact

# Libraries that give their own logger a stderr handler (and transformers/diffusers stop propagation):
# their records would bypass our format and our redaction.
LIBRARY_LOGGERS = ("transformers", "diffusers", "huggingface_hub")
_DIFFUSERS_TORCHAO_LOGGER = "diffusers.quantizers.torchao.torchao_quantizer"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
}
# Marks the handler setup_logging installs, so a second call replaces it instead of doubling lines.
_OWN_HANDLER = "_lokr_handler"
_TRACEBACK_FORMATTER = logging.Formatter()


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class RedactingFilter(logging.Filter):
    """Masks credentials in a record's message, traceback and string extras before any handler sees them."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            # A broken %-format: let the handler report it as logging always does.
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = _TRACEBACK_FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in extra_fields(record).items():
            if isinstance(value, str):
                setattr(record, key, redact(value))
        return True


class HumanFormatter(logging.Formatter):
    """``2025-01-31 12:00:00 INFO lokr: message key=value ...``"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        extras = " ".join(f"{k}={v}" for k, v in extra_fields(record).items())
        return f"{line} {extras}" if extras else line

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line; extras become top-level fields, a traceback goes in ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = extra_fields(record)
        entry.update(
            ts=datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            level=record.levelname,
            logger=record.name,
            msg=record.getMessage(),
        )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return redact(json.dumps(entry, default=str, ensure_ascii=False))


def setup_logging(stream: TextIO | None = None) -> logging.Handler:
    """Install the job's log handler on the root logger (replacing one from an earlier call)."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OWN_HANDLER, False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    from job.settings import job_settings

    settings = job_settings()
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else HumanFormatter())
    handler.addFilter(OptionalKernelFilter())
    handler.addFilter(RedactingFilter())
    # diffusers prints through a handler of its own until adopt_library_loggers: filter where it logs.
    quantizer = logging.getLogger(_DIFFUSERS_TORCHAO_LOGGER)
    if not any(isinstance(f, OptionalKernelFilter) for f in quantizer.filters):
        quantizer.addFilter(OptionalKernelFilter())
    setattr(handler, _OWN_HANDLER, True)
    root.addHandler(handler)

    root.setLevel(settings.log_level)
    # Python warnings (deprecations from diffusers, torch) go through the same format and redaction.
    logging.captureWarnings(True)
    # torch tells library authors, through its own handler, that torchao's register_constant() is no longer
    # needed: a note for torchao's developers, not for a user of lokr-job.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    # boto3 announces where it found credentials at INFO each time a client is made: noise, not news.
    for chatty in ("botocore", "boto3", "s3transfer"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    adopt_library_loggers()
    return handler


class OptionalKernelFilter(logging.Filter):
    """torchao warns, at import, for each optional compiled kernel (CUDA, mxfp8, cutlass, Triton) this
    machine cannot load, and diffusers 0.42 (which imports torchao whenever it is installed) warns that
    torchao 0.18 moved tensor classes it lists for unpickling torchao checkpoints, which lokr-job never
    loads: every command would open with those lines. They are debug lines here: nothing lokr-job runs
    needs those kernels, and ``fp8-torchao``'s own requirements are checked before a run starts
    (``precision_problem``)."""

    _NOTICES = ("Failed to load", "Warning: Detected no triton", "Unable to import `torchao` Tensor objects")

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.name.split(".")[0] in ("torchao", "diffusers")
            and record.levelno == logging.WARNING
            and str(record.msg).startswith(self._NOTICES)
        ):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def adopt_library_loggers() -> None:
    """Route transformers/diffusers/huggingface_hub records through the root handler.

    Those libraries attach their own stderr handler when first imported, so call this again after
    importing them (the job's heavy entry points do). It touches only loggers that already exist, so it
    never imports the libraries itself.
    """
    for name in LIBRARY_LOGGERS:
        logger = logging.root.manager.loggerDict.get(name)
        if not isinstance(logger, logging.Logger):
            continue
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True


def log_thread_deaths() -> None:
    """A worker thread that dies (TensorBoard's event writer on a read-only disk) becomes one warning line,
    its traceback at debug level. Whoever waits on the thread meets the failure and decides what it means
    (a tracker is switched off); Python's default hook would print the traceback to the user."""

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "a thread"
        log = logging.getLogger("lokr")
        log.warning("%s stopped: %s: %s", name, args.exc_type.__name__, args.exc_value)
        log.debug("%s traceback", name, exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    threading.excepthook = hook
