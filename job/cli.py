"""The ``lokr-job`` command: argument parsing, dispatch to stages, exit codes.

Only the standard library is imported at module level: ``lokr-job --help`` must answer in well under a
second, so the settings (pydantic), torch, diffusers and the cloud SDKs are imported once a command runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING

from job import __version__, distributed
from job.errors import ConfigError, ExitCode, JobError
from job.oserrors import map_os_error
from job.track.logs import log_thread_deaths, setup_logging

if TYPE_CHECKING:
    from job.settings import JobSettings

log = logging.getLogger("lokr")

STAGES = ("fetch", "warm", "train", "publish")
# Commands that stop cleanly on SIGTERM/SIGINT (exit 75 with their work saved; see job.preemption).
PREEMPTIBLE = ("run", "fetch", "warm", "train")

_EPILOG = """\
exit codes: 0 done; 2 bad config or usage; 3 bad data; 4 missing permission or credentials;
75 transient failure or preempted with state saved (retry me); 1 a bug.

quick start:
  lokr-job tiny demo/tiny                                   # a tiny model, data and config
  lokr-job run --config demo/tiny/config/config.json --workdir demo/work
"""

_COMMANDS = {
    "run": "fetch, warm, train and publish in order, skipping what is done",
    "check": "config (all errors at once), access, dataset census, steps, cache size and VRAM; no GPU",
    "fetch": "copy the config, datasets and base model into the work directory",
    "warm": "fill the latent and text-embedding caches on the work directory",
    "train": "train the LoKr adapter, or every weight (model_type full); resumes from the newest checkpoint",
    "publish": "push the adapter (or full-rank transformer), card and images to the Hub and the run URI",
    "infer": "generate images with the base model and a trained adapter or full-rank transformer",
    "export": "write the trained adapter in a form other tools load (merged: a diffusers transformer)",
    "tiny": "write a tiny random AuraFlow, a dataset and a config (the embedded default)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lokr-job",
        description="Train a LyCORIS LoKr adapter for AuraFlow as one resumable batch job.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lokr-job {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in _COMMANDS.items():
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name == "tiny":
            sub.add_argument("dest", metavar="DIR", help="folder to write the tiny job into")
            continue
        _add_job_options(sub)
        if name in ("run", "train", "publish", "check"):
            _add_recipe_option(sub)
        if name == "check":
            sub.add_argument("--json", action="store_true", help="print one JSON object instead of text")
        if name == "infer":
            from job.infer import add_infer_arguments

            add_infer_arguments(sub)
        if name == "export":
            from job.publish.export import add_export_arguments

            add_export_arguments(sub)
    return parser


def _add_job_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--config",
        default=None,
        metavar="URI",
        help="config.json: a path, file://, s3://bucket/key or hf://[datasets/]owner/repo[@rev]/path (env LOKR_CONFIG)",
    )
    sub.add_argument(
        "--workdir",
        default=None,
        metavar="PATH",
        help="local scratch (NVMe) for data, caches and checkpoints (env LOKR_WORKDIR; default ./lokr-work)",
    )
    sub.add_argument(
        "--run-uri",
        default=None,
        metavar="URI",
        help="durable remote prefix for checkpoints, status and output (env LOKR_RUN_URI)",
    )
    sub.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config.json key (repeatable), e.g. --set max_train_steps=100",
    )


def _add_recipe_option(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--recipe-change",
        choices=("refuse", "new-run", "continue"),
        default=None,
        help="when the run URI (or, without one, the work directory) holds a run of another recipe: "
        "refuse (exit 2, naming the keys that differ), new-run (move the old run to previous/ and start "
        "again) or continue (resume its checkpoints with the new settings) (env LOKR_RECIPE_CHANGE; "
        "default refuse)",
    )


def apply_environment_defaults(args: argparse.Namespace, settings: JobSettings) -> None:
    """An option not given on the command line takes its ``LOKR_*`` variable (``job.settings``)."""
    for option in ("config", "workdir", "run_uri", "recipe_change"):
        if hasattr(args, option) and getattr(args, option) is None:
            setattr(args, option, getattr(settings, option))


def main(argv: Sequence[str] | None = None) -> int:
    code = _main(argv)
    from job.preemption import exit_if_signalled  # after --help, which answers without the settings

    # After SIGTERM/SIGINT the process exits here, not through the interpreter's seconds-long teardown.
    return exit_if_signalled(code)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from job.settings import job_settings  # after --help, which answers without pydantic

    try:
        settings = job_settings()
    except ConfigError as exc:
        # Before logging is set up: its format and level are among the settings.
        print(f"lokr-job: error: {exc.message}", file=sys.stderr)
        return int(exc.exit_code)
    apply_environment_defaults(args, settings)
    setup_logging()
    log_thread_deaths()
    if args.command in PREEMPTIBLE:
        from job import preemption

        preemption.install()
    try:
        _dispatch(args)
    except JobError as exc:
        log.debug("traceback of the failure below (for us, not the user)", exc_info=True)
        log.error("%s", exc.message)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        log.error("interrupted")
        return int(ExitCode.TRANSIENT) if args.command in PREEMPTIBLE else 130
    except Exception as exc:
        # A full disk (75) or a refused path (4), also from a worker thread or under a wrapper's exception.
        mapped = map_os_error(exc, getattr(args, "workdir", None))
        if mapped is not None:
            log.debug("traceback of the failure below (for us, not the user)", exc_info=True)
            log.error("%s", mapped.message)
            return int(mapped.exit_code)
        log.error("lokr-job hit a bug; please report it with this traceback:\n%s", traceback.format_exc())
        return int(ExitCode.BUG)
    finally:
        distributed.shutdown()
    return int(ExitCode.OK)


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "tiny":
        from job.tiny import write_tiny_job

        config = write_tiny_job(args.dest)
        print(f"tiny job written: {config}")
        print(f"next: lokr-job run --config {config} --workdir <folder>")
        return
    from job import stages
    from job.context import open_context

    if args.command == "check":
        from job.check import check_command

        check_command(
            args.config,
            args.workdir,
            args.run_uri,
            args.overrides,
            as_json=args.json,
            recipe_change=args.recipe_change,
        )
        return
    if args.command == "infer" and args.base_model and not args.config:
        from job.infer import run_infer

        run_infer(args, None)
        return
    if args.command == "export" and not args.config:
        from job.publish.export import run_export

        run_export(args, None)
        return
    if not args.config:
        raise ConfigError(
            "no config given: pass --config URI or set LOKR_CONFIG (config.json as a path, s3://bucket/key "
            "or hf://owner/repo/path)"
        )
    # A remote config set is fetched into the work directory: one process per machine first (several
    # processes of a torchrun job share it), then the others find it there.
    ctx = distributed.on_each_machine_first(
        lambda: open_context(args.config, args.workdir, args.run_uri, args.overrides)
    )
    if args.command == "infer":
        from job.infer import run_infer

        run_infer(args, ctx)
        return
    if args.command == "export":
        from job.publish.export import run_export

        run_export(args, ctx)
        return
    if args.command in (*STAGES, "run"):
        from job.lease import exclusive
        from job.track.status import reporting

        # One process per work directory (locked now), one trainer per run URI (the lease, taken once the
        # preflight passed; until then nothing is written there).
        with (
            exclusive(ctx.workdir.root, ctx.run_uri, args.command) as run_lease,
            reporting(ctx.workdir.status, ctx.run_uri, args.command),
        ):
            stages.preflight(ctx, args.command)
            run_lease.take()
            stages.claim(ctx, args.command, getattr(args, "recipe_change", "refuse"))
            getattr(stages, args.command)(ctx)
        return
    raise AssertionError(f"no dispatch for command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
