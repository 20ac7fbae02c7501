"""The command line as a user meets it: help, usage errors and exit codes."""

import re
import subprocess
import sys

from job.cli import apply_environment_defaults, build_parser
from job.errors import ExitCode
from job.settings import job_settings


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "job", *args], capture_output=True, text=True, env=env)


def test_help_lists_every_command_and_the_exit_codes() -> None:
    result = _cli("--help")
    assert result.returncode == 0
    listed = re.findall(r"^    (\w+)  ", result.stdout, flags=re.MULTILINE)
    assert listed == ["run", "check", "fetch", "warm", "train", "publish", "infer", "export", "tiny"]
    assert "75 transient failure or preempted" in result.stdout


def test_help_does_not_import_torch_or_cloud_sdks() -> None:
    probe = (
        "import sys\n"
        "from job.cli import main\n"
        "try:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'boto3', 'huggingface_hub') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert "--config URI" in result.stdout
    assert "HEAVY []" in result.stdout


def test_each_job_option_reads_its_environment_variable(monkeypatch) -> None:
    monkeypatch.setenv("LOKR_CONFIG", "s3://bucket/config.json")
    monkeypatch.setenv("LOKR_WORKDIR", "/scratch/work")
    monkeypatch.setenv("LOKR_RUN_URI", "hf://owner/runs/run1")
    args = build_parser().parse_args(["train"])
    apply_environment_defaults(args, job_settings())
    assert (args.config, args.workdir, args.run_uri) == (
        "s3://bucket/config.json",
        "/scratch/work",
        "hf://owner/runs/run1",
    )
    for name in ("LOKR_CONFIG", "LOKR_WORKDIR", "LOKR_RUN_URI"):
        assert name in _cli("train", "--help").stdout


def test_missing_config_is_a_usage_error(tmp_path) -> None:
    result = _cli("check", env={"PATH": "", "HOME": str(tmp_path)})
    assert result.returncode == ExitCode.BAD_CONFIG
    assert "--config" in result.stderr and "LOKR_CONFIG" in result.stderr


def test_unknown_command_is_a_usage_error() -> None:
    result = _cli("launch")
    assert result.returncode == ExitCode.BAD_CONFIG
    assert "invalid choice" in result.stderr
