"""Write the SimpleTuner-options sections of docs/config.md and README.md from the data file.

    python scripts/config_docs.py          # rewrite the generated sections
    python scripts/config_docs.py --check  # exit 1 if they differ from the data file

The sections sit between ``<!-- simpletuner-options:begin -->`` and ``<!-- simpletuner-options:end -->``;
everything outside the markers is written by hand. ``tests/test_simpletuner_options.py`` fails when the
committed docs and ``job/config/simpletuner_options.json`` disagree.
"""

import argparse
import sys
import textwrap
from collections import Counter, defaultdict
from pathlib import Path

from job.config.simpletuner import Option, options

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- simpletuner-options:begin -->"
END = "<!-- simpletuner-options:end -->"
LABELS = {"acted_on": "acted on", "alias": "alias", "ignored": "ignored", "refused": "refused"}


def _names(entries: list[Option]) -> str:
    return ", ".join(f"`{o.name}`" + (" (older SimpleTuner)" if o.older else "") for o in entries)


def _counts(table: dict[str, Option]) -> str:
    counts = Counter(o.disposition for o in table.values())
    return ", ".join(f"{counts[d]} {LABELS[d]}" for d in LABELS)


def _inverted(option: Option) -> str:
    return " (inverted: true reads as false)" if option.negate else ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _file_section(title: str, table: dict[str, Option]) -> list[str]:
    by_kind: dict[str, list[Option]] = defaultdict(list)
    for option in table.values():
        by_kind[option.disposition].append(option)
    lines = [f"### {title}", "", f"{len(table)} names: {_counts(table)}.", ""]
    lines += ["**Acted on** (see the tables above): " + _names(by_kind["acted_on"]) + ".", ""]
    lines += ["| Older name | Read as |", "|---|---|"]
    lines += [f"| `{o.name}` | `{o.of}`{_inverted(o)} |" for o in by_kind["alias"]]
    lines += [
        "",
        "**Refused** (exit 2) unless the value asks for nothing: unset, or one of the values listed.",
        "",
    ]
    lines += ["| Option | Why | Instead | Accepted values |", "|---|---|---|---|"]
    for o in by_kind["refused"]:
        allowed = ", ".join(f"`{str(v).lower() if isinstance(v, bool) else v}`" for v in o.allowed) or "unset"
        lines.append(f"| `{o.name}` | {_cell(o.reason)} | {_cell(o.instead)} | {allowed} |")
    lines += ["", "**Ignored** (a warning naming the key and the reason):", ""]
    lines += ["| Reason | Options |", "|---|---|"]
    grouped: dict[str, list[Option]] = defaultdict(list)
    for o in by_kind["ignored"]:
        grouped[o.reason].append(o)
    lines += [f"| {_cell(reason)} | {_names(entries)} |" for reason, entries in sorted(grouped.items())]
    return [*lines, ""]


def docs_section() -> str:
    known = options()
    lines = [
        "## SimpleTuner options",
        "",
        "Every option name SimpleTuner knows (its field registry, from which its argument parser is built, "
        "the older names its config loader rewrites, and the keys its data backends read), as of "
        f"bghira/SimpleTuner `{known.commit}`, has one disposition in "
        "`job/config/simpletuner_options.json`: **acted on** (same meaning as in SimpleTuner), **alias** "
        "(an older name, read as the current one; setting both to different values is an error), "
        "**ignored** (a warning), or **refused** (exit 2: running anyway would train something other than "
        "what was asked). A name SimpleTuner does not know is an unknown option: an error naming the nearest "
        "known one. Some acted-on options accept only the values lokr-job can train: `model_family` "
        "`auraflow`, `lora_type` `lycoris`, the `base_model_precision` values above; any other value is an "
        "error. `num_processes` must equal the number of processes the job was launched with (`WORLD_SIZE`) "
        "when there is a launcher.",
        "",
        *_file_section("`config.json`", known.config),
        *_file_section("`multidatabackend.json`", known.dataset),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


def readme_section() -> str:
    known = options()
    refused = [o for o in known.config.values() if o.disposition == "refused"]
    aliases = [o for o in known.config.values() if o.disposition == "alias"]
    text = (
        f"Every option name SimpleTuner knows (bghira/SimpleTuner `{known.commit[:12]}`) has a disposition: "
        f"in `config.json` {_counts(known.config)}; in `multidatabackend.json` {_counts(known.dataset)}. "
        "Older names are read as the current ones ("
        + ", ".join(f"`{o.name}` → `{o.of}`{_inverted(o)}" for o in aliases)
        + "). An ignored option is a warning that gives the reason. A refused option is exit 2 with the reason "
        "and what to do instead, only where running anyway would train something else: in `config.json` "
        + _names(refused)
        + ". The full table is in [docs/config.md](docs/config.md#simpletuner-options)."
    )
    return textwrap.fill(text, width=105, break_long_words=False, break_on_hyphens=False) + "\n"


def replace_between_markers(text: str, body: str, where: Path) -> str:
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        sys.exit(f"{where}: markers {BEGIN} ... {END} not found")
    return f"{text[: start + len(BEGIN)]}\n{body}{text[end:]}"


def generated() -> dict[Path, str]:
    """Each file as it should be, generated sections filled in."""
    targets = {ROOT / "docs" / "config.md": docs_section(), ROOT / "README.md": readme_section()}
    return {
        path: replace_between_markers(path.read_text("utf-8"), body, path) for path, body in targets.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report drift instead of writing")
    args = parser.parse_args()
    stale = [path for path, text in generated().items() if path.read_text("utf-8") != text]
    if args.check:
        for path in stale:
            print(f"{path}: out of date; run python scripts/config_docs.py")
        sys.exit(1 if stale else 0)
    for path, text in generated().items():
        path.write_text(text, "utf-8")


if __name__ == "__main__":
    main()
