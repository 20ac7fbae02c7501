#!/usr/bin/env bash
# Downloads here the wheels the lent GPU machine's image lacks (its Python 3.12), for scripts/gpu_check.sh:
# ../shared/gpu/fetch-wheels.sh's list, plus what lokr-job imports on the training path that the shared
# list leaves out, every one at the version docker/constraints.txt pins (the versions the tests pass with).
#   bash scripts/gpu_wheels.sh [DEST=.wheels]       # then carry DEST (git-ignored) with the device tool
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
shared=$repo/../shared/gpu/fetch-wheels.sh
if [[ ! -x $shared ]]; then
  echo "gpu_wheels: $shared is missing (the shared folder beside the checkout)" >&2
  exit 2
fi

# httpx2, httpcore2, truststore: job/storage/hub.py imports httpx2 when any stage starts, and the image's
# huggingface_hub (1.x) brings httpx instead. prodigyopt: optimizer "prodigy" (imported when chosen).
# "-c FILE" rides along with the names: the shared script hands them all to pip download.
extra=(httpx2 httpcore2 truststore prodigyopt -c "$repo/docker/constraints.txt")
exec "$shared" "${1:-.wheels}" "${extra[@]}"
