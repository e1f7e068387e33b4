"""Production GPU configurations (issue 15): tensor parallel, data parallel, FP8 KV cache, FP8
weights, each one vLLM flag, measured against the plain configurations on the same machine.

One section per device call (each fits a call's time limit); `--merge` makes
benchmarks/results/gpu_configs.json from the sections' files:

    python -m benchmarks.gpu_configs --out DIR --sections tiny_tp
    python -m benchmarks.gpu_configs --out DIR --sections one_gpu,dp2   # dp2 against one_gpu's run
    python -m benchmarks.gpu_configs --out DIR --sections tp2
    python -m benchmarks.gpu_configs --out DIR --sections fp8,tiny_quality
    python -m benchmarks.gpu_configs --merge DIR... --out benchmarks/results/gpu_configs.json

Each call writes the model directories it needs under `--models` (default .gpu/models) first: a
device call may find the ignored directories of an earlier call gone. Wall time of each section on
two H200s (2026-11-29, one call each, the full-size sections with a warm compile cache): tiny_tp
190-320 s, one_gpu ~240 s, dp2 ~230 s (a server starts in ~50 s with one engine, ~110 s with two;
that and `vllm bench serve`'s own start, ~30 s, count against their deadline), tp2 ~240 s, fp8
~200 s, tiny_quality ~300 s (fp8 and tiny_quality side by side on the two GPUs). `--resume`
finishes a section cut off by a call's time limit from the runs it completed.

On a device machine, put DIR under $OUT and tar it there (`tar -czf $OUT/DIR.tgz -C $OUT DIR`):
a device call brings back a limited number of files, and the rest are left out.

Sections (every engine is a fresh process: `benchmarks.bench`, `benchmarks.exact` or a server):
- tiny_tp: the tiny random-weight checkpoint in float32 (Triton attention with IEEE float32
  dots, torch.compile + CUDA graphs) at TP=1 and TP=2, each against the float32 reference;
  `tokens_equal_tp1` compares the two engines' tokens directly.
- tp2: p-MoD-LLaVA-NeXT-7B dims and vLLM's LLaVA-NeXT-7B, dummy weights, bf16, both at TP=2:
  KV bytes per request per rank, requests/s on 256 mixed-size image requests, and p-MoD's
  greedy tokens for the quality prompts (compared with the TP=1 run of the fp8 section).
- one_gpu: `pmod-serve` on one GPU driven by `vllm bench serve` (256 image prompts, concurrency
  256): the reference of dp2, on the same machine in the same session.
- dp2: `pmod-serve --data-parallel-size 2`, the same run, against one_gpu's (or `--one-gpu`'s)
  requests/s; `/metrics` polled per `engine` label, `pmod_kv_blocks_in_use` against each engine's
  block pool as vLLM reports it.
- fp8: full size, TP=1, eager (what is compared is the numbers, not the speed): p-MoD bf16 (the
  quality base), p-MoD with `--kv-cache-dtype fp8`, p-MoD with `--quantization fp8` (also an image
  chat through vLLM's chat path), vLLM's LLaVA-NeXT bf16 (the KV base).
- tiny_quality: the trained tiny checkpoint (real weights: quality differences mean something),
  bf16 against fp8 KV, fp8 weights (W8A8) and weight-only fp8 weights (W8A16, Marlin);
  tiny_dense_quality: the same weight runs on the dense control.

Quality policy (stated before measuring; `compare_quality`). Each prompt's greedy tokens are
compared with the base run's position by position up to the first difference, where both runs
saw the same context, so their log-probs are directly comparable:
- a difference in tokens is allowed only where the base run itself nearly ties: the base run's
  log-prob of its own token exceeds its log-prob of the other run's token by at most `tie_margin`;
- over those positions, the largest |log-prob difference| of the tokens in both runs' top-5 is at
  most `max_logprob_error`.
TP=2 against TP=1 (bf16): tie_margin 0.1 nats, max_logprob_error 0.25 nats, the bf16 policy of
the GPU exactness check (benchmarks/README.md). FP8 (KV or weights) against bf16: tie_margin 0.5,
max_logprob_error 1.0 (e4m3 keeps 3 mantissa bits, 16 times coarser than bf16's 7). Greedy agreement
(the share of generated tokens before the first difference) is reported too. With dummy weights,
every next-token distribution is nearly flat: tokens differ at near ties early, and the policy is
mostly a log-prob check there; the trained tiny checkpoint is where agreement is meaningful.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import write_json
from benchmarks.e2e_serve import gpu_name, kv_metrics_agree, ratio

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("tiny_tp", "one_gpu", "dp2", "tp2", "fp8", "tiny_quality", "tiny_dense_quality")
TRAINED_TINY = REPO / "pmod_train" / "checkpoints" / "shapes-pmod"
# Trained like TRAINED_TINY, with every layer dense: the control for the fp8-weights quality check.
TRAINED_TINY_DENSE = REPO / "pmod_train" / "checkpoints" / "shapes-dense"
POLICIES = {
    "bf16": {"tie_margin": 0.1, "max_logprob_error": 0.25},
    "fp8": {"tie_margin": 0.5, "max_logprob_error": 1.0},
}


def _log(message: str) -> None:
    print(f"[gpu_configs {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------------
# Quality policy
# ------------------------------------------------------------------------------------------------


def compare_quality(base: dict, other: dict, tie_margin: float, max_logprob_error: float) -> dict:
    """`base`/`other`: the `quality` phase of benchmarks.bench (same prompts, same order)."""
    prompts = list(zip(base["prompts"], other["prompts"], strict=True))
    worst_error, worst_regret, agreement, violations = 0.0, 0.0, [], []
    for index, (b, o) in enumerate(prompts):
        length = min(len(b["tokens"]), len(o["tokens"]))
        first_diff = next((i for i in range(length) if b["tokens"][i] != o["tokens"][i]), length)
        agreement.append(first_diff / max(1, len(b["tokens"])))
        for position in range(min(first_diff + 1, length)):
            b_top, o_top = b["top_logprobs"][position], o["top_logprobs"][position]
            shared = set(b_top) & set(o_top)
            error = max((abs(b_top[t] - o_top[t]) for t in shared), default=0.0)
            worst_error = max(worst_error, error)
            if error > max_logprob_error:
                violations.append({"prompt": index, "position": position, "logprob_error": error})
        if first_diff < length:
            b_top = b["top_logprobs"][first_diff]
            own, theirs = str(b["tokens"][first_diff]), str(o["tokens"][first_diff])
            # Outside the base run's top-5, the other token is no near tie.
            regret = b_top[own] - b_top[theirs] if theirs in b_top else math.inf
            worst_regret = max(worst_regret, regret)
            if regret > tie_margin:
                violations.append({"prompt": index, "position": first_diff, "regret": regret})
    return {"prompts": len(prompts), "greedy_agreement": sum(agreement) / len(agreement),
            "all_tokens_equal": all(b["tokens"] == o["tokens"] for b, o in prompts),
            "max_logprob_error_nats": worst_error, "max_regret_nats": worst_regret,
            "policy": {"tie_margin": tie_margin, "max_logprob_error": max_logprob_error},
            "violations": violations[:20], "passed": not violations}


# ------------------------------------------------------------------------------------------------
# Engine runs (one process each)
# ------------------------------------------------------------------------------------------------


def _run(cmd: list[str], log: Path, timeout_s: float, env: dict | None = None) -> int:
    _log(f"$ {shlex.join(cmd)}")
    with open(log, "w") as out:
        try:
            return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s, cwd=REPO,
                                  env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            return -9


def bench(args, name: str, engine: str, model_dir: Path, tokenizer: Path, phases: str, *flags: str,
          timeout_s: float = 400, env: dict | None = None) -> dict:
    """benchmarks.bench for one engine configuration (`env`: extra environment) into
    `args.out`/`name`.json; returns that JSON (with `returncode`). With `args.resume`, a run whose
    JSON is already there and complete (benchmarks.bench writes `total_s` last) is not run again."""
    path = args.out / f"{name}.json"
    cmd = [sys.executable, "-m", "benchmarks.bench", "--engine", engine, "--model-dir", str(model_dir),
           "--tokenizer-model", str(tokenizer), "--out", str(path), "--phases", phases,
           "--no-torch-profiler", *flags]
    if args.resume and path.exists() and "total_s" in (done := json.loads(path.read_text())):
        # A run that finished but whose section was cut off (e.g. by a device call's time limit):
        # its return code is unknown unless gpu_configs got to record it.
        done.setdefault("returncode", None)
        done.setdefault("command", shlex.join(cmd))
        _log(f"{name}: reused {path} (errors: {list(done.get('errors', {}))})")
        return done
    start = time.monotonic()
    rc = _run(cmd, args.out / f"{name}.log", timeout_s, env={"NCCL_NVLS_ENABLE": "0", **(env or {})})
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update({"returncode": rc, "wall_s": time.monotonic() - start, "command": shlex.join(cmd)})
    write_json(path, result)
    _log(f"{name}: rc={rc} in {result['wall_s']:.0f} s, errors: {list(result.get('errors', {}))}")
    return result


def _bench_runs(section: dict) -> list[dict]:
    """The benchmarks.bench results a section holds (under `runs`, or `pmod`/`baseline` for tp2)."""
    runs = list((section.get("runs") or {}).values()) + [section.get("pmod"), section.get("baseline")]
    return [run for run in runs if isinstance(run, dict) and "engine" in run]


def kv_bytes(result: dict) -> float | None:
    return (result.get("kv_one_request") or {}).get("kv_bytes_measured") or None


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------


def section_tiny_tp(args) -> dict:
    """float32 exactness of the tiny checkpoint at TP=1 and TP=2 (benchmarks.exact)."""
    checkpoint = args.models / "tiny-next"
    reference = args.models / "reference-next.json"
    env = {"TRITON_F32_DEFAULT": "ieee", "NCCL_NVLS_ENABLE": "0"}
    common = [sys.executable, "-m", "benchmarks.exact", "--checkpoint", str(checkpoint), "--variant", "next",
              "--dtype", "float32", "--attention-backend", "TRITON_ATTN", "--check", "exact",
              "--reference-cache", str(reference)]
    _run([*common, "--reference-only"], args.out / "tiny_reference.log", 600, env)
    runs = {}
    for tp in (1, 2):
        path = args.out / f"tiny_tp{tp}.json"
        cmd = [*common, "--tensor-parallel-size", str(tp), "--name", f"tiny-tp{tp}", "--out", str(path)]
        rc = _run(cmd, args.out / f"tiny_tp{tp}.log", 400, env)
        runs[tp] = json.loads(path.read_text()) if path.exists() else {"returncode": rc}
        runs[tp]["command"] = shlex.join(cmd)
        _log(f"tiny TP={tp}: passed={runs[tp].get('passed')}")
    cases = runs[1].get("cases", {})
    equal = bool(cases) and all(
        runs[2].get("cases", {}).get(name, {}).get("tokens") == case["tokens"] for name, case in cases.items())
    return {"tp1": runs[1], "tp2": runs[2], "tokens_equal_tp1": equal,
            "tp1_equals_reference": runs[1].get("passed"), "tp2_equals_reference": runs[2].get("passed")}


def serve_c256(args, name: str, server_args: str = "") -> tuple[int, list[str], dict]:
    """pmod-serve under vllm bench serve at concurrency 256 (benchmarks.e2e_serve) into
    OUT/`name`/e2e_serve.json: (return code, command, pmod's report)."""
    out = args.out / name
    cmd = [sys.executable, "-m", "benchmarks.e2e_serve", "--out", str(out), "--models", str(args.models),
           "--engines", "pmod", "--runs", "warmup,image_c256", "--deadline-s", str(args.serve_deadline_s)]
    if server_args:
        cmd += ["--server-args", server_args]
    rc = _run(cmd, args.out / f"{name}.log", args.serve_deadline_s + 60, {"NCCL_NVLS_ENABLE": "0"})
    report = json.loads((out / "e2e_serve.json").read_text()) if (out / "e2e_serve.json").exists() else {}
    return rc, cmd, report.get("pmod", {})


def section_one_gpu(args) -> dict:
    """The one-GPU reference of dp2."""
    rc, cmd, pmod = serve_c256(args, "one_gpu")
    c256 = pmod.get("runs", {}).get("image_c256", {})
    return {"returncode": rc, "command": shlex.join(cmd), "server_command": pmod.get("server_command"),
            "requests_per_s": c256.get("request_throughput"), "completed": c256.get("completed"),
            "failed": c256.get("failed"), "error": pmod.get("error") or c256.get("error")}


def section_dp2(args) -> dict:
    """pmod-serve --data-parallel-size 2 against the one-GPU run of the same session."""
    rc, cmd, pmod = serve_c256(args, "dp2", "--data-parallel-size 2")
    c256 = pmod.get("runs", {}).get("image_c256", {})
    one_gpu_path = args.one_gpu or args.out / "one_gpu.json"
    one_gpu = json.loads(one_gpu_path.read_text()) if one_gpu_path.exists() else {}
    if "pmod" in one_gpu:  # an e2e_serve.json (--one-gpu), not a one_gpu section
        one_gpu = one_gpu["pmod"].get("runs", {}).get("image_c256", {})
        one_gpu["requests_per_s"] = one_gpu.get("request_throughput")
    per_engine = c256.get("kv_metrics_per_engine", {})
    metrics_ok = kv_metrics_agree(per_engine, num_engines=2)
    return {"returncode": rc, "command": shlex.join(cmd), "server_command": pmod.get("server_command"),
            "requests_per_s": c256.get("request_throughput"), "completed": c256.get("completed"),
            "failed": c256.get("failed"), "one_gpu_requests_per_s": one_gpu.get("requests_per_s"),
            "throughput_ratio_vs_one_gpu": ratio(c256.get("request_throughput"), one_gpu.get("requests_per_s")),
            "kv_metrics_per_engine": per_engine, "metrics_per_engine_ok": metrics_ok,
            "error": pmod.get("error") or c256.get("error")}


def section_tp2(args) -> dict:
    pmod_dir, dense_dir = args.models / "pmod-next-7b", args.models / "llava-next-7b-hf"
    tokenizer = pmod_dir / "tokenizer.model"
    flags = ["--tensor-parallel-size", "2", "--attention-backend", "FLASH_ATTN"]
    pmod = bench(args, "tp2_pmod", "pmod", pmod_dir, tokenizer, "kv_one_request,throughput,quality", *flags)
    dense = bench(args, "tp2_baseline", "baseline", dense_dir, tokenizer, "kv_one_request,throughput", *flags)
    return {"pmod": pmod, "baseline": dense,
            "kv_bytes_ratio": ratio(kv_bytes(pmod), kv_bytes(dense)),
            "throughput_ratio": ratio((pmod.get("throughput") or {}).get("requests_per_s"),
                                      (dense.get("throughput") or {}).get("requests_per_s"))}


def section_fp8(args) -> dict:
    pmod_dir, dense_dir = args.models / "pmod-next-7b", args.models / "llava-next-7b-hf"
    tokenizer = pmod_dir / "tokenizer.model"
    eager = ["--enforce-eager", "--attention-backend", "FLASH_ATTN"]
    runs = {
        "bf16": bench(args, "fp8_base_pmod_bf16", "pmod", pmod_dir, tokenizer, "kv_one_request,quality", *eager),
        "fp8_kv": bench(args, "fp8_pmod_fp8_kv", "pmod", pmod_dir, tokenizer, "kv_one_request,quality",
                        *eager, "--kv-cache-dtype", "fp8"),
        "fp8_weights": bench(args, "fp8_pmod_fp8_weights", "pmod", pmod_dir, tokenizer,
                             "kv_one_request,quality,chat", *eager, "--quantization", "fp8"),
        "dense_bf16": bench(args, "fp8_baseline_bf16", "baseline", dense_dir, tokenizer, "kv_one_request", *eager),
    }
    return {"runs": runs, **quality_report(runs, kv_base=runs["dense_bf16"])}


# `--quantization fp8` with weight-only FP8 (W8A16: FP8 weights, bf16 activations) through vLLM's
# Marlin kernels, which vLLM otherwise uses only on GPUs without FP8 compute. The W8A8 default
# quantizes activations per token too; weight-only separates the two error sources.
W8A16 = {"VLLM_TEST_FORCE_FP8_MARLIN": "1"}
TINY_FLAGS = ["--load-format", "auto", "--enforce-eager", "--attention-backend", "TRITON_ATTN",
              "--max-model-len", "2048", "--gpu-memory-utilization", "0.3", "--tiny"]


def section_tiny_quality(args) -> dict:
    tokenizer = TRAINED_TINY / "tokenizer.model"
    runs = {
        "bf16": bench(args, "tiny_pmod_bf16", "pmod", TRAINED_TINY, tokenizer, "quality,chat", *TINY_FLAGS),
        "fp8_kv": bench(args, "tiny_pmod_fp8_kv", "pmod", TRAINED_TINY, tokenizer, "quality,chat", *TINY_FLAGS,
                        "--kv-cache-dtype", "fp8"),
        "fp8_weights": bench(args, "tiny_pmod_fp8_weights", "pmod", TRAINED_TINY, tokenizer, "quality,chat",
                             *TINY_FLAGS, "--quantization", "fp8"),
        "fp8_weights_w8a16": bench(args, "tiny_pmod_fp8_weights_w8a16", "pmod", TRAINED_TINY, tokenizer,
                                   "quality,chat", *TINY_FLAGS, "--quantization", "fp8", env=W8A16),
    }
    return {"checkpoint": str(TRAINED_TINY.relative_to(REPO)), "runs": runs, **quality_report(runs)}


def section_tiny_dense_quality(args) -> dict:
    """The same fp8-weights check on the dense control: is a policy miss p-MoD's or FP8's?"""
    tokenizer = TRAINED_TINY_DENSE / "tokenizer.model"
    runs = {
        "bf16": bench(args, "tiny_dense_bf16", "pmod", TRAINED_TINY_DENSE, tokenizer, "quality", *TINY_FLAGS),
        "fp8_weights": bench(args, "tiny_dense_fp8_weights", "pmod", TRAINED_TINY_DENSE, tokenizer, "quality",
                             *TINY_FLAGS, "--quantization", "fp8"),
        "fp8_weights_w8a16": bench(args, "tiny_dense_fp8_weights_w8a16", "pmod", TRAINED_TINY_DENSE, tokenizer,
                                   "quality", *TINY_FLAGS, "--quantization", "fp8", env=W8A16),
    }
    return {"checkpoint": str(TRAINED_TINY_DENSE.relative_to(REPO)), "runs": runs, **quality_report(runs)}


def quality_report(runs: dict, kv_base: dict | None = None) -> dict:
    base = runs["bf16"].get("quality")
    report = {}
    for name in ("fp8_kv", "fp8_weights", "fp8_weights_w8a16"):
        if name not in runs:
            continue
        other = runs[name].get("quality")
        report[name] = {"quality": compare_quality(base, other, **POLICIES["fp8"]) if base and other else None,
                        "errors": runs[name].get("errors"), "returncode": runs[name].get("returncode")}
        if kv_base is not None:
            report[name]["kv_bytes_ratio_vs_bf16_dense"] = ratio(kv_bytes(runs[name]), kv_bytes(kv_base))
            report[name]["kv_bytes_ratio_vs_bf16_pmod"] = ratio(kv_bytes(runs[name]), kv_bytes(runs["bf16"]))
    if kv_base is not None:
        report["bf16_kv_bytes_ratio_vs_dense"] = ratio(kv_bytes(runs["bf16"]), kv_bytes(kv_base))
    report["chat"] = {name: run.get("chat") for name, run in runs.items() if run.get("chat")}
    return report


# ------------------------------------------------------------------------------------------------
# Merge into benchmarks/results/gpu_configs.json
# ------------------------------------------------------------------------------------------------


def merge(dirs: list[Path]) -> dict:
    sections: dict[str, dict] = {}
    for directory in dirs:
        for name in SECTIONS:
            path = directory / f"{name}.json"
            if path.exists():
                sections[name] = json.loads(path.read_text())
    tiny_tp, tp2, dp2 = sections.get("tiny_tp", {}), sections.get("tp2", {}), sections.get("dp2", {})
    fp8, tiny_quality = sections.get("fp8", {}), sections.get("tiny_quality", {})
    gpu = next((s.get("gpu") for s in sections.values() if s.get("gpu")), None)

    tp2_quality = None
    base = ((fp8.get("runs") or {}).get("bf16") or {}).get("quality")
    if base and (tp2.get("pmod") or {}).get("quality"):
        tp2_quality = compare_quality(base, tp2["pmod"]["quality"], **POLICIES["bf16"])

    def fp8_entry(name: str) -> dict:
        full = (fp8.get(name) or {}).get("quality")
        tiny = (tiny_quality.get(name) or {}).get("quality")
        checks = [c for c in (full, tiny) if c is not None]
        return {"quality_full_size_dummy": full, "quality_trained_tiny": tiny,
                "quality_policy_pass": bool(checks) and len(checks) == 2 and all(c["passed"] for c in checks)}

    fp8_kv = fp8_entry("fp8_kv")
    fp8_weights = fp8_entry("fp8_weights")
    # The dense control says whether a p-MoD policy miss is FP8's alone (it does not decide the pass).
    fp8_weights["quality_trained_tiny_dense_control"] = (
        (sections.get("tiny_dense_quality", {}).get("fp8_weights") or {}).get("quality"))
    w8a16 = (tiny_quality.get("fp8_weights_w8a16") or {}).get("quality")
    fp8_weights["weight_only_w8a16"] = {
        "env": W8A16, "quality_trained_tiny": w8a16,
        "quality_trained_tiny_dense_control": (
            (sections.get("tiny_dense_quality", {}).get("fp8_weights_w8a16") or {}).get("quality")),
        "quality_policy_pass_trained_tiny": None if w8a16 is None else w8a16["passed"],
    }
    chat = (fp8.get("chat") or {}).get("fp8_weights")
    return {
        "gpu": gpu,
        "command": {name: section.get("command") for name, section in sections.items()},
        "tp2": {"gpu": gpu, "tokens_equal_tp1": tiny_tp.get("tokens_equal_tp1"),
                "tiny_float32_tp1_equals_reference": tiny_tp.get("tp1_equals_reference"),
                "tiny_float32_tp2_equals_reference": tiny_tp.get("tp2_equals_reference"),
                "full_size_bf16_vs_tp1": tp2_quality,
                "kv_bytes_ratio": tp2.get("kv_bytes_ratio"), "throughput_ratio": tp2.get("throughput_ratio")},
        "dp2": {"throughput_ratio_vs_one_gpu": dp2.get("throughput_ratio_vs_one_gpu"),
                "metrics_per_engine_ok": dp2.get("metrics_per_engine_ok"),
                "requests_per_s": dp2.get("requests_per_s"), "one_gpu_requests_per_s": dp2.get("one_gpu_requests_per_s"),
                "kv_metrics_per_engine": dp2.get("kv_metrics_per_engine")},
        "fp8_kv": {"kv_bytes_ratio_vs_bf16_dense": (fp8.get("fp8_kv") or {}).get("kv_bytes_ratio_vs_bf16_dense"),
                   "kv_bytes_ratio_vs_bf16_pmod": (fp8.get("fp8_kv") or {}).get("kv_bytes_ratio_vs_bf16_pmod"),
                   "quality_policy": POLICIES["fp8"], **fp8_kv},
        "fp8_weights": {"served": bool(chat and chat.get("output_tokens")), "chat": chat,
                        "quality_policy": POLICIES["fp8"], **fp8_weights},
        "bf16_kv_bytes_ratio_vs_dense_tp1": fp8.get("bf16_kv_bytes_ratio_vs_dense"),
    }


def prepare_models(models: Path, sections: tuple[str, ...]) -> None:
    """The model directories `sections` need (benchmarks.models: quick, weightless where full size)."""
    from benchmarks.models import prepare, prepare_tiny_checkpoints

    if set(sections) & {"one_gpu", "dp2", "tp2", "fp8"}:
        prepare(models)
    if "tiny_tp" in sections:
        prepare_tiny_checkpoints(models)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=REPO / ".gpu" / "models")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sections", type=lambda s: tuple(s.split(",")), default=())
    parser.add_argument("--one-gpu", type=Path,
                        help="dp2's reference: e2e_serve.json of a one-GPU pmod-serve run (image_c256) "
                             "instead of OUT/one_gpu.json")
    parser.add_argument("--serve-deadline-s", type=float, default=330,
                        help="one_gpu and dp2: e2e_serve's deadline, the server's start included")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the complete benchmarks.bench runs already under --out (a section cut "
                             "off by a time limit is finished without running them again)")
    parser.add_argument("--merge", type=Path, nargs="+")
    args = parser.parse_args(argv)
    if args.merge:
        write_json(args.out, merge(args.merge))
        print(json.dumps(merge(args.merge), indent=1, default=str)[:4000])
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    args.models = args.models.resolve()
    prepare_models(args.models, args.sections)
    functions = {"tiny_tp": section_tiny_tp, "one_gpu": section_one_gpu, "dp2": section_dp2, "tp2": section_tp2, "fp8": section_fp8,
                 "tiny_quality": section_tiny_quality, "tiny_dense_quality": section_tiny_dense_quality}
    for name in args.sections:
        start = time.monotonic()
        try:
            result = functions[name](args)
        except Exception as exc:  # keep the other sections' results
            import traceback

            result = {"error": repr(exc), "traceback": traceback.format_exc()[-3000:]}
        # The GPU the section's runs had (a resumed section may be finished on another machine).
        run_gpus = [run.get("gpu") for run in _bench_runs(result) if run.get("gpu")]
        result.update({"section_s": time.monotonic() - start, "gpu": run_gpus[0] if run_gpus else gpu_name(),
                       "command": result.get("command") or shlex.join([sys.executable, "-m", "benchmarks.gpu_configs",
                                                                        *(argv or sys.argv[1:])])})
        write_json(args.out / f"{name}.json", result)
        _log(f"section {name}: {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
