#!/usr/bin/env bash
# The image's entrypoint (under tini): maps the platform's conventions onto lokr-job's, then runs the job
# with exec, so that SIGTERM reaches the job itself and its exit code is the container's.
#
#   IMAGE                        lokr-job run, all settings from the environment (the RunPod/Vast way)
#   IMAGE --set k=v ...          options alone: lokr-job run with them
#   IMAGE COMMAND [options]      lokr-job COMMAND: run, check, fetch, warm, train, publish, infer, tiny
#   IMAGE --help | --version     answered at once; so is any command's --help
#
# Read here (the job reads LOKR_CONFIG, LOKR_RUN_URI, LOKR_WORKDIR, LOKR_GRACE_SECONDS, ... itself):
#   CONFIG_URI, RUN_URI    aliases of LOKR_CONFIG and LOKR_RUN_URI, used when those are unset
#   LOKR_NPROC_PER_NODE    processes (GPUs) on this machine; >1 or "gpu" (all visible GPUs) runs the job
#                          under torchrun (docker/launch.py). Default 1: one process, no launcher
#   LOKR_NNODES            machines in a multi-node run (default 1); then also
#   LOKR_NODE_RANK         this machine's rank (default: $JOB_COMPLETION_INDEX of an Indexed Job, else 0)
#   LOKR_MASTER_ADDR       rank 0's address (default localhost), LOKR_MASTER_PORT (default 29500)
#   LOKR_RUNPOD_ON_EXIT    on RunPod (RUNPOD_POD_ID set): stop | remove | none (default stop). RunPod
#                          restarts a pod's container when it exits, so a finished job would run again and
#                          bill forever; after a final exit (anything but 75 or a signal) the pod is
#                          stopped (remove: deleted) with the pod-scoped runpodctl
#
# Started as root (the image's default), it creates the work directories, gives them to the `lokr` user
# and drops to it before anything else runs: mounted volumes (/workspace on RunPod, Vast, `docker run -v`)
# are usually root-owned. Started as another user (`--user`, Kubernetes runAsUser), it only checks.
set -euo pipefail

log() { printf 'entrypoint: %s\n' "$*" >&2; }
die() { # die CODE MESSAGE: the job's exit codes (2 bad config, 4 no permission)
    log "$2"
    exit "$1"
}

# No arguments, or options alone: `run`. Anything else is lokr-job's to parse (and to refuse, exit 2).
if (($# == 0)) || [[ "$1" == -* && "$1" != -h && "$1" != --help && "$1" != --version ]]; then
    set -- run "$@"
fi
subcommand="$1"
# Help and version need no config, no directories and no user switch: answer before any of it.
for arg in "$@"; do
    case "$arg" in -h | --help | --version) exec lokr-job "$@" ;; esac
done

# Only exported when set: an empty LOKR_CONFIG would hide the CLI's own "no config given" (exit 2) for
# the commands that need one, and a --config argument serves as well.
if [[ -n "${LOKR_CONFIG:-${CONFIG_URI:-}}" ]]; then
    export LOKR_CONFIG="${LOKR_CONFIG:-${CONFIG_URI:-}}"
fi
if [[ -n "${LOKR_RUN_URI:-${RUN_URI:-}}" ]]; then
    export LOKR_RUN_URI="${LOKR_RUN_URI:-${RUN_URI:-}}"
fi

if [[ -n "${RUNPOD_POD_ID:-}" ]]; then
    platform="runpod pod $RUNPOD_POD_ID"
elif [[ -n "${VAST_CONTAINERLABEL:-}" || -n "${CONTAINER_ID:-}" ]]; then
    platform="vast instance ${CONTAINER_ID:-${VAST_CONTAINERLABEL#C.}}"
elif [[ -n "${KUBERNETES_SERVICE_HOST:-}" ]]; then
    platform="kubernetes pod ${HOSTNAME:-?}"
else
    platform="docker"
fi
log "platform: $platform; workdir ${LOKR_WORKDIR:-<unset>}; run uri ${LOKR_RUN_URI:-<unset>: checkpoints stay on this machine}"

# Local directories the job writes: the work dir, the HF cache, and a run URI that is a local path
# (a RunPod network volume, say).
dirs=()
[[ -n "${LOKR_WORKDIR:-}" ]] && dirs+=("$LOKR_WORKDIR")
[[ -n "${HF_HOME:-}" ]] && dirs+=("$HF_HOME")
case "${LOKR_RUN_URI:-}" in
    "" | s3://* | hf://*) ;;
    file://*) dirs+=("${LOKR_RUN_URI#file://}") ;;
    *://*) ;;
    *) dirs+=("$LOKR_RUN_URI") ;;
esac

drop=()
if [[ "$(id -u)" == 0 ]] && id lokr >/dev/null 2>&1; then
    for d in "${dirs[@]}"; do
        mkdir -p "$d"
        # Only what is not lokr's yet: cheap on a warm cache, and never beyond our own directories.
        find "$d" ! -user lokr -exec chown -h lokr:lokr {} +
    done
    export HOME=/home/lokr USER=lokr
    drop=(setpriv --reuid=lokr --regid=lokr --init-groups --)
else
    [[ "$(id -u)" == 0 ]] && log "running as root: there is no 'lokr' user to drop to"
    for d in "${dirs[@]}"; do
        if ! mkdir -p "$d" 2>/dev/null || [[ ! -w "$d" ]]; then
            die 4 "$d is not writable by uid $(id -u): start the container as root (the default; it fixes
ownership and drops to uid 1000), chown the volume to $(id -u), or point LOKR_WORKDIR/HF_HOME elsewhere"
        fi
    done
fi

cmd=(lokr-job "$@")
nproc="${LOKR_NPROC_PER_NODE:-1}"
nnodes="${LOKR_NNODES:-1}"
# The stages share the work among the processes of a torchrun job; check, infer and tiny are one
# process's work (N copies would print N reports, or write one tiny job N times at once).
case "$subcommand" in run | fetch | warm | train | publish) ;; *) nproc=1 nnodes=1 ;; esac
if [[ "$nproc" != 1 || "$nnodes" != 1 ]]; then
    launch=(python3 "$(dirname "${BASH_SOURCE[0]}")/launch.py" --nproc-per-node "$nproc" --nnodes "$nnodes")
    if [[ "$nnodes" != 1 ]]; then
        launch+=(--node-rank "${LOKR_NODE_RANK:-${JOB_COMPLETION_INDEX:-0}}"
            --master-addr "${LOKR_MASTER_ADDR:-localhost}" --master-port "${LOKR_MASTER_PORT:-29500}")
    else
        # One machine: rendezvous on a free local port, so jobs sharing a host's network never clash.
        launch+=(--standalone)
    fi
    cmd=("${launch[@]}" --no-python "${cmd[@]}")
fi
cmd=("${drop[@]}" "${cmd[@]}")

on_exit="${LOKR_RUNPOD_ON_EXIT:-stop}"
if [[ -z "${RUNPOD_POD_ID:-}" || "$on_exit" == none ]]; then
    log "exec: ${cmd[*]}"
    exec "${cmd[@]}"
fi

# RunPod: stay as the parent so the pod can be stopped afterwards; forward the signals tini gives us.
log "run: ${cmd[*]} (then runpodctl $on_exit pod on a final exit)"
"${cmd[@]}" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' TERM
trap 'kill -INT "$child" 2>/dev/null || true' INT
rc=0
wait "$child" || rc=$?
while kill -0 "$child" 2>/dev/null; do # a trapped signal interrupts wait; wait for the real exit
    rc=0
    wait "$child" || rc=$?
done
if ((rc == 75 || rc > 128)); then
    log "exit $rc: leaving the pod up so that RunPod restarts the container and the job resumes"
elif ! command -v runpodctl >/dev/null; then
    log "exit $rc: runpodctl is not in this pod; stop it yourself, or it keeps restarting and billing"
else
    log "exit $rc: runpodctl $on_exit pod $RUNPOD_POD_ID"
    runpodctl "$on_exit" pod "$RUNPOD_POD_ID" || log "runpodctl $on_exit failed: stop the pod yourself"
fi
exit "$rc"
