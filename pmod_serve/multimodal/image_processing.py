"""Image pixels of p-MoD-LLaVA: a PIL image -> the CLIP crops of its layout
(docs/p-mod.md, "Image layouts"; the layout's geometry is `pmod_serve.pmod.image_layout`).

Each crop goes through transformers' CLIP image processor, PIL-backed (`CLIPImageProcessorPil`:
PIL and NumPy, no torchvision), configured from the checkpoint's `preprocessor_config.json`. What
transformers has no processor for, the LLaVA layouts, is here: the pad layout's expansion to a
square and the anyres base crop plus letterboxed tiles. Shared by the vLLM multimodal processor
and the plain-PyTorch reference; no vLLM import.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from pmod_serve.pmod.image_layout import ImageLayout, best_resolution

# Every resize of the released pipeline is PIL bicubic (the CLIP processor's and PIL's default).
RESAMPLE = Image.Resampling.BICUBIC


@functools.lru_cache(maxsize=16)
def clip_processor(layout: ImageLayout) -> CLIPImageProcessorPil:
    """transformers' CLIP processor with the layout's preprocessor settings."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": layout.shortest_edge},
        crop_size={"height": layout.crop_size, "width": layout.crop_size},
        image_mean=list(layout.image_mean),
        image_std=list(layout.image_std),
        rescale_factor=layout.rescale_factor,
        resample=RESAMPLE,
    )


def clip_preprocess(image: Image.Image, layout: ImageLayout) -> torch.Tensor:
    """One crop ``[3, crop, crop]`` float32: bicubic resize of the shortest edge, centre crop,
    rescale, normalise (transformers' CLIP processor)."""
    # Converted here, as the released code does (`.convert("RGB")`): transformers' own conversion
    # would composite an alpha channel onto white instead of dropping it.
    image = image.convert("RGB") if image.mode != "RGB" else image
    pixels = clip_processor(layout)(image, return_tensors=None)["pixel_values"][0]
    return torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))


def expand_to_square(image: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """Paste the image centred on a square canvas of ``color`` (the pad layout)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), color)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def letterbox(image: Image.Image, target_width: int, target_height: int) -> Image.Image:
    """Resize keeping the aspect ratio to fit ``target``, then paste centred on black."""
    width, height = image.size
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        new_width, new_height = target_width, min(math.ceil(height * scale_w), target_height)
    else:
        new_width, new_height = min(math.ceil(width * scale_h), target_width), target_height
    canvas = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    resized = image.resize((new_width, new_height), resample=RESAMPLE)
    canvas.paste(resized, ((target_width - new_width) // 2, (target_height - new_height) // 2))
    return canvas


def anyres_crops(image: Image.Image, layout: ImageLayout) -> list[Image.Image]:
    """Base image (whole image squashed to 336x336) followed by the letterboxed tiles, row-major."""
    target_width, target_height = best_resolution(*image.size, layout.grid_pinpoints)
    boxed = letterbox(image, target_width, target_height)
    side = layout.crop_size
    tiles = [
        boxed.crop((left, top, left + side, top + side))
        for top in range(0, target_height, side)
        for left in range(0, target_width, side)
    ]
    base = image.resize((layout.shortest_edge, layout.shortest_edge), resample=RESAMPLE)
    return [base, *tiles]


def preprocess(image: Image.Image, layout: ImageLayout) -> torch.Tensor:
    """``[num_crops, 3, 336, 336]`` float32 CLIP input of one image."""
    image = image.convert("RGB") if image.mode != "RGB" else image
    if layout.is_anyres:
        crops = anyres_crops(image, layout)
    elif layout.image_aspect_ratio == "pad":
        crops = [expand_to_square(image, layout.pad_color)]
    else:
        crops = [image]
    return torch.stack([clip_preprocess(crop, layout) for crop in crops])
