#!/usr/bin/env bash
# Installs lokr-job and its pinned dependencies into a virtual environment. The image build runs it (CUDA
# torch) and so does CI (CPU torch), so that both test the same install path. Settings, by environment:
#
#   LOKR_VENV        venv to create, or to reuse if it exists          default /opt/venv
#   PYTHON           interpreter that creates the venv                 default python3
#   TORCH_INDEX_URL  index torch comes from; set it empty to use pip's  default https://download.pytorch.org/whl/cu128
#                    own configuration (PyPI, find-links: CI's CPU wheel)
#   TORCH_SPEC       torch requirement                                 default the torch== line of constraints.txt
#   LOKR_EXTRAS      extras of lokr-job to install, comma-separated    default none (CI: dev)
#   LOKR_INSTALL     all | deps                                        default all
#                    deps: torch and the pinned dependencies only (the image's cacheable layer; the
#                    image installs lokr-job itself from a wheel, in a layer of its own)
#   LOKR_EDITABLE    1: pip install -e (a developer's or CI's checkout) default 0
#   LOKR_CA_BUNDLE   CA bundle pip trusts, used when the file exists    default none
#                    (the image build's `ca-bundle` secret, for a network that re-signs TLS)
#
# Example (CI):  LOKR_VENV=.venv TORCH_INDEX_URL= LOKR_EXTRAS=dev LOKR_EDITABLE=1 docker/install.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
project="$(dirname "$here")"
constraints="$here/constraints.txt"
venv="${LOKR_VENV:-/opt/venv}"
python="${PYTHON:-python3}"
torch_index="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cu128}"  # '-': an empty value means "none"
torch_spec="${TORCH_SPEC:-$(grep -m1 '^torch==' "$constraints")}"
extras="${LOKR_EXTRAS:-}"
mode="${LOKR_INSTALL:-all}"
editable="${LOKR_EDITABLE:-0}"
if [[ -s "${LOKR_CA_BUNDLE:-}" ]]; then
    export PIP_CERT="$LOKR_CA_BUNDLE"
fi

case "$mode" in all | deps) ;; *)
    echo "install.sh: LOKR_INSTALL must be all or deps, not '$mode'" >&2
    exit 2
    ;;
esac

[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)

# torch first, from the index that decides its build: with --index-url pip cannot pick PyPI's
# default build instead. Its nvidia-*/triton dependencies come pinned by the wheel itself.
if [[ -n "$torch_index" ]]; then
    "${pip[@]}" install --index-url "$torch_index" "$torch_spec"
else
    "${pip[@]}" install "$torch_spec"
fi

if [[ "$mode" == deps ]]; then
    # Only the dependencies named in pyproject.toml (and the extras'), so this layer does not change
    # when job/ does. The installed torch satisfies the torch pin, so it stays.
    mapfile -t deps < <("$venv/bin/python" - "$project/pyproject.toml" "$extras" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
deps = list(project["dependencies"])
for extra in filter(None, sys.argv[2].split(",")):
    deps += project["optional-dependencies"][extra.strip()]
print("\n".join(deps))
PY
    )
    "${pip[@]}" install -c "$constraints" "${deps[@]}"
else
    target="$project"
    [[ -n "$extras" ]] && target="${project}[${extras}]"
    args=(-c "$constraints")
    [[ "$editable" == 1 ]] && args+=(-e)
    "${pip[@]}" install "${args[@]}" "$target"
fi

"${pip[@]}" check
