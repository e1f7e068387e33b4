"""CPU host-overhead benchmark: per-step scheduler and model-runner host time, p-MoD vs dense.

Issue 13, "Measure" 1. A benchmark, not a test: it prints a table and writes JSON.

    python -m benchmarks.host_overhead --out benchmarks/results/host_overhead_cpu.json
    python -m benchmarks.host_overhead --kinds prefill --repeats 3 --out benchmarks/results/host_overhead_prefill_cpu.json
    python -m benchmarks.host_overhead --kinds mixed --block-size 32 --out benchmarks/results/host_overhead_mixed_cpu.json

Models: the tiny released-layout checkpoint with the released 32-layer PRD schedule (layers 8-31
are p-MoD layers; `model_registry.tiny`, variant next, seed 0, the same build as
`python -m model_registry.tiny --variant next --out DIR`) against its dense twin
(`benchmarks.models.write_dense_twin`: the same weights and dimensions with routing off, no layer
a p-MoD layer), both served by the same plugin, engine and settings. The dense twin gets one KV
cache group; so does the p-MoD model (its one group holds every layer's blocks; before issue 13, one per ratio).

Each model runs in its own process (in-process engines share vLLM's process-global state), as an
in-process `LLM` (VLLM_ENABLE_V1_MULTIPROCESSING=0), driven one step at a time through
`LLM.llm_engine.add_request / step / abort_request`. For each batch size N (1, 32, 128), N
requests (one image each, so routing happens; then text-only) are submitted with ignore_eos and
max_tokens up to max_model_len, stepped until every one of them is decoding (a step schedules N
requests and N tokens), then W more steps, then M timed steps; then they are aborted.

Timed on vLLM's objects (so the numbers mean the same on today's engine path and on a rewrite):
  - scheduler: `scheduler.schedule()` + `scheduler.update_from_output()`;
  - runner: the model runner's `execute_model()` + `sample_tokens()`;
  - inside them, the model's compute: `forward` (reported alone), and `compute_logits`,
    `embed_input_ids`, `embed_multimodal` and the sampler (reported as other compute).
On a CPU the model's compute is host time too, so it is subtracted:
runner host = execute_model + sample_tokens - model compute. Per-step medians over the M steps;
each model's worker runs --repeats times (default 2), alternating the order of the two models,
and each metric is the lowest of its per-step medians (load from other processes on a shared
machine only ever adds time). Compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import image_size

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BATCH_SIZES = (1, 32, 128)
# 640x32 gives 576 + 2 x 49 = 674 visual tokens (the smallest a LLaVA-NeXT image gets), so 128
# image requests prefill in seconds and fit the CPU KV pool. Decode-step host work does not depend
# on the number of visual tokens; pass --image-size 672x672 for the standard 2928-token request.
DEFAULT_IMAGE_SIZE = "640x32"
MODEL_COMPUTE = ("forward", "compute_logits", "embed_input_ids", "embed_multimodal")


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ------------------------------------------------------------------------------------------------
# Worker: one model, one in-process engine
# ------------------------------------------------------------------------------------------------


class StepTimers:
    """Wraps the engine's scheduler, model runner and model methods (instance attributes)."""

    def __init__(self) -> None:
        self.recording = False
        self.records: dict[str, list] = {}
        self._compute_depth = 0
        self._compute_s = 0.0  # model compute accumulated since start
        self.last_schedule: tuple[int, int] | None = None  # (num reqs, num tokens) of the last schedule()

    def reset(self) -> None:
        self.records = {"schedule": [], "update": [], "execute": [], "sample": [], "forward": [],
                        "other_compute": [], "step_wall": [], "sched_shape": []}

    def _push(self, key: str, value) -> None:
        if self.recording:
            self.records[key].append(value)

    def wrap_scheduler(self, scheduler) -> None:
        schedule, update = scheduler.schedule, scheduler.update_from_output

        def timed_schedule(*args, **kwargs):
            start = time.perf_counter()
            out = schedule(*args, **kwargs)
            self._push("schedule", time.perf_counter() - start)
            shape = (len(out.num_scheduled_tokens), int(out.total_num_scheduled_tokens))
            self.last_schedule = shape
            self._push("sched_shape", shape)
            return out

        def timed_update(*args, **kwargs):
            start = time.perf_counter()
            out = update(*args, **kwargs)
            self._push("update", time.perf_counter() - start)
            return out

        scheduler.schedule = timed_schedule
        scheduler.update_from_output = timed_update

    def wrap_runner_call(self, runner, name: str, key: str) -> bool:
        original = getattr(runner, name, None)
        if original is None:
            return False

        def timed(*args, **kwargs):
            compute_before = self._compute_s
            start = time.perf_counter()
            out = original(*args, **kwargs)
            total = time.perf_counter() - start
            self._push(key, (total, self._compute_s - compute_before))
            return out

        setattr(runner, name, timed)
        return True

    def wrap_compute(self, obj, name: str, key: str) -> bool:
        original = getattr(obj, name, None)
        if original is None:
            return False

        def timed(*args, **kwargs):
            self._compute_depth += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._compute_depth -= 1
                if self._compute_depth == 0:  # nested wrapped calls count once
                    seconds = time.perf_counter() - start
                    self._compute_s += seconds
                    self._push(key, seconds)

        setattr(obj, name, timed)
        return True


def _engine_parts(llm):
    """(engine core, scheduler, model runner) of an in-process engine."""
    core = llm.llm_engine.engine_core.engine_core  # InprocClient -> EngineCore
    executor = core.model_executor
    worker = executor.driver_worker
    worker = getattr(worker, "worker", worker)  # WorkerWrapperBase -> worker
    return core, core.scheduler, worker.model_runner


def _summarise(timers: StepTimers, batch: int, only_prefill: bool = False) -> dict:
    """Per-step medians; `only_prefill`: over the steps that schedule prompt tokens only."""
    rec = timers.records
    steps = min(len(rec["schedule"]), len(rec["update"]), len(rec["execute"]))
    sample = rec["sample"] if len(rec["sample"]) >= steps else [(0.0, 0.0)] * steps
    shapes = rec["sched_shape"][:steps]
    chosen = [i for i in range(steps) if not only_prefill or shapes[i][1] > shapes[i][0]]
    ms = 1e3
    per_step = []
    for i in chosen:
        exec_total, exec_compute = rec["execute"][i]
        sample_total, sample_compute = sample[i]
        per_step.append({
            "schedule": rec["schedule"][i] * ms,
            "update": rec["update"][i] * ms,
            "scheduler": (rec["schedule"][i] + rec["update"][i]) * ms,
            "execute": exec_total * ms,
            "sample": sample_total * ms,
            "compute": (exec_compute + sample_compute) * ms,
            "runner_host": (exec_total - exec_compute + sample_total - sample_compute) * ms,
        })
    for row in per_step:
        row["host"] = row["scheduler"] + row["runner_host"]
    summary = {key: _median([row[key] for row in per_step]) for key in
               ("schedule", "update", "scheduler", "execute", "sample", "compute", "runner_host", "host")}
    # forward / other compute: per call; in a decode step each is called once.
    summary["forward"] = _median([s * ms for s in rec["forward"]])
    summary["other_compute"] = _median([s * ms for s in rec["other_compute"]])
    summary["step_wall"] = _median([s * ms for s in rec["step_wall"]])
    if only_prefill:
        # A prefill step's model compute differs between the models (that is the point of p-MoD):
        # wall-clock medians of the compute and the step would compare work, not host cost.
        summary["forward"] = summary["other_compute"] = summary["step_wall"] = None
        summary["prefill_tokens"] = _median([shapes[i][1] for i in chosen])
    summary["steps"] = len(chosen)
    summary["forward_calls"] = len(rec["forward"])
    summary["steady_steps"] = sum(1 for reqs, tokens in shapes if reqs == batch and tokens == batch)
    return {"median_ms": summary}


def _requests(kind: str, batch: int, seed0: int, question: str, image_size: tuple[int, int]):
    from benchmarks.common import make_image, vicuna_prompt

    if kind == "text":
        return [{"prompt": vicuna_prompt(question, 0)} for _ in range(batch)]
    width, height = image_size
    return [{"prompt": vicuna_prompt(question, 1),
             "multi_modal_data": {"image": make_image(width, height, seed=seed0 + i)}}
            for i in range(batch)]


def _step_until_all_decoding(engine, timers: StepTimers, batch: int, args, label: str) -> int:
    """Steps the engine until --warmup steps in a row each schedule `batch` requests of one token
    (all of them decoding); returns the steps taken."""
    steps = 0
    steady_run = 0
    while steady_run < args.warmup:
        engine.step()
        steps += 1
        steady_run = steady_run + 1 if timers.last_schedule == (batch, batch) else 0
        if steps > args.max_prefill_steps:
            raise RuntimeError(f"{label}: not all requests decoding after {steps} steps "
                               f"(last step scheduled {timers.last_schedule}); KV pool too small?")
    return steps


def _measure(llm, timers: StepTimers, kind: str, batch: int, args, seed0: int, question: str) -> dict:
    from vllm import SamplingParams

    engine = llm.llm_engine
    prompts = _requests(kind, batch, seed0, question, args.image_size)
    ids = [f"{kind}-{batch}-{seed0}-{i}" for i in range(batch)]
    started = time.perf_counter()
    for req_id, prompt in zip(ids, prompts):
        # max_tokens: whatever fits max_model_len (the engine caps the prompt + output there).
        params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=0.0)
        engine.add_request(req_id, prompt, params)
    submitted = time.perf_counter()
    timers.recording = False
    prompt_tokens = None
    steps_to_steady = _step_until_all_decoding(engine, timers, batch, args, f"{kind} x{batch}")
    steady_at = time.perf_counter()
    scheduler = _engine_parts(llm)[1]
    running = len(scheduler.running)
    try:
        prompt_tokens = _median([r.num_prompt_tokens for r in scheduler.running])
    except AttributeError:
        pass
    timers.reset()
    timers.recording = True
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.step()
        timers.records["step_wall"].append(time.perf_counter() - start)
    timers.recording = False
    result = _summarise(timers, batch)
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    result.update({
        "batch": batch,
        "kind": kind,
        "running_when_timed": running,
        "prompt_tokens_median": prompt_tokens,
        "submit_s": submitted - started,
        "prefill_and_warmup_s": steady_at - submitted,
        "steps_to_steady": steps_to_steady,
    })
    return result


def _batch_sizes(settings: dict, kind: str) -> list[int]:
    """The batch sizes of `kind`, from the arguments (`vars(args)`) or a report's settings."""
    return list(settings["prefill_batch_sizes"] if kind == "prefill" else settings["batch_sizes"])


def _measure_prefill(llm, timers: StepTimers, batch: int, args, seed0: int, question: str) -> dict:
    """Host time of the steps that prefill `batch` image requests of --prefill-image-size
    submitted at once (what stands between a request and its first token), --prefill-rounds
    rounds of fresh images (no prefix-cache hit past the system prompt)."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    timers.reset()
    for round_index in range(args.prefill_rounds):
        seed = seed0 + round_index * batch
        prompts = _requests("image", batch, seed, question, args.prefill_image_size)
        ids = [f"prefill-{batch}-{seed}-{i}" for i in range(batch)]
        for req_id, prompt in zip(ids, prompts):
            engine.add_request(req_id, prompt, SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0))
        timers.recording = True
        steps = 0
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            engine.step()
            timers.records["step_wall"].append(time.perf_counter() - start)
            steps += 1
            if steps > args.max_prefill_steps:
                raise RuntimeError(f"prefill x{batch}: unfinished after {steps} steps")
        timers.recording = False
    result = _summarise(timers, batch, only_prefill=True)
    result.update({"batch": batch, "kind": "prefill", "rounds": args.prefill_rounds,
                   "image_size": "x".join(map(str, args.prefill_image_size))})
    return result


def _measure_mixed(llm, timers: StepTimers, batch: int, args, seed0: int, question: str) -> dict:
    """Host time of the steady state of a loaded image server (c=256 in benchmarks/e2e_serve.py):
    `batch` requests decoding, and every step admits one new image request of
    --prefill-image-size and prefills it whole beside their decodes (a routed step). The new
    request asks for one token, so it leaves in the step that prefills it, as a finished request
    leaves a full KV cache for each admitted one. Timed over the steps that schedule prompt tokens."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    decoding = _requests("image", batch, seed0, question, args.image_size)
    ids = [f"mixed-{batch}-{seed0}-{i}" for i in range(batch)]
    for req_id, prompt in zip(ids, decoding):
        engine.add_request(req_id, prompt, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=0.0))
    _step_until_all_decoding(engine, timers, batch, args, f"mixed x{batch}")
    timers.reset()
    arriving = _requests("image", args.steps, seed0 + batch, question, args.prefill_image_size)
    for index, prompt in enumerate(arriving):
        engine.add_request(f"mixed-{batch}-{seed0}-new-{index}", prompt,
                           SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0))
        timers.recording = True
        start = time.perf_counter()
        engine.step()
        timers.records["step_wall"].append(time.perf_counter() - start)
        timers.recording = False
    result = _summarise(timers, batch + 1, only_prefill=True)
    engine.abort_request(ids)
    while engine.has_unfinished_requests():
        engine.step()
    result.update({"batch": batch, "kind": "mixed", "image_size": "x".join(map(str, args.prefill_image_size)),
                   "decoding_image_size": "x".join(map(str, args.image_size))})
    return result


def run_worker(args) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    import vllm
    from vllm import LLM

    from benchmarks.common import question_of_tokens

    start = time.perf_counter()
    llm = LLM(model=str(args.checkpoint), dtype="float32", seed=0, max_model_len=args.max_model_len,
              # mixed: N decoding requests and the one being admitted.
              max_num_seqs=max(args.batch_sizes) + ("mixed" in args.kinds), block_size=args.block_size)
    engine_start_s = time.perf_counter() - start
    core, scheduler, runner = _engine_parts(llm)
    timers = StepTimers()
    timers.reset()
    timers.wrap_scheduler(scheduler)
    wrapped = {
        "execute_model": timers.wrap_runner_call(runner, "execute_model", "execute"),
        "sample_tokens": timers.wrap_runner_call(runner, "sample_tokens", "sample"),
    }
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    wrapped["model.forward"] = timers.wrap_compute(model, "forward", "forward")
    for name in MODEL_COMPUTE[1:]:
        wrapped[f"model.{name}"] = timers.wrap_compute(model, name, "other_compute")
    sampler = getattr(runner, "sampler", None)
    if sampler is not None:
        wrapped["sampler.forward"] = timers.wrap_compute(sampler, "forward", "other_compute")

    kv_config = scheduler.kv_cache_config
    info = {
        "label": args.label,
        "checkpoint": str(args.checkpoint),
        "vllm_version": vllm.__version__,
        "torch_threads": torch.get_num_threads(),
        "engine_start_s": engine_start_s,
        "kv_cache_groups": len(kv_config.kv_cache_groups),
        "kv_cache_num_blocks": kv_config.num_blocks,
        "prefix_caching": scheduler.kv_cache_manager.enable_caching,
        "async_scheduling": bool(core.vllm_config.scheduler_config.async_scheduling),
        "batch_queue": getattr(core, "batch_queue", None) is not None,
        "max_num_batched_tokens": core.vllm_config.scheduler_config.max_num_batched_tokens,
        "wrapped": wrapped,
        "runs": {},
    }
    question = question_of_tokens(Path(args.checkpoint) / "tokenizer.model", 60)
    # Warm-up: one image request to a few decode steps (first-call costs off the timed runs).
    _measure(llm, timers, "image", 1, argparse.Namespace(**{**vars(args), "steps": 3, "warmup": 2}), 10_000, question)
    seed = 0
    for kind in args.kinds:
        info["runs"][kind] = {}
        for batch in _batch_sizes(vars(args), kind):
            if kind == "prefill":
                result = _measure_prefill(llm, timers, batch, args, 50_000 + seed, question)
            elif kind == "mixed":
                result = _measure_mixed(llm, timers, batch, args, 70_000 + seed, question)
            else:
                result = _measure(llm, timers, kind, batch, args, seed, question)
            seed += batch
            info["runs"][kind][str(batch)] = result
            med = result["median_ms"]
            print(f"[host_overhead] {args.label} {kind} x{batch}: scheduler {med['scheduler']:.3f} ms, "
                  f"runner host {med['runner_host']:.3f} ms, forward {med['forward'] or 0:.3f} ms "
                  + (f"({med['steps']} prefill steps)" if kind in ("prefill", "mixed")
                     else f"({med['steady_steps']}/{med['steps']} steady steps)"), flush=True)
    Path(args.result).write_text(json.dumps(info, indent=2) + "\n")
    # In-process engines do not always shut down cleanly; the process exits here.
    sys.stdout.flush()
    os._exit(0)


# ------------------------------------------------------------------------------------------------
# Driver: build both checkpoints, one worker process each, the table
# ------------------------------------------------------------------------------------------------

def combine_repeats(infos: list[dict]) -> dict:
    """One model's result: per metric, the lowest per-step median over the repeats."""
    good = [info for info in infos if "runs" in info]
    if not good:
        return infos[0] if infos else {"error": "not run"}
    combined = {key: value for key, value in good[0].items() if key != "runs"}
    combined["repeats"] = [{"loadavg_1min": info.get("loadavg_1min"), "runs": info["runs"]} for info in good]
    combined["errors"] = [info["error"] for info in infos if "error" in info]
    combined["runs"] = {}
    for kind, by_batch in good[0]["runs"].items():
        combined["runs"][kind] = {}
        for batch, run in by_batch.items():
            medians = [info["runs"][kind][batch]["median_ms"] for info in good
                       if batch in info["runs"].get(kind, {})]
            best = {key: min((m[key] for m in medians if m.get(key) is not None), default=None)
                    for key in run["median_ms"]}
            combined["runs"][kind][batch] = {**run, "median_ms": best,
                                             "statistic": f"lowest of {len(medians)} per-step medians"}
    return combined


ROWS = (
    ("scheduler", "scheduler ms"),
    ("runner_host", "runner host ms (excl. compute)"),
    ("host", "host ms (scheduler + runner)"),
    ("forward", "forward ms"),
    ("other_compute", "other compute ms (logits, sampler)"),
    ("step_wall", "engine step wall ms"),
)


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def build_report(results: dict, args, command: str) -> dict:
    report = {
        "benchmark": "host_overhead",
        "command": command,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "git_commit": _git_commit(),
        "settings": {
            "batch_sizes": list(args.batch_sizes), "kinds": list(args.kinds), "steps": args.steps,
            "prefill_batch_sizes": list(args.prefill_batch_sizes), "prefill_rounds": args.prefill_rounds,
            "prefill_image_size": "x".join(map(str, args.prefill_image_size)),
            "warmup": args.warmup, "image_size": "x".join(map(str, args.image_size)),
            "max_model_len": args.max_model_len, "kv_cache_gib": args.kv_cache_gib, "threads": args.threads,
            "block_size": args.block_size,
            "question_tokens": 60, "dtype": "float32", "repeats": args.repeats,
        },
        "models": {},
        "ratios_pmod_over_dense": {},
    }
    for label, info in results.items():
        report["models"][label] = info
    pmod, dense = results.get("pmod"), results.get("dense")
    if pmod and dense:
        for kind in args.kinds:
            report["ratios_pmod_over_dense"][kind] = {}
            for batch in _batch_sizes(vars(args), kind):
                p = pmod["runs"].get(kind, {}).get(str(batch), {}).get("median_ms", {})
                d = dense["runs"].get(kind, {}).get(str(batch), {}).get("median_ms", {})
                report["ratios_pmod_over_dense"][kind][str(batch)] = {
                    key: _ratio(p.get(key), d.get(key)) for key, _ in ROWS}
    return report


def _cell(models: dict, label: str, kind: str, batch: int, key: str):
    run = models.get(label, {}).get("runs", {}).get(kind, {}).get(str(batch), {})
    return run.get("median_ms", {}).get(key)


def print_table(report: dict) -> None:
    models = report["models"]
    settings = report["settings"]
    for kind in settings["kinds"]:
        batch_sizes = _batch_sizes(settings, kind)
        if kind == "prefill":
            print(f"\nprefill: N image requests of {settings.get('prefill_image_size')} submitted at once "
                  "(per-step medians over the steps that schedule prompt tokens)")
        elif kind == "mixed":
            print(f"\nmixed: N requests decoding, one new {settings.get('prefill_image_size')} image request "
                  "prefilled in every step (per-step medians over those steps)")
        else:
            print(f"\n{kind} requests (per-step medians over decode steps, all requests running)")
        header = f"{'':36}" + "".join(f"{'N=' + str(b):>24}" for b in batch_sizes)
        print(header)
        print(f"{'':36}" + "".join(f"{'p-MoD / dense / ratio':>24}" for _ in batch_sizes))
        for key, title in ROWS:
            cells = []
            for batch in batch_sizes:
                p, d = (_cell(models, label, kind, batch, key) for label in ("pmod", "dense"))
                r = _ratio(p, d)
                fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
                cells.append(f"{fmt(p)} / {fmt(d)} / {'-' if r is None else f'{r:.2f}x'}")
            print(f"{title:36}" + "".join(f"{c:>24}" for c in cells))
    groups = {label: info.get("kv_cache_groups") for label, info in models.items()}
    print(f"\nKV cache groups: {groups}")


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="JSON report path")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench",
                        help="where the tiny checkpoint and its dense twin are built")
    parser.add_argument("--checkpoint", type=Path, help="p-MoD checkpoint (default: build the tiny one)")
    parser.add_argument("--batch-sizes", type=lambda s: tuple(int(x) for x in s.split(",")),
                        default=DEFAULT_BATCH_SIZES)
    parser.add_argument("--kinds", type=lambda s: tuple(s.split(",")), default=("image", "text"),
                        help="image,text,prefill,mixed (prefill: the steps that prefill image requests; "
                             "mixed: N requests decoding while each step prefills one new image request)")
    parser.add_argument("--prefill-batch-sizes", type=lambda s: tuple(int(x) for x in s.split(",")), default=(1, 4))
    parser.add_argument("--prefill-image-size", type=image_size, default=image_size("672x672"),
                        help="the standard 2928-visual-token request")
    parser.add_argument("--prefill-rounds", type=int, default=4, help="rounds of fresh prefill requests")
    parser.add_argument("--steps", type=int, default=30, help="timed decode steps per batch size")
    parser.add_argument("--warmup", type=int, default=5, help="steady steps before timing")
    parser.add_argument("--image-size", type=image_size, default=image_size(DEFAULT_IMAGE_SIZE))
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--max-prefill-steps", type=int, default=2000)
    parser.add_argument("--kv-cache-gib", type=int, default=3, help="VLLM_CPU_KVCACHE_SPACE")
    # vLLM's default block size on CUDA. The CPU backend's own default (128) would lend a 7B image
    # request 8x fewer layer-blocks than a GPU does and hide the per-block work of the scheduler
    # (allocation, prefix-cache naming) that a GPU server pays.
    parser.add_argument("--block-size", type=int, default=16, help="KV cache block size (tokens)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="worker runs per model, alternating the order; the lowest median is reported")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/OpenMP threads of the engine (1: steadier timings on a shared machine)")
    parser.add_argument("--models", type=lambda s: tuple(s.split(",")), default=("pmod", "dense"),
                        help="pmod,dense")
    parser.add_argument("--timeout-s", type=int, default=1200, help="per model")
    # worker mode (internal)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--label", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    command = "python -m benchmarks.host_overhead " + shlex.join(sys.argv[1:] if argv is None else argv)
    from benchmarks.models import write_dense_twin
    from model_registry.tiny import build_tiny_checkpoint

    checkpoint = args.checkpoint or build_tiny_checkpoint(args.work / "tiny-next", variant="next", seed=0)
    checkpoints = {"pmod": Path(checkpoint), "dense": write_dense_twin(checkpoint, args.work / "tiny-next-dense")}
    results = {}
    passthrough = ["--batch-sizes", ",".join(map(str, args.batch_sizes)), "--kinds", ",".join(args.kinds),
                   "--prefill-batch-sizes", ",".join(map(str, args.prefill_batch_sizes)),
                   "--prefill-image-size", "x".join(map(str, args.prefill_image_size)),
                   "--prefill-rounds", str(args.prefill_rounds),
                   "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--image-size", "x".join(map(str, args.image_size)), "--max-model-len", str(args.max_model_len),
                   "--max-tokens", str(args.max_tokens), "--max-prefill-steps", str(args.max_prefill_steps),
                   "--kv-cache-gib", str(args.kv_cache_gib), "--threads", str(args.threads),
                   "--block-size", str(args.block_size)]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=str(args.threads))
    # Repeats alternate the order (A B, B A, ...) so that a load drift on a shared machine hits both
    # models alike; each metric is then the lowest per-step median over the repeats (contention
    # only ever adds time).
    repeats: dict[str, list[dict]] = {label: [] for label in args.models}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = list(args.models) if repeat % 2 == 0 else list(reversed(args.models))
            for label in order:
                result_path = Path(tmp) / f"{label}-{repeat}.json"
                cmd = [sys.executable, "-m", "benchmarks.host_overhead", "--worker", "--label", label,
                       "--checkpoint", str(checkpoints[label]), "--result", str(result_path), *passthrough]
                print(f"[host_overhead] {label} (repeat {repeat + 1}/{args.repeats}): {checkpoints[label]}",
                      flush=True)
                load_before = os.getloadavg()[0]
                try:
                    proc = subprocess.run(cmd, cwd=REPO, env=env, timeout=args.timeout_s)
                    if proc.returncode != 0 or not result_path.exists():
                        repeats[label].append({"error": f"worker exited with {proc.returncode}"})
                        continue
                except subprocess.TimeoutExpired:
                    repeats[label].append({"error": f"worker timed out after {args.timeout_s} s"})
                    continue
                info = json.loads(result_path.read_text())
                info["loadavg_1min"] = [load_before, os.getloadavg()[0]]
                repeats[label].append(info)
    results = {label: combine_repeats(runs) for label, runs in repeats.items()}
    report = build_report(results, args, command)
    print_table(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"[host_overhead] wrote {args.out}")


if __name__ == "__main__":
    main()
