"""One configuration of the GPU exactness suite: the vLLM p-MoD engine against the plain-PyTorch
reference (pmod_reference.model, float32 on the CPU), on the tiny random-weight checkpoints of the
CPU tests.

    python -m benchmarks.exact --checkpoint DIR --variant next|v15 --dtype float32|bfloat16
        [--attention-backend TRITON_ATTN|FLASH_ATTN|...] [--enforce-eager] --out FILE.json

float32 (`--check exact`): greedy tokens must equal the reference's, token for token, and the
prompt token ids must be the reference's. On CUDA, run float32 with TRITON_F32_DEFAULT=ieee so
Triton's float32 dots are IEEE (not TF32).

bfloat16 (`--check tolerance`): FlashAttention has no float32 kernels, so its run is bf16 and
is judged by the tolerance policy of benchmarks/README.md: the fp32 reference is teacher-forced
along the engine's own tokens, and at every generated position
  (a) the engine's token is the reference's argmax, or the reference prefers its argmax by at
      most `--tie-margin` nats (a near tie that bf16 rounding may flip), and
  (b) over the engine's top-5 logprobs at that position, the largest |engine - reference|
      logprob difference stays under `--max-logprob-error` nats.
The exact-match prefix against the reference's own greedy tokens is reported too.

`--passes 2` replays every batch on the same engine: with prefix caching on (the default), the
second pass hits the first pass's blocks (image and text up to the last full block), so its tokens
check the prefix-cache path against the same reference; each case records `num_cached_tokens` per
pass, and a later pass passes only if every prompt of two blocks or more hit.

`--compare A.json B.json` compares two `--check tolerance` runs of the same cases (say, with and
without PMOD_ATTENTION_METADATA_PER_CLASS=1): equal tokens, largest top-5 logprob difference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# LLM.collective_rpc with a callable (the KV cache probe) pickles it for the engine process.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

from benchmarks.common import make_image, vicuna_prompt, write_json  # noqa: E402

NEW_TOKENS = 16
QUESTION = "What is shown in this image?"


def cases(variant: str):
    if variant == "v15":
        return [
            ("v15-512x384", vicuna_prompt(QUESTION, 1), [make_image(512, 384, 7)]),
            ("v15-300x300", vicuna_prompt(QUESTION, 1), [make_image(300, 300, 7)]),
        ]
    sizes = [(400, 300), (300, 700), (672, 672), (1000, 200)]
    items = [(f"next-{w}x{h}", vicuna_prompt(QUESTION, 1), [make_image(w, h, seed)])
             for seed, (w, h) in enumerate(sizes)]
    items.append(("next-two-images", vicuna_prompt("Compare the two images.", 2),
                  [make_image(640, 480, 11), make_image(336, 336, 12)]))
    items.append(("next-text-only-mixed", vicuna_prompt("Tell me about cats and dogs.", 0), []))
    # Batch 2: three image requests, so decode batches are padded to a CUDA graph size (3 -> 4).
    items += [(f"next-pad-{i}", vicuna_prompt(QUESTION, 1), [make_image(336 + 64 * i, 336, 40 + i)])
              for i in range(3)]
    # Batch 3: a text-only request alone (no compaction at all; graphs read the copied lengths).
    items.append(("next-text-only", vicuna_prompt("Tell me about cats and dogs.", 0), []))
    return items


def batches_of(variant: str, items):
    if variant == "v15":
        return [items]
    return [items[:6], items[6:9], items[9:]]


def teacher_forced_logprobs(reference, prompt, images, tokens):
    """fp32 reference log-softmax at each generated position, fed the engine's own tokens."""
    import torch

    with torch.no_grad():
        inputs = reference.prompt_inputs(prompt, images)
        caches = reference._new_caches()
        num_prompt = len(inputs.token_ids)
        hidden, _ = reference.model(reference.embed_prompt(inputs, images), torch.arange(num_prompt), caches,
                                    inputs.target_mask)
        result = []
        for i, token in enumerate(tokens):
            logits = reference.module.lm_head(hidden[-1]).float()
            result.append(torch.log_softmax(logits, dim=-1))
            if i == len(tokens) - 1:
                break
            hidden, _ = reference.model(reference.model.embed_tokens(torch.tensor([token])),
                                        torch.tensor([num_prompt + i]), caches)
    return result


def check_case(args, reference, ref, ref_prompt_ids, prompt, images, out) -> dict:
    tokens = list(out.outputs[0].token_ids)
    prefix = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), min(len(tokens), len(ref)))
    case = {"tokens": tokens, "reference": ref, "exact": tokens == ref, "match_prefix": prefix,
            "prompt_ids_match": list(out.prompt_token_ids) == ref_prompt_ids,
            "num_prompt_tokens": len(out.prompt_token_ids),
            "num_cached_tokens": int(out.num_cached_tokens or 0)}
    if args.check == "tolerance" or not case["exact"]:
        # (for an exact-check failure: diagnostics only, the verdict stays "not exact")
        ref_lp = teacher_forced_logprobs(reference, prompt, images, tokens)
        worst_margin, worst_err, violations = 0.0, 0.0, []
        for pos, (token, lp, top) in enumerate(zip(tokens, ref_lp, out.outputs[0].logprobs)):
            margin = float(lp.max() - lp[token])
            err = max(abs(float(entry.logprob) - float(lp[tid])) for tid, entry in top.items())
            worst_margin, worst_err = max(worst_margin, margin), max(worst_err, err)
            if margin > args.tie_margin or err > args.max_logprob_error:
                violations.append({"pos": pos, "margin": margin, "logprob_error": err})
        case.update({"max_regret_nats": worst_margin, "max_logprob_error_nats": worst_err,
                     "violations": violations,
                     # the engine's own top-5 per position, to compare two engine runs exactly
                     "top_logprobs": [{str(tid): float(entry.logprob) for tid, entry in top.items()}
                                      for top in out.outputs[0].logprobs]})
        case["ok"] = case["prompt_ids_match"] and not violations
    if args.check == "exact":
        case["ok"] = case["prompt_ids_match"] and case["exact"]
    return case


def noise_floor(checkpoint: Path, variant: str) -> dict:
    """How far the reference itself, run in bfloat16 (CPU), lands from the float32 reference.

    Same statistics as the engine's tolerance check (teacher-forced float32 reference along the
    bf16 run's own greedy tokens): the bf16 noise floor of the checkpoint, against which the
    engine's bf16 deviation is judged."""
    import torch

    from pmod_reference.model import PmodReference

    r32 = PmodReference(checkpoint, dtype=torch.float32)
    r16 = PmodReference(checkpoint, dtype=torch.bfloat16)
    out = {}
    for name, prompt, images in cases(variant):
        with torch.no_grad():
            inputs = r16.prompt_inputs(prompt, images)
            caches = r16._new_caches()
            num_prompt = len(inputs.token_ids)
            hidden, _ = r16.model(r16.embed_prompt(inputs, images), torch.arange(num_prompt), caches,
                                  inputs.target_mask)
            tokens, logprobs = [], []
            for i in range(NEW_TOKENS):
                lp = torch.log_softmax(r16.module.lm_head(hidden[-1]).float(), -1)
                token = int(lp.argmax())
                tokens.append(token)
                logprobs.append(lp)
                if i == NEW_TOKENS - 1:
                    break
                hidden, _ = r16.model(r16.model.embed_tokens(torch.tensor([token])),
                                      torch.tensor([num_prompt + i]), caches)
        ref = teacher_forced_logprobs(r32, prompt, images, tokens)
        out[name] = {
            "max_regret_nats": max(float(r.max() - r[t]) for t, r in zip(tokens, ref)),
            "max_logprob_error_nats": max(
                max(abs(float(lp[j]) - float(r[j])) for j in torch.topk(lp, 5).indices.tolist())
                for lp, r in zip(logprobs, ref)),
        }
        print(name, out[name], flush=True)
    return out


def compare_runs(first: Path, second: Path) -> dict:
    """Two `--check tolerance` runs of the same cases (e.g. two engine paths): per case, whether
    the tokens are equal and the largest difference between their top-5 logprobs."""
    runs = [json.loads(Path(path).read_text())["cases"] for path in (first, second)]
    cases = {}
    for name in runs[0]:
        a, b = runs[0][name], runs[1].get(name)
        if b is None:
            cases[name] = {"tokens_equal": False, "missing": True}
            continue
        diffs = [abs(lp - other[tid]) for top, other in zip(a["top_logprobs"], b["top_logprobs"])
                 for tid, lp in top.items() if tid in other]
        cases[name] = {"tokens_equal": a["tokens"] == b["tokens"], "max_logprob_diff": max(diffs, default=None)}
    return {"runs": [str(first), str(second)], "cases": cases,
            "tokens_equal": all(case["tokens_equal"] for case in cases.values()),
            "max_logprob_diff": max((c.get("max_logprob_diff") or 0.0 for c in cases.values()), default=0.0)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--variant", choices=("next", "v15"), default="next")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attention-backend", default=None)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--check", choices=("exact", "tolerance"), default="exact")
    parser.add_argument("--tie-margin", type=float, default=0.1)
    parser.add_argument("--max-logprob-error", type=float, default=0.25)
    parser.add_argument("--capture-sizes", default="1,2,4,8,16")
    # Production configurations (issue 15): the same cases and checks under these engine flags.
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--passes", type=int, default=1,
                        help="run every batch this many times on one engine (later passes hit the prefix cache)")
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--name", default=None)
    parser.add_argument("--reference-cache", type=Path, default=None,
                        help="JSON of the reference's greedy tokens per case (computed once, reused)")
    parser.add_argument("--reference-only", action="store_true", help="fill --reference-cache and exit")
    parser.add_argument("--noise-floor", type=Path, default=None,
                        help="write the reference-in-bf16 noise floor of --checkpoint to this JSON and exit")
    parser.add_argument("--compare", type=Path, nargs=2, metavar="RUN.json",
                        help="compare two --check tolerance runs (tokens, top-5 logprobs) and exit")
    args = parser.parse_args()
    if not args.compare and args.checkpoint is None:
        parser.error("--checkpoint is required")

    if args.compare:
        comparison = compare_runs(*args.compare)
        print(json.dumps(comparison, indent=1))
        if args.out:
            write_json(args.out, comparison)
        return
    if args.noise_floor:
        write_json(args.noise_floor, {"checkpoint": str(args.checkpoint), "new_tokens": NEW_TOKENS,
                                      "cases": noise_floor(args.checkpoint, args.variant)})
        return

    import torch

    from pmod_reference.model import PmodReference

    result = {"name": args.name, "argv": sys.argv, "checkpoint": str(args.checkpoint), "dtype": args.dtype,
              "attention_backend": args.attention_backend, "enforce_eager": args.enforce_eager,
              "tensor_parallel_size": args.tensor_parallel_size, "kv_cache_dtype": args.kv_cache_dtype,
              "quantization": args.quantization,
              "check": args.check, "cases": {}, "errors": {},
              "env": {k: os.environ.get(k) for k in ("TRITON_F32_DEFAULT", "VLLM_FLOAT32_MATMUL_PRECISION", "PMOD_ROUTED_STEP_COMPILE")}}

    def save():
        write_json(args.out, result)

    items = cases(args.variant)
    reference = PmodReference(args.checkpoint)
    t0 = time.perf_counter()
    stamp_file = args.checkpoint / ".pmod_tiny_stamp.json"
    stamp = stamp_file.read_text() if stamp_file.exists() else str(args.checkpoint)
    cached = {}
    if args.reference_cache and args.reference_cache.exists():
        cached = json.loads(args.reference_cache.read_text())
        if cached.get("stamp") != stamp:
            cached = {}
    expected, prompt_ids = {}, {}
    for name, prompt, images in items:
        if name in cached.get("cases", {}):
            expected[name], prompt_ids[name] = cached["cases"][name]
        else:
            expected[name] = reference.generate(prompt, images, NEW_TOKENS)
            prompt_ids[name] = reference.prompt_token_ids(prompt, images)
    if args.reference_cache:
        write_json(args.reference_cache, {"stamp": stamp, "cases": {n: [expected[n], prompt_ids[n]] for n in expected}})
    result["reference_s"] = time.perf_counter() - t0
    if args.reference_only:
        print(f"reference cache written: {args.reference_cache} ({result['reference_s']:.0f}s)")
        return

    from vllm import LLM, SamplingParams

    kwargs = dict(model=str(args.checkpoint), dtype=args.dtype, seed=0, max_model_len=4096,
                  max_logprobs=20, gpu_memory_utilization=0.3,
                  tensor_parallel_size=args.tensor_parallel_size, kv_cache_dtype=args.kv_cache_dtype)
    if args.quantization:
        kwargs["quantization"] = args.quantization
    if args.no_prefix_caching:
        kwargs["enable_prefix_caching"] = False
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.attention_backend:
        kwargs["attention_backend"] = args.attention_backend
    if args.enforce_eager:
        kwargs["enforce_eager"] = True
    elif torch.cuda.is_available() and args.capture_sizes:
        kwargs["cudagraph_capture_sizes"] = [int(s) for s in args.capture_sizes.split(",")]
    t0 = time.perf_counter()
    try:
        llm = LLM(**kwargs)
    except Exception:
        result["errors"]["engine_start"] = traceback.format_exc()[-4000:]
        result["passed"] = False
        save()
        raise
    result["engine_start_s"] = time.perf_counter() - t0
    config = llm.llm_engine.vllm_config.compilation_config
    result["compilation_mode"] = str(config.mode)
    result["cudagraph_mode"] = str(config.cudagraph_mode)
    result["prefix_caching"] = bool(llm.llm_engine.vllm_config.cache_config.enable_prefix_caching)
    result["passes"] = args.passes
    block_size = result["block_size"] = llm.llm_engine.vllm_config.cache_config.block_size
    try:
        from benchmarks.common import rpc_kv_cache_info

        info = llm.collective_rpc(rpc_kv_cache_info, timeout=120)[0]
        result["attention_backends"] = info.get("attention_backends")
        result["num_kv_groups"] = info.get("num_groups")
    except Exception:
        result["errors"]["kv_cache_info"] = traceback.format_exc()[-2000:]

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=5)

    def request(prompt, images):
        return {"prompt": prompt, "multi_modal_data": {"image": images}} if images else {"prompt": prompt}

    batches = batches_of(args.variant, items)
    all_ok = True
    for pass_index in range(args.passes):
        outputs = {}
        for batch in batches:
            requests = [request(p, i) for _, p, i in batch]
            for (name, _, _), out in zip(batch, llm.generate(requests, params, use_tqdm=False)):
                outputs[name] = out
        for name, prompt, images in items:
            case = check_case(args, reference, expected[name], prompt_ids[name], prompt, images, outputs[name])
            if pass_index:
                # A replayed prompt of two blocks or more must hit (at least its first block).
                case["must_hit"] = case["num_prompt_tokens"] >= 2 * block_size
                case["ok"] = case["ok"] and (case["num_cached_tokens"] > 0 or not case["must_hit"])
                result.setdefault("later_passes", []).append({"pass": pass_index, "case": name, **case})
            else:
                result["cases"][name] = case
            all_ok &= case["ok"]
            print(f"[exact {args.name}] pass {pass_index} {name}: ok={case['ok']} exact={case['exact']} "
                  f"prefix={case['match_prefix']}/{len(expected[name])} cached={case['num_cached_tokens']}"
                  + (f" regret={case['max_regret_nats']:.3g} lp_err={case['max_logprob_error_nats']:.3g}"
                     if "max_regret_nats" in case else ""), flush=True)
    result["passed"] = all_ok
    save()
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass


if __name__ == "__main__":
    main()
