# syntax=docker/dockerfile:1
#
# pmod-serve: vLLM 0.26 + the pmod_serve plugin (p-MoD LLaVA with per-layer compacted KV cache).
#
#   docker build -t pmod-serve:dev .
#   docker run --gpus all -p 8000:8000 -v pmod-models:/models \
#       -e VLLM_API_KEY=... pmod-serve:dev                      # serves $PMOD_MODEL
#   docker run ... pmod-serve:dev MCG-NJU/p-MoD-LLaVA-v1.5-7B --max-model-len 4096
#
# `make deploy-check` lints this file (hadolint) and checks the base image tag, the transformers
# pin, the UID, the port and the health path against the rest of the repo (deploy/check.py).
# No image is built there.

FROM vllm/vllm-openai:v0.26.0

# transformers 5.17+ breaks vLLM 0.26's LLaVA imports; the base image ships an unpinned 5.x.
ARG TRANSFORMERS_VERSION=5.16.0
# Ray is an optional vLLM dependency (not in the base image); only the multinode overlay needs it.
# Pin taken from vLLM 0.26.0's own test requirements (requirements/test/cuda.txt: ray==2.48.0).
ARG WITH_RAY=1
ARG RAY_VERSION=2.48.0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

WORKDIR /opt/pmod-serve

# Only what the wheel build needs (see .dockerignore, which allow-lists these paths): the
# packages pyproject's [tool.setuptools.packages.find] includes that exist in the repo, and its
# readme. (deploy/check.py fails when a package directory appears that is not copied here.)
# loadtests/ (the load-test client) is in that list, so it ships in the wheel too; its imports
# (vllm, numpy, aiohttp, tqdm, pillow, prometheus_client) are vLLM 0.26 itself or its requirements.
COPY pyproject.toml README.md ./
COPY pmod_serve ./pmod_serve
COPY model_registry ./model_registry
COPY loadtests ./loadtests
# The trained demo model (pmod-serve --demo) and its package.
COPY pmod_train ./pmod_train

# --no-deps: vLLM, torch and friends come from the base image and must not be re-resolved.
# transformers is then pinned with its own dependencies. The last command fails the build if the
# versions drift, the plugin entry point is not registered or the `pmod-serve` script (which the
# entrypoint execs) is not on PATH.
RUN python3 -m pip install --no-cache-dir --no-deps . \
    && python3 -m pip install --no-cache-dir "transformers==${TRANSFORMERS_VERSION}" \
    && if [ "${WITH_RAY}" = "1" ]; then \
         python3 -m pip install --no-cache-dir "ray[cgraph]==${RAY_VERSION}"; \
       fi \
    && python3 -c "import importlib.metadata as m, shutil, sys; \
v = {d: m.version(d) for d in ('vllm', 'transformers', 'pmod-serve')}; print(v); \
eps = [e for e in m.entry_points(group='vllm.general_plugins') if e.name == 'pmod']; \
sys.exit(0 if v['vllm'] == '0.26.0' and v['transformers'] == '${TRANSFORMERS_VERSION}' \
and len(eps) == 1 and eps[0].value == 'pmod_serve.plugin:register' and shutil.which('pmod-serve') \
else 'version pin, vllm.general_plugins entry point or pmod-serve console script mismatch')"

COPY --chmod=0755 deploy/docker-entrypoint.sh /usr/local/bin/pmod-entrypoint

# Non-root user `pmod`: UID 10001 (above 10000, so it maps to no user of the host), GID 0 like
# the base image's own users (group-0 writable dirs). -l: no lastlog/faillog entry for a high UID.
# Model cache: Hugging Face hub cache lives on a volume (a PVC in deploy/k8s).
RUN useradd -l --uid 10001 --gid 0 --create-home --home-dir /home/pmod --shell /usr/sbin/nologin pmod \
    && mkdir -p /models \
    && chown 10001:0 /models \
    && chmod 0775 /models

ENV HF_HOME=/models \
    PMOD_MODEL=MCG-NJU/p-MoD-LLaVA-NeXT-7B \
    PMOD_OFFLINE=0 \
    VLLM_USE_V2_MODEL_RUNNER=0 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    HOME=/home/pmod

VOLUME ["/models"]

# deploy/k8s runs the pods with the same numbers (runAsUser/runAsGroup; checked by deploy/check.py).
USER 10001:0
WORKDIR /home/pmod

EXPOSE 8000

# Docker/Podman only: Kubernetes ignores HEALTHCHECK and uses the probes in deploy/k8s.
# start-period covers a first start that downloads ~15 GB of weights and loads them.
HEALTHCHECK --interval=30s --timeout=10s --start-period=1200s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://localhost:8000/health"]

ENTRYPOINT ["/usr/local/bin/pmod-entrypoint"]
