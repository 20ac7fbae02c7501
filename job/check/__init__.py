"""``lokr-job check``: config, access, dataset census and estimates, before any GPU is rented."""

from job.check.report import CheckReport
from job.check.run import build_report, check_command, run_check

__all__ = ["CheckReport", "build_report", "check_command", "run_check"]
