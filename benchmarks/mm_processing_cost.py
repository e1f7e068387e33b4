"""What the API server spends on one image request before the engine sees it: p-MoD against dense.

vLLM renders an image chat request in the API server process: the multimodal processor of the
model tokenizes the prompt, preprocesses the image (p-MoD: `pmod_serve.multimodal.image_processing`,
PIL; vLLM's LLaVA-NeXT: transformers' `LlavaNextImageProcessor`, the torchvision-backed one where
torchvision is installed) and expands the image placeholder. That time is part of every TTFT.
This times exactly that call, the model's processor built by vLLM's registry as the API server
builds it (without the processor cache, so every call does the work), on fresh random images of
the standard request's size. A benchmark, not a test: medians of wall time, in one process.

    python -m benchmarks.mm_processing_cost --models .gpu/models --out OUT.json
    python -m benchmarks.mm_processing_cost --models /tmp/m --tiny --engines pmod   # CPU (p-MoD only)
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import image_size, make_image, vicuna_prompt, write_json
from benchmarks.models import prepare


def processor_of(model_dir: Path):
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    model_config = ModelConfig(model=str(model_dir), limit_mm_per_prompt={"image": 1})
    return MULTIMODAL_REGISTRY.create_processor(model_config, cache=None)


def time_processor(model_dir: Path, width: int, height: int, repeats: int, warmups: int) -> dict:
    processor = processor_of(model_dir)
    # Both tokenizers map "<image>" to their image placeholder.
    prompt = vicuna_prompt("Describe the image in detail.", num_images=1)
    times_ms, num_tokens = [], None
    for i in range(warmups + repeats):
        items = processor.info.parse_mm_data({"image": make_image(width, height, seed=i)})
        start = time.perf_counter()
        result = processor(prompt, items)
        elapsed = (time.perf_counter() - start) * 1000.0
        num_tokens = len(result["prompt_token_ids"])
        if i >= warmups:
            times_ms.append(elapsed)
    return {"model_dir": str(model_dir), "prompt_tokens": num_tokens, "repeats": repeats,
            "median_ms": statistics.median(times_ms), "min_ms": min(times_ms), "times_ms": times_ms}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True, help="the directory of `python -m benchmarks.models`")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--engines", default="pmod,baseline")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--image-size", type=image_size, default=image_size("672x672"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmups", type=int, default=3)
    args = parser.parse_args(argv)
    width, height = args.image_size
    dirs = prepare(args.models, tiny=args.tiny)
    report: dict = {"command": shlex.join(["python", "-m", "benchmarks.mm_processing_cost", *(sys.argv[1:] if argv is None else argv)]),
                    "image_size": "x".join(map(str, args.image_size))}
    for engine in args.engines.split(","):
        try:
            report[engine] = time_processor(dirs[engine], width, height, args.repeats, args.warmups)
        except Exception as exc:  # one model failing still reports the other
            report[engine] = {"error": f"{type(exc).__name__}: {exc}"}
        print(engine, {k: v for k, v in report[engine].items() if k != "times_ms"}, flush=True)
    if "median_ms" in report.get("pmod", {}) and "median_ms" in report.get("baseline", {}):
        report["ratio_median"] = report["pmod"]["median_ms"] / report["baseline"]["median_ms"]
    write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
