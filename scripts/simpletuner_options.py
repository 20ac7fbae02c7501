"""List every option name a SimpleTuner checkout knows, for ``tests/fixtures/simpletuner_names.json``.

Usage::

    git clone https://github.com/bghira/SimpleTuner /tmp/SimpleTuner
    python scripts/simpletuner_options.py /tmp/SimpleTuner > tests/fixtures/simpletuner_names.json

(``--commit SHA`` records the commit when the checkout is not a git work tree, e.g. a ``git archive``.)

Then give every new name a disposition in ``job/config/simpletuner_options.json`` until
``tests/test_simpletuner_options.py`` passes, and regenerate the docs with
``python scripts/config_docs.py``.

The names are read from the source with ``ast``, without importing SimpleTuner (which needs its whole
dependency tree):

- ``config``: SimpleTuner builds its argument parser from its field registry, so the registry is the
  list of ``config.json`` keys: every ``ConfigField(...)``'s ``name``, its ``arg_name`` and its
  ``aliases`` (leading ``--`` dropped), plus the legacy keys that ``cli_utils.py`` rewrites
  (``@_legacy_handler("...")``) and the ``--flag`` spellings ``cmd_args.py`` rewrites before parsing.
- ``dataset``: ``multidatabackend.json`` keys have no registry; they are the literal keys the data
  backend code reads from a backend entry (``backend.get("key")``, ``backend["key"]``,
  ``"key" in backend``), less private ``_markers`` SimpleTuner adds itself.
"""

import argparse
import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REGISTRY_DIRS = (
    "simpletuner/simpletuner_sdk/server/services/field_registry/sections",
    "simpletuner/helpers/models/field_registry",
)
CLI_UTILS = "simpletuner/helpers/configuration/cli_utils.py"
CMD_ARGS = "simpletuner/helpers/configuration/cmd_args.py"
DATA_BACKEND_DIR = "simpletuner/helpers/data_backend"
# The variable names the data backend code gives one multidatabackend.json entry.
BACKEND_VARS = frozenset({"backend", "backend_dict"})


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _literal_strings(node: ast.expr | None, env: dict[str, object] | None = None) -> list[str]:
    """The strings a literal (or a list of them, or an f-string over loop variables in ``env``) holds."""
    env = env or {}
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Name) and isinstance(env.get(node.id), str):
        return [str(env[node.id])]
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            elif (
                isinstance(value, ast.FormattedValue)
                and isinstance(value.value, ast.Name)
                and value.value.id in env
            ):
                parts.append(str(env[value.value.id]))
            else:
                return []
        return ["".join(parts)]
    if isinstance(node, ast.List | ast.Tuple):
        return [s for item in node.elts for s in _literal_strings(item, env)]
    return []


def _loop_bindings(loop: ast.For) -> list[dict[str, object]]:
    """Each iteration's variables, for a loop over literal tuples or ``range(constants)``; else none."""
    if isinstance(loop.iter, ast.Call) and getattr(loop.iter.func, "id", None) == "range":
        rows: list[object] = list(range(*(ast.literal_eval(a) for a in loop.iter.args)))
    else:
        try:
            rows = list(ast.literal_eval(loop.iter))
        except ValueError:
            return []
    if isinstance(loop.target, ast.Name):
        return [{loop.target.id: row} for row in rows]
    names = [getattr(t, "id", "") for t in getattr(loop.target, "elts", [])]
    return [dict(zip(names, row, strict=False)) for row in rows if isinstance(row, tuple)]


def _config_fields(node: ast.AST, env: dict[str, object]) -> Iterator[tuple[ast.Call, dict[str, object]]]:
    """Every ``ConfigField(...)`` call, with the loop variables in force where it is made."""
    if isinstance(node, ast.For) and (bindings := _loop_bindings(node)):
        for binding in bindings:
            for child in node.body:
                yield from _config_fields(child, {**env, **binding})
        return
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ConfigField":
        yield node, env
    for child in ast.iter_child_nodes(node):
        yield from _config_fields(child, env)


def registry_names(root: Path) -> set[str]:
    names: set[str] = set()
    for folder in REGISTRY_DIRS:
        for path in sorted((root / folder).glob("*.py")):
            for call, env in _config_fields(_parse(path), {}):
                keywords = {k.arg: k.value for k in call.keywords}
                name = _literal_strings(keywords.get("name"), env)
                if not name:
                    sys.exit(f"{path}:{call.lineno}: ConfigField name is not a literal; extend this script")
                names.update(name)
                for key in ("arg_name", "aliases"):
                    names.update(s.lstrip("-") for s in _literal_strings(keywords.get(key), env))
    return names


def legacy_names(root: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(_parse(root / CLI_UTILS)):
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                if (
                    isinstance(decorator, ast.Call)
                    and getattr(decorator.func, "id", None) == "_legacy_handler"
                ):
                    names.update(_literal_strings(decorator.args[0]))
    # cmd_args.py rewrites a few retired flags (e.g. --ignore_final_epochs) before argparse sees them.
    for node in ast.walk(_parse(root / CMD_ARGS)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("--"):
            flag = node.value.removeprefix("--").removesuffix("=")
            if flag.replace("_", "").isalnum() and "-" not in flag:
                names.add(flag)
    # "--help" is argparse's own flag, not an option.
    return {n for n in names if not n.startswith("__") and n != "help"}


def _backend_keys(tree: ast.Module) -> Iterator[str]:
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and getattr(node.func.value, "id", None) in BACKEND_VARS
            and node.args
        ):
            yield from _literal_strings(node.args[0])
        elif isinstance(node, ast.Subscript) and getattr(node.value, "id", None) in BACKEND_VARS:
            yield from _literal_strings(node.slice)
        elif (
            isinstance(node, ast.Compare)
            and isinstance(node.ops[0], ast.In | ast.NotIn)
            and getattr(node.comparators[0], "id", None) in BACKEND_VARS
        ):
            yield from _literal_strings(node.left)


def dataset_names(root: Path) -> set[str]:
    names: set[str] = set()
    for path in sorted((root / DATA_BACKEND_DIR).rglob("*.py")):
        names.update(_backend_keys(_parse(path)))
    return {n for n in names if not n.startswith("_")}


def commit_of(root: Path) -> str:
    done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{root} is not a git work tree: pass --commit SHA")
    return done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a SimpleTuner source tree")
    parser.add_argument("--commit", help="the commit the tree holds (default: git rev-parse HEAD)")
    args = parser.parse_args()
    root: Path = args.checkout
    config = registry_names(root)
    # cmd_args.py's flag strings include registry names; only the ones the registry lacks are legacy.
    config |= legacy_names(root)
    listing = {
        "repository": "bghira/SimpleTuner",
        "commit": args.commit or commit_of(root),
        "config": sorted(config),
        "dataset": sorted(dataset_names(root)),
    }
    json.dump(listing, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
