"""Accuracy of the trained tiny p-MoD-LLaVA against its dense twin: a miniature of the paper's Table 1.

    python -m benchmarks.accuracy [--num-examples 250] [--out benchmarks/results/accuracy.json]

Held-out synthetic pictures (`pmod_train.shapes`, a seed never used in training), one question each,
greedy, through vLLM with the pmod-serve plugin (in-process `LLM` engine, float32, CPU):
  - p-MoD: `pmod_train/checkpoints/shapes-pmod` (8 ordinary + 8 p-MoD layers, PRD 0.845 -> 0.525);
  - dense: `pmod_train/checkpoints/shapes-dense` (same dimensions, data and steps; no MoD layer),
    served by the same plugin;
  - reference: the plain-PyTorch reference (`pmod_reference.model`) of the p-MoD checkpoint.
An answer is right when the generated text (stripped, lower-case, trailing period dropped) equals
the expected one or two words. Per request it also reports the visual-token-layers processed (the
visual tokens every decoder layer ran on, summed over layers) and the KV cache the engine held at the
request's largest allocation, read from the scheduler's block tables (`pmod_serve.v1.core.kv_accounting`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in-process: its scheduler is readable

from pmod_train import shapes  # noqa: E402
from pmod_train.forward import vicuna_prompt  # noqa: E402
from pmod_train.paths import DENSE_CHECKPOINT, PMOD_CHECKPOINT  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 8


def normalise(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def visual_token_layers(schedule, num_visual: int) -> int:
    """Visual tokens processed, summed over decoder layers: T per ordinary layer, trunc(T*r) per p-MoD layer."""
    from pmod_serve.pmod.schedule import kept_target_count

    return sum(
        kept_target_count(num_visual, schedule.retention_ratio[layer]) if schedule.is_pmod_layer(layer) else num_visual
        for layer in range(schedule.num_layers)
    )


def serve(checkpoint: Path, items: list[shapes.Example]) -> dict[str, Any]:
    """Greedy answers from an in-process vLLM engine, and each request's largest KV allocation."""
    from vllm import LLM, SamplingParams

    from pmod_serve.v1.core.kv_accounting import kv_usage

    llm = LLM(model=str(checkpoint), dtype="float32", seed=0, max_model_len=512, max_num_seqs=64)
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    config = engine.model_config.hf_config
    bytes_per_slot = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS)
    started = time.monotonic()
    for index, item in enumerate(items):
        engine.add_request(f"q{index}", {"prompt": vicuna_prompt(item.question),
                                        "multi_modal_data": {"image": [item.image]}}, params)
    outputs: dict[int, list[int]] = {}
    texts: dict[int, str] = {}
    largest: dict[int, Any] = {}
    prompt_tokens: dict[int, int] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                index = int(output.request_id.split("-")[0][1:])
                outputs[index] = list(output.outputs[0].token_ids)
                texts[index] = output.outputs[0].text
                prompt_tokens[index] = len(output.prompt_token_ids)
        for request_id, kv in kv_usage(scheduler, per_request=True).requests.items():
            index = int(request_id.split("-")[0][1:])
            if index not in largest or kv.layer_slots >= largest[index].layer_slots:
                largest[index] = kv
    seconds = time.monotonic() - started
    block_size = scheduler.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
    n = len(items)
    return {
        "token_ids": [outputs[i] for i in range(n)],
        "texts": [texts[i] for i in range(n)],
        "prompt_tokens": [prompt_tokens[i] for i in range(n)],
        "kv_slots": [largest[i].layer_slots for i in range(n)],
        "kv_dense_slots": [largest[i].dense_layer_slots for i in range(n)],
        "kv_blocks": [largest[i].layer_blocks for i in range(n)],
        "kv_dense_blocks": [largest[i].dense_layer_blocks for i in range(n)],
        "bytes_per_slot": bytes_per_slot,
        "block_size": block_size,
        "seconds": seconds,
    }


def reference_answers(checkpoint: Path, items: list[shapes.Example]) -> tuple[list[list[int]], list[str], list[int]]:
    import torch

    from pmod_reference.model import PmodReference

    torch.set_num_threads(1)
    reference = PmodReference(checkpoint)
    ids, texts, kv = [], [], []
    for item in items:
        output = reference.generate_with_cache(vicuna_prompt(item.question), [item.image], MAX_NEW_TOKENS)
        ids.append(output.token_ids)
        texts.append(reference.tokenizer.decode(output.token_ids))
        kv.append(sum(output.kv_cache_lengths))
    return ids, texts, kv


def score(texts: list[str], items: list[shapes.Example]) -> dict[str, Any]:
    right = [normalise(t) == e.answer for t, e in zip(texts, items)]
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for ok, item in zip(right, items):
        by_kind[item.kind].append(ok)
    return {
        "accuracy": sum(right) / len(right),
        "by_question_type": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_kind.items())},
        "right": right,
    }


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def run(num_examples: int, pmod: Path, dense: Path, skip_reference: bool = False) -> dict[str, Any]:
    from pmod_serve.pmod.schedule import PmodSchedule

    items = shapes.heldout(num_examples)
    results: dict[str, Any] = {}
    served = {"pmod": serve(pmod, items), "dense": serve(dense, items)}
    for name, checkpoint in (("pmod", pmod), ("dense", dense)):
        config = json.loads((checkpoint / "config.json").read_text())
        schedule = PmodSchedule.from_config(config)
        tower = json.loads((checkpoint / config["mm_vision_tower"] / "config.json").read_text())
        num_visual = (tower["image_size"] // tower["patch_size"]) ** 2
        out = served[name]
        scored = score(out["texts"], items)
        results[name] = {
            "checkpoint": str(checkpoint.relative_to(REPO)) if checkpoint.is_relative_to(REPO) else str(checkpoint),
            "accuracy": scored["accuracy"],
            "by_question_type": scored["by_question_type"],
            "pmod_layers": {str(k): round(v, 4) for k, v in sorted(schedule.retention_ratio.items())},
            "visual_tokens_per_image": num_visual,
            "visual_token_layers_per_request": visual_token_layers(schedule, num_visual),
            "mean_prompt_tokens": mean(out["prompt_tokens"]),
            "kv_slots_per_request_mean": mean(out["kv_slots"]),
            "kv_bytes_per_request_mean": mean(out["kv_slots"]) * out["bytes_per_slot"],
            "kv_dense_layout_slots_per_request_mean": mean(out["kv_dense_slots"]),
            "kv_blocks_per_request_mean": mean(out["kv_blocks"]),
            "kv_block_size": out["block_size"],
            "engine_seconds": round(out["seconds"], 1),
            "training": json.loads((checkpoint / "training.json").read_text()),
        }
    if not skip_reference:
        ref_ids, ref_texts, ref_kv = reference_answers(pmod, items)
        scored = score(ref_texts, items)
        results["reference_pmod"] = {
            "accuracy": scored["accuracy"],
            "by_question_type": scored["by_question_type"],
            "kv_slots_per_request_mean": mean(ref_kv),
            "served_tokens_equal_reference": mean(a == b for a, b in zip(served["pmod"]["token_ids"], ref_ids)),
        }
    results["examples"] = [
        {"question": e.question, "answer": e.answer, "pmod": served["pmod"]["texts"][i],
         "dense": served["dense"]["texts"][i]}
        for i, e in enumerate(items[:10])
    ]
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-examples", type=int, default=250)
    parser.add_argument("--pmod", type=Path, default=PMOD_CHECKPOINT)
    parser.add_argument("--dense", type=Path, default=DENSE_CHECKPOINT)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "accuracy.json")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    started = time.monotonic()
    results = run(args.num_examples, args.pmod.resolve(), args.dense.resolve(), args.skip_reference)
    pmod, dense = results["pmod"], results["dense"]
    report = {
        "pmod_accuracy": pmod["accuracy"],
        "dense_accuracy": dense["accuracy"],
        "reference_pmod_accuracy": results.get("reference_pmod", {}).get("accuracy"),
        "num_examples": args.num_examples,
        "command": "python -m benchmarks.accuracy " + " ".join(shlex.quote(a) for a in argv),
        "task": f"pmod_train.shapes held-out stream (seed {shapes.HELDOUT_SEED}), one question per picture, "
                f"greedy, at most {MAX_NEW_TOKENS} new tokens, exact match",
        "engine": "vLLM 0.26.0 (CPU) + pmod-serve plugin, in-process LLM, float32",
        "visual_token_layers_ratio": pmod["visual_token_layers_per_request"] / dense["visual_token_layers_per_request"],
        "kv_slots_ratio": pmod["kv_slots_per_request_mean"] / dense["kv_slots_per_request_mean"],
        **{k: v for k, v in results.items()},
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"wrote {args.out}")


def table(report: dict[str, Any]) -> str:
    pmod, dense = report["pmod"], report["dense"]
    reference = report.get("reference_pmod")
    lines = [
        "| model | accuracy | color | shape | count | count_shape | position | visual-token-layers / request | KV slots / request (bytes) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def row(name: str, entry: dict[str, Any], layers: str, kv: str) -> str:
        kinds = entry["by_question_type"]
        cells = " | ".join(f"{kinds.get(k, float('nan')):.3f}" for k in shapes.QUESTION_TYPES)
        return f"| {name} | **{entry['accuracy']:.3f}** | {cells} | {layers} | {kv} |"

    for name, entry in (("dense LLaVA (served)", dense), ("p-MoD (served)", pmod)):
        kv = f"{entry['kv_slots_per_request_mean']:.0f} ({entry['kv_bytes_per_request_mean'] / 1024:.0f} KiB)"
        lines.append(row(name, entry, str(entry["visual_token_layers_per_request"]), kv))
    if reference:
        lines.append(row("p-MoD (PyTorch reference)", reference, str(pmod["visual_token_layers_per_request"]),
                         f"{reference['kv_slots_per_request_mean']:.0f}"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
