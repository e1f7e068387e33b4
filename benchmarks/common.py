"""Shared pieces of the GPU check and the benchmark: images, prompts, engine-side probes."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from model_registry import VICUNA_V1_SYSTEM_PROMPT, chat_template_path

VICUNA_SYSTEM = VICUNA_V1_SYSTEM_PROMPT

# Cut to exactly 60 tokens of the benchmark tokenizer by `question_of_tokens`.
_QUESTION_TEXT = (
    "Please describe the image in detail: the colors, the shapes, the objects, what each part "
    "shows, and how the parts relate to each other, then say what the photo is about, where it "
    "was taken, how many people are there, what they are doing, what is written on the signs, "
    "and which details a careful viewer would notice first and last."
)


def vicuna_prompt(question: str, num_images: int) -> str:
    images = "<image>\n" * num_images
    return f"{VICUNA_SYSTEM} USER: {images}{question} ASSISTANT:"


# The LLaVA v1 conversation template both engines are served with (vLLM's LLaVA-NeXT has none).
CHAT_TEMPLATE = chat_template_path("vicuna_v1")


def image_size(text: str) -> tuple[int, int]:
    """`WIDTHxHEIGHT` -> (width, height): the benchmarks' `--image-size` argument type."""
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def make_image(width: int, height: int, seed: int) -> Image.Image:
    """Deterministic structured image (gradients + noise), as tests/conftest.py makes them."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [(x * (seed + 1) * 7) % 256, (y * (seed + 3) * 5) % 256, ((x + y) * (seed + 5)) % 256], axis=-1
    )
    noise = rng.integers(0, 64, (height, width, 3))
    return Image.fromarray(((base + noise) % 256).astype(np.uint8))


def question_of_tokens(tokenizer_model: Path, num_tokens: int = 60) -> str:
    """The longest word prefix of `_QUESTION_TEXT` with at most `num_tokens` SentencePiece tokens."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    words = _QUESTION_TEXT.split()
    best = words[0]
    for n in range(1, len(words) + 1):
        text = " ".join(words[:n])
        if len(sp.encode(text)) > num_tokens:
            break
        best = text
    return best


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def write_json(path: Path, value: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, default=str) + "\n")


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def out_dir() -> Path:
    path = Path(os.environ.get("OUT") or "bench-out")
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------
# Engine-side probes, run inside the worker through LLM.collective_rpc (callables need
# VLLM_ALLOW_INSECURE_SERIALIZATION=1). Each takes the worker as `self`.
# --------------------------------------------------------------------------------------------


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def rpc_kv_cache_info(self) -> dict:
    """The KV cache the engine allocated: pool bytes, groups, and vLLM's own concurrency figure."""
    runner = self.model_runner
    config = runner.kv_cache_config
    info = {
        "num_blocks": config.num_blocks,
        "pool_bytes": int(sum(t.size for t in config.kv_cache_tensors)),
        "num_groups": len(config.kv_cache_groups),
        "groups": [
            {
                "layers": len(g.layer_names),
                "block_size": g.kv_cache_spec.block_size,
                "page_size_bytes": g.kv_cache_spec.page_size_bytes,
                "spec": type(g.kv_cache_spec).__name__,
                "retention_ratios": list(getattr(g.kv_cache_spec, "retention_ratios", ())),
            }
            for g in config.kv_cache_groups
        ],
        "attention_backends": sorted(
            {ag.backend.get_name() for groups in runner.attn_groups for ag in groups}
        ),
        "cudagraph_mode": str(runner.compilation_config.cudagraph_mode),
        "compilation_mode": str(runner.compilation_config.mode),
        "device_name": _device_name(),
    }
    try:
        from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

        info["vllm_max_concurrency_at_max_model_len"] = float(
            get_max_concurrency_for_kv_cache_config(runner.vllm_config, config)
        )
    except Exception as exc:  # pragma: no cover - informational
        info["vllm_max_concurrency_error"] = repr(exc)
    return info


def rpc_step_timer_start(self) -> bool:
    """Time every execute_model call (host) and the model forward (device events)."""
    import torch

    runner = self.model_runner
    records: list = []
    runner._bench_records = records
    if not hasattr(runner, "_bench_orig_execute"):
        runner._bench_orig_execute = runner.execute_model
        runner._bench_orig_forward = runner._model_forward

        def execute_model(scheduler_output, *args, **kwargs):
            start = time.perf_counter()
            current = {"t0": start, "tokens": scheduler_output.total_num_scheduled_tokens,
                       "reqs": len(scheduler_output.num_scheduled_tokens), "ev": None}
            runner._bench_current = current
            try:
                return runner._bench_orig_execute(scheduler_output, *args, **kwargs)
            finally:
                current["host_ms"] = (time.perf_counter() - start) * 1e3
                if runner._bench_records is not None:
                    runner._bench_records.append(current)

        def model_forward(*args, **kwargs):
            if not torch.cuda.is_available():
                return runner._bench_orig_forward(*args, **kwargs)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            out = runner._bench_orig_forward(*args, **kwargs)
            end.record()
            current = getattr(runner, "_bench_current", None)
            if current is not None:
                current["ev"] = (begin, end)
            return out

        runner.execute_model = execute_model
        runner._model_forward = model_forward
    return True


def rpc_step_timer_stop(self) -> dict:
    """Per-step summary: decode-only steps (1 token per request) and the others."""
    import torch

    runner = self.model_runner
    records = getattr(runner, "_bench_records", None) or []
    runner._bench_records = None
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    rows = []
    for i, rec in enumerate(records):
        gpu_ms = rec["ev"][0].elapsed_time(rec["ev"][1]) if rec.get("ev") else None
        period_ms = (records[i + 1]["t0"] - rec["t0"]) * 1e3 if i + 1 < len(records) else None
        rows.append({"tokens": rec["tokens"], "reqs": rec["reqs"], "host_ms": rec.get("host_ms"),
                     "gpu_forward_ms": gpu_ms, "period_ms": period_ms})

    def summary(selected):
        if not selected:
            return None
        return {
            "steps": len(selected),
            "median_reqs": median([r["reqs"] for r in selected]),
            "median_gpu_forward_ms": median([r["gpu_forward_ms"] for r in selected]),
            "median_host_execute_ms": median([r["host_ms"] for r in selected]),
            "median_step_period_ms": median([r["period_ms"] for r in selected]),
        }

    decode = [r for r in rows if r["tokens"] == r["reqs"]]
    other = [r for r in rows if r["tokens"] != r["reqs"]]
    slowest = sorted(rows, key=lambda r: -(r["period_ms"] or r["host_ms"] or 0))[:6]
    return {"decode_steps": summary(decode), "prefill_or_mixed_steps": summary(other), "num_steps": len(rows),
            "slowest_steps": slowest}


def rpc_profiler_start(self) -> bool:
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=activities)
    prof.__enter__()
    self.model_runner._bench_profiler = prof
    return True


def rpc_profiler_stop(self) -> str:
    prof = getattr(self.model_runner, "_bench_profiler", None)
    if prof is None:
        return ""
    prof.__exit__(None, None, None)
    self.model_runner._bench_profiler = None
    averages = prof.key_averages()
    sort = "cuda_time_total"
    try:
        device = averages.table(sort_by=sort, row_limit=30, max_name_column_width=70)
    except Exception:
        device = ""
    host = averages.table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=70)
    return f"== by device time ==\n{device}\n\n== by host time ==\n{host}\n"


def rpc_host_profile_start(self) -> bool:
    """cProfile of the engine core's thread (scheduler, runner, output handling) until stopped."""
    import cProfile

    profiler = cProfile.Profile()
    self.model_runner._bench_cprofile = profiler
    profiler.enable()
    return True


def rpc_host_profile_stop(self, limit: int = 45) -> str:
    import io
    import pstats

    profiler = getattr(self.model_runner, "_bench_cprofile", None)
    if profiler is None:
        return ""
    profiler.disable()
    self.model_runner._bench_cprofile = None
    texts = []
    for sort in ("cumulative", "tottime"):
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).strip_dirs().sort_stats(sort).print_stats(limit)
        texts.append(f"== host profile by {sort} ==\n{stream.getvalue()}")
    return "\n".join(texts)
