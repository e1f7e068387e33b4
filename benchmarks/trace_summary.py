"""Where a served engine's steps spend their time: a summary of the torch-profiler trace vLLM's
worker writes (server started with `--profiler-config '{"profiler": "torch", ...}'`, profiler
started and stopped through its `/start_profile` and `/stop_profile` endpoints;
`benchmarks/e2e_serve.py --profile-run RUN` does both).

For each engine step (vLLM's `execute_context_..._generation_...` annotation of `execute_model`):
its host time, the device time of the kernels it launched (and their time in attention, matrix
multiplies and the rest), and the period to the next step; for
the whole window: how much of the time the GPU was busy, the longest idle gaps with what the
host was doing meanwhile, and every call that made the host wait for the GPU (synchronisations)
with the operators it happened in. A host-bound engine shows as a GPU idle while the host runs
operators; a sync-bound one as long synchronisations.

    python -m benchmarks.trace_summary TRACE.pt.trace.json.gz [--out summary.json]
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import statistics
from collections import Counter, defaultdict
from pathlib import Path

STEP_PREFIX = "execute_context_"
GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
RUNTIME_CATEGORIES = {"cuda_runtime", "cuda_driver"}
# Runtime calls that block the host until the GPU (or a stream) has caught up.
SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize"}
# An asynchronous copy that takes this long on the host waited (pageable memory, or a full queue).
BLOCKING_ASYNC_COPY_US = 200.0
# The CUDA caching allocator going to the driver: it does so when its cached segments cannot serve
# a request (new sizes, memory nearly full), and cudaFree (emptying the cache to retry an
# allocation) makes the host wait for the whole device.
ALLOCATOR_CALLS = {"cudaMalloc", "cudaFree", "cuMemCreate", "cuMemMap", "cuMemUnmap", "cuMemRelease",
                   "cuMemAddressReserve", "cuMemAddressFree"}


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        trace = json.load(handle)
    return [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]


def _union_length(intervals: list[tuple[float, float]]) -> tuple[float, list[tuple[float, float]]]:
    """Total covered length of `intervals` and the merged intervals, sorted."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return sum(end - start for start, end in merged), merged


class _Enclosing:
    """The host operators and annotations of one thread, for "what contains time t" queries."""

    def __init__(self, events: list[dict]) -> None:
        self.events = sorted(events, key=lambda e: (e["ts"], -e["dur"]))
        self.starts = [e["ts"] for e in self.events]
        self.longest = max((e["dur"] for e in self.events), default=0.0)

    def at(self, t: float) -> list[dict]:
        """Events containing time t, outermost first."""
        hi = bisect.bisect_right(self.starts, t)
        lo = bisect.bisect_left(self.starts, t - self.longest)
        found = [e for e in self.events[lo:hi] if e["ts"] <= t <= e["ts"] + e["dur"]]
        return sorted(found, key=lambda e: (e["ts"], -e["dur"]))


def _chain(events: list[dict], innermost: int = 4) -> str:
    names = [e["name"] for e in events if not e["name"].startswith(STEP_PREFIX)]
    return " > ".join(names[-innermost:]) or "(no operator)"


def _step_kind(name: str) -> str:
    # execute_context_{requests}({tokens})_generation_{requests}({tokens})
    context = name[len(STEP_PREFIX):].split("_generation_")[0]
    return "decode" if context.startswith("0(") else "prefill"


# Kernel classes by name: attention (FlashAttention, vLLM's Triton/paged attention), matrix
# multiplies (cuBLAS/nvjet/CUTLASS GEMMs), and the rest (norms, activations, gathers, copies...).
# Attention first: FlashAttention-3's kernels are CUTLASS device kernels too.
KERNEL_CLASSES = (("attention", ("flash", "attn", "attention")),
                  ("gemm", ("gemm", "nvjet", "cutlass", "cublas", "xmma")))


def kernel_class(name: str) -> str:
    lowered = name.lower()
    for kind, keys in KERNEL_CLASSES:
        if any(key in lowered for key in keys):
            return kind
    return "other"


def _by_class(kernels: list[dict]) -> dict[str, float]:
    total: Counter = Counter()
    for kernel in kernels:
        total[kernel_class(kernel["name"])] += kernel["dur"]
    return {kind: total[kind] / 1e3 for kind in ("attention", "gemm", "other")}


def summarize(events: list[dict], top: int = 12) -> dict:
    steps = sorted((e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith(STEP_PREFIX)),
                   key=lambda e: e["ts"])
    if not steps:
        return {"error": "no engine step annotations in the trace"}
    thread = (steps[0]["pid"], steps[0]["tid"])
    host_ops = [e for e in events if (e["pid"], e["tid"]) == thread
                and e.get("cat") in {"cpu_op", "user_annotation", "python_function"}]
    enclosing = _Enclosing(host_ops)
    runtime = [e for e in events if e.get("cat") in RUNTIME_CATEGORIES]
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    gpu_by_correlation = defaultdict(list)
    for e in gpu:
        gpu_by_correlation[e.get("args", {}).get("correlation")].append(e)

    # Kernels per step: those launched by runtime calls inside the step's annotation.
    step_starts = [s["ts"] for s in steps]

    def step_at(ts: float) -> int | None:
        """Index of the step whose annotation spans host time `ts`, if any."""
        index = bisect.bisect_right(step_starts, ts) - 1
        return index if index >= 0 and ts <= steps[index]["ts"] + steps[index]["dur"] else None

    launched = defaultdict(list)
    for call in runtime:
        if (call["pid"], call["tid"]) != thread:
            continue
        index = step_at(call["ts"])
        if index is not None:
            launched[index] += gpu_by_correlation.get(call.get("args", {}).get("correlation"), [])

    # The runner's and scheduler's named phases (vLLM's record_function annotations) per step.
    phases_in_step: dict[int, Counter] = defaultdict(Counter)
    for e in host_ops:
        if e.get("cat") != "user_annotation" or e["name"].startswith(STEP_PREFIX):
            continue
        index = step_at(e["ts"])
        if index is not None:
            phases_in_step[index][e["name"]] += e["dur"]

    per_step = []
    for index, step in enumerate(steps):
        kernels = launched[index]
        device_us, _ = _union_length([(k["ts"], k["ts"] + k["dur"]) for k in kernels])
        period = steps[index + 1]["ts"] - step["ts"] if index + 1 < len(steps) else None
        per_step.append({
            "step": step["name"], "kind": _step_kind(step["name"]), "host_ms": step["dur"] / 1e3,
            "device_ms": device_us / 1e3, "kernels": len(kernels),
            "kernel_ms_by_class": _by_class(kernels),
            "host_phases_ms": {name: us / 1e3 for name, us in phases_in_step[index].most_common()},
            "period_ms": period / 1e3 if period is not None else None,
        })

    # The window: first step start to the end of the last step's kernels.
    window_start = steps[0]["ts"]
    last_kernels = launched[len(steps) - 1]
    window_end = max([steps[-1]["ts"] + steps[-1]["dur"], *(k["ts"] + k["dur"] for k in last_kernels)])
    busy_intervals = [(max(k["ts"], window_start), min(k["ts"] + k["dur"], window_end)) for k in gpu
                      if k["ts"] + k["dur"] > window_start and k["ts"] < window_end]
    busy_us, merged = _union_length(busy_intervals)
    gaps = [(end, start) for (_, end), (start, _) in zip(merged, merged[1:]) if start > end]
    if merged and merged[0][0] > window_start:
        gaps.insert(0, (window_start, merged[0][0]))
    if merged and merged[-1][1] < window_end:
        gaps.append((merged[-1][1], window_end))
    idle_by_host_op: Counter = Counter()
    longest = []
    for start, end in gaps:
        chain = _chain(enclosing.at((start + end) / 2), innermost=3)
        idle_by_host_op[chain] += end - start
        longest.append((end - start, chain))
    longest.sort(reverse=True)

    syncs: dict[str, dict] = {}
    allocator: dict[str, dict] = {}
    for call in runtime:
        if (call["pid"], call["tid"]) != thread or not (window_start <= call["ts"] <= window_end):
            continue
        if call["name"] in ALLOCATOR_CALLS:
            entry = allocator.setdefault(f'{call["name"]} in {_chain(enclosing.at(call["ts"]))}',
                                         {"count": 0, "total_ms": 0.0})
            entry["count"] += 1
            entry["total_ms"] += call["dur"] / 1e3
        blocking = call["name"] in SYNC_CALLS or (
            call["name"] in {"cudaMemcpyAsync", "cuMemcpyAsync"} and call["dur"] >= BLOCKING_ASYNC_COPY_US)
        if not blocking:
            continue
        key = f'{call["name"]} in {_chain(enclosing.at(call["ts"]))}'
        entry = syncs.setdefault(key, {"count": 0, "total_ms": 0.0})
        entry["count"] += 1
        entry["total_ms"] += call["dur"] / 1e3

    host_ops_by_name: Counter = Counter()
    operators_by_name: Counter = Counter()
    for e in host_ops:
        if e.get("cat") == "user_annotation" and not e["name"].startswith(STEP_PREFIX):
            host_ops_by_name[e["name"]] += e["dur"]
        elif e.get("cat") == "cpu_op" and step_at(e["ts"]) is not None:
            operators_by_name[e["name"]] += e["dur"]
    kernels_by_name = Counter(k["name"][:100] for index in range(len(steps)) for k in launched[index]
                              if k.get("cat") == "kernel")

    def medians(kind: str | None) -> dict:
        chosen = [s for s in per_step if kind is None or s["kind"] == kind]
        if not chosen:
            return {"steps": 0}
        out = {"steps": len(chosen)}
        for key in ("host_ms", "device_ms", "period_ms", "kernels"):
            values = [s[key] for s in chosen if s[key] is not None]
            if values:
                out[f"median_{key}"] = statistics.median(values)
                out[f"total_{key}"] = sum(values)
        for kind in ("attention", "gemm", "other"):
            out[f"median_{kind}_kernel_ms"] = statistics.median(s["kernel_ms_by_class"][kind] for s in chosen)
        # Where a step's host time goes, by phase (a phase absent from a step counts 0 there).
        names = Counter()
        for step in chosen:
            names.update(step["host_phases_ms"])
        out["median_host_phase_ms"] = {
            name: statistics.median(step["host_phases_ms"].get(name, 0.0) for step in chosen)
            for name, _ in names.most_common(top)}
        return out

    window_ms = (window_end - window_start) / 1e3
    return {
        "window_ms": window_ms,
        "gpu_busy_ms": busy_us / 1e3,
        "gpu_busy_fraction": busy_us / (window_end - window_start) if window_end > window_start else None,
        "steps": medians(None),
        "prefill_steps": medians("prefill"),
        "decode_steps": medians("decode"),
        "gpu_idle_ms_by_host_operator": {k: v / 1e3 for k, v in idle_by_host_op.most_common(top)},
        "longest_gpu_idle_gaps": [{"ms": gap / 1e3, "host": chain} for gap, chain in longest[:top]],
        "host_waits_for_gpu": dict(sorted(syncs.items(), key=lambda kv: -kv[1]["total_ms"])[:top]),
        "allocator_calls": dict(sorted(allocator.items(), key=lambda kv: -kv[1]["total_ms"])[:top]),
        "runner_phases_ms": {k: v / 1e3 for k, v in host_ops_by_name.most_common(top)},
        # Inclusive host time of PyTorch operators in the steps (an operator's time includes the
        # operators it calls), and the kernels the steps launched, by name: what a step is made of.
        "host_operators_ms": {k: v / 1e3 for k, v in operators_by_name.most_common(top)},
        "kernels_by_name": dict(kernels_by_name.most_common(top)),
        "per_step": per_step,
    }


def summarize_dir(directory: Path, top: int = 12) -> dict:
    """Every worker trace under `directory` (one per rank), by file name."""
    traces = sorted(p for p in directory.rglob("*.pt.trace.json*"))
    return {p.name: summarize(load_events(p), top) for p in traces} or {"error": f"no trace under {directory}"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path, help="a *.pt.trace.json[.gz] file, or a directory of them")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    summary = summarize_dir(args.trace, args.top) if args.trace.is_dir() else summarize(load_events(args.trace), args.top)
    text = json.dumps(summary, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text if len(text) < 20000 else text[:20000] + "\n...")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
