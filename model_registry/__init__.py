"""The model registry of pmod-serve: supported p-MoD checkpoints, their chat templates, vision
tower configs, checkpoint loading/checking and tiny test checkpoints."""

from model_registry.catalog import (
    CATALOG,
    CatalogEntry,
    full_size_config,
    lookup,
    validate_config,
)
from model_registry.checkpoint import check_checkpoint, expected_weight_shapes, load_state_dict
from model_registry.errors import CheckpointError, ConfigError, Problem
from pmod_serve.transformers_utils.chat_templates import (
    VICUNA_V1_SYSTEM_PROMPT,
    chat_template_path,
    render_prompt,
)
from pmod_serve.transformers_utils.vision_tower import (
    VisionTowerError,
    image_layout_of,
    load_preprocessor_config,
    load_vision_config,
    resolve_vision_tower,
)


def build_tiny_checkpoint(*args, **kwargs):
    """See `model_registry.tiny.build_tiny_checkpoint` (imported lazily: it needs sentencepiece)."""
    from model_registry.tiny import build_tiny_checkpoint as build

    return build(*args, **kwargs)


def write_full_size_config(*args, **kwargs):
    """See `model_registry.tiny.write_full_size_config` (imported lazily: it needs sentencepiece)."""
    from model_registry.tiny import write_full_size_config as write

    return write(*args, **kwargs)


__all__ = [
    "CATALOG",
    "CatalogEntry",
    "CheckpointError",
    "ConfigError",
    "Problem",
    "VICUNA_V1_SYSTEM_PROMPT",
    "VisionTowerError",
    "build_tiny_checkpoint",
    "chat_template_path",
    "check_checkpoint",
    "expected_weight_shapes",
    "full_size_config",
    "image_layout_of",
    "load_preprocessor_config",
    "load_state_dict",
    "load_vision_config",
    "lookup",
    "render_prompt",
    "resolve_vision_tower",
    "validate_config",
    "write_full_size_config",
]
