#!/usr/bin/env bash
# Every GPU measurement of lokr-job in one device call, and its CPU dry run (issue 17; DESIGN §6).
#
# A later session that is lent a GPU runs it so, from the repository root:
#   1. here:  bash scripts/gpu_wheels.sh
#             (../shared/gpu/fetch-wheels.sh .wheels plus what lokr-job imports that the shared list lacks,
#             at docker/constraints.txt's versions; .wheels is git-ignored)
#   2. the device tool's run:  command "bash scripts/gpu_check.sh", carry [".wheels"], timeout_s 540
#   3. the table is at the end of the reply's output, and in $OUT/gpu_check.md and $OUT/gpu_check.json
#      (the whole log in $OUT/gpu_check.log): copy its figures into BENCHMARKS.md (section "GPU check")
#      with the date, the GPU and the command.
# The run keeps itself to 420 s (each row to its own budget) after the install below.
#
# The CPU dry run, which CI runs through tests/test_gpu_check.py:
#   bash scripts/gpu_check.sh --dry-run [--out DIR]
# Other options (--only ROWS, --no-tiny-job, --offload-dir DIR): PYTHONPATH=scripts python3 -m gpu_check -h
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

dry_run=false
for arg in "$@"; do
  if [[ $arg == --dry-run ]]; then dry_run=true; fi
done

if $dry_run; then
  # Here and in CI: the project's venv when there is one.
  default=python3
  if [[ -x .venv/bin/python ]]; then default=.venv/bin/python; fi
  python=${PYTHON:-$default}
else
  # The device machine's image lacks these packages and cannot download: install the carried wheels.
  python=${PYTHON:-python3}
  shopt -s nullglob
  wheels=(.wheels/*.whl)
  if ((${#wheels[@]} == 0)); then
    echo "gpu_check: no .wheels/*.whl: run scripts/gpu_wheels.sh here and carry .wheels" >&2
    exit 2
  fi
  "$python" -m pip install --quiet --no-index --no-deps "${wheels[@]}"
  # No build isolation: it would fetch setuptools, and nothing can be fetched there (the image has it).
  # Not fatal: gpu_check runs lokr-job from the checkout (python -m job) either way.
  "$python" -m pip install --quiet --no-index --no-deps --no-build-isolation -e . ||
    echo "gpu_check: the editable install failed; lokr-job runs from the checkout" >&2
fi

export PYTHONPATH="$repo/scripts:$repo${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n ${OUT:-} ]]; then
  # The device tool returns only the output's tail: the whole log goes back beside the table.
  mkdir -p "$OUT"
  "$python" -m gpu_check "$@" 2>&1 | tee "$OUT/gpu_check.log"
else
  exec "$python" -m gpu_check "$@"
fi
