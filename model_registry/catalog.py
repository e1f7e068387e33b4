"""The catalogue of supported p-MoD checkpoints and the validation of their config.json.

docs/p-mod.md, "config.json", lists the keys a released checkpoint's config.json holds; `CatalogEntry.released_config`
holds the values of the two releases, `validate_config` checks any config (a release, a tiny test
checkpoint or a user's fine-tune) for what this project can serve.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from model_registry.errors import ConfigError, Problem
from pmod_serve.pmod.schedule import (
    TARGET_TOKEN_TYPES,
    PmodConfigError,
    PmodSchedule,
    WeightNorm,
    retention_ratios,
)
from pmod_serve.transformers_utils.configs.pmod_llava import PMOD_ARCHITECTURE as ARCHITECTURE
from pmod_serve.transformers_utils.configs.pmod_llava import PMOD_MODEL_TYPE as MODEL_TYPE
from pmod_serve.transformers_utils.vision_tower import CLIP_VIT_L_336

# LLaVA-NeXT's AnyRes grid: 1x2, 2x1, 2x2, 3x1 and 1x3 tiles of 336 pixels, as [width, height].
NEXT_GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

# Vicuna-7B v1.5, the language model of both releases.
_VICUNA_7B = {
    "num_hidden_layers": 32,
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "intermediate_size": 11008,
    "vocab_size": 32000,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "hidden_act": "silu",
}

# The p-MoD settings of both releases (the authors' training scripts).
_PMOD_RELEASE = {
    "mod_target_layers": "shiftedcos_decay_0.85_0.15",
    "mod_router_factor": 0.5,
    "mod_weight_norm": "tanh_0.2_1",
    "mod_target_token_type": "vision_all",
    "mod_bias_enabled": True,
}

_MM_COMMON = {
    "mm_vision_tower": CLIP_VIT_L_336,
    "mm_projector_type": "mlp2x_gelu",
    "mm_hidden_size": 1024,
    "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch",
    "max_num_patches": None,
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
    "unfreeze_mm_vision_tower": True,
    "tokenizer_padding_side": "right",
}


@dataclass(frozen=True)
class CatalogEntry:
    """A released p-MoD checkpoint this project serves."""

    hub_id: str
    # "next" (AnyRes, LLaVA-NeXT) or "v15" (pad, LLaVA-1.5): selects the tiny-checkpoint layout too.
    variant: str
    aliases: tuple[str, ...]
    # Keys the checkpoint's config.json must contain, with their released values.
    released_config: Mapping[str, Any] = field(compare=False)
    chat_template: str = "vicuna_v1"

    @property
    def names(self) -> tuple[str, ...]:
        return (self.hub_id, *self.aliases)

    @property
    def schedule(self) -> PmodSchedule:
        """The PRD schedule the release implies: layers 0-7 ordinary, 8-31 p-MoD."""
        return PmodSchedule.from_config(dict(self.released_config))


def _entry(hub_id: str, variant: str, aliases: tuple[str, ...], mm: Mapping[str, Any]) -> CatalogEntry:
    released = {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        **_VICUNA_7B,
        **_MM_COMMON,
        **mm,
        **_PMOD_RELEASE,
    }
    return CatalogEntry(hub_id, variant, aliases, MappingProxyType(released))


CATALOG: tuple[CatalogEntry, ...] = (
    _entry(
        "MCG-NJU/p-MoD-LLaVA-NeXT-7B",
        "next",
        ("MCG-NJU/p-MoD-LLaVA-NeXT",),
        {
            "mm_patch_merge_type": "spatial_unpad",
            "image_aspect_ratio": "anyres",
            "image_grid_pinpoints": NEXT_GRID_PINPOINTS,
            "tokenizer_model_max_length": 4096,
        },
    ),
    _entry(
        "MCG-NJU/p-MoD-LLaVA-v1.5-7B",
        "v15",
        (),
        {
            "mm_patch_merge_type": "flat",
            "image_aspect_ratio": "pad",
            # LLaVA-1.5 training never writes the key; absent and null are the same.
            "image_grid_pinpoints": None,
            "tokenizer_model_max_length": 2048,
        },
    ),
)

VARIANTS = {entry.variant: entry for entry in CATALOG}


def lookup(name_or_alias: str) -> CatalogEntry | None:
    """The catalogue entry of a hub id or alias (case-insensitive), or of a variant name."""
    wanted = str(name_or_alias).strip().rstrip("/").lower()
    for entry in CATALOG:
        if wanted == entry.variant or wanted in (name.lower() for name in entry.names):
            return entry
    return None


def _require_entry(variant: str) -> CatalogEntry:
    entry = lookup(variant)
    if entry is None:
        known = ", ".join(sorted(VARIANTS)) + ", " + ", ".join(n for e in CATALOG for n in e.names)
        raise KeyError(f"unknown p-MoD checkpoint {variant!r}: expected one of {known}")
    return entry


def full_size_config(variant: str) -> dict[str, Any]:
    """The complete config.json of a release ("next", "v15", or a hub id / alias).

    Used to run the real 7B shapes with vLLM's load_format="dummy" (no weights needed).
    """
    entry = _require_entry(variant)
    config = copy.deepcopy(dict(entry.released_config))
    schedule = entry.schedule
    config.update(
        {
            "_name_or_path": entry.hub_id,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "rope_scaling": None,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "use_mm_proj": True,
            "tune_mm_mlp_adapter": False,
            "freeze_mm_mlp_adapter": False,
            "mm_projector_lr": None,
            "mm_vision_tower_lr": None,
            "mod_special_init": True,
            # The released training code writes the selected layers back into the config.
            "mod_target_layer_indices": sorted(schedule.retention_ratio),
        }
    )
    return config


# --------------------------------------------------------------------------- validation

# What this project implements (docs/p-mod.md, "Image layouts" and "Config keys"); anything else is an error, not a deviation.
_SUPPORTED = {
    "mm_projector_type": ("mlp2x_gelu",),
    "mm_vision_select_feature": ("patch",),
    "mm_patch_merge_type": ("flat", "spatial_unpad"),
    "image_aspect_ratio": ("pad", "anyres"),
    "mod_target_token_type": TARGET_TOKEN_TYPES,
}
_POSITIVE_INTS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "mm_hidden_size",
)
_REQUIRED_STRINGS = ("mm_vision_tower", "mod_target_layers", "mod_weight_norm")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _same_value(actual: Any, expected: Any) -> bool:
    if isinstance(expected, float) or isinstance(actual, float):
        if isinstance(actual, (int, float)) and isinstance(expected, (int, float)):
            return not isinstance(actual, bool) and math.isclose(actual, expected, rel_tol=1e-9)
        return False
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        return len(actual) == len(expected) and all(map(_same_value, actual, expected))
    return type(actual) is type(expected) and actual == expected


def _config_errors(config: Mapping[str, Any], file: str) -> list[Problem]:
    errors: list[Problem] = []

    def error(key: str, message: str) -> None:
        errors.append(Problem(file, key, message))

    if config.get("model_type") != MODEL_TYPE:
        error("model_type", f"is {config.get('model_type')!r}, a p-MoD LLaVA checkpoint has {MODEL_TYPE!r}")
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or ARCHITECTURE not in architectures:
        error("architectures", f"is {architectures!r}, expected [{ARCHITECTURE!r}]")

    for key in _POSITIVE_INTS:
        value = config.get(key)
        if value is None:
            error(key, "is missing")
        elif not _is_int(value) or value <= 0:
            error(key, f"is {value!r}, expected a positive integer")
    for key in _REQUIRED_STRINGS:
        if not isinstance(config.get(key), str) or not config.get(key):
            error(key, f"is {config.get(key)!r}, expected a non-empty string" if key in config else "is missing")
    for key, allowed in _SUPPORTED.items():
        value = config.get(key)
        if value is None and key == "mod_target_token_type":
            continue  # the schedule defaults it to vision_all
        if value not in allowed:
            shown = "is missing" if key not in config else f"is {value!r}"
            error(key, f"{shown}; this project supports {', '.join(map(repr, allowed))}")

    eps = config.get("rms_norm_eps")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
        error("rms_norm_eps", f"is {eps!r}, expected a positive number")
    if not _is_int(config.get("mm_vision_select_layer")):
        error("mm_vision_select_layer", f"is {config.get('mm_vision_select_layer')!r}, expected an integer")
    if config.get("rope_scaling") not in (None, {}):
        error("rope_scaling", f"is {config['rope_scaling']!r}; RoPE scaling is not supported")
    for key in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if config.get(key, False) is not False:
            error(key, f"is {config[key]!r}; only false is supported (LLaVA-1.5/NeXT prompts)")
    if "mod_bias_enabled" in config and not isinstance(config["mod_bias_enabled"], bool):
        error("mod_bias_enabled", f"is {config['mod_bias_enabled']!r}, expected true or false")

    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    kv_heads = config.get("num_key_value_heads", heads)
    if _is_int(heads) and _is_int(hidden) and heads > 0:
        if "head_dim" not in config and hidden % heads:
            error("num_attention_heads", f"{heads} does not divide hidden_size {hidden}")
        if not _is_int(kv_heads) or kv_heads <= 0 or heads % kv_heads:
            error("num_key_value_heads", f"is {kv_heads!r}, expected a divisor of num_attention_heads {heads}")

    aspect, merge = config.get("image_aspect_ratio"), config.get("mm_patch_merge_type")
    if aspect == "anyres":
        if merge != "spatial_unpad":
            error("mm_patch_merge_type", f"is {merge!r}; anyres needs 'spatial_unpad' (as the released code)")
        pinpoints = config.get("image_grid_pinpoints")
        if not (
            isinstance(pinpoints, list)
            and pinpoints
            and all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_int(s) and s > 0 for s in p)
                for p in pinpoints
            )
        ):
            error("image_grid_pinpoints", f"is {pinpoints!r}; anyres needs a list of [width, height] pairs")
        max_patches = config.get("max_num_patches")
        if max_patches is not None and (not _is_int(max_patches) or max_patches <= 0):
            error("max_num_patches", f"is {max_patches!r}, expected null or a positive integer")
    elif aspect == "pad" and merge != "flat":
        error("mm_patch_merge_type", f"is {merge!r}; the pad layout needs 'flat' (as the released code)")

    # The p-MoD keys, each parsed the way pmod_serve.pmod.schedule parses them, so the key is named.
    layers = config.get("num_hidden_layers")
    if isinstance(config.get("mod_weight_norm"), str):
        try:
            WeightNorm.parse(config["mod_weight_norm"])
        except PmodConfigError as exc:
            error("mod_weight_norm", str(exc))
    factor = config.get("mod_router_factor", 0.5)
    if not isinstance(factor, (int, float)) or isinstance(factor, bool):
        error("mod_router_factor", f"is {factor!r}, expected a number")
    elif isinstance(config.get("mod_target_layers"), str) and _is_int(layers) and layers > 0:
        try:
            retention_ratios(config["mod_target_layers"], float(factor), layers)
        except PmodConfigError as exc:
            error("mod_target_layers", str(exc))
        else:
            if not errors:
                try:
                    PmodSchedule.from_config(dict(config))
                except PmodConfigError as exc:
                    key = "mod_target_layer_indices" if "mod_target_layer_indices" in str(exc) else "mod_*"
                    error(key, str(exc))
    return errors


def validate_config(
    config: Mapping[str, Any],
    source_path: str | Path,
    entry: CatalogEntry | None = None,
    *,
    raise_on_error: bool = True,
) -> list[Problem]:
    """Check a p-MoD LLaVA config.json.

    Errors (missing or mistyped keys, values this project does not implement, p-MoD keys that do
    not parse) make the checkpoint unservable: with `raise_on_error` they raise one `ConfigError`
    listing all of them, each naming `source_path` and the key. With `entry`, keys whose value
    differs from that release are returned as "deviation" problems (a fine-tune or a tiny test
    checkpoint legitimately differs). Returns the deviations, plus the errors if not raising.
    """
    file = str(source_path)
    if not isinstance(config, Mapping):
        raise ConfigError(file, [Problem(file, "<root>", f"is a {type(config).__name__}, expected an object")])
    errors = _config_errors(config, file)
    if errors and raise_on_error:
        raise ConfigError(Path(file).parent, errors)

    deviations: list[Problem] = []
    if entry is not None:
        for key, expected in entry.released_config.items():
            if key not in config:
                if expected is not None:
                    deviations.append(Problem(file, key, f"is missing; {entry.hub_id} has {expected!r}", "deviation"))
            elif not _same_value(config[key], expected):
                deviations.append(
                    Problem(file, key, f"is {config[key]!r}; {entry.hub_id} has {expected!r}", "deviation")
                )
    return errors + deviations if not raise_on_error else deviations
