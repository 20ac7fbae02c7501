#!/usr/bin/env bash
# CI smoke test: the whole job on the tiny config, started the way the image starts it.
#
#   scripts/smoke.sh [DIR]     (DIR: where to build and run; default a temporary folder, removed after)
#
# 1. `lokr-job tiny` writes a tiny random AuraFlow, a dataset and a config;
# 2. docker/entrypoint.sh (the image's ENTRYPOINT, under tini there) runs `lokr-job run` on it: as a user
#    other than root, or root without a `lokr` user as here, it only checks the directories; set
#    LOKR_NPROC_PER_NODE=2 to run it as two processes through docker/launch.py;
# 3. the adapter loads back into the tiny transformer (every module it names is found, and merging it
#    changes the weights), and `lokr-job infer` renders a PNG with it.
# lokr-job and python3 are the ones on PATH (the image's, or CI's virtual environment).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -gt 0 ]]; then
    dir="$1"
    mkdir -p "$dir"
else
    dir="$(mktemp -d)"
    trap 'rm -rf "$dir"' EXIT
fi
# Readable by the `lokr` user the entrypoint drops to when this runs as root inside the image.
chmod go+rx "$dir"
log() { printf 'smoke: %s\n' "$*" >&2; }

log "building the tiny job in $dir/tiny"
lokr-job tiny "$dir/tiny" >/dev/null
config="$dir/tiny/config/config.json"

log "running it through docker/entrypoint.sh"
# Hermetic: no run URI, Hub push or platform hooks from the caller's environment.
env -u LOKR_RUN_URI -u RUN_URI -u CONFIG_URI -u RUNPOD_POD_ID \
    LOKR_CONFIG="$config" LOKR_WORKDIR="$dir/work" \
    bash "$root/docker/entrypoint.sh"
adapter="$dir/work/output/pytorch_lora_weights.safetensors"
[[ -s "$adapter" ]] || {
    log "FAIL: the job exited 0 but wrote no adapter at $adapter"
    exit 1
}

log "loading $adapter into the tiny transformer"
python3 - "$dir/tiny/model" "$adapter" <<'PY'
import sys

import torch
from diffusers import AuraFlowTransformer2DModel
from lycoris import create_lycoris_from_weights
from safetensors import safe_open

model, adapter = sys.argv[1], sys.argv[2]
transformer = AuraFlowTransformer2DModel.from_pretrained(model, subfolder="transformer")
before = {name: p.detach().clone() for name, p in transformer.named_parameters()}
network, _ = create_lycoris_from_weights(1.0, adapter, transformer)
with safe_open(adapter, "pt") as handle:
    named = {key.split(".")[0] for key in handle.keys()}
assert network.loras and len(network.loras) == len(named), (len(network.loras), len(named))
network.merge_to(1.0)
changed = [name for name, p in transformer.named_parameters() if not torch.equal(p, before[name])]
assert changed, "merging the adapter changed no weight"
print(f"smoke: adapter loads: {len(network.loras)} LoKr modules, {len(changed)} weights changed")
PY

log "rendering with lokr-job infer"
lokr-job infer --config "$config" --workdir "$dir/work" --out "$dir/infer" --steps 2
pngs=("$dir"/infer/*.png)
[[ -s "${pngs[0]}" ]] || {
    log "FAIL: lokr-job infer wrote no PNG in $dir/infer"
    exit 1
}
log "OK: ${#pngs[@]} image(s) in $dir/infer"
