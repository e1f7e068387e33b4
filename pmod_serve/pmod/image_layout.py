"""Visual-token layout of p-MoD-LLaVA (docs/p-mod.md, "Image layouts"): how many CLIP crops and
visual tokens an image gets, and how the crops' features become the image's token sequence.

No vLLM import (`pmod_serve.pmod`). The pixels (PIL image -> CLIP crops) are
`pmod_serve.multimodal.image_processing`; a checkpoint's layout, with its CLIP tower's configs, is
`pmod_serve.transformers_utils.vision_tower.image_layout_of`.

Two layouts matter:
- ``pad`` (p-MoD-LLaVA-v1.5): the image is expanded to a square and CLIP-preprocessed into one
  336x336 crop, which yields 24x24 = 576 visual tokens.
- ``anyres`` + ``spatial_unpad`` (p-MoD-LLaVA-NeXT): a low-resolution base crop plus a grid of
  336x336 tiles of a letterboxed copy; the tiles' features are stitched into one map, un-padded back to
  the image's aspect ratio and given one ``image_newline`` token per row.

Any other ``image_aspect_ratio`` (``square``, ``None``) is plain CLIP preprocessing, 576 tokens.

Sizes follow PIL: ``(width, height)``. Feature maps are ``(rows, cols)``.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# The defaults of openai/clip-vit-large-patch14-336, which both releases use.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The released code shrinks a feature map only when it is more than 1% over max_num_patches.
SHRINK_TOLERANCE = 1.01


def _getter(config: Any):
    if config is None:
        return lambda key, default=None: default
    if isinstance(config, Mapping):
        return config.get
    return lambda key, default=None: getattr(config, key, default)


def _size_value(value: Any, key: str, default: int) -> int:
    """Read a size that a preprocessor config may store as an int or as a dict."""
    if value is None:
        return default
    if isinstance(value, Mapping):
        if key in value:
            return int(value[key])
        return int(next(iter(value.values())))
    return int(value)


@dataclass(frozen=True)
class ImageLayout:
    """How one checkpoint turns an image into CLIP crops and visual tokens."""

    image_aspect_ratio: str  # "pad", "anyres", or anything else (plain CLIP preprocessing)
    grid_pinpoints: tuple[tuple[int, int], ...]  # anyres candidate resolutions, (width, height)
    patch_merge_type: str  # "flat", "spatial_unpad", ...
    max_num_patches: int | None
    shortest_edge: int = 336  # CLIP resize target, also the side of the anyres base image
    crop_size: int = 336  # CLIP crop side, also the side of an anyres tile
    patch_size: int = 14  # ViT patch side: crop_size // patch_size features per side
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255

    @classmethod
    def from_config(
        cls,
        config: Any,
        preprocessor_config: Mapping[str, Any] | Any | None = None,
        vision_config: Mapping[str, Any] | Any | None = None,
    ) -> ImageLayout:
        """Build from the checkpoint's config (dict or HF config object), the CLIP tower's
        ``preprocessor_config.json`` and, optionally, the CLIP vision config (for the patch size)."""
        get = _getter(config)
        get_pre = _getter(preprocessor_config)
        get_vision = _getter(vision_config)

        pinpoints = get("image_grid_pinpoints") or ()
        if isinstance(pinpoints, str):  # the released code also accepts a Python literal
            pinpoints = ast.literal_eval(pinpoints)
        layout = cls(
            image_aspect_ratio=str(get("image_aspect_ratio", "square") or "square"),
            grid_pinpoints=tuple((int(w), int(h)) for w, h in pinpoints),
            patch_merge_type=str(get("mm_patch_merge_type", "flat") or "flat"),
            max_num_patches=get("max_num_patches"),
            shortest_edge=_size_value(get_pre("size"), "shortest_edge", 336),
            crop_size=_size_value(get_pre("crop_size"), "height", 336),
            patch_size=int(get_vision("patch_size", 14)),
            image_mean=tuple(float(x) for x in get_pre("image_mean", CLIP_MEAN)),
            image_std=tuple(float(x) for x in get_pre("image_std", CLIP_STD)),
            rescale_factor=float(get_pre("rescale_factor", 1 / 255)),
        )
        layout.validate(vision_image_size=get_vision("image_size"))
        return layout

    def validate(self, vision_image_size: int | None = None) -> None:
        if self.crop_size % self.patch_size:
            raise ValueError(
                f"crop size {self.crop_size} is not a multiple of the patch size {self.patch_size}"
            )
        if vision_image_size is not None and int(vision_image_size) != self.crop_size:
            raise ValueError(
                f"the CLIP tower takes {vision_image_size}px images but its preprocessor crops {self.crop_size}px"
            )
        if self.is_anyres:
            if not self.grid_pinpoints:
                raise ValueError("image_aspect_ratio 'anyres' needs image_grid_pinpoints")
            for width, height in self.grid_pinpoints:
                if width % self.crop_size or height % self.crop_size:
                    raise ValueError(
                        f"pinpoint {[width, height]} is not a multiple of the tile size {self.crop_size}"
                    )
            # The released code implements anyres only with un-padding + image_newline.
            if "unpad" not in self.patch_merge_type:
                raise ValueError(
                    f"image_aspect_ratio 'anyres' with mm_patch_merge_type {self.patch_merge_type!r} is not "
                    "supported (the released p-MoD code only implements 'spatial_unpad')"
                )

    @property
    def is_anyres(self) -> bool:
        return self.image_aspect_ratio == "anyres"

    @property
    def features_per_side(self) -> int:
        return self.crop_size // self.patch_size

    @property
    def tokens_per_crop(self) -> int:
        return self.features_per_side**2

    @property
    def pad_color(self) -> tuple[int, int, int]:
        # int() rounds down, as the released expand2square call does.
        return tuple(int(x * 255) for x in self.image_mean)


# --------------------------------------------------------------------------------------------------
# Geometry: which resolution, how many tiles, how many tokens
# --------------------------------------------------------------------------------------------------


def best_resolution(width: int, height: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The pinpoint ``(w, h)`` that keeps most of the image's pixels; ties go to the least wasted area."""
    best = None
    best_effective, best_wasted = 0, math.inf
    for target_width, target_height in pinpoints:
        scale = min(target_width / width, target_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = target_width * target_height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(target_width), int(target_height)), effective, wasted
    if best is None:
        raise ValueError(f"no usable pinpoint among {list(pinpoints)} for a {width}x{height} image")
    return best


def tile_grid(width: int, height: int, layout: ImageLayout) -> tuple[int, int]:
    """``(rows, cols)`` of 336x336 tiles an anyres image is cut into."""
    target_width, target_height = best_resolution(width, height, layout.grid_pinpoints)
    return target_height // layout.crop_size, target_width // layout.crop_size


def _unpad_slices(rows: int, cols: int, width: int, height: int) -> tuple[slice, slice]:
    """Rows and columns of a ``rows x cols`` letterboxed feature map that hold the image itself.

    The float aspect comparison and the symmetric trim of ``(current - int(original*scale)) // 2``
    follow the released code exactly: an odd difference leaves one padded line in.
    """
    if width / height > cols / rows:
        new_rows = int(height * (cols / width))
        trim = (rows - new_rows) // 2
        return slice(trim, rows - trim), slice(0, cols)
    new_cols = int(width * (rows / height))
    trim = (cols - new_cols) // 2
    return slice(0, rows), slice(trim, cols - trim)


def _shrunk_shape(rows: int, cols: int, layout: ImageLayout) -> tuple[int, int] | None:
    """Target shape of the optional bilinear shrink to about ``max_num_patches`` tiles' worth of features."""
    if layout.max_num_patches is None:
        return None
    times = math.sqrt(rows * cols / (layout.max_num_patches * layout.tokens_per_crop))
    if times <= SHRINK_TOLERANCE:
        return None
    return int(rows // times), int(cols // times)


def unpadded_feature_shape(width: int, height: int, layout: ImageLayout) -> tuple[int, int]:
    """``(rows, cols)`` of an anyres image's high-resolution feature map after un-padding (and the
    optional ``max_num_patches`` shrink), before the newline column is added."""
    if not layout.is_anyres:
        raise ValueError(
            f"image_aspect_ratio {layout.image_aspect_ratio!r} has no high-resolution feature map"
        )
    grid_rows, grid_cols = tile_grid(width, height, layout)
    side = layout.features_per_side
    row_slice, col_slice = _unpad_slices(grid_rows * side, grid_cols * side, width, height)
    rows = row_slice.stop - row_slice.start
    cols = col_slice.stop - col_slice.start
    return _shrunk_shape(rows, cols, layout) or (rows, cols)


def num_visual_tokens(width: int, height: int, layout: ImageLayout) -> int:
    """Visual tokens one image contributes: 576, or ``576 + rows * (cols + 1)`` for anyres."""
    if not layout.is_anyres:
        return layout.tokens_per_crop
    rows, cols = unpadded_feature_shape(width, height, layout)
    return layout.tokens_per_crop + rows * (cols + 1)


def target_token_mask(width: int, height: int, layout: ImageLayout, target_token_type: str) -> torch.Tensor:
    """Which of one image's visual tokens the p-MoD routers may skip (docs/p-mod.md, "Config keys": ``mod_target_token_type``).

    ``vision_hr`` spares the 576 base tokens of an anyres image; in every other case (and in the pad
    layout whatever the type says) all visual tokens are targets. Whether text tokens are targets
    (``"all"``) is decided by the caller, which sees the whole sequence.
    """
    mask = torch.ones(num_visual_tokens(width, height, layout), dtype=torch.bool)
    if layout.is_anyres and target_token_type == "vision_hr":
        mask[: layout.tokens_per_crop] = False
    return mask


def num_crops(width: int, height: int, layout: ImageLayout) -> int:
    if not layout.is_anyres:
        return 1
    rows, cols = tile_grid(width, height, layout)
    return 1 + rows * cols


# --------------------------------------------------------------------------------------------------
# Features: per-crop features -> the image's visual-token sequence
# --------------------------------------------------------------------------------------------------


def merge_image_features(
    features: torch.Tensor,
    width: int,
    height: int,
    layout: ImageLayout,
    image_newline: torch.Tensor | None = None,
) -> torch.Tensor:
    """Turn projected per-crop features ``[num_crops, 576, hidden]`` into the image's visual tokens
    ``[num_visual_tokens, hidden]``: base tokens first, then the un-padded high-resolution map with a
    newline token closing each row, flattened row-major."""
    expected = num_crops(width, height, layout)
    if features.dim() != 3 or features.shape[0] != expected or features.shape[1] != layout.tokens_per_crop:
        raise ValueError(
            f"expected features [{expected}, {layout.tokens_per_crop}, hidden] for a {width}x{height} image, "
            f"got {list(features.shape)}"
        )
    if not layout.is_anyres:
        return features[0]
    if image_newline is None:
        raise ValueError("the anyres spatial_unpad layout needs the checkpoint's image_newline")

    base, tiles = features[0], features[1:]
    grid_rows, grid_cols = tile_grid(width, height, layout)
    side = layout.features_per_side
    hidden = features.shape[-1]
    # [grid_rows, grid_cols, side, side, hidden] -> [hidden, grid_rows*side, grid_cols*side]
    feature_map = tiles.view(grid_rows, grid_cols, side, side, hidden)
    feature_map = feature_map.permute(4, 0, 2, 1, 3).reshape(hidden, grid_rows * side, grid_cols * side)

    row_slice, col_slice = _unpad_slices(grid_rows * side, grid_cols * side, width, height)
    feature_map = feature_map[:, row_slice, col_slice]
    shrunk = _shrunk_shape(feature_map.shape[1], feature_map.shape[2], layout)
    if shrunk is not None:
        feature_map = F.interpolate(feature_map[None], list(shrunk), mode="bilinear")[0]

    rows = feature_map.shape[1]
    newline_column = image_newline.to(feature_map.dtype)[:, None, None].expand(hidden, rows, 1)
    feature_map = torch.cat([feature_map, newline_column], dim=2)
    high_res = feature_map.permute(1, 2, 0).reshape(-1, hidden)
    return torch.cat([base, high_res], dim=0)
