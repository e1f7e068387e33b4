"""GPU check of pmod-serve: exactness on the GPU, then p-MoD vs vLLM's LLaVA-NeXT, side by side.

    python -m benchmarks.gpu_check --part env,exact,bench-baseline,bench-pmod,report \
        [--models DIR] [--out DIR] [--tiny]

Parts (each engine runs in its own subprocess, so one crash or leak never spoils the next):
  env             versions, GPU, and whether torchvision / transformers / vLLM's LLaVA-NeXT import
  exact           the exactness suite on the tiny checkpoints (benchmarks/exact.py), in the modes
                  listed in EXACT_CONFIGS: float32 with Triton attention (IEEE dots) eager and
                  with decode CUDA graphs, the LLaVA-1.5 layout, and bfloat16 FlashAttention
                  (FA3 on Hopper) with decode CUDA graphs under the tolerance policy
  bench-baseline  vLLM's LlavaNextForConditionalGeneration, 7B dims, dummy weights (benchmarks/bench.py)
  bench-pmod      p-MoD-LLaVA-NeXT-7B dims, dummy weights, same engine settings
  report          results JSON (benchmarks/results/) + markdown table from the two bench files
Files land in --out (default $OUT): exact.json, bench_<engine>.json, bench_<engine>.profile.txt.
On a machine without CUDA, `--tiny` dry-runs everything on tiny dims.
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

REPO = Path(__file__).resolve().parents[1]

# name, checkpoint variant, dtype, attention backend, eager, check
# In priority order (a deadline may cut the tail).
EXACT_CONFIGS = [
    ("fp32-triton-cudagraph", "next", "float32", "TRITON_ATTN", False, "exact"),
    ("bf16-flash-cudagraph", "next", "bfloat16", "FLASH_ATTN", False, "tolerance"),
    ("fp32-triton-eager", "next", "float32", "TRITON_ATTN", True, "exact"),
    ("v15-fp32-triton-cudagraph", "v15", "float32", "TRITON_ATTN", False, "exact"),
    ("bf16-flash-eager", "next", "bfloat16", "FLASH_ATTN", True, "tolerance"),
]
CPU_EXACT_CONFIGS = [("cpu-fp32-eager", "next", "float32", None, True, "exact")]


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(cmd: list[str], env: dict | None = None, timeout: float | None = None) -> int:
    log("$ " + " ".join(shlex.quote(c) for c in cmd))
    merged = dict(os.environ)
    merged.update(env or {})
    merged.setdefault("PYTHONUNBUFFERED", "1")
    merged["PYTHONPATH"] = str(REPO) + (":" + merged["PYTHONPATH"] if merged.get("PYTHONPATH") else "")
    try:
        return subprocess.run(cmd, env=merged, cwd=REPO, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        log(f"timed out after {timeout}s")
        return 124


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


# ---------------------------------------------------------------------------------------- env


def part_env(out: Path) -> None:
    code = r"""
import importlib, json, os, subprocess, sys
info = {"python": sys.version.split()[0]}
for name in ("torch", "transformers", "torchvision", "triton", "vllm", "sentencepiece", "PIL"):
    try:
        mod = importlib.import_module(name)
        info[name] = getattr(mod, "__version__", "?") + "  " + os.path.dirname(mod.__file__)
    except Exception as exc:
        info[name] = "IMPORT FAILED: " + repr(exc)[:300]
try:
    import torch
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
except Exception as exc:
    info["gpu"] = repr(exc)
for mod in ("vllm.model_executor.models.llava_next", "pmod_serve.model_executor.models.pmod_llava", "vllm.vllm_flash_attn"):
    try:
        importlib.import_module(mod); info[mod] = "ok"
    except Exception as exc:
        info[mod] = "IMPORT FAILED: " + repr(exc)[:300]
try:
    from vllm.vllm_flash_attn.flash_attn_interface import get_scheduler_metadata  # noqa
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
    info["flash_attn_version"] = get_flash_attn_version()
except Exception as exc:
    info["flash_attn_version"] = repr(exc)[:300]
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm",
                                         "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except Exception as exc:
    info["nvidia_smi"] = repr(exc)
print(json.dumps(info, indent=1))
"""
    run([sys.executable, "-c", code])


# -------------------------------------------------------------------------------------- exact


def part_exact(out: Path, models: Path, tiny: bool, deadline: float | None = None) -> dict:
    from benchmarks.common import write_json
    from benchmarks.models import prepare_tiny_checkpoints

    checkpoints = prepare_tiny_checkpoints(models)
    configs = EXACT_CONFIGS if has_cuda() else CPU_EXACT_CONFIGS
    summary = {"configs": {}}
    for name, variant, dtype, backend, eager, check in configs:
        if deadline is not None and time.time() > deadline - 100:
            summary["configs"][name] = {"passed": None, "skipped": "deadline"}
            log(f"exact {name}: skipped (deadline)")
            continue
        path = out / f"exact_{name}.json"
        cmd = [sys.executable, "-m", "benchmarks.exact", "--checkpoint", str(checkpoints[variant]),
               "--variant", variant, "--dtype", dtype, "--check", check, "--out", str(path), "--name", name,
               "--reference-cache", str(models / f"reference-{variant}.json")]
        if backend:
            cmd += ["--attention-backend", backend]
        if eager:
            cmd += ["--enforce-eager"]
        env = {"TRITON_F32_DEFAULT": "ieee"} if dtype == "float32" else {}
        start = time.perf_counter()
        timeout = 300 if deadline is None else max(60, min(300, deadline - time.time()))
        rc = run(cmd, env=env, timeout=timeout)
        entry = {"rc": rc, "seconds": round(time.perf_counter() - start, 1), "command": " ".join(cmd)}
        if path.exists():
            detail = json.loads(path.read_text())
            path.unlink()  # folded into exact.json (the device returns at most 8 files)
            entry.update({k: detail.get(k) for k in ("passed", "compilation_mode", "cudagraph_mode",
                                                     "attention_backends", "num_kv_groups", "engine_start_s",
                                                     "env", "errors")})
            entry["cases"] = {
                case: {k: v for k, v in c.items() if k not in ("tokens", "reference")} | (
                    {"tokens": c["tokens"], "reference": c["reference"]} if not c.get("ok") else {})
                for case, c in detail.get("cases", {}).items()
            }
        else:
            entry["passed"] = False
        summary["configs"][name] = entry
        log(f"exact {name}: passed={entry.get('passed')} rc={rc}")
        write_json(out / "exact.json", summary)
    summary["passed"] = all(c.get("passed") for c in summary["configs"].values() if c.get("skipped") is None)
    write_json(out / "exact.json", summary)
    return summary


# -------------------------------------------------------------------------------------- bench


def part_bench(engine: str, out: Path, models: Path, tiny: bool, extra: list[str]) -> int:
    from benchmarks.models import prepare

    dirs = prepare(models, tiny=tiny)
    path = out / f"bench_{engine}.json"
    cmd = [sys.executable, "-m", "benchmarks.bench", "--engine", engine, "--model-dir", str(dirs[engine]),
           "--out", str(path), "--tokenizer-model", str(dirs["pmod"] / "tokenizer.model")]
    if tiny:
        cmd += ["--tiny", "--dtype", "float32", "--max-num-batched-tokens", "4096", "--gpu-memory-utilization", "0.3"]
    elif has_cuda():
        cmd += ["--attention-backend", "FLASH_ATTN", "--time-budget-s", "420"]
    cmd += extra
    env = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    if not has_cuda():
        env["VLLM_CPU_KVCACHE_SPACE"] = "2"
    rc = run(cmd, env=env, timeout=None)
    if rc != 0 and engine == "pmod" and "--enforce-eager" not in extra:
        result = json.loads(path.read_text()) if path.exists() else {}
        if "engine_start" in result.get("errors", {}) or "warmup" in result.get("errors", {}):
            log("p-MoD failed with CUDA graphs; retrying eagerly (reported as such)")
            path.rename(out / "bench_pmod_cudagraph_failed.json")
            rc = run(cmd + ["--enforce-eager"], env=env)
    return rc


# ------------------------------------------------------------------------------------- report


def kv_bytes_theory(prompt_tokens: int, num_targets: int, fed: int, kv_cache: dict, compacted: bool) -> float:
    """Bytes of the KV blocks a request holds (block accounting of the engine's own layout): every
    layer ceil(slots / block size) pages; a p-MoD layer's slots leave out its skipped targets."""
    from pmod_serve.pmod.schedule import kept_target_count

    total = 0
    for group in kv_cache["groups"]:
        ratios = group.get("retention_ratios") or [None] * group["layers"]
        for ratio in ratios:
            slots = prompt_tokens + fed
            if compacted and ratio is not None:
                slots -= num_targets - kept_target_count(num_targets, ratio)
            total += math.ceil(slots / group["block_size"]) * group["page_size_bytes"]
    return total


def judge_exactness(exact: dict, floor: dict | None) -> dict:
    """Per configuration: exact cases (float32), and the calibrated bf16 tolerance policy.

    bf16 (benchmarks/README.md): text-only prompts (no routing) within the a-priori bounds (regret
    <= 0.1 nats, top-5 logprob error <= 0.25 nats); image prompts no further from the float32
    reference than the reference itself run in bf16 (the checkpoint's bf16 noise floor): max and
    median over cases of both statistics <= 1.25x the floor's."""
    from benchmarks.common import median

    for name, config in exact.get("configs", {}).items():
        cases = config.get("cases") or {}
        if not cases:
            continue
        config["exact_cases"] = f"{sum(1 for c in cases.values() if c.get('exact'))}/{len(cases)}"
        if not name.startswith("bf16") or floor is None:
            continue
        text = {n: c for n, c in cases.items() if "text-only" in n}
        image = {n: c for n, c in cases.items() if "text-only" not in n}
        stats = {}
        for key in ("max_regret_nats", "max_logprob_error_nats"):
            engine = [c[key] for c in image.values()]
            noise = [floor[n][key] for n in image if n in floor]
            stats[key] = {"engine_max": max(engine), "engine_median": median(engine),
                          "bf16_reference_max": max(noise), "bf16_reference_median": median(noise)}
        text_ok = all(c["max_regret_nats"] <= 0.1 and c["max_logprob_error_nats"] <= 0.25 for c in text.values())
        image_ok = all(v["engine_max"] <= 1.25 * v["bf16_reference_max"]
                       and v["engine_median"] <= 1.25 * v["bf16_reference_median"] for v in stats.values())
        config["a_priori_policy_passed"] = config.get("passed")
        config["calibrated_policy"] = {"text_only_within_a_priori_bounds": text_ok, "image_prompts_vs_bf16_reference": stats,
                                       "image_prompts_within_1.25x_floor": image_ok, "passed": text_ok and image_ok}
    return exact


def part_report(out: Path, results_dir: Path, command: str, tiny: bool, name: str | None = None) -> dict:
    from benchmarks.common import write_json

    base = json.loads((out / "bench_baseline.json").read_text())
    pmod = json.loads((out / "bench_pmod.json").read_text())
    exact = json.loads((out / "exact.json").read_text()) if (out / "exact.json").exists() else None
    floor_path = results_dir / "bf16_noise_floor.json"
    if exact is not None:
        floor = json.loads(floor_path.read_text())["cases"] if floor_path.exists() else None
        exact = judge_exactness(exact, floor)
    visual = 576 + 48 * 49  # one 672x672 image: 2x2 tiles, 48x48 map + newlines
    fed = 127  # 128 output tokens: the last one is never fed back

    def kv_block(res, pmod_engine):
        info = res.get("kv_cache", {})
        one = res.get("kv_one_request", {})
        prompt = one.get("prompt_tokens")
        if not info.get("groups") or not prompt:
            return {}
        theory = kv_bytes_theory(prompt, visual, fed, info, compacted=pmod_engine)
        dense = kv_bytes_theory(prompt, visual, fed, info, compacted=False)
        measured = one.get("kv_bytes_measured")
        return {"prompt_tokens": prompt, "kv_bytes_per_request_blocks": theory, "kv_bytes_dense_same_engine": dense,
                "kv_bytes_per_request_measured": measured, "pool_bytes": info["pool_bytes"],
                "capacity_by_blocks": int(info["pool_bytes"] // theory) if theory else None,
                "vllm_max_concurrency_at_max_model_len": info.get("vllm_max_concurrency_at_max_model_len")}

    kv_base, kv_pmod = kv_block(base, False), kv_block(pmod, True)

    def get(res, *keys):
        for key in keys:
            if not isinstance(res, dict):
                return None
            res = res.get(key)
        return res

    def ratio(a, b):
        return (a / b) if (a is not None and b not in (None, 0)) else None

    rows = {
        "kv_bytes_per_request": (kv_base.get("kv_bytes_per_request_measured"), kv_pmod.get("kv_bytes_per_request_measured")),
        "kv_bytes_per_request_blocks": (kv_base.get("kv_bytes_per_request_blocks"), kv_pmod.get("kv_bytes_per_request_blocks")),
        "max_concurrency": (get(base, "kv_one_request", "capacity_measured"), get(pmod, "kv_one_request", "capacity_measured")),
        "capacity_by_blocks": (kv_base.get("capacity_by_blocks"), kv_pmod.get("capacity_by_blocks")),
        "vllm_reported_concurrency_at_max_model_len": (kv_base.get("vllm_max_concurrency_at_max_model_len"),
                                                       kv_pmod.get("vllm_max_concurrency_at_max_model_len")),
        "max_concurrent_decoding_128_submitted": (get(base, "decode_bs128", "max_concurrent_decoding"),
                                                  get(pmod, "decode_bs128", "max_concurrent_decoding")),
        "ttft_bs1": (get(base, "ttft_bs1", "ttft_wall_s_median"), get(pmod, "ttft_bs1", "ttft_wall_s_median")),
        "prefill_tok_s_bs16": (get(base, "prefill_bs16", "prefill_tokens_per_s"), get(pmod, "prefill_bs16", "prefill_tokens_per_s")),
        "tpot_bs32": (get(base, "decode_bs32", "tpot_s_median"), get(pmod, "decode_bs32", "tpot_s_median")),
        "tpot_bs128": (get(base, "decode_bs128", "tpot_s_median"), get(pmod, "decode_bs128", "tpot_s_median")),
        "throughput": (get(base, "throughput", "requests_per_s"), get(pmod, "throughput", "requests_per_s")),
        "throughput_output_tok_s": (get(base, "throughput", "output_tokens_per_s"), get(pmod, "throughput", "output_tokens_per_s")),
        "text_only_overhead": (get(base, "text_only", "latency_s_median"), get(pmod, "text_only", "latency_s_median")),
    }
    ratios = {key: ratio(p, b) for key, (b, p) in rows.items()}
    targets = {"kv_bytes_per_request": ("<=", 0.58), "max_concurrency": (">=", 1.7), "ttft_bs1": ("<=", 0.70),
               "throughput": (">=", 1.5), "tpot_bs32": ("<=", 1.0), "text_only_overhead": ("<=", 1.05)}
    verdicts = {}
    for key, (op, bound) in targets.items():
        value = ratios.get(key)
        verdicts[key] = None if value is None else (value <= bound if op == "<=" else value >= bound)
    result = {
        "gpu": pmod.get("gpu"),
        "vllm_version": pmod.get("vllm_version"),
        "torch_version": pmod.get("torch_version"),
        "command": command,
        "tiny_dry_run": tiny,
        "baseline": {**{k: v for k, v in base.items() if k not in ("argv",)}, "kv": kv_base},
        "pmod": {**{k: v for k, v in pmod.items() if k not in ("argv",)}, "kv": kv_pmod},
        "ratios": {k: ratios[k] for k in ("kv_bytes_per_request", "max_concurrency", "ttft_bs1", "throughput",
                                          "tpot_bs32", "text_only_overhead")},
        "ratios_extra": {k: v for k, v in ratios.items()
                         if k not in ("kv_bytes_per_request", "max_concurrency", "ttft_bs1", "throughput",
                                      "tpot_bs32", "text_only_overhead")},
        "side_by_side": {k: {"baseline": b, "pmod": p} for k, (b, p) in rows.items()},
        "targets": {k: f"{op} {bound}" for k, (op, bound) in targets.items()},
        "target_met": verdicts,
        "exactness": exact,
    }
    name = name or ("gpu_results_tiny_dryrun" if tiny else "gpu_results")
    write_json(results_dir / f"{name}.json", result)
    (results_dir / f"{name}.md").write_text(markdown(result))
    log(f"report written to {results_dir / name}.json / .md")
    print(markdown(result))
    return result


def _fmt(value, unit=""):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if unit == "s":
            return f"{value * 1e3:.1f} ms"
        if unit == "GiB":
            return f"{value / 2**30:.3f} GiB"
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    if unit == "GiB":
        return f"{value / 2**30:.3f} GiB"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown(result: dict) -> str:
    side = result["side_by_side"]
    r = {**result["ratios"], **result["ratios_extra"]}
    met = result["target_met"]
    lines = [
        f"## p-MoD-LLaVA-NeXT-7B vs vLLM LLaVA-NeXT-7B ({result['gpu']}, vLLM {result['vllm_version']})",
        "",
        "Same engine settings for both (bf16, load_format=dummy, gpu_memory_utilization 0.90, block size 16, "
        "max_model_len 4096, max_num_seqs 256, max_num_batched_tokens 16384, FlashAttention); the baseline keeps "
        "vLLM's defaults (torch.compile + FULL_AND_PIECEWISE CUDA graphs, prefix caching on); so does p-MoD "
        "(prefix caching on since issue 17), except that steps routing visual tokens run eagerly with vLLM's CUDA kernels. "
        "Standard request: one 672x672 image (2928 visual "
        "tokens), a 60-token question, 128 output tokens (ignore_eos).",
        "",
        "| metric | vLLM LLaVA-NeXT | p-MoD | p-MoD / baseline | target | met |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]

    def row(label, key, unit="", target_key=None):
        b, p = side[key]["baseline"], side[key]["pmod"]
        target = result["targets"].get(target_key or key, "")
        verdict = met.get(target_key or key)
        mark = "" if not target else ("yes" if verdict else ("**no**" if verdict is False else "n/a"))
        lines.append(f"| {label} | {_fmt(b, unit)} | {_fmt(p, unit)} | {_fmt(r.get(key))} | {target} | {mark} |")

    row("KV bytes per request (measured: peak KV usage x pool)", "kv_bytes_per_request", "GiB")
    row("KV bytes per request (block accounting)", "kv_bytes_per_request_blocks", "GiB", target_key="-")
    row("max concurrent requests (measured: 1 / KV usage of one request)", "max_concurrency")
    row("max concurrent requests (block accounting: pool / bytes per request)", "capacity_by_blocks", target_key="-")
    row("vLLM's reported max concurrency (at max_model_len, dense)", "vllm_reported_concurrency_at_max_model_len",
        target_key="-")
    row("most requests decoding at once (128 submitted)", "max_concurrent_decoding_128_submitted", target_key="-")
    row("TTFT, batch 1, one image", "ttft_bs1", "s")
    row("prefill throughput, batch 16 (prompt tokens/s)", "prefill_tok_s_bs16", target_key="-")
    row("decode time per output token, batch 32", "tpot_bs32", "s")
    row("decode time per output token, batch 128 submitted", "tpot_bs128", "s", target_key="-")
    row("throughput, 256 mixed-size requests (req/s)", "throughput")
    row("throughput, 256 mixed-size requests (output tok/s)", "throughput_output_tok_s", target_key="-")
    row("text-only latency, batch 1, 128 tokens", "text_only_overhead", "s")
    lines += ["", "Command:", "", "```", result["command"], "```", ""]
    exact = result.get("exactness")
    if exact:
        lines += ["Exactness (tiny checkpoints, 16 greedy tokens per case, against the float32 reference):", "",
                  "| mode | attention | cudagraph mode | exact cases | result |", "| --- | --- | --- | --- | --- |"]
        for name, c in exact.get("configs", {}).items():
            if c.get("skipped"):
                verdict = "not run (time)"
            elif "calibrated_policy" in c:
                cal = c["calibrated_policy"]
                st = cal["image_prompts_vs_bf16_reference"]
                verdict = (("pass" if cal["passed"] else "**fail**") + " (calibrated bf16 policy: max regret "
                           f"{st['max_regret_nats']['engine_max']:.2f} vs bf16 reference "
                           f"{st['max_regret_nats']['bf16_reference_max']:.2f} nats, max logprob error "
                           f"{st['max_logprob_error_nats']['engine_max']:.2f} vs "
                           f"{st['max_logprob_error_nats']['bf16_reference_max']:.2f}; a-priori 0.1/0.25 bounds: "
                           f"{'pass' if c.get('a_priori_policy_passed') else 'fail'})")
            else:
                verdict = "pass" if c.get("passed") else "**fail**"
            lines.append(f"| {name} | {', '.join(c.get('attention_backends') or []) or 'n/a'} | "
                         f"{c.get('cudagraph_mode')} | {c.get('exact_cases', 'n/a')} | {verdict} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", default="env,exact,bench-baseline,bench-pmod,report")
    parser.add_argument("--models", type=Path, default=REPO / ".gpu" / "models")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--bench-args", default="", help="extra arguments for benchmarks/bench.py")
    parser.add_argument("--command", default=None, help="the command line recorded in the report")
    parser.add_argument("--report-name", default=None, help="file stem of the report under --results")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="seconds from now after which no new exactness configuration starts")
    args = parser.parse_args()
    out = args.out or Path(os.environ.get("OUT") or REPO / "bench-out")
    out.mkdir(parents=True, exist_ok=True)
    args.models.mkdir(parents=True, exist_ok=True)
    command = args.command or "python -m benchmarks.gpu_check " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    parts = args.part.split(",")
    deadline = time.time() + args.deadline_s if args.deadline_s else None
    extra = shlex.split(args.bench_args)
    for part in parts:
        log(f"=== {part} ===")
        if part == "env":
            part_env(out)
        elif part == "exact":
            part_exact(out, args.models, args.tiny, deadline)
        elif part in ("bench-baseline", "bench-pmod"):
            part_bench(part.split("-", 1)[1], out, args.models, args.tiny, extra)
        elif part == "report":
            part_report(out, args.results, command, args.tiny, args.report_name)
        else:
            raise SystemExit(f"unknown part {part!r}")


if __name__ == "__main__":
    main()
