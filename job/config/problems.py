"""How the loader reads a config file and reports what is wrong with it: JSON with JSON5's tolerance,
parse errors as file:line:column, pydantic's validation errors as one line per key, all collected so
every problem in every file is raised together."""

import re
from pathlib import Path
from typing import Any

import json5
from pydantic import BaseModel, ValidationError

from job.config import simpletuner
from job.oserrors import map_os_error
from job.redact import remember_secrets


class Problems:
    """Every error and warning found so far, each prefixed with the file (and key) it is about."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, where: Path | str, message: str) -> None:
        self.errors.append(f"{where}: {message}")

    def warn(self, where: Path | str, message: str) -> None:
        self.warnings.append(f"{where}: {message}")


def read_json5(path: Path, problems: Problems, expect: type) -> Any:
    """Parse JSON with JSON5 tolerance (trailing commas, comments), errors as file:line:column."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        # Unreadable (EACCES) is access to grant, not a config to fix: exit 4, not one of the problems.
        if (refused := map_os_error(exc, None)) is not None:
            raise refused from exc
        problems.error(path, f"cannot read: {exc.strerror}")
        return None
    try:
        value = json5.loads(text)
    except ValueError as exc:
        problems.error(_position(path, str(exc)), f"not valid JSON: {_strip_position(str(exc))}")
        return None
    # Before anything can quote the file: from here on every error, log line and record masks them.
    remember_secrets(value)
    if not isinstance(value, expect):
        shape = "an object {...}" if expect is dict else "a list [...]"
        problems.error(path, f"must hold {shape}, found {type(value).__name__}")
        return None
    return value


def _position(path: Path, message: str) -> str:
    line = re.search(r"<string>:(\d+)", message)
    column = re.search(r"column (\d+)", message)
    return f"{path}:{line.group(1) if line else '?'}:{column.group(1) if column else '?'}"


def _strip_position(message: str) -> str:
    return re.sub(r"^<string>:\d+\s*", "", message)


def validate(model: type[BaseModel], data: dict[str, Any], where: Path | str, problems: Problems) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(file)"
            name = str(err["loc"][-1]) if err["loc"] else ""
            shown = simpletuner.shown_value(name, err["input"])
            got = f" (got {shown})" if err["loc"] and err["type"] != "missing" else ""
            message = err["msg"].removeprefix("Value error, ")
            problems.error(where, f"{key}: {message}{got}")
        return None
