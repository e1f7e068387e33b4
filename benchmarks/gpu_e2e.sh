#!/usr/bin/env bash
# Stages vLLM onto a GPU host that has no package index and runs benchmarks/e2e_serve.py there.
#
# Here (a machine with pip access), once:
#   bash benchmarks/gpu_e2e.sh wheelhouse          # ../shared/gpu/make-wheelhouse.sh .gpu 58 -> .gpu/p0..pN
# /.gpu/ must be ignored (the common git dir's info/exclude has it), and each part (58 MiB) travels
# with the working tree in one device call (64 MiB a call, the repository included).
#
# On the GPU host, one device call per step, back to back (a machine stays warm for only ~30 s
# after a call, and /tmp/pmod-stage, /tmp/pmod-site and the ignored .gpu/models live on it):
#   bash benchmarks/gpu_e2e.sh stage 0             # carry .gpu/p0: copies the part into /tmp/pmod-stage
#   bash benchmarks/gpu_e2e.sh stage 1             # carry .gpu/p1 ...
#   bash benchmarks/gpu_e2e.sh stage N install     # carry .gpu/pN (the last part, with install.sh):
#                                                  #   install vLLM into /tmp/pmod-site, this repo
#                                                  #   (pip -e), the model dirs (.gpu/models)
#   bash benchmarks/gpu_e2e.sh exact               # float32 exactness of the tiny checkpoint (compile + CUDA
#                                                  #   graphs, a replay pass with prefix-cache hits) into
#                                                  #   $OUT/exact_fp32.json; pass PMOD_* settings in the env
#   bash benchmarks/gpu_e2e.sh run [E2E ARGS...]   # e2e_serve into /tmp/e2e-out, then e2e_serve.json
#                                                  #   and a tarball of every log/result to $OUT
# `run` repeats the cheap parts of `install` (env, pip -e, model dirs), so it also works alone on
# a machine where `install` ran before. With `--engines pmod` and `--engines baseline` in two calls
# (same warm machine), each server gets a whole call; merge the two files here with
#   python -m benchmarks.e2e_serve --merge e2e_pmod.json e2e_baseline.json --out benchmarks/results/
# With PMOD_ROUTED_STEP_COMPILE set (e.g. inductor against the default), p-MoD's files are named
# e2e_pmod-<setting>.json (...-maxtargets<N> with PMOD_ROUTED_STEP_COMPILE_MAX_TARGETS set); with
# PMOD_COALESCE_IMAGE_ADMISSIONS=1, e2e_pmod[-<setting>]-coalesce.json; with
# PMOD_RESERVE_PROMPTS_IN_PROGRESS=0, ...-noreserve.json; with PMOD_CUDA_SYNC_DEBUG set (a
# diagnostic, not a measurement), ...-syncdebug.json.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
stage=/tmp/pmod-stage
step=${1:?usage: gpu_e2e.sh wheelhouse | stage N [install] | install | run [e2e_serve args]}
shift

gpu_env() {
  [ -f /tmp/pmod-site/.complete ] || bash "$stage/install.sh" >/dev/null
  eval "$(bash "$stage/install.sh")"
  python3 -m pip install -q --no-deps --no-build-isolation -e .
  python3 -m benchmarks.models .gpu/models >/dev/null
}

case "$step" in
  wheelhouse)
    git check-ignore -q .gpu/p0 || { echo "error: .gpu/ is not ignored (add /.gpu/ to info/exclude)" >&2; exit 1; }
    bash ../shared/gpu/make-wheelhouse.sh .gpu "${1:-58}"
    ;;
  stage)
    part=${1:?stage N}
    shift
    mkdir -p "$stage"
    cp ".gpu/p$part"/* "$stage/"
    ls -la "$stage"
    if [ "${1:-}" = install ]; then
      exec bash "$0" install
    fi
    ;;
  install)
    ls "$stage"/install.sh >/dev/null
    start=$(date +%s)
    gpu_env
    python3 -c 'import vllm, pmod_serve, torch; print("vllm", vllm.__version__, "torch", torch.__version__, torch.cuda.get_device_name(0))'
    echo "install: $(( $(date +%s) - start )) s"
    ;;
  exact)
    gpu_env
    python3 -m benchmarks.models .gpu/models --with-tiny-checkpoints >/dev/null
    check=(python3 -m benchmarks.exact --checkpoint .gpu/models/tiny-next --variant next --dtype float32
           --attention-backend TRITON_ATTN --check exact --reference-cache .gpu/models/reference-next.json)
    # The reference first, in a process of its own (computed beside a forked engine, it hangs).
    TRITON_F32_DEFAULT=ieee "${check[@]}" --reference-only
    TRITON_F32_DEFAULT=ieee "${check[@]}" --passes 2 --out "${OUT:-/tmp}/exact_fp32.json"
    ;;
  run)
    gpu_env
    out=/tmp/e2e-out
    rm -rf "$out"
    rc=0
    PYTHONUNBUFFERED=1 python3 -m benchmarks.e2e_serve --out "$out" --models .gpu/models "$@" || rc=$?
    if [ -n "${OUT:-}" ]; then
      name=e2e_serve
      case " $* " in
        *" --engines pmod "*) name=e2e_pmod ;;
        *" --engines baseline "*) name=e2e_baseline ;;
      esac
      # p-MoD runs of several routed-step settings in one session (eager vs compiled) keep apart.
      if [ "$name" != e2e_baseline ] && [ -n "${PMOD_ROUTED_STEP_COMPILE:-}" ]; then
        name="$name-$PMOD_ROUTED_STEP_COMPILE"
      fi
      if [ "$name" != e2e_baseline ] && [ -n "${PMOD_ROUTED_STEP_COMPILE_MAX_TARGETS:-}" ]; then
        name="$name-maxtargets$PMOD_ROUTED_STEP_COMPILE_MAX_TARGETS"
      fi
      if [ "$name" != e2e_baseline ] && [ "${PMOD_COALESCE_IMAGE_ADMISSIONS:-}" = 1 ]; then
        name="$name-coalesce"
      fi
      if [ "$name" != e2e_baseline ] && [ "${PMOD_RESERVE_PROMPTS_IN_PROGRESS:-}" = 0 ]; then
        name="$name-noreserve"
      fi
      if [ "$name" != e2e_baseline ] && [ -n "${PMOD_CUDA_SYNC_DEBUG:-}" ]; then
        name="$name-syncdebug"
      fi
      [ -f "$out/e2e_serve.json" ] && cp "$out/e2e_serve.json" "$OUT/$name.json"
      # Profiler traces (--profile-run) travel on their own, where small enough to come back.
      tar -czf "$OUT/$name-files.tgz" --exclude='*.pt.trace.json*' -C "$(dirname "$out")" "$(basename "$out")"
      find "$out" -name '*.pt.trace.json.gz' -size -15M | while read -r trace; do
        cp "$trace" "$OUT/$(basename "$(dirname "$trace")").pt.trace.json.gz"
      done
    fi
    exit $rc
    ;;
  *)
    echo "unknown step $step" >&2
    exit 2
    ;;
esac
