"""The job's environment variables (``LOKR_*``), read and checked in one place.

Every ``LOKR_*`` variable the Python job reads is a field here; docs/settings.md is the table users read,
and a test keeps the two in step. Settings are read at each call, not once at import: the preemption
budget, retry waits and lease times follow the environment of the moment, which is how tests shrink
them. The snapshot is cached per value of the ``LOKR_*`` variables, so a storage call that asks for the
retry settings costs a dictionary walk, not a validation.

A bad value is a ``ConfigError`` (exit 2) naming the variable, the value and what it must be; the CLI
checks them all before it starts, so a typo in a Job manifest fails at once, not after GPU time.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from job.errors import ConfigError

PREFIX = "LOKR_"
DEFAULT_GRACE_SECONDS = 20.0
DOCS = "docs/settings.md"


class JobSettings(BaseSettings):
    """One field per ``LOKR_<NAME>`` variable (the field name upper-cased)."""

    # A blank value (``LOKR_LOG_LEVEL=`` in a manifest) means the default, as it did for every variable before.
    model_config = SettingsConfigDict(
        env_prefix=PREFIX, extra="ignore", frozen=True, env_ignore_empty=True, str_strip_whitespace=True
    )

    config: str | None = None
    workdir: str = "lokr-work"
    run_uri: str | None = None
    recipe_change: Literal["refuse", "new-run", "continue"] = "refuse"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    log_steps: bool = False
    grace_seconds: float = Field(default=DEFAULT_GRACE_SECONDS, ge=0)
    retry_attempts: int = Field(default=6, ge=1)
    retry_base_seconds: float = Field(default=1.0, ge=0)
    retry_max_seconds: float = Field(default=60.0, ge=0)
    s3_concurrency: int = Field(default=16, ge=1, le=256)
    # Their defaults follow the run URI's kind (job.lease.LeaseSettings): None means "not set".
    lease_ttl_seconds: float | None = Field(default=None, gt=0)
    lease_heartbeat_seconds: float | None = Field(default=None, gt=0)
    lease_wait_seconds: float | None = Field(default=None, ge=0)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value


def env_name(field: str) -> str:
    return f"{PREFIX}{field.upper()}"


def job_settings() -> JobSettings:
    """The settings the environment holds now; ``ConfigError`` naming every bad variable."""
    return _settings(tuple(sorted((k, v) for k, v in os.environ.items() if k.upper().startswith(PREFIX))))


@lru_cache(maxsize=8)
def _settings(variables: tuple[tuple[str, str], ...]) -> JobSettings:
    """``variables`` is the cache key only: pydantic-settings reads the same environment itself."""
    try:
        return JobSettings()
    except ValidationError as exc:
        problems = [_describe(error) for error in exc.errors()]
        raise ConfigError(
            f"bad environment variable{'s' if len(problems) > 1 else ''}: {'; '.join(problems)} "
            f"(the table of LOKR_* variables: {DOCS})"
        ) from None


def _describe(error: dict) -> str:
    field = str(error["loc"][0]) if error["loc"] else "?"
    value = error.get("input")
    reasons = {
        "float_parsing": "is not a number of seconds",
        "int_parsing": "is not a whole number",
        "int_from_float": "is not a whole number",
        "bool_parsing": "is not a boolean (use 1 or 0)",
    }
    reason = reasons.get(error["type"]) or error["msg"].replace("Input should be", "must be")
    return f"{env_name(field)}={value!r} {reason}"
