"""One engine of the side-by-side benchmark: p-MoD-LLaVA-NeXT-7B or vLLM's LLaVA-NeXT-7B.

    python -m benchmarks.bench --engine pmod|baseline --models DIR --out FILE.json [--tiny]

Both engines: load_format="dummy" (unless --load-format), the same dtype, gpu_memory_utilization, block size,
max_model_len, max_num_seqs, max_num_batched_tokens and attention backend. Everything else is
vLLM's default for the model: the baseline keeps torch.compile, FULL_AND_PIECEWISE CUDA graphs,
prefix caching and chunked multimodal input; p-MoD gets what pmod_serve.model_executor.models.config sets
(torch.compile and CUDA graphs except for steps that route visual tokens; prefix caching on since
issue #17, off in the results recorded before it). Every request carries its own
image (a fresh seed), so neither the multimodal processor cache nor prefix caching replays work.

Phases (each a fresh batch, timed with the host clock around LLM.generate, plus vLLM's own
per-request timestamps): kv_one_request, ttft_bs1, prefill_bs16, decode_bs32, decode_bs128
(also the measured max concurrency), throughput (256 mixed-size requests), text_only,
profile_bs32 (step timer with device events + torch.profiler summary).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks import common  # noqa: E402
from benchmarks.common import Timer, make_image, mean, median, vicuna_prompt  # noqa: E402
from pmod_serve.entrypoints.demo import data_url  # noqa: E402

STANDARD_SIZE = (672, 672)
MIXED_SIZES = [(672, 672), (336, 672), (1008, 336), (400, 300), (640, 480), (800, 600), (1000, 200), (300, 700)]
OUTPUT_TOKENS = 128

_seed = itertools.count(1000)
QUALITY_TOKENS = 16
QUALITY_SEED = 500


def quality_requests(num_prompts: int) -> list[dict]:
    """Fixed prompts for quality comparisons: images of every mixed size, and one text-only."""
    questions = ["What is shown in this image?", "Describe the colours in the picture.",
                 "How many objects are there?", "Where is the largest shape?"]
    requests = [{"prompt": vicuna_prompt("Tell me about cats and dogs.", 0)}]
    for i in range(num_prompts - 1):
        size = MIXED_SIZES[i % len(MIXED_SIZES)]
        requests.append({"prompt": vicuna_prompt(questions[i % len(questions)], 1),
                         "multi_modal_data": {"image": make_image(*size, QUALITY_SEED + i)}})
    return requests


def tokens_label(max_tokens: int) -> str:
    return f"max_tokens={max_tokens} (prefill + decode)"


def engine_kwargs(args) -> dict:
    kwargs = dict(
        model=str(args.model_dir),
        load_format=args.load_format,
        dtype=args.dtype,
        gpu_memory_utilization=args.gpu_memory_utilization,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        limit_mm_per_prompt={"image": 1},
        seed=0,
        disable_log_stats=False,
    )
    if args.attention_backend:
        kwargs["attention_backend"] = args.attention_backend
    # Production configurations (issue 15): each is one vLLM flag.
    if args.tensor_parallel_size != 1:
        kwargs["tensor_parallel_size"] = args.tensor_parallel_size
    if args.kv_cache_dtype != "auto":
        kwargs["kv_cache_dtype"] = args.kv_cache_dtype
    if args.quantization:
        kwargs["quantization"] = args.quantization
    if args.enforce_eager:
        kwargs["enforce_eager"] = True
    if args.tiny:
        kwargs["max_num_seqs"] = min(args.max_num_seqs, 64)
    return kwargs


class Bench:
    def __init__(self, llm, args, question: str):
        self.llm = llm
        self.args = args
        self.question = question
        self.stats: list = []
        self.tokenizer_prompt_len = None
        processor = llm.llm_engine.output_processor
        original = processor.update_scheduler_stats

        def record(scheduler_stats):
            if scheduler_stats is not None:
                self.stats.append((scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs,
                                   scheduler_stats.kv_cache_usage))
            return original(scheduler_stats)

        processor.update_scheduler_stats = record

    # -- requests --------------------------------------------------------------------------

    def image_request(self, size=STANDARD_SIZE):
        return {"prompt": vicuna_prompt(self.question, 1),
                "multi_modal_data": {"image": make_image(*size, next(_seed))}}

    def text_request(self):
        return {"prompt": vicuna_prompt(self.question, 0)}

    def params(self, max_tokens):
        from vllm import SamplingParams

        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    def run(self, requests, max_tokens):
        self.stats.clear()
        with Timer() as timer:
            outputs = self.llm.generate(requests, self.params(max_tokens), use_tqdm=False)
        return outputs, timer.seconds

    def scheduler_summary(self):
        if not self.stats:
            return {}
        return {"peak_running": max(s[0] for s in self.stats),
                "peak_kv_cache_usage": max(s[2] for s in self.stats),
                "steps": len(self.stats)}

    @staticmethod
    def engine_span(outputs):
        """Seconds from the first request reaching the engine core to the last token (engine clock)."""
        metrics = [o.metrics for o in outputs if o.metrics is not None]
        starts = [m.queued_ts for m in metrics if m.queued_ts]
        ends = [m.last_token_ts for m in metrics if m.last_token_ts]
        return (max(ends) - min(starts)) if starts and ends else None

    @staticmethod
    def max_concurrent_decoding(outputs):
        """Most requests between their first and last token at one time (engine clock)."""
        events = []
        for o in outputs:
            m = o.metrics
            if m is not None and m.first_token_ts and m.last_token_ts:
                events += [(m.first_token_ts, 1), (m.last_token_ts, -1)]
        best = current = 0
        for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
            current += delta
            best = max(best, current)
        return best

    @staticmethod
    def per_request(outputs):
        ttft, tpot, prompt_lens, out_lens = [], [], [], []
        for out in outputs:
            prompt_lens.append(len(out.prompt_token_ids))
            n = len(out.outputs[0].token_ids)
            out_lens.append(n)
            m = out.metrics
            if m is None:
                continue
            if m.first_token_latency:
                ttft.append(m.first_token_latency)
            if n > 1 and m.last_token_ts and m.first_token_ts:
                tpot.append((m.last_token_ts - m.first_token_ts) / (n - 1))
        return ttft, tpot, prompt_lens, out_lens

    # -- phases ----------------------------------------------------------------------------

    def warmup(self):
        self.run([self.image_request() for _ in range(2)] + [self.text_request()], 8)
        self.run([self.image_request(size) for size in MIXED_SIZES[:4]], 4)
        return {"done": True}

    def kv_one_request(self, kv_info):
        outputs, seconds = self.run([self.image_request()], OUTPUT_TOKENS)
        summary = self.scheduler_summary()
        prompt_len = len(outputs[0].prompt_token_ids)
        measured = summary.get("peak_kv_cache_usage", 0.0) * kv_info["pool_bytes"]
        usage = summary.get("peak_kv_cache_usage") or None
        return {"prompt_tokens": prompt_len, "output_tokens": len(outputs[0].outputs[0].token_ids),
                "peak_kv_cache_usage": usage, "kv_bytes_measured": measured,
                # How many such requests the engine's block pool holds at once (vLLM's own usage gauge).
                "capacity_measured": int(1.0 / usage) if usage else None, "seconds": seconds}

    def ttft_bs1(self, reps=5):
        walls, engine = [], []
        for _ in range(reps):
            outputs, seconds = self.run([self.image_request()], 1)
            walls.append(seconds)
            ttft, _, _, _ = self.per_request(outputs)
            engine.extend(ttft)
        return {"ttft_wall_s_median": median(walls), "ttft_wall_s_all": walls,
                "ttft_engine_s_median": median(engine), "prompt_tokens": len(outputs[0].prompt_token_ids)}

    def prefill_bs16(self, reps=3, batch=16):
        walls, tokens = [], None
        for _ in range(reps):
            outputs, seconds = self.run([self.image_request() for _ in range(batch)], 1)
            walls.append(seconds)
            tokens = sum(len(o.prompt_token_ids) for o in outputs)
        wall = median(walls)
        return {"batch": batch, "prompt_tokens_total": tokens, "wall_s_median": wall, "wall_s_all": walls,
                "prefill_tokens_per_s": tokens / wall, "images_per_s": batch / wall}

    def decode(self, batch):
        outputs, seconds = self.run([self.image_request() for _ in range(batch)], OUTPUT_TOKENS)
        ttft, tpot, prompt_lens, out_lens = self.per_request(outputs)
        return {"batch": batch, "wall_s": seconds, "tpot_s_median": median(tpot), "tpot_s_mean": mean(tpot),
                "ttft_s_median": median(ttft), "output_tokens_per_s": sum(out_lens) / seconds,
                "requests_per_s": batch / seconds, "prompt_tokens_median": median(prompt_lens),
                "engine_span_s": self.engine_span(outputs),
                "max_concurrent_decoding": self.max_concurrent_decoding(outputs),
                **self.scheduler_summary()}

    def throughput(self, num_requests):
        requests = [self.image_request(MIXED_SIZES[i % len(MIXED_SIZES)]) for i in range(num_requests)]
        outputs, seconds = self.run(requests, OUTPUT_TOKENS)
        ttft, tpot, prompt_lens, out_lens = self.per_request(outputs)
        return {"num_requests": num_requests, "sizes": MIXED_SIZES, "wall_s": seconds,
                "requests_per_s": num_requests / seconds, "output_tokens_per_s": sum(out_lens) / seconds,
                "total_tokens_per_s": (sum(out_lens) + sum(prompt_lens)) / seconds,
                "tpot_s_median": median(tpot), "ttft_s_median": median(ttft),
                "engine_span_s": self.engine_span(outputs),
                "prompt_tokens_mean": mean(prompt_lens), **self.scheduler_summary()}

    def text_only(self, reps=3):
        walls, tpots, ttfts = [], [], []
        for _ in range(reps):
            outputs, seconds = self.run([self.text_request()], OUTPUT_TOKENS)
            walls.append(seconds)
            ttft, tpot, _, _ = self.per_request(outputs)
            tpots.extend(tpot)
            ttfts.extend(ttft)
        return {"latency_s_median": median(walls), "latency_s_all": walls, "tpot_s_median": median(tpots),
                "ttft_s_median": median(ttfts), "prompt_tokens": len(outputs[0].prompt_token_ids),
                "output_tokens": OUTPUT_TOKENS}

    def quality(self, num_prompts: int, max_tokens: int = QUALITY_TOKENS):
        """Greedy tokens and top-5 log-probs of fixed prompts (the same images and questions for
        every engine configuration), for benchmarks.gpu_configs.compare_quality."""
        from vllm import SamplingParams

        outputs = self.llm.generate(quality_requests(num_prompts),
                                    SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=5),
                                    use_tqdm=False)
        return {"prompts": [
            {"prompt_tokens": len(out.prompt_token_ids), "tokens": list(out.outputs[0].token_ids),
             "top_logprobs": [{str(t): float(lp.logprob) for t, lp in position.items()}
                              for position in out.outputs[0].logprobs]}
            for out in outputs]}

    def chat(self):
        """One OpenAI-style image chat through vLLM's chat path (template, image_url, detokenised)."""
        image = make_image(640, 480, QUALITY_SEED)
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(image)}},
            {"type": "text", "text": "What is shown in this image?"}]}]
        from vllm import SamplingParams

        out = self.llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False,
                            chat_template=common.CHAT_TEMPLATE.read_text())[0]
        return {"prompt_tokens": len(out.prompt_token_ids), "text": out.outputs[0].text,
                "output_tokens": len(out.outputs[0].token_ids), "finish_reason": out.outputs[0].finish_reason}

    def host_profile(self, out_prefix: Path, batch=32):
        """cProfile (engine-core thread) of decoding: one text request, one image request, and
        `batch` image requests; what the host does per step, by function."""
        texts = []
        for label, requests in (("text, batch 1", [self.text_request()]),
                                ("image, batch 1", [self.image_request()]),
                                (f"image, batch {batch}", [self.image_request() for _ in range(batch)])):
            self.llm.collective_rpc(common.rpc_host_profile_start, timeout=120)
            _, seconds = self.run(requests, OUTPUT_TOKENS)
            text = self.llm.collective_rpc(common.rpc_host_profile_stop, timeout=300)[0]
            texts.append(f"######## {label}, {OUTPUT_TOKENS} output tokens, {seconds:.2f} s\n{text}")
        path = out_prefix.with_suffix(".hostprofile.txt")
        path.write_text("\n".join(texts))
        return {"host_profile": path.name}

    def profile(self, out_prefix: Path, batch=32, max_tokens=24):
        """torch.profiler summaries (worker side) of one batch-1 prefill and of a batch-32 run."""
        if self.args.no_torch_profiler:
            return {}
        texts = []
        for label, requests, tokens in (("prefill, batch 1, one 672x672 image (max_tokens=1)", [self.image_request()], 1),
                                        (f"batch {batch}, {tokens_label(max_tokens)}", [self.image_request() for _ in range(batch)], max_tokens)):
            self.llm.collective_rpc(common.rpc_profiler_start, timeout=120)
            self.run(requests, tokens)
            texts.append(f"######## {label}\n" + self.llm.collective_rpc(common.rpc_profiler_stop, timeout=300)[0])
        path = out_prefix.with_suffix(".profile.txt")
        path.write_text("\n".join(texts))
        return {"torch_profiler_table": path.name}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=("pmod", "baseline"), required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer-model", type=Path, default=None,
                        help="SentencePiece model used to cut the 60-token question (the same for both engines)")
    parser.add_argument("--tiny", action="store_true", help="CPU dry run: small batches")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--load-format", default="dummy", help="'auto' for a checkpoint with real weights")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--attention-backend", default=None)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--phases", default="all")
    parser.add_argument("--no-torch-profiler", action="store_true")
    parser.add_argument("--time-budget-s", type=float, default=None, help="skip the phases that would start later")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--quantization", default=None)
    parser.add_argument("--quality-prompts", type=int, default=12)
    args = parser.parse_args()

    import torch
    import vllm

    result: dict = {"engine": args.engine, "vllm_version": vllm.__version__, "torch_version": torch.__version__,
                    "gpu": None,
                    "argv": sys.argv, "errors": {}}
    kwargs = engine_kwargs(args)
    result["engine_kwargs"] = {k: v for k, v in kwargs.items()}

    def save():
        common.write_json(args.out, result)

    from vllm import LLM

    start = time.perf_counter()
    try:
        llm = LLM(**kwargs)
    except Exception:
        result["errors"]["engine_start"] = traceback.format_exc()[-4000:]
        save()
        raise
    result["engine_start_s"] = time.perf_counter() - start
    cache_config = llm.llm_engine.vllm_config.cache_config
    result["num_gpu_blocks"] = cache_config.num_gpu_blocks
    result["compilation_mode"] = str(llm.llm_engine.vllm_config.compilation_config.mode)
    result["cudagraph_mode"] = str(llm.llm_engine.vllm_config.compilation_config.cudagraph_mode)
    result["enable_prefix_caching"] = cache_config.enable_prefix_caching
    try:
        result["kv_cache"] = llm.collective_rpc(common.rpc_kv_cache_info, timeout=120)[0]
        result["gpu"] = result["kv_cache"].get("device_name")
    except Exception:
        result["errors"]["kv_cache_info"] = traceback.format_exc()[-3000:]
        result["kv_cache"] = {"pool_bytes": 0}
    save()

    tokenizer_model = args.tokenizer_model or args.model_dir / "tokenizer.model"
    question = common.question_of_tokens(tokenizer_model, 60)
    result["question"] = question
    bench = Bench(llm, args, question)
    tiny = args.tiny
    phases = [
        ("warmup", lambda: bench.warmup()),
        ("kv_one_request", lambda: bench.kv_one_request(result["kv_cache"])),
        ("ttft_bs1", lambda: bench.ttft_bs1(reps=2 if tiny else 5)),
        ("text_only", lambda: bench.text_only(reps=1 if tiny else 3)),
        ("prefill_bs16", lambda: bench.prefill_bs16(reps=1 if tiny else 3, batch=4 if tiny else 16)),
        ("decode_bs32", lambda: bench.decode(4 if tiny else 32)),
        ("profile", lambda: bench.profile(args.out, batch=4 if tiny else 32, max_tokens=8 if tiny else 24)),
        ("host_profile", lambda: bench.host_profile(args.out, batch=4 if tiny else 32)),
        ("decode_bs128", lambda: bench.decode(8 if tiny else 128)),
        ("throughput", lambda: bench.throughput(8 if tiny else args.num_requests)),
        ("quality", lambda: bench.quality(args.quality_prompts)),
        ("chat", lambda: bench.chat()),
    ]
    wanted = None if args.phases == "all" else set(args.phases.split(","))
    try:
        llm.collective_rpc(common.rpc_step_timer_start, timeout=120)
        timer = True
    except Exception:
        result["errors"]["step_timer"] = traceback.format_exc()[-2000:]
        timer = False
    result["step_timers"] = {}
    for name, phase in phases:
        if wanted is not None and name not in wanted and name != "warmup":
            continue
        if args.time_budget_s and time.perf_counter() - start > args.time_budget_s:
            result["errors"][name] = "skipped: time budget"
            continue
        t0 = time.perf_counter()
        if timer:
            llm.collective_rpc(common.rpc_step_timer_start, timeout=120)
        try:
            result[name] = phase()
        except Exception:
            result["errors"][name] = traceback.format_exc()[-3000:]
            print(result["errors"][name], file=sys.stderr, flush=True)
        if timer:
            try:
                result["step_timers"][name] = llm.collective_rpc(common.rpc_step_timer_stop, timeout=120)[0]
            except Exception:
                result["errors"][f"step_timer_{name}"] = traceback.format_exc()[-2000:]
        print(f"[bench {args.engine}] {name}: {time.perf_counter() - t0:.1f}s "
              f"{json.dumps(result.get(name), default=str)[:400]}", flush=True)
        print(f"[bench {args.engine}] {name} steps: "
              f"{json.dumps(result['step_timers'].get(name), default=str)[:700]}", flush=True)
        save()
    result["total_s"] = time.perf_counter() - start
    save()
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()


if __name__ == "__main__":
    main()
