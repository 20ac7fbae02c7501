"""Screening a config file's keys against SimpleTuner's option table (``job.config.simpletuner``): older
spellings mapped, ignored options warned about, refused ones and unknown ones (with the nearest known name)
reported, each naming the file and the key."""

import difflib
from pathlib import Path
from typing import Any

from job.config import simpletuner
from job.config.problems import Problems


def screen_keys(
    raw: dict[str, Any],
    known: set[str],
    table: dict[str, simpletuner.Option],
    where: Path,
    problems: Problems,
) -> None:
    """Map SimpleTuner's older spellings onto their keys, warn on the options lokr-job ignores, refuse the
    ones it cannot honour, and report unknown keys with the nearest known one."""
    for key in [k for k in raw if k not in known and k in table and table[k].disposition == "alias"]:
        canonical, value = table[key].of, raw.pop(key)
        if table[key].negate:
            # ignore_final_epochs: true is strict_epoch_limit: false (SimpleTuner's cmd_args.py rewrites it).
            if simpletuner.asks_for_nothing(table[key], value):
                continue
            value = simpletuner.negated(value)
            if value is None:
                problems.error(
                    where, f"{key}: must be true or false (SimpleTuner's older {canonical}, inverted)"
                )
                continue
            clash = canonical in raw and simpletuner.negated(raw[canonical]) == value
        else:
            clash = canonical in raw and raw[canonical] != value
        if clash:
            problems.error(
                where,
                f"{key}: SimpleTuner's older name for {canonical}, and both are set to different "
                f"values; keep {canonical} only",
            )
        raw.setdefault(canonical, value)
    for key in list(raw):
        if key in known:
            continue
        value = raw.pop(key)
        option = table.get(key)
        if option is None:
            near = difflib.get_close_matches(key, sorted(known | set(table)), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            problems.error(
                where, f"{key}: unknown option (value {simpletuner.shown_value(key, value)}){hint}"
            )
        elif option.disposition == "refused" and not simpletuner.asks_for_nothing(option, value):
            problems.error(
                where,
                f"{key}: SimpleTuner option refused by lokr-job: {option.reason}; {option.instead} "
                f"(value {simpletuner.shown_value(key, value)})",
            )
        elif option.name == "num_processes":
            if problem := simpletuner.world_size_problem(value):
                problems.error(where, problem)
        else:
            # Acted on elsewhere (a text_embeds key on an image backend, say) means unused here.
            reason = option.reason or "not used by this kind of entry"
            problems.warn(where, f"{key}: known SimpleTuner option, ignored by lokr-job ({reason})")
