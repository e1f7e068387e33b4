"""Image layouts of p-MoD-LLaVA (docs/p-mod.md, "Image layouts"): geometry worked out by hand,
pixels against HF's CLIP processor configured from the raw preprocessor config and against the
spec's steps in NumPy, feature merging against hand-placed features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pmod_serve.multimodal.image_processing import PixelNormalization, crop_pixels, letterbox, preprocess
from pmod_serve.pmod.image_layout import (
    ImageLayout,
    best_resolution,
    merge_image_features,
    num_crops,
    num_visual_tokens,
    target_token_mask,
    tile_grid,
    unpadded_feature_shape,
)

NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CLIP_PREPROCESSOR = {
    "crop_size": {"height": 336, "width": 336},
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}
NEXT_CONFIG = {
    "image_aspect_ratio": "anyres",
    "image_grid_pinpoints": NEXT_PINPOINTS,
    "mm_patch_merge_type": "spatial_unpad",
    "max_num_patches": None,
}
V15_CONFIG = {"image_aspect_ratio": "pad", "mm_patch_merge_type": "flat"}


@pytest.fixture(scope="module")
def next_layout() -> ImageLayout:
    return ImageLayout.from_config(NEXT_CONFIG, CLIP_PREPROCESSOR, {"patch_size": 14, "image_size": 336})


@pytest.fixture(scope="module")
def pad_layout() -> ImageLayout:
    return ImageLayout.from_config(V15_CONFIG, CLIP_PREPROCESSOR)


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return image.convert(mode)


def test_layout_from_config(next_layout: ImageLayout, pad_layout: ImageLayout) -> None:
    assert next_layout.is_anyres and next_layout.grid_pinpoints[0] == (336, 672)
    assert next_layout.features_per_side == 24 and next_layout.tokens_per_crop == 576
    assert pad_layout.image_aspect_ratio == "pad" and not pad_layout.is_anyres
    # round-down(mean * 255) per channel
    assert pad_layout.pad_color == (122, 116, 104)
    # a string pinpoint list (as the released code accepts) and an HF-config-like object
    as_string = dict(NEXT_CONFIG, image_grid_pinpoints=str(NEXT_PINPOINTS))
    assert ImageLayout.from_config(as_string, CLIP_PREPROCESSOR).grid_pinpoints == next_layout.grid_pinpoints
    square = ImageLayout.from_config(type("Cfg", (), {"image_aspect_ratio": None})(), None)
    assert square.image_aspect_ratio == "square" and num_visual_tokens(800, 600, square) == 576


def test_anyres_without_unpad_is_rejected() -> None:
    with pytest.raises(ValueError, match="spatial_unpad"):
        ImageLayout.from_config(dict(NEXT_CONFIG, mm_patch_merge_type="flat"), CLIP_PREPROCESSOR)


# Worked out by hand with the NeXT pinpoints. effective(w, h) = min(int(W*s)*int(H*s), W*H),
# s = min(w/W, h/H); ties -> least wasted w*h - effective. Tile grid rows x cols of 336px, feature map
# (24*rows) x (24*cols), unpad: if W/H > cols/rows trim rows else columns by (cur - int(orig*scale))//2
# per side, tokens = 576 + H' * (W' + 1).
HAND_COMPUTED = [
    # 672x672: [672,672] keeps all 451584 px (the others 336*336) -> 2x2 tiles, 48x48 map, same
    # aspect -> columns branch, int(672*48/672) = 48, nothing trimmed: 576 + 48*49 = 2928.
    ((672, 672), (672, 672), (2, 2), (48, 48), 2928),
    # 400x300 (120000 px): [672,336] s=1.12 -> 448*336, capped at 120000; [672,672] s=1.68 also
    # 120000 but wastes 331584 > 105792; [1008,336] wastes 218688 -> [672,336], 1x2 tiles, map 24x48.
    # 4/3 < 48/24 -> columns: int(400 * 24/300) = 32, trim (48-32)//2 = 8 per side -> 24x32:
    # 576 + 24*33 = 1368.
    ((400, 300), (672, 336), (1, 2), (24, 32), 1368),
    # 300x700 (210000 px): [336,672] s=0.96 -> 288*672 = 193536; [336,1008] s=1.12 -> 336*784,
    # capped at 210000 -> [336,1008], 3x1 tiles, map 72x24. 3/7 > 24/72 -> rows: int(700 * 24/300)
    # = 56, trim (72-56)//2 = 8 -> 56x24: 576 + 56*25 = 1976.
    ((300, 700), (336, 1008), (3, 1), (56, 24), 1976),
    # 1000x200 (200000 px): [1008,336] s=1.008 -> 1008*201 = 202608, capped at 200000; [672,336]
    # s=0.672 -> 672*134 -> [1008,336], 1x3 tiles, map 24x72. 5 > 3 -> rows: int(200 * 72/1000) =
    # int(14.4) = 14, trim (24-14)//2 = 5 -> 14x72: 576 + 14*73 = 1598.
    ((1000, 200), (1008, 336), (1, 3), (14, 72), 1598),
    # 336x336: every pinpoint keeps the 112896 px; [336,672] and [672,336] both waste 112896, the
    # first wins -> 2x1 tiles, map 48x24. 1 > 24/48 -> rows: int(336 * 24/336) = 24, trim 12 -> 24x24:
    # 576 + 24*25 = 1176.
    ((336, 336), (336, 672), (2, 1), (24, 24), 1176),
    # 800x600: [672,672] s=0.84 -> 672*504 = 338688 beats 448*336 ([672,336], [1008,336]) -> 2x2,
    # map 48x48. 4/3 > 1 -> rows: int(600 * 48/800) = 36, trim 6 -> 36x48: 576 + 36*49 = 2340.
    ((800, 600), (672, 672), (2, 2), (36, 48), 2340),
]


@pytest.mark.parametrize("size,resolution,grid,shape,tokens", HAND_COMPUTED)
def test_visual_token_counts_by_hand(next_layout, size, resolution, grid, shape, tokens) -> None:
    width, height = size
    assert best_resolution(width, height, NEXT_PINPOINTS) == resolution
    assert tile_grid(width, height, next_layout) == grid
    assert unpadded_feature_shape(width, height, next_layout) == shape
    assert num_visual_tokens(width, height, next_layout) == tokens
    assert num_crops(width, height, next_layout) == 1 + grid[0] * grid[1]


def test_pad_layout_always_576(pad_layout: ImageLayout) -> None:
    for width, height in [(672, 672), (400, 300), (300, 700), (1000, 200), (17, 5)]:
        assert num_visual_tokens(width, height, pad_layout) == 576
        assert target_token_mask(width, height, pad_layout, "vision_hr").all()


def test_max_num_patches_shrink() -> None:
    layout = ImageLayout.from_config(dict(NEXT_CONFIG, max_num_patches=2), CLIP_PREPROCESSOR)
    # 672x672 -> 48x48 map; times = sqrt(48*48 / (2*576)) = sqrt(2) > 1.01 -> int(48 // 1.414) = 33.
    assert unpadded_feature_shape(672, 672, layout) == (33, 33)
    assert num_visual_tokens(672, 672, layout) == 576 + 33 * 34
    # 400x300 -> 24x32 map; times = sqrt(768/1152) < 1.01: untouched.
    assert unpadded_feature_shape(400, 300, layout) == (24, 32)
    features = torch.randn(5, 576, 8)
    merged = merge_image_features(features, 672, 672, layout, torch.zeros(8))
    assert merged.shape == (576 + 33 * 34, 8)


def test_target_token_mask(next_layout: ImageLayout) -> None:
    mask_all = target_token_mask(400, 300, next_layout, "vision_all")
    mask_hr = target_token_mask(400, 300, next_layout, "vision_hr")
    assert mask_all.dtype == torch.bool and mask_all.numel() == 1368 and mask_all.all()
    assert not mask_hr[:576].any() and mask_hr[576:].all()


# --------------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------------


def hf_clip(image: Image.Image) -> torch.Tensor:
    """transformers 5's PIL-backed CLIP processor (the torchvision one is not allowed here)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(**CLIP_PREPROCESSOR)
    return torch.from_numpy(np.asarray(processor(image)["pixel_values"][0]))


def spec_clip(image: Image.Image, shortest_edge: int = 336, crop: int = 336) -> torch.Tensor:
    """The spec's CLIP steps in NumPy: bicubic resize of the shortest edge (the long edge
    truncated), centre crop at `(dim - crop) // 2` (zero padding when smaller), rescale by 1/255
    in float64, normalise in float32."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(shortest_edge * long / short)
    size = (shortest_edge, new_long) if width <= height else (new_long, shortest_edge)
    pixels = np.asarray(image.convert("RGB").resize(size, resample=Image.Resampling.BICUBIC))
    if pixels.shape[0] < crop or pixels.shape[1] < crop:
        padded = np.zeros((max(pixels.shape[0], crop), max(pixels.shape[1], crop), 3), dtype=pixels.dtype)
        top, left = -(-(padded.shape[0] - pixels.shape[0]) // 2), -(-(padded.shape[1] - pixels.shape[1]) // 2)
        padded[top : top + pixels.shape[0], left : left + pixels.shape[1]] = pixels
        pixels = padded
    top, left = (pixels.shape[0] - crop) // 2, (pixels.shape[1] - crop) // 2
    pixels = pixels[top : top + crop, left : left + crop]
    pixels = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(CLIP_PREPROCESSOR["image_mean"], dtype=np.float32)
    std = np.asarray(CLIP_PREPROCESSOR["image_std"], dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(((pixels - mean) / std).transpose(2, 0, 1)))


@pytest.mark.parametrize("size", [(336, 336), (500, 375), (375, 500), (1000, 201), (200, 150), (1, 1), (5000, 3)])
def test_square_layout_matches_hf_clip_processor(size) -> None:
    layout = ImageLayout.from_config({"image_aspect_ratio": "square"}, CLIP_PREPROCESSOR)
    image = noise_image(*size, seed=sum(size))
    pixels = preprocess(image, layout)
    assert pixels.shape == (1, 3, 336, 336) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels[0], hf_clip(image), rtol=0, atol=0)
    torch.testing.assert_close(pixels[0], spec_clip(image), rtol=0, atol=0)


def test_8bit_crops_normalised_by_lookup_equal_the_processor(next_layout: ImageLayout, pad_layout: ImageLayout) -> None:
    # What the engine gets (8-bit crops, normalised on its device by table lookup) is bit for bit
    # what transformers' processor computes, for every 8-bit value in every channel.
    every_value = np.arange(336 * 336 * 3, dtype=np.int64).reshape(336, 336, 3) % 256
    image = Image.fromarray(np.ascontiguousarray(np.roll(every_value, 1, axis=2)).astype(np.uint8))
    square = ImageLayout.from_config({"image_aspect_ratio": "square"}, CLIP_PREPROCESSOR)
    normalise = PixelNormalization(square)
    pixels = crop_pixels(image, square)
    assert pixels.dtype == torch.uint8 and pixels.shape == (1, 3, 336, 336)
    assert len(torch.unique(pixels[0, 0])) == 256
    torch.testing.assert_close(normalise(pixels)[0], hf_clip(image), rtol=0, atol=0)
    for layout, size in ((next_layout, (672, 672)), (next_layout, (500, 375)), (pad_layout, (300, 200)), (square, (37, 900))):
        noisy = noise_image(*size, seed=size[0])
        torch.testing.assert_close(PixelNormalization(layout)(crop_pixels(noisy, layout)), preprocess(noisy, layout),
                                   rtol=0, atol=0)
    with pytest.raises(TypeError, match="8-bit"):
        normalise(pixels.float())


def test_clip_preprocess_drops_alpha_like_the_released_code() -> None:
    # The released code opens images with .convert("RGB") (alpha dropped, not composited on white).
    layout = ImageLayout.from_config({"image_aspect_ratio": "square"}, CLIP_PREPROCESSOR)
    rgba = noise_image(300, 200, seed=3).convert("RGBA")
    rgba.putalpha(0)
    torch.testing.assert_close(preprocess(rgba, layout)[0], spec_clip(rgba.convert("RGB")), rtol=0, atol=0)


def test_pad_layout_expands_to_square_then_clip(pad_layout: ImageLayout) -> None:
    image = noise_image(300, 200, mode="L")  # grey scale: converted to RGB first
    pixels = preprocess(image, pad_layout)
    square = Image.new("RGB", (300, 300), (122, 116, 104))
    square.paste(image.convert("RGB"), (0, 50))
    torch.testing.assert_close(pixels[0], hf_clip(square), rtol=0, atol=0)
    # the top band is the rounded-down mean colour: about 0 after normalisation (|122/255 - mean| / std)
    assert pixels[0, :, :20].abs().max() < 0.02


def test_letterbox_ceils_the_free_axis() -> None:
    # 400x300 into 672x336: height is exact (336), width ceil(400 * 1.12) = ceil(448.00000000000006)
    # = 449, pasted at x = (672 - 449) // 2 = 111.
    boxed = np.asarray(letterbox(Image.new("RGB", (400, 300), (255, 255, 255)), 672, 336))
    assert boxed.shape == (336, 672, 3)
    lit_columns = np.flatnonzero(boxed.max(axis=(0, 2)) > 0)
    assert (lit_columns[0], lit_columns[-1]) == (111, 111 + 449 - 1)


def test_anyres_crops(next_layout: ImageLayout) -> None:
    image = noise_image(400, 300, seed=3)
    pixels = preprocess(image, next_layout)
    assert pixels.shape == (3, 3, 336, 336)
    # crop 0: the whole image squashed to 336x336 first
    torch.testing.assert_close(
        pixels[0], hf_clip(image.resize((336, 336), Image.Resampling.BICUBIC)), rtol=0, atol=0
    )
    # crops 1, 2: the left and right halves of the letterboxed image
    boxed = letterbox(image, 672, 336)
    torch.testing.assert_close(pixels[1], hf_clip(boxed.crop((0, 0, 336, 336))), rtol=0, atol=0)
    torch.testing.assert_close(pixels[2], hf_clip(boxed.crop((336, 0, 672, 336))), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Feature merging
# --------------------------------------------------------------------------------------------------


def positional_features(width: int, height: int, layout: ImageLayout) -> torch.Tensor:
    """Features whose 3 channels say (crop, global row, global column) of each feature."""
    rows, cols = tile_grid(width, height, layout)
    features = torch.zeros(1 + rows * cols, 24, 24, 3)
    features[0, ..., 0] = -1
    for tile in range(rows * cols):
        tile_row, tile_col = divmod(tile, cols)
        features[1 + tile, ..., 0] = tile
        features[1 + tile, ..., 1] = (tile_row * 24 + torch.arange(24))[:, None]
        features[1 + tile, ..., 2] = (tile_col * 24 + torch.arange(24))[None, :]
    return features.view(1 + rows * cols, 576, 3)


def test_merge_stitches_unpads_and_adds_newlines(next_layout: ImageLayout) -> None:
    # 300x700: 3x1 tiles, map 72x24, rows 8..63 survive (see HAND_COMPUTED)
    features = positional_features(300, 700, next_layout)
    newline = torch.tensor([7.0, 7.0, 7.0])
    merged = merge_image_features(features, 300, 700, next_layout, newline)
    assert merged.shape == (1976, 3)
    torch.testing.assert_close(merged[:576], features[0])
    grid = merged[576:].view(56, 25, 3)
    assert (grid[:, 24] == 7).all()  # one newline closing every row
    torch.testing.assert_close(grid[:, :24, 1], (8 + torch.arange(56.0))[:, None].expand(56, 24))
    torch.testing.assert_close(grid[:, :24, 2], torch.arange(24.0)[None].expand(56, 24))
    torch.testing.assert_close(
        grid[:, :24, 0],
        (torch.div(8 + torch.arange(56), 24, rounding_mode="floor").float()[:, None].expand(56, 24)),
    )


def test_merge_row_major_across_tile_columns(next_layout: ImageLayout) -> None:
    # 400x300: 1x2 tiles, map 24x48, columns 8..39 survive
    features = positional_features(400, 300, next_layout)
    merged = merge_image_features(features, 400, 300, next_layout, torch.full((3,), 7.0))
    grid = merged[576:].view(24, 33, 3)
    torch.testing.assert_close(grid[0, :32, 2], 8 + torch.arange(32.0))
    torch.testing.assert_close(grid[:, 0, 1], torch.arange(24.0))
    assert grid[0, 15, 0] == 0 and grid[0, 16, 0] == 1  # column 24 is the second tile's first


def test_merge_pad_layout_and_shape_errors(pad_layout: ImageLayout, next_layout: ImageLayout) -> None:
    features = torch.randn(1, 576, 4)
    assert torch.equal(merge_image_features(features, 300, 700, pad_layout), features[0])
    with pytest.raises(ValueError, match="expected features"):
        merge_image_features(torch.randn(3, 576, 4), 300, 700, next_layout, torch.zeros(4))
    with pytest.raises(ValueError, match="image_newline"):
        merge_image_features(torch.randn(4, 576, 4), 300, 700, next_layout, None)
