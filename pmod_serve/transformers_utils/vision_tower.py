"""Where a checkpoint's CLIP vision tower configuration lives (`mm_vision_tower`, docs/p-mod.md,
"config.json"), and the image layout it gives the checkpoint.

The releases name the hub id `openai/clip-vit-large-patch14-336`; with no model hub at serving time
its vision config and image-processor config are bundled here (the tower's weights are in the
checkpoint itself: `unfreeze_mm_vision_tower` is true).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pmod_serve.pmod.image_layout import CLIP_MEAN, CLIP_STD, ImageLayout

_CLIP_DIR = Path(__file__).resolve().parent / "clip"

# The tower the released checkpoints name (`mm_vision_tower`).
CLIP_VIT_L_336 = "openai/clip-vit-large-patch14-336"

BUNDLED_VISION_TOWERS: dict[str, Path] = {
    CLIP_VIT_L_336: _CLIP_DIR / "clip-vit-large-patch14-336",
}


class VisionTowerError(FileNotFoundError):
    """`mm_vision_tower` names nothing this machine can load."""


def resolve_vision_tower(mm_vision_tower: str, checkpoint_dir: str | Path) -> Path:
    """The local directory holding the vision tower's config.json (and preprocessor_config.json).

    A bundled hub id maps to its bundled directory; an absolute directory is used as is; a relative
    path is resolved against the checkpoint directory. Anything else is an error.
    """
    name = str(mm_vision_tower)
    if name in BUNDLED_VISION_TOWERS:
        return BUNDLED_VISION_TOWERS[name]
    candidate = Path(name).expanduser()
    if not candidate.is_absolute():
        candidate = Path(checkpoint_dir) / candidate
    if (candidate / "config.json").is_file():
        return candidate.resolve()
    where = f"{candidate} has no config.json" if candidate.is_dir() else f"no directory {candidate}"
    raise VisionTowerError(
        f"{Path(checkpoint_dir) / 'config.json'}: mm_vision_tower {name!r} cannot be resolved: it is not "
        f"one of the bundled towers ({', '.join(BUNDLED_VISION_TOWERS)}) and {where}"
    )


def load_vision_config(tower_dir: str | Path) -> dict[str, Any]:
    """The CLIP vision config of a tower directory: a CLIPVisionConfig, or the vision part of a
    full CLIPConfig (as in the hub's openai/clip-* repositories)."""
    path = Path(tower_dir) / "config.json"
    config = json.loads(path.read_text())
    if config.get("model_type") == "clip" or "vision_config" in config:
        config = dict(config.get("vision_config") or {})
    defaults = {"num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    for key, value in defaults.items():
        config.setdefault(key, value)
    missing = [
        key
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "image_size", "patch_size")
        if key not in config
    ]
    if missing:
        raise VisionTowerError(f"{path}: vision config lacks {', '.join(missing)}")
    return config


def load_preprocessor_config(tower_dir: str | Path) -> dict[str, Any]:
    """The tower's CLIP image-processor settings, with the legacy integer `size`/`crop_size` forms
    (openai's own files) normalised to dicts. CLIP defaults when the file is absent."""
    path = Path(tower_dir) / "preprocessor_config.json"
    config: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    config.setdefault("image_mean", list(CLIP_MEAN))
    config.setdefault("image_std", list(CLIP_STD))
    size = config.get("size", 336)
    if isinstance(size, int):
        config["size"] = {"shortest_edge": size}
    crop = config.get("crop_size", config["size"].get("shortest_edge", 336))
    if isinstance(crop, int):
        config["crop_size"] = {"height": crop, "width": crop}
    return config


def image_layout_of(config: Any, checkpoint_dir: str | Path) -> ImageLayout:
    """The image layout of a checkpoint: its config (dict or HF config) with its CLIP tower's
    preprocessor and vision configs (`mm_vision_tower`, resolved by `resolve_vision_tower`)."""
    get = config.get if isinstance(config, Mapping) else (lambda key, default=None: getattr(config, key, default))
    tower_dir = resolve_vision_tower(get("mm_vision_tower"), checkpoint_dir)
    return ImageLayout.from_config(config, load_preprocessor_config(tower_dir), load_vision_config(tower_dir))
