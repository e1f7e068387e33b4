"""Image pixels of p-MoD-LLaVA: a PIL image -> the CLIP crops of its layout
(docs/p-mod.md, "Image layouts"; the layout's geometry is `pmod_serve.pmod.image_layout`).

Each crop goes through transformers' CLIP image processor, PIL-backed (`CLIPImageProcessorPil`:
PIL and NumPy, no torchvision), configured from the checkpoint's `preprocessor_config.json`. What
transformers has no processor for, the LLaVA layouts, is here: the pad layout's expansion to a
square and the anyres base crop plus letterboxed tiles. Shared by the vLLM multimodal processor
and the plain-PyTorch reference; no vLLM import.

The processing is split in two. `crop_pixels` does the geometry (resizes, crops) and keeps the
8-bit pixels; `PixelNormalization` then rescales and normalises them. A pixel's normalised value
depends only on its 8-bit value and its channel, so normalisation is a lookup in a 3 x 256 table
computed with transformers' own arithmetic (rescale in float64, then normalise in float32): bit
for bit the processor's output. The vLLM model ships the 8-bit crops from the API server to the
engine (a quarter of the bytes) and looks them up on the GPU; `preprocess` does both on the CPU.
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
def clip_geometry(layout: ImageLayout) -> CLIPImageProcessorPil:
    """transformers' CLIP processor with the layout's resize and crop, without rescaling or
    normalising (8-bit pixels out)."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": layout.shortest_edge},
        crop_size={"height": layout.crop_size, "width": layout.crop_size},
        resample=RESAMPLE,
        do_rescale=False,
        do_normalize=False,
    )


def clip_crop(image: Image.Image, layout: ImageLayout) -> np.ndarray:
    """One crop ``[3, crop, crop]`` uint8 of an RGB image: bicubic resize of the shortest edge,
    centre crop (transformers' CLIP processor)."""
    if image.size == (layout.crop_size, layout.crop_size) == (layout.shortest_edge,) * 2:
        # Already a crop (anyres tiles and base image): the processor's resize and crop are
        # identities there (PIL returns a copy), so skip its round trips.
        return np.asarray(image).transpose(2, 0, 1)
    return clip_geometry(layout)(image, return_tensors=None)["pixel_values"][0]


def normalization_table(layout: ImageLayout) -> np.ndarray:
    """``[3, 256]`` float32: the normalised value of each 8-bit value in each channel, computed
    as transformers' processor computes every pixel (`rescale`: float64 product, cast to float32;
    `normalize`: float32 difference and quotient)."""
    rescaled = (np.arange(256, dtype=np.float64) * layout.rescale_factor).astype(np.float32)
    mean = np.asarray(layout.image_mean, dtype=np.float32)
    std = np.asarray(layout.image_std, dtype=np.float32)
    return (rescaled[None, :] - mean[:, None]) / std[:, None]


def normalize_pixels(pixels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """8-bit crops ``[..., 3, h, w]`` -> their values in ``table`` (`normalization_table`, on the
    crops' device)."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"expected 8-bit pixels, got {pixels.dtype}")
    channel = torch.arange(3, device=pixels.device).view(3, 1, 1)
    return table[channel, pixels.long()]


class PixelNormalization(torch.nn.Module):
    """`normalize_pixels` with the layout's table kept on the model's device."""

    def __init__(self, layout: ImageLayout) -> None:
        super().__init__()
        # Not a weight: left out of state dicts (checkpoints, dummy initialisation).
        self.register_buffer("table", torch.tensor(normalization_table(layout), dtype=torch.float32),
                             persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return normalize_pixels(pixels, self.table)


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


def crop_pixels(image: Image.Image, layout: ImageLayout) -> torch.Tensor:
    """``[num_crops, 3, 336, 336]`` uint8 CLIP crops of one image (not yet normalised)."""
    # Converted here, as the released code does (`.convert("RGB")`): transformers' own conversion
    # would composite an alpha channel onto white instead of dropping it.
    image = image.convert("RGB") if image.mode != "RGB" else image
    if layout.is_anyres:
        crops = anyres_crops(image, layout)
    elif layout.image_aspect_ratio == "pad":
        crops = [expand_to_square(image, layout.pad_color)]
    else:
        crops = [image]
    return torch.from_numpy(np.stack([clip_crop(crop, layout) for crop in crops]))


def preprocess(image: Image.Image, layout: ImageLayout) -> torch.Tensor:
    """``[num_crops, 3, 336, 336]`` float32 CLIP input of one image (on the CPU)."""
    return normalize_pixels(crop_pixels(image, layout), torch.from_numpy(normalization_table(layout)))
