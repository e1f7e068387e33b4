"""End-to-end serving benchmark: `pmod-serve` against dense `vllm serve`, driven by `vllm bench serve`.

Issue 13, "Measure" 2. One server after the other on the same machine:

  1. `pmod-serve <pmod-next-7b> --load-format dummy` (p-MoD-LLaVA-NeXT-7B, released layout);
  2. `vllm serve <llava-next-7b-hf> --load-format dummy` (vLLM's own LlavaNextForConditionalGeneration
     with identical dimensions: `benchmarks.models`),

each with vLLM's defaults otherwise (the baseline keeps torch.compile, CUDA graphs and prefix
caching; p-MoD gets what its plugin sets). Both serve the same vicuna_v1 chat template (pmod-serve
by default, the baseline through `--chat-template`: chat requests need one, and llava-hf
directories carry none here). Each server is driven by vLLM's own client, `vllm bench serve`
(`--backend openai-chat`, `--ignore-eos`, `--save-result`), one run after the other:

  | run        | dataset                                               | concurrency | reported          |
  |------------|-------------------------------------------------------|-------------|-------------------|
  | warmup     | random-mm (not reported)                              | 4           | -                 |
  | image_c1   | random-mm: one 672x672 image, 60 text tokens, 128 out | 1           | TTFT, TPOT        |
  | image_c32  | the same                                              | 32          | TPOT, requests/s  |
  | image_c256 | the same, >= 256 prompts                              | 256         | requests/s        |
  | text_c1    | random: 60 text tokens, 128 out                       | 1           | E2E, TPOT, TTFT   |
  | image_c256_1024 | as image_c256, 1,024 prompts                     | 256         | requests/s        |

`image_c256` is one burst: all 256 requests arrive at once, so its time includes the ramp (every
image prefilled before the pool is full) and the tail (the last requests decoding alone for 128
steps). `image_c256_1024` keeps 256 requests in flight for four times as many requests, so the
ramp and tail weigh a quarter as much: closer to a server's steady state.

Every run has its own dataset seed (the same for both servers), so both servers get identical
requests and no run repeats another's images (no multimodal-cache or prefix-cache replays).
While each run goes, /metrics is polled (every --poll-s seconds) for vLLM's
`vllm:kv_cache_usage_perc` and running requests: the peak usage during `image_c1` is the KV
cache one standard request holds (as a fraction of that server's pool). Scrapes before and after
each run give vLLM's server-side latency means and the engine's steps in the run
(`engine_step_counts`: steps, prompt and generated tokens per step, wall ms per step, preemptions):
at c=256 a step's time is what every decoding request waits per token. For p-MoD they also give
the KV savings: while requests run (`pmod_kv_savings_while_running`, from the block gauges) and
per finished request (`pmod_request_kv_savings_ratio`: count, mean, p10/p50/p90 of the run's
requests from the plugin's histogram, interpolated as PromQL does; deploy/SIZING.md's rows).

    python -m benchmarks.e2e_serve --out OUT_DIR                      # GPU, both servers
    python -m benchmarks.e2e_serve --out OUT_DIR --quick --tiny --baseline pmod-dense   # CPU dry run

Writes OUT_DIR/e2e_serve.json: {"gpu", "host", "vllm_version", "command", "pmod", "baseline",
"ratios": {"ttft_c1", "tpot_c1", "tpot_c32", "throughput_c256", "text_only_c1", ...}} (each
p-MoD / baseline, medians from `vllm bench serve`), plus each run's `vllm bench serve` JSON and
each server's log. A server that fails to start is reported (its log tail in the JSON) and the
other one still runs; servers are stopped (process group SIGTERM, then SIGKILL) whatever happens.

`--baseline pmod-dense` replaces the baseline by the p-MoD checkpoint's dense twin served by
pmod-serve (`benchmarks.models.write_dense_twin`): a CPU stand-in for plumbing checks only (vLLM's
llava modules need torchvision, which the CPU environment lacks). `--baseline none` skips it.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks.common import CHAT_TEMPLATE, Timer, image_size, median
from benchmarks.trace_summary import summarize_dir
from loadtests.metrics import kv_savings_point, parse_metrics

REPO = Path(__file__).resolve().parents[1]

# run name -> (dataset, concurrency, prompt-count flag, seed)
RUNS = {
    "warmup": ("random-mm", 4, "warmup_prompts", 100),
    "image_c1": ("random-mm", 1, "c1_prompts", 101),
    "image_c32": ("random-mm", 32, "c32_prompts", 102),
    "image_c256": ("random-mm", 256, "c256_prompts", 103),
    "text_c1": ("random", 1, "text_prompts", 104),
    "image_c256_1024": ("random-mm", 256, "c256_1024_prompts", 105),
}
DEFAULT_COUNTS = {"warmup_prompts": 8, "c1_prompts": 16, "c32_prompts": 128, "c256_prompts": 256, "text_prompts": 16,
                  "c256_1024_prompts": 1024}
QUICK_COUNTS = {"warmup_prompts": 1, "c1_prompts": 2, "c32_prompts": 4, "c256_prompts": 4, "text_prompts": 2,
                "c256_1024_prompts": 8}

# The bench-serve result keys kept in e2e_serve.json (the full files are saved beside it).
KEPT_KEYS = (
    "completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
    "request_throughput", "output_throughput", "total_token_throughput", "max_concurrency",
    "max_concurrent_requests",
    "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
    "mean_tpot_ms", "median_tpot_ms", "p90_tpot_ms", "p99_tpot_ms",
    "mean_itl_ms", "median_itl_ms",
    "mean_e2el_ms", "median_e2el_ms", "p90_e2el_ms", "p99_e2el_ms",
)

# vLLM's own request-latency histograms (seconds): their means over a run, from the deltas of
# `_sum` and `_count`, split a client's TTFT into where it went. vLLM stamps a request's arrival
# when the API server starts rendering it (chat template, tokenizer, image preprocessing), so
# client TTFT - server TTFT = HTTP and streaming; server TTFT - queue - prefill = rendering and
# the hand-offs between the API server and the engine core; prefill = scheduled -> first token.
SERVER_LATENCIES = {
    "ttft": "vllm:time_to_first_token_seconds",
    "queue": "vllm:request_queue_time_seconds",
    "prefill": "vllm:request_prefill_time_seconds",
    "decode": "vllm:request_decode_time_seconds",
    "inter_token": "vllm:inter_token_latency_seconds",
    "e2e": "vllm:e2e_request_latency_seconds",
}

_live: list[subprocess.Popen] = []  # process groups to end at exit


def _log(message: str) -> None:
    print(f"[e2e_serve {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _kill_group(process: subprocess.Popen, grace_s: float) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    # Whatever the leader did, nothing of its group may outlive us.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    if process in _live:
        _live.remove(process)


def _cleanup() -> None:
    for process in list(_live):
        _kill_group(process, grace_s=5)


def _on_signal(signum, frame):  # noqa: ARG001
    raise SystemExit(128 + signum)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _vllm_cli() -> list[str]:
    """`vllm` (the module form works where pip installed vLLM with --target and no script on PATH)."""
    return [sys.executable, "-m", "vllm.entrypoints.cli.main"]


def _pmod_serve_cli() -> list[str]:
    script = Path(sys.executable).parent / "pmod-serve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pmod_serve.entrypoints.server"]


# ------------------------------------------------------------------------------------------------
# /metrics
# ------------------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)$")


def metrics_text(base_url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout) as response:
        return response.read().decode()


# Histograms whose buckets are kept (under `name{le="..."}`): tokens per engine step, and each
# finished p-MoD request's KV savings.
KEPT_BUCKETS = ("vllm:iteration_tokens_total_bucket", "pmod_request_kv_savings_ratio_bucket")


def summed_samples(text: str) -> dict[str, float]:
    """Prometheus samples, summed over label sets (buckets left out, but for KEPT_BUCKETS)."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if not match:
            continue
        name = match.group(1)
        if name.endswith("_bucket"):
            if name not in KEPT_BUCKETS:
                continue
            le = re.search(r'le="([^"]*)"', match.group(2) or "")
            name = f'{name}{{le="{le.group(1) if le else ""}"}}'
        try:
            samples[name] = samples.get(name, 0.0) + float(match.group(3))
        except ValueError:
            continue
    return samples


def scrape(base_url: str, timeout: float = 5.0) -> dict[str, float]:
    """Prometheus samples of /metrics, summed over label sets (buckets left out)."""
    return summed_samples(metrics_text(base_url, timeout))


def series_per_engine(text: str, names: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """The named series per `engine` label ({engine: {name: value}}): with
    --data-parallel-size N, each engine core has its own block pool and its own series."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if not match or match.group(1) not in names:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        engine = out.setdefault(labels.get("engine", ""), {})
        engine[match.group(1)] = engine.get(match.group(1), 0.0) + float(match.group(3))
    return out


def histogram_quantiles(before: dict[str, float], after: dict[str, float], name: str,
                        quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)) -> dict[str, float]:
    """Count, mean and quantiles of a histogram's observations between two scrapes (its buckets in
    KEPT_BUCKETS), interpolated inside a bucket as PromQL's `histogram_quantile` does, so they read
    like the dashboard's; a quantile in the +Inf bucket is the highest finite bound, as there."""
    prefix = f'{name}_bucket{{le="'
    buckets = sorted((float(key[len(prefix):-2]), after[key] - before.get(key, 0.0))
                     for key in after if key.startswith(prefix))
    count = buckets[-1][1] if buckets else 0.0
    if count <= 0:
        return {}
    summary = {"count": count, "mean": (after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)) / count}
    for quantile in quantiles:
        rank = quantile * count
        lower, below = 0.0, 0.0
        for upper, cumulative in buckets:
            if cumulative >= rank:
                if upper == float("inf"):
                    value = lower
                elif cumulative > below:
                    value = lower + (upper - lower) * (rank - below) / (cumulative - below)
                else:
                    value = upper
                break
            lower, below = upper, cumulative
        summary[f"p{round(quantile * 100)}"] = value
    return summary


def server_latency_means_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean of each of vLLM's request-latency histograms over the requests between two scrapes (ms)."""
    means = {}
    for name, metric in SERVER_LATENCIES.items():
        count = after.get(f"{metric}_count", 0.0) - before.get(f"{metric}_count", 0.0)
        if count > 0:
            means[name] = 1000.0 * (after.get(f"{metric}_sum", 0.0) - before.get(f"{metric}_sum", 0.0)) / count
    return means


def _step_summary(counts: dict) -> str:
    """`engine_step_counts` as one log line."""
    return ", ".join(f"{key} {value:.1f}" if isinstance(value, float | int)
                     else f"{key} " + " ".join(f"{bucket}: {steps:.0f}" for bucket, steps in value.items())
                     for key, value in counts.items())


# Upper edges (vLLM's bucket bounds) of the step sizes reported.
STEP_TOKEN_EDGES = (512, 2048, 4096, 8192)


def engine_step_counts(before: dict[str, float], after: dict[str, float], duration_s: float | None) -> dict:
    """What the engine did between two scrapes: its steps (`vllm:iteration_tokens_total`, one
    observation per engine step), tokens per step, the run's wall time per step, and preemptions.
    A step's time is what a decoding request waits per token; tokens per step say how much
    prefill rode in each (a 672x672 image is ~3,000 prompt tokens)."""
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    steps = delta("vllm:iteration_tokens_total_count")
    counts: dict = {"preemptions": delta("vllm:num_preemptions_total"), "engine_steps": steps}
    # Steps by their token count, from vLLM's histogram (cumulative buckets): decodes with little
    # or no prefill, then steps carrying about one 672x672 image (~3,000 tokens) or two.
    at_most = {edge: delta(f'vllm:iteration_tokens_total_bucket{{le="{edge}.0"}}') for edge in STEP_TOKEN_EDGES}
    if steps > 0 and any(at_most.values()):
        low = 0
        by_tokens = {}
        for edge in STEP_TOKEN_EDGES:
            by_tokens[f"{low + 1}-{edge}"] = at_most[edge] - at_most.get(low, 0.0)
            low = edge
        by_tokens[f">{low}"] = steps - at_most[low]
        counts["steps_by_tokens"] = by_tokens
    if steps > 0:
        counts["tokens_per_step"] = delta("vllm:iteration_tokens_total_sum") / steps
        counts["prompt_tokens_per_step"] = delta("vllm:prompt_tokens_total") / steps
        counts["generation_tokens_per_step"] = delta("vllm:generation_tokens_total") / steps
        if duration_s:
            counts["wall_ms_per_step"] = 1000.0 * duration_s / steps
    return counts


_ALLOCATOR_REPORT = re.compile(r"CUDA caching allocator went to the driver in the last \d+ s: (\d+) allocation "
                               r"retries .*?, (\d+) cudaMalloc, (\d+) cudaFree")


def allocator_reports(log_text: str) -> dict[str, int]:
    """The p-MoD GPU runner's reports of allocator trips to the driver while serving
    (`pmod_serve.v1.worker.gpu_worker.AllocatorWatch`), summed over a server log."""
    totals = {"reports": 0, "alloc_retries": 0, "cuda_malloc": 0, "cuda_free": 0}
    for retries, mallocs, frees in _ALLOCATOR_REPORT.findall(log_text):
        totals["reports"] += 1
        totals["alloc_retries"] += int(retries)
        totals["cuda_malloc"] += int(mallocs)
        totals["cuda_free"] += int(frees)
    return totals


def cache_config_of(text: str) -> dict[str, str]:
    """Labels of vllm:cache_config_info (num_gpu_blocks, block_size, ...), if exported."""
    for line in text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            return dict(re.findall(r'(\w+)="([^"]*)"', line))
    return {}


# Blocks the p-MoD metrics report against the pool vLLM reports, per engine core.
BLOCK_SERIES = ("pmod_kv_blocks_in_use", "vllm:kv_cache_usage_perc", "vllm:num_requests_running")


def kv_metrics_agreement(samples: list[dict[str, dict[str, float]]], num_gpu_blocks_total: int) -> dict:
    """Per engine: how far `pmod_kv_blocks_in_use` is from the blocks vLLM's own gauge says are
    in use: `kv_cache_usage_perc` x (blocks per engine - 1) (BlockPool.get_usage leaves out the
    null block). `vllm:cache_config_info` reports num_gpu_blocks summed over the data-parallel
    engines (core_client adds every engine's), and the engines' pools are equal. The two
    series are scraped together but refreshed by different processes at step granularity, so
    mid-run they may differ by one step's allocations."""
    engines = sorted({engine for sample in samples for engine, series in sample.items()
                      if "vllm:kv_cache_usage_perc" in series})
    report: dict[str, dict] = {}
    if not engines:
        return report
    usable = num_gpu_blocks_total // len(engines) - 1
    for engine in engines:
        diffs, busy, peak_pmod, peak_pool = [], 0, 0.0, 0.0
        for sample in samples:
            series = sample.get(engine, {})
            if "pmod_kv_blocks_in_use" not in series or "vllm:kv_cache_usage_perc" not in series:
                continue
            pool_used = series["vllm:kv_cache_usage_perc"] * usable
            diffs.append(abs(series["pmod_kv_blocks_in_use"] - pool_used) / usable)
            busy += series.get("vllm:num_requests_running", 0) > 0
            peak_pmod, peak_pool = max(peak_pmod, series["pmod_kv_blocks_in_use"]), max(peak_pool, pool_used)
        diffs.sort()
        report[engine] = {"num_gpu_blocks": usable + 1, "samples": len(diffs), "busy_samples": busy,
                          "max_abs_diff_fraction_of_pool": diffs[-1] if diffs else None,
                          "median_abs_diff_fraction_of_pool": diffs[len(diffs) // 2] if diffs else None,
                          "peak_blocks_in_use": peak_pmod, "peak_pool_blocks_in_use": round(peak_pool, 1)}
    return report


def kv_metrics_agree(report: dict, num_engines: int, median_tolerance: float = 0.01,
                     peak_tolerance: float = 0.05) -> bool:
    """Every engine served requests and its p-MoD series tracks its own pool: the typical
    sample within `median_tolerance` of the pool, and the peaks within `peak_tolerance` of each
    other (a label shared by engines, or one engine's series showing the sum, fails both)."""
    return len(report) == num_engines and all(
        e["busy_samples"] > 0 and e["peak_pool_blocks_in_use"] > 0
        and e["median_abs_diff_fraction_of_pool"] <= median_tolerance
        and abs(e["peak_blocks_in_use"] - e["peak_pool_blocks_in_use"]) <= peak_tolerance * e["peak_pool_blocks_in_use"]
        for e in report.values())


def cache_config_labels(base_url: str) -> dict[str, str]:
    try:
        return cache_config_of(metrics_text(base_url))
    except Exception:
        return {}


class MetricsPoller:
    """Peak KV-cache usage and running requests while a run goes, and p-MoD's KV savings while
    requests run (the load tests' `kv_savings_point`: over several engines, 1 - blocks in use /
    their dense-layout equivalent, both summed)."""

    def __init__(self, base_url: str, interval_s: float) -> None:
        self.base_url = base_url
        self.interval_s = interval_s
        self.peak_kv_usage = None
        self.peak_running = None
        self.samples = 0
        self.per_engine: list[dict[str, dict[str, float]]] = []
        self.kv_savings: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                text = metrics_text(self.base_url, timeout=2)
            except Exception:
                continue
            metrics = summed_samples(text)
            self.samples += 1
            usage = metrics.get("vllm:kv_cache_usage_perc")
            running = metrics.get("vllm:num_requests_running")
            if usage is not None:
                self.peak_kv_usage = max(usage, self.peak_kv_usage or 0.0)
            if running is not None:
                self.peak_running = max(running, self.peak_running or 0.0)
            if "pmod_kv_blocks_in_use" in metrics:
                self.per_engine.append(series_per_engine(text, BLOCK_SERIES))
                point = kv_savings_point(parse_metrics(text))
                if running and point["busy"]:
                    self.kv_savings.append(point["kv_savings_ratio"])

    def __enter__(self):
        if self.interval_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


# ------------------------------------------------------------------------------------------------
# One server, its runs
# ------------------------------------------------------------------------------------------------


def server_command(engine: str, args, model_dir: Path, served_name: str, port: int) -> list[str]:
    common = ["--load-format", args.load_format, "--served-model-name", served_name,
              "--host", "127.0.0.1", "--port", str(port), *shlex.split(args.server_args)]
    if args.profile_run:
        common += ["--profiler-config", json.dumps(profiler_config(args, engine))]
    if engine == "pmod":
        return [*_pmod_serve_cli(), str(model_dir), *common, *shlex.split(args.pmod_args)]
    if engine == "baseline" and args.baseline == "pmod-dense":
        return [*_pmod_serve_cli(), str(model_dir), *common, *shlex.split(args.baseline_args)]
    return [*_vllm_cli(), "serve", str(model_dir), *common, "--chat-template", str(CHAT_TEMPLATE),
            *shlex.split(args.baseline_args)]


def profiler_config(args, engine: str) -> dict:
    """vLLM's torch profiler for `--profile-run`: the worker's host and device activity (at most
    `--profile-steps` engine steps), without Python stacks or the API server (they would slow the
    host further)."""
    return {"profiler": "torch", "torch_profiler_dir": str(args.out / f"trace_{engine}"),
            "torch_profiler_with_stack": False, "torch_profiler_dump_cuda_time_total": False,
            "ignore_frontend": True, "max_iterations": args.profile_steps}


def profile_window(base_url: str, args, run: str, stop: threading.Event) -> threading.Thread:
    """Profiles the server for `--profile-for-s` seconds, `--profile-at-s` seconds after it first
    runs `--profile-when-running` requests (at most the run's concurrency): the run's steady state,
    not its first steps (the engine gets the first requests while the API server still renders the
    others' images)."""
    running = min(args.profile_when_running, RUNS[run][1])
    def post(path: str) -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(base_url + path, method="POST"), timeout=120).read()
        except Exception as error:  # the summary then says that no trace was written
            _log(f"profiler {path}: {error}")

    def window() -> None:
        while not stop.wait(0.25):
            try:
                if scrape(base_url, timeout=2).get("vllm:num_requests_running", 0) >= running:
                    break
            except Exception:
                continue
        if not stop.wait(args.profile_at_s):
            post("/start_profile")
            stop.wait(args.profile_for_s)
            post("/stop_profile")

    thread = threading.Thread(target=window, daemon=True)
    thread.start()
    return thread


def bench_command(args, run: str, base_url: str, served_name: str, result_dir: Path, engine: str) -> list[str]:
    dataset, concurrency, count_flag, seed = RUNS[run]
    width, height = args.image_size
    cmd = [*_vllm_cli(), "bench", "serve",
           "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
           "--base-url", base_url, "--model", served_name, "--tokenizer", str(args.tokenizer),
           "--dataset-name", dataset, "--seed", str(seed),
           "--num-prompts", str(getattr(args, count_flag)), "--max-concurrency", str(concurrency),
           "--request-rate", "inf", "--ignore-eos", "--temperature", "0",
           "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
           "--random-range-ratio", "0",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
           "--ready-check-timeout-sec", "0", "--num-warmups", "0", "--disable-tqdm",
           "--save-result", "--save-detailed", "--result-dir", str(result_dir), "--result-filename", f"{engine}_{run}.json"]
    if dataset == "random-mm":
        cmd += ["--random-mm-base-items-per-request", "1", "--random-mm-num-mm-items-range-ratio", "0",
                "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
                "--random-mm-bucket-config", f"{{({height}, {width}, 1): 1.0}}"]
    return cmd


def ttft_after_first_wave(data: dict, concurrency: int) -> dict:
    """TTFT of the requests sent after the first `concurrency` (from `--save-detailed`'s
    per-request start times and TTFTs, in ms). The first wave arrives at once and queues behind
    its own prefills; later requests arrive as earlier ones finish, into a loaded server."""
    starts, ttfts = data.get("start_times") or [], data.get("ttfts") or []
    if len(starts) != len(ttfts) or len(ttfts) <= concurrency:
        return {}
    later = [ttft for _, ttft in sorted(zip(starts, ttfts))[concurrency:] if ttft]
    if not later:
        return {}
    # Percentiles as `vllm bench serve` computes its own (numpy's linear interpolation).
    median, p90 = np.percentile(later, [50, 90]) * 1e3
    return {"requests_after_first_wave": len(later), "median_ttft_after_first_wave_ms": float(median),
            "p90_ttft_after_first_wave_ms": float(p90)}


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def start_server(cmd: list[str], log_path: Path, cwd: Path, profiled: bool = False) -> subprocess.Popen:
    """A server in its own session (stopped with its whole group by `_kill_group`, or at exit),
    with vLLM's default processes, its output in `log_path`."""
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    if profiled:  # the model runner's phases (preprocess, forward, sample, ...) in the trace
        env["VLLM_CUSTOM_SCOPES_FOR_PROFILING"] = "1"
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(cwd),
                                   start_new_session=True)
    _live.append(process)
    return process


def run_server(engine: str, args, model_dir: Path, deadline: float, result: dict) -> dict:
    """Start the server, run the benchmark runs, stop it. Fills `result` as it goes (so an
    interrupted benchmark still reports what ran)."""
    out: Path = args.out
    served_name = engine
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = server_command(engine, args, model_dir, served_name, port)
    log_path = out / f"server_{engine}.log"
    result.update({"model_dir": str(model_dir), "server_command": shlex.join(cmd), "server_log": log_path.name,
                   "runs": {}, "bench_commands": {}})
    _log(f"{engine}: starting {shlex.join(cmd)}")
    result["gpu_memory_used_mib_at_start"] = wait_gpu_memory_free()
    start = time.monotonic()
    process = start_server(cmd, log_path, out, profiled=args.profile_run is not None)
    try:
        from pmod_serve.entrypoints.demo import wait_healthy

        try:
            wait_healthy(base_url, process, max(1.0, min(args.server_timeout_s, deadline - time.monotonic())))
        except (RuntimeError, TimeoutError) as exc:
            result["error"] = f"server did not become healthy: {exc}"
            result["server_log_tail"] = _tail(log_path)
            _log(f"{engine}: {result['error']}")
            return result
        result["startup_s"] = time.monotonic() - start
        result["cache_config"] = cache_config_labels(base_url)
        _log(f"{engine}: healthy after {result['startup_s']:.1f} s")
        for run in args.runs:
            remaining = deadline - time.monotonic()
            if remaining < args.min_run_s:
                result["runs"][run] = {"skipped": f"deadline: {remaining:.0f} s left"}
                _log(f"{engine}: {run} skipped ({remaining:.0f} s left)")
                continue
            result["runs"][run] = one_run(engine, run, args, base_url, served_name, remaining, result)
            if process.poll() is not None:
                result["error"] = f"server exited with {process.returncode} during {run}"
                result["server_log_tail"] = _tail(log_path)
                break
        try:
            final = scrape(base_url)
            result["pmod_metrics"] = {k: v for k, v in final.items() if k.startswith("pmod_")}
        except Exception:
            pass
    finally:
        _kill_group(process, grace_s=args.stop_grace_s)
        result["stopped"] = process.poll() is not None
        if engine == "pmod" and log_path.exists():
            result["allocator_driver_calls"] = allocator_reports(log_path.read_text(errors="replace"))
    return result


def one_run(engine: str, run: str, args, base_url: str, served_name: str, remaining: float, result: dict) -> dict:
    cmd = bench_command(args, run, base_url, served_name, args.out, engine)
    result["bench_commands"][run] = shlex.join(cmd)
    log_path = args.out / f"bench_{engine}_{run}.log"
    try:
        before = scrape(base_url)
    except Exception:
        before = {}
    _log(f"{engine}: {run} (concurrency {RUNS[run][1]}, {getattr(args, RUNS[run][2])} prompts)")
    started = time.monotonic()
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    with open(log_path, "w") as log, MetricsPoller(base_url, args.poll_s) as poller:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(args.out),
                                   start_new_session=True)
        _live.append(process)
        finished = threading.Event()
        profiler = profile_window(base_url, args, run, finished) if run == args.profile_run else None
        try:
            process.wait(timeout=max(1.0, remaining - 5))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(process, grace_s=5)
            finished.set()
            if profiler is not None:
                profiler.join(timeout=120)
    entry: dict = {"wall_s": time.monotonic() - started, "returncode": process.returncode,
                   "peak_kv_cache_usage": poller.peak_kv_usage, "peak_running": poller.peak_running,
                   "metrics_samples": poller.samples}
    if poller.kv_savings:
        entry["pmod_kv_savings_while_running"] = {"median": median(poller.kv_savings),
                                                  "min": min(poller.kv_savings), "max": max(poller.kv_savings),
                                                  "samples": len(poller.kv_savings)}
    if poller.per_engine:
        blocks = cache_config_labels(base_url).get("num_gpu_blocks", "")
        if blocks.isdigit():
            entry["kv_metrics_per_engine"] = kv_metrics_agreement(poller.per_engine, int(blocks))
    after = None
    try:
        after = scrape(base_url)
        for key in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total"):
            if key in after:
                entry[key.split(":", 1)[1] + "_delta"] = after[key] - before.get(key, 0.0)
        entry["server_mean_latency_ms"] = server_latency_means_ms(before, after)
        request_savings = histogram_quantiles(before, after, "pmod_request_kv_savings_ratio")
        if request_savings:
            entry["pmod_request_kv_savings_ratio"] = request_savings
    except Exception:
        pass
    duration_s = None
    result_file = args.out / f"{engine}_{run}.json"
    if timed_out:
        entry["error"] = "vllm bench serve ran past the deadline and was stopped"
    if result_file.exists() and not timed_out:
        data = json.loads(result_file.read_text())
        entry.update({k: data.get(k) for k in KEPT_KEYS if k in data})
        entry.update(ttft_after_first_wave(data, RUNS[run][1]))
        # The benchmark's duration (first request sent to last answer): the engine's busy span.
        duration_s = data.get("duration")
        entry["result_file"] = result_file.name
        if entry.get("completed") and entry.get("prompt_tokens_total_delta"):
            entry["server_prompt_tokens_per_request"] = entry["prompt_tokens_total_delta"] / entry["completed"]
    elif "error" not in entry:
        entry["error"] = f"vllm bench serve exited with {process.returncode} and wrote no result"
    if after is not None:
        entry["engine_steps"] = engine_step_counts(before, after, duration_s)
    if run == args.profile_run:
        # Not a measurement (the profiler slows the engine's host): excluded from the ratios.
        entry["profiled"] = True
        entry["trace_summary"] = summarize_dir(args.out / f"trace_{engine}")
    if "error" in entry:
        entry["log_tail"] = _tail(log_path, 2000)
        _log(f"{engine}: {run}: {entry['error']}")
    else:
        _log(f"{engine}: {run}: ttft {entry.get('median_ttft_ms')} ms, tpot {entry.get('median_tpot_ms')} ms, "
             f"e2el {entry.get('median_e2el_ms')} ms, {entry.get('request_throughput')} req/s, "
             f"peak KV {entry['peak_kv_cache_usage']}; server means (ms): "
             + ", ".join(f"{k} {v:.1f}" for k, v in entry.get("server_mean_latency_ms", {}).items())
             + "; engine steps: " + _step_summary(entry.get("engine_steps", {})))
    return entry


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

RATIOS = {
    # name: (run, key)  -- p-MoD / baseline
    "ttft_c1": ("image_c1", "median_ttft_ms"),
    "tpot_c1": ("image_c1", "median_tpot_ms"),
    "tpot_c32": ("image_c32", "median_tpot_ms"),
    "throughput_c256": ("image_c256", "request_throughput"),
    "text_only_c1": ("text_c1", "median_e2el_ms"),
    # extra context
    "throughput_c32": ("image_c32", "request_throughput"),
    "throughput_c256_1024_prompts": ("image_c256_1024", "request_throughput"),
    "ttft_c32_after_first_wave": ("image_c32", "median_ttft_after_first_wave_ms"),
    "text_only_tpot_c1": ("text_c1", "median_tpot_ms"),
    "text_only_ttft_c1": ("text_c1", "median_ttft_ms"),
    "kv_per_request": ("image_c1", "peak_kv_cache_usage"),
}


def ratio(a, b) -> float | None:
    """a / b where both are numbers and b is not 0, else None (a run that did not happen)."""
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def _measured(part: dict, run: str) -> dict:
    """An engine's result of `run`, empty if it did not run or was profiled (not a measurement)."""
    entry = part.get("runs", {}).get(run, {})
    return {} if entry.get("profiled") else entry


def ratios(pmod: dict, baseline: dict) -> dict:
    out = {}
    for name, (run, key) in RATIOS.items():
        p, b = _measured(pmod, run).get(key), _measured(baseline, run).get(key)
        out[name] = ratio(p, b)
    return out


def wait_gpu_memory_free(timeout_s: float = 60, below_mib: int = 4096) -> float | None:
    """Before a server starts: wait until the last one's GPU memory is back (nvidia-smi; no-op
    without a GPU). Returns the used MiB seen last."""
    deadline = time.monotonic() + timeout_s
    used = None
    while True:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode != 0:
            return None
        used = max(float(x) for x in out.stdout.split())
        if used < below_mib or time.monotonic() > deadline:
            return used
        time.sleep(2)


def gpu_name() -> str:
    """From nvidia-smi: a CUDA context in this process would take GPU memory from the servers."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "cpu"


def host_info() -> dict:
    """The host CPU, and how fast one of its cores runs the host work that paces a step: a pure
    Python loop (the engine's scheduling and kernel launches) and PIL's bicubic resize of a
    672x672 image to 336x336 (p-MoD's image preprocessing). Measured before the servers start,
    so that runs on different machines can be told apart by their hosts (medians of 5, ms)."""
    from PIL import Image

    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def median_ms(work, repeats: int = 5) -> float:
        times = []
        for _ in range(repeats):
            with Timer() as timer:
                work()
            times.append(timer.seconds * 1e3)
        return median(times)

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (672, 672, 3), dtype=np.uint8))
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "python_loop_ms": median_ms(lambda: sum(i * i for i in range(1_000_000))),
        "pil_bicubic_672_to_336_ms": median_ms(lambda: image.resize((336, 336), resample=Image.Resampling.BICUBIC)),
    }


def vllm_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vllm")
    except PackageNotFoundError:
        return None


def print_table(report: dict) -> None:
    rows = [("TTFT c=1 (ms)", "image_c1", "median_ttft_ms"), ("TPOT c=1 (ms)", "image_c1", "median_tpot_ms"),
            ("TPOT c=32 (ms)", "image_c32", "median_tpot_ms"), ("req/s c=32", "image_c32", "request_throughput"),
            ("req/s c=256", "image_c256", "request_throughput"),
            ("req/s c=256, 1024 prompts", "image_c256_1024", "request_throughput"),
            ("TTFT c=32 later (ms)", "image_c32", "median_ttft_after_first_wave_ms"),
            ("text E2E c=1 (ms)", "text_c1", "median_e2el_ms"),
            ("text TPOT c=1 (ms)", "text_c1", "median_tpot_ms"), ("text TTFT c=1 (ms)", "text_c1", "median_ttft_ms"),
            ("peak KV usage c=1", "image_c1", "peak_kv_cache_usage")]
    print(f"\n{'':26}{'p-MoD':>12}{'baseline':>12}{'ratio':>10}")
    for title, run, key in rows:
        p = report["pmod"].get("runs", {}).get(run, {}).get(key)
        b = report["baseline"].get("runs", {}).get(run, {}).get(key)
        r = ratio(p, b)

        def fmt(v):
            return "-" if not isinstance(v, (int, float)) else f"{v:.4g}"
        print(f"{title:26}{fmt(p):>12}{fmt(b):>12}{fmt(r):>10}")
    for engine in ("pmod", "baseline"):
        if report[engine].get("error"):
            print(f"{engine}: {report[engine]['error']}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.e2e_serve", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="output directory (e2e_serve.json, server logs, bench results); with --merge, "
                             "the merged file or its directory")
    parser.add_argument("--models", type=Path, default=REPO / ".gpu" / "models",
                        help="where benchmarks.models puts (or has put) the model directories")
    parser.add_argument("--tiny", action="store_true", help="tiny-dimension model directories (CPU dry run)")
    parser.add_argument("--pmod-model", type=Path, help="p-MoD checkpoint dir (default: MODELS/pmod-next-7b)")
    parser.add_argument("--baseline-model", type=Path,
                        help="baseline dir (default: MODELS/llava-next-7b-hf, or the dense twin of the p-MoD dir)")
    parser.add_argument("--baseline", choices=("vllm", "pmod-dense", "none"), default="vllm",
                        help="vllm: vLLM's LlavaNext (GPU); pmod-dense: the p-MoD dir's dense twin through "
                             "pmod-serve (CPU plumbing check); none: p-MoD only")
    parser.add_argument("--tokenizer", type=Path,
                        help="client tokenizer (default: the llava-hf dir: same SentencePiece model as p-MoD's)")
    parser.add_argument("--engines", type=lambda s: tuple(s.split(",")), default=("pmod", "baseline"),
                        help="pmod,baseline (one per device call, then --merge, when one call is too short)")
    parser.add_argument("--merge", type=Path, nargs="+", help="merge per-engine e2e_serve.json files into --out")
    parser.add_argument("--quick", action="store_true", help="tiny prompt counts (plumbing check)")
    for flag, value in DEFAULT_COUNTS.items():
        parser.add_argument("--" + flag.replace("_", "-"), type=int, default=None,
                            help=f"default {value} ({QUICK_COUNTS[flag]} with --quick)")
    parser.add_argument("--runs", type=lambda s: tuple(s.split(",")), default=tuple(RUNS),
                        help="comma-separated subset of " + ",".join(RUNS))
    parser.add_argument("--image-size", type=image_size, default=image_size("672x672"))
    parser.add_argument("--input-len", type=int, default=60, help="random text tokens per request")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--server-args", default="", help="extra flags for both servers (quoted string)")
    parser.add_argument("--pmod-args", default="", help="extra flags for pmod-serve")
    parser.add_argument("--baseline-args", default="", help="extra flags for the baseline server")
    parser.add_argument("--server-timeout-s", type=float, default=420)
    parser.add_argument("--stop-grace-s", type=float, default=40, help="SIGTERM -> SIGKILL (pmod-serve drains 30 s)")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="whole benchmark; the p-MoD server gets the first half (what it leaves goes to "
                             "the baseline); runs that no longer fit are skipped")
    parser.add_argument("--min-run-s", type=float, default=20, help="do not start a run with less time left")
    parser.add_argument("--poll-s", type=float, default=0.5, help="/metrics polling interval (0: off)")
    parser.add_argument("--profile-run", choices=tuple(RUNS), default=None,
                        help="profile part of this run with vLLM's torch profiler (servers get --profiler-config); "
                             "its trace is summarised (benchmarks/trace_summary.py) and its numbers are left "
                             "out of the ratios")
    parser.add_argument("--profile-when-running", type=int, default=64,
                        help="profiling starts --profile-at-s after the server first runs this many requests "
                             "(at most the run's concurrency)")
    parser.add_argument("--profile-at-s", type=float, default=3.0)
    parser.add_argument("--profile-for-s", type=float, default=1.5, help="seconds profiled")
    parser.add_argument("--profile-steps", type=int, default=64, help="at most this many engine steps profiled")
    args = parser.parse_args(argv)
    for flag in DEFAULT_COUNTS:
        if getattr(args, flag) is None:
            setattr(args, flag, (QUICK_COUNTS if args.quick else DEFAULT_COUNTS)[flag])
    unknown = set(args.runs) - set(RUNS)
    if unknown:
        parser.error(f"unknown runs {sorted(unknown)}")
    return args


def merge(paths: list[Path], out: Path) -> dict:
    """One report from per-engine reports (`--engines pmod` and `--engines baseline` run one after
    the other on the same machine, e.g. as two device calls)."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    merged = {"gpu": None, "vllm_version": None, "command": "", "commands": [], "merged_from": [str(p) for p in paths],
              "pmod": {}, "baseline": {}, "ratios": {}}
    for report in reports:
        for key in ("gpu", "vllm_version", "date_utc", "baseline_kind", "settings"):
            if merged.get(key) is None and report.get(key) is not None:
                merged[key] = report[key]
        if report.get("gpu") != merged["gpu"]:
            merged.setdefault("warnings", []).append(f"different GPUs: {report.get('gpu')} vs {merged['gpu']}")
        # Each server's run records its host (the same machine gives about the same numbers).
        merged.setdefault("hosts", []).append(report.get("host"))
        merged["commands"] += report.get("commands") or [report["command"]]
        for engine in ("pmod", "baseline"):
            part = report.get(engine, {})
            if not (part.get("runs") or part.get("error")):
                continue
            if not merged[engine].get("runs"):
                merged[engine] = part
                continue
            # The same engine again (a later server of the same session, e.g. for the runs a
            # deadline cut): its completed runs replace the earlier ones.
            for run, entry in part.get("runs", {}).items():
                if "error" not in entry and "skipped" not in entry:
                    merged[engine]["runs"][run] = entry
                    merged[engine].setdefault("runs_from_later_server", {})[run] = part.get("server_command")
    merged["command"] = " ; ".join(merged["commands"])
    merged["ratios"] = ratios(merged["pmod"], merged["baseline"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=2) + "\n")
    return merged


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python -m benchmarks.e2e_serve " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.merge:
        out = args.out / "e2e_serve.json" if args.out.suffix != ".json" else args.out
        report = merge(args.merge, out)
        print_table(report)
        _log(f"wrote {out}")
        return 0
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    atexit.register(_cleanup)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    t0 = time.monotonic()
    # Runs must end early enough for the server to be stopped inside the deadline.
    total = (args.deadline_s - args.stop_grace_s) if args.deadline_s else float("inf")
    engines = [e for e in ("pmod", "baseline") if e in args.engines and not (e == "baseline" and args.baseline == "none")]

    from benchmarks.models import prepare, write_dense_twin

    if args.pmod_model is None or (args.baseline == "vllm" and args.baseline_model is None) or args.tokenizer is None:
        # Absolute: servers run with the output directory as their working directory.
        dirs = prepare(args.models.resolve(), tiny=args.tiny)
        args.pmod_model = args.pmod_model or dirs["pmod"]
        if args.baseline == "vllm":
            args.baseline_model = args.baseline_model or dirs["baseline"]
        args.tokenizer = args.tokenizer or dirs["baseline"]
    if args.baseline == "pmod-dense" and args.baseline_model is None:
        args.baseline_model = write_dense_twin(args.pmod_model, args.pmod_model.parent / (args.pmod_model.name + "-dense"))

    report = {
        "gpu": gpu_name(),
        "host": host_info(),
        "vllm_version": vllm_version(),
        "command": command,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "baseline_kind": args.baseline,
        "settings": {
            "image_size": "x".join(map(str, args.image_size)), "input_len": args.input_len,
            "output_len": args.output_len, "load_format": args.load_format, "tokenizer": str(args.tokenizer),
            "prompts": {run: getattr(args, RUNS[run][2]) for run in args.runs},
            "concurrency": {run: RUNS[run][1] for run in args.runs},
            "seeds": {run: RUNS[run][3] for run in args.runs},
            "statistic": "medians from vllm bench serve (mean and p90/p99 kept too); ratios are p-MoD / baseline",
            "env": {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "CUDA_VISIBLE", "PMOD_"))},
        },
        "pmod": {"skipped": "not in --engines"},
        "baseline": {"skipped": "--baseline none" if args.baseline == "none" else "not in --engines"},
        "ratios": {},
    }
    out_json = args.out / "e2e_serve.json"

    def save() -> None:
        report["ratios"] = ratios(report["pmod"], report["baseline"])
        report["wall_s"] = time.monotonic() - t0
        out_json.write_text(json.dumps(report, indent=2) + "\n")

    try:
        for i, engine in enumerate(engines):
            # With both engines, p-MoD may use half of the time; what it leaves goes to the baseline.
            share = total / 2 if (len(engines) == 2 and i == 0) else total
            model_dir = args.pmod_model if engine == "pmod" else args.baseline_model
            report[engine] = {"status": "running"}
            run_server(engine, args, model_dir, t0 + share, report[engine])
            report[engine]["status"] = "done"
            save()
    finally:
        _cleanup()
        for engine in engines:
            if report[engine].get("status") == "running":
                report[engine]["status"] = "interrupted"
                report[engine].setdefault("error", "interrupted (signal or exception) before the server finished")
        save()
    print_table(report)
    _log(f"wrote {out_json}")
    failed = any(report[e].get("error") for e in engines)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
