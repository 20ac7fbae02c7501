"""What lokr-job does with each option name SimpleTuner knows, read from ``simpletuner_options.json``.

Users paste whole SimpleTuner configs. Every name SimpleTuner's argument parser, field registry or data
backend code knows (at the commit recorded in the file) has one disposition there:

- ``acted_on``: lokr-job implements it with SimpleTuner's meaning (a field of the schema, or checked here);
- ``alias``: an older spelling, mapped onto the canonical key (``of``) before validation;
- ``ignored``: a warning naming the key and the reason;
- ``refused``: exit 2 naming the key, why, and what to do instead, because running anyway would train
  something other than what was asked. A value that asks for nothing (unset, or one of ``allowed``: the
  feature's "off") is only a warning.

Only a name in neither SimpleTuner nor lokr-job's schema is "unknown" (probably misspelt).
``scripts/simpletuner_options.py`` lists SimpleTuner's names; ``scripts/config_docs.py`` writes the
tables in docs/config.md from this file.
"""

import json
import os
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal

from job.redact import is_secret_name, masked

Disposition = Literal["acted_on", "alias", "ignored", "refused"]

# Values that set nothing: SimpleTuner skips a key whose value is empty (cli_utils.mapping_to_cli_args).
_UNSET_WORDS = {"", "none", "null"}


@dataclass(frozen=True)
class Option:
    name: str
    disposition: Disposition
    reason: str = ""
    of: str = ""  # alias: the canonical name
    negate: bool = False  # alias: a true/false whose value is the opposite of the canonical key's
    instead: str = ""  # refused: what to do instead
    allowed: tuple[Any, ...] = ()  # refused: values that ask for nothing lokr-job leaves undone
    older: bool = False  # a name from an older SimpleTuner release, not in the commit recorded


@dataclass(frozen=True)
class Options:
    commit: str
    config: dict[str, Option]
    dataset: dict[str, Option]


@cache
def options() -> Options:
    raw = json.loads(resources.files("job.config").joinpath("simpletuner_options.json").read_text("utf-8"))

    def table(entries: dict[str, dict[str, Any]]) -> dict[str, Option]:
        return {
            name: Option(name=name, **{**entry, "allowed": tuple(entry.get("allowed", ()))})
            for name, entry in entries.items()
        }

    return Options(
        commit=raw["simpletuner"]["commit"], config=table(raw["config"]), dataset=table(raw["dataset"])
    )


def asks_for_nothing(option: Option, value: Any) -> bool:
    """Whether a refused option's value leaves the feature off (SimpleTuner's strings included)."""
    if value is None or value == [] or value == {}:
        return True
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _UNSET_WORDS:
            return True
        try:
            value = json.loads(word)
        except ValueError:
            value = word
    # False == 0 in Python, which is what we want: "off" either way.
    return any(value == allowed for allowed in option.allowed)


def negated(value: Any) -> bool | None:
    """The opposite of a true/false value as SimpleTuner's parser reads one (strings included), or None
    when the value is neither."""
    # SimpleTuner's words (configuration/cmd_args.py, BOOL_TRUE_STRINGS and BOOL_FALSE_STRINGS).
    word = str(value).strip().lower()
    if word in {"1", "true", "yes", "y", "on"}:
        return False
    if word in {"0", "false", "no", "n", "off"}:
        return True
    return None


def shown_value(key: str, value: Any) -> str:
    """A value for an error message: hidden when the key names a credential, and with any credential
    inside it (a nested ``aws`` block's keys, a pasted token) masked."""
    return "<hidden>" if is_secret_name(key) else repr(masked(value))


def world_size_problem(num_processes: Any) -> str | None:
    """``num_processes`` is SimpleTuner's launch size; lokr-job is launched by torchrun, which sets
    WORLD_SIZE. A different number would train with a different global batch, so it is an error; with no
    launcher (``check``, a single process) there is nothing to compare against."""
    launched = os.environ.get("WORLD_SIZE")
    try:
        wanted = int(num_processes)
    except (TypeError, ValueError):
        return f"num_processes: must be a whole number of processes (got {num_processes!r})"
    if wanted < 1:
        return f"num_processes: must be at least 1 (got {wanted})"
    if launched is not None and launched.strip() and int(launched) != wanted:
        return (
            f"num_processes: the config asks for {wanted} processes but the job was launched with "
            f"WORLD_SIZE={launched}; launch {wanted} (torchrun --nproc-per-node) or set num_processes to {launched}"
        )
    return None
