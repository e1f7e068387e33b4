"""Routing maps: which visual tokens each p-MoD layer kept, drawn over the image (cf. the paper's Fig. 5).

    python -m pmod_train routing-map IMAGE --out map.png [--question "..."] [--checkpoint DIR]

The kept tokens come from the plain-PyTorch reference (`PmodReference.kept_indices`: the top
``trunc(T * ratio)`` visual tokens by router weight at prefill, docs/p-mod.md, "A p-MoD layer at prefill"). Each panel shows the picture
as the model sees it (the pad layout's square crop); the patches a layer skipped are veiled in white.
The first panel is the picture with the model's greedy answer.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pmod_reference.model import PmodReference
from pmod_serve.multimodal.image_processing import expand_to_square
from pmod_serve.pmod.schedule import kept_target_count
from pmod_train.forward import vicuna_prompt

DEFAULT_QUESTION = "How many objects are there?"


@dataclass
class RoutingMap:
    grid: int  # visual tokens per side
    kept: dict[int, list[int]]  # p-MoD layer -> kept visual-token indices (0 .. grid*grid-1), ascending
    ratios: dict[int, float]
    answer: str
    question: str


def compute(reference: PmodReference, image: Image.Image, question: str = DEFAULT_QUESTION,
            max_new_tokens: int = 8) -> RoutingMap:
    if reference.layout.is_anyres:
        raise NotImplementedError("routing maps are drawn for the pad layout (one square crop per image)")
    prompt = vicuna_prompt(question)
    inputs = reference.prompt_inputs(prompt, [image])
    (span,) = inputs.image_spans
    grid = reference.layout.features_per_side
    if span.stop - span.start != grid * grid:
        raise ValueError(f"expected {grid * grid} visual tokens, got {span.stop - span.start}")
    kept = {
        layer: [i - span.start for i in indices if span.start <= i < span.stop]
        for layer, indices in reference.kept_indices(prompt, [image]).items()
    }
    answer_ids = reference.generate(prompt, [image], max_new_tokens)
    answer = reference.tokenizer.decode(answer_ids).strip()
    return RoutingMap(grid, kept, dict(reference.schedule.retention_ratio), answer, question)


def expected_counts(routing: RoutingMap) -> dict[int, int]:
    """What the schedule says each layer keeps: ``trunc(T * ratio)`` of the T visual tokens."""
    tokens = routing.grid * routing.grid
    return {layer: kept_target_count(tokens, ratio) for layer, ratio in routing.ratios.items()}


def draw(reference: PmodReference, image: Image.Image, routing: RoutingMap, out: str | Path,
         panel: int = 224) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    square = expand_to_square(image.convert("RGB"), reference.layout.pad_color)
    picture = np.asarray(square.resize((panel, panel), resample=Image.BICUBIC)).astype(np.float32) / 255
    layers = sorted(routing.kept)
    columns = min(5, len(layers) + 1)
    rows = math.ceil((len(layers) + 1) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.75 * rows + 0.5), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    axes.flat[0].imshow(picture)
    axes.flat[0].set_title(f"input\nanswer: {routing.answer}", fontsize=8)
    cell = panel / routing.grid
    veiled = picture * 0.22 + 0.78  # skipped tokens: almost white, like the paper's Figure 5
    for axis, layer in zip(list(axes.flat)[1:], layers):
        mask = np.zeros((routing.grid, routing.grid), dtype=bool)
        mask.flat[routing.kept[layer]] = True
        pixel_mask = np.kron(mask, np.ones((math.ceil(cell), math.ceil(cell)), dtype=bool))[:panel, :panel]
        axis.imshow(np.where(pixel_mask[..., None], picture, veiled))
        for line in range(1, routing.grid):  # the token grid
            axis.axhline(line * cell - 0.5, color="grey", linewidth=0.3, alpha=0.5)
            axis.axvline(line * cell - 0.5, color="grey", linewidth=0.3, alpha=0.5)
        total = routing.grid * routing.grid
        axis.set_title(f"layer {layer}: kept {len(routing.kept[layer])}/{total}\n"
                       f"(retention ratio {routing.ratios[layer]:.3f})", fontsize=8)
    figure.suptitle(f"p-MoD routing (visual tokens kept per layer)\nQ: {routing.question}", fontsize=10)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> None:
    from pmod_train.paths import PMOD_CHECKPOINT

    parser = argparse.ArgumentParser(prog="python -m pmod_train routing-map", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--checkpoint", type=Path, default=PMOD_CHECKPOINT)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    reference = PmodReference(args.checkpoint)
    image = Image.open(args.image)
    routing = compute(reference, image, args.question)
    path = draw(reference, image, routing, args.out)
    counts = ", ".join(f"{layer}:{len(kept)}" for layer, kept in sorted(routing.kept.items()))
    print(f"answer: {routing.answer}\nkept visual tokens per p-MoD layer (of {routing.grid ** 2}): {counts}\n"
          f"wrote {path}")


if __name__ == "__main__":
    main()
