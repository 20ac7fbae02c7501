# lokr-job: trains a LyCORIS LoKr adapter for AuraFlow as a batch job.
#   docker build -t lokr-job .
#   docker run --gpus all --shm-size 16g --stop-timeout 60 -v /workspace:/workspace \
#     -e LOKR_CONFIG=s3://bucket/run/config/config.json -e LOKR_RUN_URI=s3://bucket/run -e HF_TOKEN lokr-job
#   docker run lokr-job --help          # or: check --config ..., tiny DIR, any lokr-job command
# docs/runpod.md, docs/vast.md and docs/kubernetes.md say more.
#
# Base: CUDA 12.8 because the torch pin is installed from PyTorch's cu128 index: those wheels target
# CUDA 12.8, the first to cover Blackwell as well as Ampere/Ada/Hopper, and run on any 12.x driver
# (>= 525 via minor-version compatibility, >= 570 for everything). Keep the two in step.
# The `base` flavour, not `runtime`/`cudnn-runtime`: the cu128 wheels bring their own CUDA runtime,
# cuBLAS, cuDNN and NCCL as nvidia-* packages and load those, so the image's copies would only add
# gigabytes to every pull on a rented machine. What `base` gives is what matters here: the
# NVIDIA_* variables that make the container toolkit mount the driver, and Ubuntu 24.04's Python 3.12.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

FROM ${CUDA_IMAGE} AS deps
ARG DEBIAN_FRONTEND=noninteractive
# Distribution packages are not pinned: the base tag fixes the release and Ubuntu replaces old versions
# in its archive, so exact pins would break every rebuild after a security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential ca-certificates python3 python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Extras to bake in, e.g. "deepspeed" (not pinned in docker/constraints.txt; its JIT ops need nvcc).
ARG EXTRAS=""
# A network that re-signs TLS (a corporate proxy) needs its CA bundle for pip; it comes in as a build
# secret, never as a layer:  docker build --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LOKR_VENV=/opt/venv \
    LOKR_EXTRAS=${EXTRAS} \
    LOKR_CA_BUNDLE=/run/secrets/ca-bundle \
    TORCH_INDEX_URL=${TORCH_INDEX_URL}
# Only what decides the dependencies: this stage (torch alone is gigabytes) survives every change
# under job/, and so does the runtime layer copied from it.
COPY docker/install.sh docker/constraints.txt docker/
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=ca-bundle \
    LOKR_INSTALL=deps bash docker/install.sh

# lokr-job itself, as a wheel: the runtime stage installs it in a layer of its own (hundreds of KB), so
# a code change ships that layer and not the venv.
FROM deps AS project
COPY README.md ./
COPY job/ job/
# The venv's own setuptools (torch needs it) builds it: no isolated build environment to download.
RUN /opt/venv/bin/python -m pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

FROM ${CUDA_IMAGE} AS runtime
ARG CUDA_IMAGE
ARG DEBIAN_FRONTEND=noninteractive
# No compilers here: python3 for the venv, tini as PID 1 (forwards SIGTERM, reaps zombies; Kubernetes
# has no `docker run --init`), CA certificates for S3 and the Hub. setpriv (util-linux) is in the base.
# The base image's `ubuntu` user holds uid 1000; the job's user takes it over.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 tini \
    && rm -rf /var/lib/apt/lists/* \
    && (userdel --remove ubuntu 2>/dev/null || true) \
    && (groupdel ubuntu 2>/dev/null || true) \
    && groupadd --gid 1000 lokr \
    && useradd --uid 1000 --gid lokr --create-home --shell /bin/bash lokr \
    && mkdir -p /workspace/lokr /workspace/hf \
    && chown -R lokr:lokr /workspace
COPY --from=deps /opt/venv /opt/venv
COPY --chmod=0755 docker/entrypoint.sh docker/launch.py /opt/lokr/docker/
# Last, so that a code change rebuilds this small layer and nothing before it.
RUN --mount=type=bind,from=project,source=/wheels,target=/wheels \
    /opt/venv/bin/python -m pip install --no-deps --no-index --no-cache-dir /wheels/*.whl

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="lokr-job" \
      org.opencontainers.image.description="Batch job that trains a LyCORIS LoKr adapter for AuraFlow and publishes it" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${CUDA_IMAGE}"

# /workspace is the persistent volume on RunPod and the conventional one on Vast; the work dir (NVMe
# scratch: data, caches, checkpoints) and the Hugging Face cache live on it so a restart on the same
# machine finds them. The durable state is LOKR_RUN_URI, not this folder. No VOLUME: Docker would make
# an anonymous volume of it on every `docker run` and leave it behind; mount one by name or host path.
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    LOKR_WORKDIR=/workspace/lokr \
    HF_HOME=/workspace/hf
WORKDIR /workspace

# A batch job has no endpoint to probe: it is healthy while it runs, and its exit code says the rest.
HEALTHCHECK NONE

# No USER: the entrypoint starts as root only to create the work directories and give them to uid 1000
# (mounted volumes are root-owned on RunPod, Vast and `docker run -v`), then drops to `lokr` with setpriv
# before the job starts. `--user 1000` or Kubernetes' runAsUser skip that step entirely.
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/lokr/docker/entrypoint.sh"]
CMD []
