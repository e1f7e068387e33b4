#!/usr/bin/env bash
# pmod-serve container entrypoint (installed as /usr/local/bin/pmod-entrypoint by the Dockerfile).
#
# Serving is `pmod-serve <checkpoint> --port 8000 [flags]` (the package's console script:
# `vllm serve` plus production defaults: --limit-mm-per-prompt {"image": 4}, --shutdown-timeout 30
# (SIGTERM drains in-flight requests for up to 30 s); the plugin's request protections apply).
# Flags: any `vllm serve` flag, plus pmod-serve's --media-allow-host, --media-allowed-domain,
# --media-max-bytes and --media-timeout.
#
# Usage (arguments after the image name):
#   (none)                         serve $PMOD_MODEL (default MCG-NJU/p-MoD-LLaVA-NeXT-7B)
#   --flag ...                     serve $PMOD_MODEL with extra pmod-serve / `vllm serve` flags
#   <checkpoint> [--flag ...]      serve <checkpoint> (hub id or local path) with extra flags
#   ray-head [<checkpoint>] [--flag ...]
#                                  start a Ray head, wait for PMOD_RAY_CLUSTER_SIZE nodes, then pmod-serve
#                                  (add --distributed-executor-backend ray and the parallel sizes)
#   ray-worker                     join the Ray cluster at PMOD_RAY_HEAD_ADDRESS and block
#
# Environment:
#   PMOD_MODEL               checkpoint when none is given as an argument
#   PMOD_OFFLINE=1           no hub access: exports HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1
#                            (the checkpoint must already be in $HF_HOME, i.e. the /models volume)
#   VLLM_API_KEY             bearer token for /v1/* (read by vLLM itself; never put on the command line)
#   VLLM_API_KEY_FILE        file holding the key (e.g. a mounted secret); exported as VLLM_API_KEY
#   PMOD_REQUIRE_API_KEY=1   refuse to start without a non-empty API key (fail closed)
#   PMOD_RAY_HEAD_ADDRESS    Ray head host (default: $LWS_LEADER_ADDRESS, set by LeaderWorkerSet)
#   PMOD_RAY_PORT            Ray GCS port (default 6379)
#   PMOD_RAY_CLUSTER_SIZE    Ray nodes to wait for, head included (default: $LWS_GROUP_SIZE)
#   PMOD_RAY_TIMEOUT_S       how long the head waits for workers / a worker retries (default 600)
#   PMOD_PYTHON              python interpreter used for the preflight check (default python3)
#
# The OpenAI-compatible server listens on port 8000 (HEALTHCHECK, Service and probes assume it).
set -euo pipefail

readonly PMOD_PORT=8000
readonly DEFAULT_MODEL="MCG-NJU/p-MoD-LLaVA-NeXT-7B"
readonly SUPPORTED_MODELS=("MCG-NJU/p-MoD-LLaVA-NeXT-7B" "MCG-NJU/p-MoD-LLaVA-v1.5-7B")
PYTHON="${PMOD_PYTHON:-python3}"

log() { printf 'pmod-entrypoint: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 64; }

# --- vLLM engine settings required by the plugin -------------------------------------------
# p-MoD runs on vLLM's V1 model runner; keep an explicit override if the operator set one.
export VLLM_USE_V2_MODEL_RUNNER="${VLLM_USE_V2_MODEL_RUNNER:-0}"

# --- offline switch ----------------------------------------------------------------------------
case "${PMOD_OFFLINE:-0}" in
  1|true|yes) export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 ;;
  0|false|no|"") ;;
  *) die "PMOD_OFFLINE must be 0 or 1, got '${PMOD_OFFLINE}'" ;;
esac

# --- API key ---------------------------------------------------------------------------------
if [[ -n "${VLLM_API_KEY_FILE:-}" ]]; then
  [[ -r "${VLLM_API_KEY_FILE}" ]] || die "VLLM_API_KEY_FILE=${VLLM_API_KEY_FILE} is not readable"
  VLLM_API_KEY="$(tr -d '\r\n' < "${VLLM_API_KEY_FILE}")"
  export VLLM_API_KEY
fi
if [[ "${PMOD_REQUIRE_API_KEY:-0}" == "1" && -z "${VLLM_API_KEY:-}" ]]; then
  die "PMOD_REQUIRE_API_KEY=1 but VLLM_API_KEY (or VLLM_API_KEY_FILE) is empty"
fi

# --- preflight: the plugin must be installed and registered with vLLM -------------------------
preflight() {
  "${PYTHON}" - <<'PY' || die "pmod_serve plugin is not installed/registered (see message above)"
import importlib.metadata as md
import importlib.util
import sys

eps = [e for e in md.entry_points(group="vllm.general_plugins") if e.name == "pmod"]
if len(eps) != 1 or eps[0].value != "pmod_serve.plugin:register":
    sys.exit("no entry point 'pmod = pmod_serve.plugin:register' in group vllm.general_plugins: %r"
             % [(e.name, e.value) for e in eps])
if importlib.util.find_spec("pmod_serve.plugin") is None:
    sys.exit("module pmod_serve.plugin cannot be found")
PY
}

check_model() {
  local m="$1" s
  for s in "${SUPPORTED_MODELS[@]}"; do [[ "$m" == "$s" ]] && return 0; done
  if [[ -d "$m" ]]; then
    log "serving local checkpoint directory $m"
  else
    log "warning: '$m' is not one of the supported checkpoints (${SUPPORTED_MODELS[*]})"
  fi
}

warn_args() {
  local a
  for a in "$@"; do
    case "$a" in
      --api-key|--api-key=*) log "warning: --api-key puts the key in the process list; use VLLM_API_KEY" ;;
      --port|--port=*) log "warning: --port overrides ${PMOD_PORT}; HEALTHCHECK, Service and probes expect ${PMOD_PORT}" ;;
    esac
  done
}

serve() {
  local model="${PMOD_MODEL:-$DEFAULT_MODEL}"
  if [[ $# -gt 0 && "$1" != -* ]]; then
    model="$1"
    shift
  fi
  [[ -n "$model" ]] || die "no checkpoint: set PMOD_MODEL or pass one as the first argument"
  check_model "$model"
  warn_args "$@"
  preflight
  log "pmod-serve ${model} --port ${PMOD_PORT} $* (VLLM_USE_V2_MODEL_RUNNER=${VLLM_USE_V2_MODEL_RUNNER}, HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0}, api key: $([[ -n "${VLLM_API_KEY:-}" ]] && echo set || echo unset))"
  # pmod-serve takes the checkpoint as its FIRST argument; everything after it is flags.
  exec pmod-serve "$model" --port "${PMOD_PORT}" "$@"
}

ray_head() {
  local port="${PMOD_RAY_PORT:-6379}"
  local size="${PMOD_RAY_CLUSTER_SIZE:-${LWS_GROUP_SIZE:-}}"
  local timeout="${PMOD_RAY_TIMEOUT_S:-600}"
  [[ "$size" =~ ^[1-9][0-9]*$ ]] || die "PMOD_RAY_CLUSTER_SIZE (or LWS_GROUP_SIZE) must be a positive integer, got '${size}'"
  [[ "$timeout" =~ ^[0-9]+$ ]] || die "PMOD_RAY_TIMEOUT_S must be an integer, got '${timeout}'"
  ray start --head --port="${port}" --include-dashboard=false --disable-usage-stats
  local waited=0 alive
  while :; do
    alive="$("${PYTHON}" -c 'import ray; ray.init(address="auto", logging_level="ERROR"); print(sum(1 for n in ray.nodes() if n["Alive"]))' 2>/dev/null || echo 0)"
    if [[ "$alive" -ge "$size" ]]; then
      log "ray cluster ready: ${alive}/${size} nodes"
      break
    fi
    if [[ "$waited" -ge "$timeout" ]]; then
      die "timed out after ${timeout}s waiting for ray nodes (${alive}/${size} alive)"
    fi
    log "waiting for ray nodes: ${alive}/${size} alive"
    sleep 5
    waited=$((waited + 5))
  done
  serve "$@"
}

ray_worker() {
  local head="${PMOD_RAY_HEAD_ADDRESS:-${LWS_LEADER_ADDRESS:-}}"
  local port="${PMOD_RAY_PORT:-6379}"
  local timeout="${PMOD_RAY_TIMEOUT_S:-600}"
  [[ -n "$head" ]] || die "ray-worker needs PMOD_RAY_HEAD_ADDRESS (or LWS_LEADER_ADDRESS)"
  [[ "$timeout" =~ ^[0-9]+$ ]] || die "PMOD_RAY_TIMEOUT_S must be an integer, got '${timeout}'"
  local waited=0
  # `ray start --block` only returns when the node stops; retry while the head is not up yet.
  until ray start --address="${head}:${port}" --block --disable-usage-stats; do
    if [[ "$waited" -ge "$timeout" ]]; then
      die "could not join ray head ${head}:${port} within ${timeout}s"
    fi
    log "ray head ${head}:${port} not reachable yet; retrying"
    sleep 5
    waited=$((waited + 5))
  done
}

case "${1:-}" in
  ray-head) shift; ray_head "$@" ;;
  ray-worker) shift; ray_worker ;;
  *) serve "$@" ;;
esac
