"""Reading and checking checkpoints in the released LLaVA / p-MoD layout (docs/p-mod.md, "The released checkpoint layout").

`load_state_dict` reads the weights (safetensors or PyTorch .bin, sharded with an index or single
file) and drops stale buffers; `check_checkpoint` compares them with the names and shapes the
config implies and raises one `CheckpointError` naming the file and key of every problem.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model_registry.catalog import validate_config
from model_registry.errors import CheckpointError, ConfigError, Problem
from pmod_serve.pmod.schedule import PmodSchedule
from pmod_serve.transformers_utils.vision_tower import (
    VisionTowerError,
    load_vision_config,
    resolve_vision_tower,
)

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_SINGLE = "pytorch_model.bin"

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."

# Buffers older transformers versions saved and that are recomputed from the config.
_STALE_BUFFER = re.compile(r"(^|\.)rotary_emb\.inv_freq$|^model\.vision_tower\..*embeddings\.position_ids$")


def is_stale_buffer(name: str) -> bool:
    return bool(_STALE_BUFFER.search(name))


@dataclass(frozen=True)
class WeightSpec:
    """The expected shape of one weight, with the config key behind each dimension (for errors)."""

    shape: tuple[int, ...]
    dims: tuple[str, ...]
    required: bool = True


# --------------------------------------------------------------------------- expected names


def _llama_layer_specs(prefix: str, config: Mapping[str, Any]) -> dict[str, WeightSpec]:
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    q_dims = ("num_attention_heads*head_dim", "hidden_size")
    kv_dims = ("num_key_value_heads*head_dim", "hidden_size")
    specs = {
        f"{prefix}self_attn.q_proj.weight": WeightSpec((heads * head_dim, hidden), q_dims),
        f"{prefix}self_attn.k_proj.weight": WeightSpec((kv_heads * head_dim, hidden), kv_dims),
        f"{prefix}self_attn.v_proj.weight": WeightSpec((kv_heads * head_dim, hidden), kv_dims),
        f"{prefix}self_attn.o_proj.weight": WeightSpec((hidden, heads * head_dim), q_dims[::-1]),
        f"{prefix}mlp.gate_proj.weight": WeightSpec((inter, hidden), ("intermediate_size", "hidden_size")),
        f"{prefix}mlp.up_proj.weight": WeightSpec((inter, hidden), ("intermediate_size", "hidden_size")),
        f"{prefix}mlp.down_proj.weight": WeightSpec((hidden, inter), ("hidden_size", "intermediate_size")),
        f"{prefix}input_layernorm.weight": WeightSpec((hidden,), ("hidden_size",)),
        f"{prefix}post_attention_layernorm.weight": WeightSpec((hidden,), ("hidden_size",)),
    }
    if config.get("attention_bias"):
        for proj, size in (("q", heads * head_dim), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim)):
            specs[f"{prefix}self_attn.{proj}_proj.bias"] = WeightSpec((size,), q_dims[:1])
        specs[f"{prefix}self_attn.o_proj.bias"] = WeightSpec((hidden,), ("hidden_size",))
    if config.get("mlp_bias"):
        specs[f"{prefix}mlp.gate_proj.bias"] = WeightSpec((inter,), ("intermediate_size",))
        specs[f"{prefix}mlp.up_proj.bias"] = WeightSpec((inter,), ("intermediate_size",))
        specs[f"{prefix}mlp.down_proj.bias"] = WeightSpec((hidden,), ("hidden_size",))
    return specs


def _clip_specs(vision: Mapping[str, Any], required: bool) -> dict[str, WeightSpec]:
    """HF CLIPVisionModel names (transformers 4.x layout, as the releases store them)."""
    width, inter = vision["hidden_size"], vision["intermediate_size"]
    channels, patch = vision.get("num_channels", 3), vision["patch_size"]
    positions = (vision["image_size"] // patch) ** 2 + 1
    w, i = ("vision hidden_size",), ("vision intermediate_size",)
    p = VISION_PREFIX

    def spec(shape: tuple[int, ...], dims: tuple[str, ...]) -> WeightSpec:
        return WeightSpec(shape, dims, required)

    specs = {
        f"{p}embeddings.class_embedding": spec((width,), w),
        f"{p}embeddings.patch_embedding.weight": spec(
            (width, channels, patch, patch), w + ("num_channels", "patch_size", "patch_size")
        ),
        f"{p}embeddings.position_embedding.weight": spec((positions, width), ("(image_size/patch_size)^2+1",) + w),
        f"{p}pre_layrnorm.weight": spec((width,), w),
        f"{p}pre_layrnorm.bias": spec((width,), w),
    }
    for layer in range(vision["num_hidden_layers"]):
        lp = f"{p}encoder.layers.{layer}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            specs[f"{lp}self_attn.{proj}.weight"] = spec((width, width), w + w)
            specs[f"{lp}self_attn.{proj}.bias"] = spec((width,), w)
        for norm in ("layer_norm1", "layer_norm2"):
            specs[f"{lp}{norm}.weight"] = spec((width,), w)
            specs[f"{lp}{norm}.bias"] = spec((width,), w)
        specs[f"{lp}mlp.fc1.weight"] = spec((inter, width), i + w)
        specs[f"{lp}mlp.fc1.bias"] = spec((inter,), i)
        specs[f"{lp}mlp.fc2.weight"] = spec((width, inter), w + i)
        specs[f"{lp}mlp.fc2.bias"] = spec((width,), w)
    specs[f"{p}post_layernorm.weight"] = spec((width,), w)
    specs[f"{p}post_layernorm.bias"] = spec((width,), w)
    return specs


def expected_weight_specs(config: Mapping[str, Any], vision_config: Mapping[str, Any]) -> dict[str, WeightSpec]:
    """Every weight name of the released layout the config implies, in a stable order."""
    schedule = PmodSchedule.from_config(dict(config))
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    mm_hidden = config["mm_hidden_size"]
    specs: dict[str, WeightSpec] = {
        "model.embed_tokens.weight": WeightSpec((vocab, hidden), ("vocab_size", "hidden_size")),
    }
    for layer in range(config["num_hidden_layers"]):
        if schedule.is_pmod_layer(layer):
            specs.update(_llama_layer_specs(f"model.layers.{layer}.decoder_layer.", config))
            specs[f"model.layers.{layer}.router.router.weight"] = WeightSpec((1, hidden), ("1", "hidden_size"))
            if schedule.router_bias:
                specs[f"model.layers.{layer}.router.router.bias"] = WeightSpec((1,), ("1",))
        else:
            specs.update(_llama_layer_specs(f"model.layers.{layer}.", config))
    specs["model.norm.weight"] = WeightSpec((hidden,), ("hidden_size",))
    specs["lm_head.weight"] = WeightSpec(
        (vocab, hidden), ("vocab_size", "hidden_size"), required=not config.get("tie_word_embeddings", False)
    )
    specs["model.mm_projector.0.weight"] = WeightSpec((hidden, mm_hidden), ("hidden_size", "mm_hidden_size"))
    specs["model.mm_projector.0.bias"] = WeightSpec((hidden,), ("hidden_size",))
    specs["model.mm_projector.2.weight"] = WeightSpec((hidden, hidden), ("hidden_size", "hidden_size"))
    specs["model.mm_projector.2.bias"] = WeightSpec((hidden,), ("hidden_size",))
    if "unpad" in str(config.get("mm_patch_merge_type", "")):
        specs["model.image_newline"] = WeightSpec((hidden,), ("hidden_size",))
    # Without unfreeze_mm_vision_tower the tower's weights may come from the tower directory instead.
    specs.update(_clip_specs(vision_config, required=bool(config.get("unfreeze_mm_vision_tower", False))))
    return specs


def expected_weight_shapes(config: Mapping[str, Any], vision_config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {name: spec.shape for name, spec in expected_weight_specs(config, vision_config).items()}


# --------------------------------------------------------------------------- reading


def _read_json(path: Path, checkpoint_dir: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(checkpoint_dir, [Problem(path.name, "<file>", f"cannot be read as JSON: {exc}")]) from exc


def weight_files(checkpoint_dir: str | Path) -> tuple[str, dict[str, str] | None]:
    """(the file naming the weights: an index or the single weights file, key -> shard file from
    the index, or None for a single file)."""
    root = Path(checkpoint_dir)
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index_path = root / index_name
        if index_path.is_file():
            index = _read_json(index_path, root)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(root, [Problem(index_name, "weight_map", "is missing or empty")])
            return index_name, {str(k): str(v) for k, v in weight_map.items()}
    for single in (SAFETENSORS_SINGLE, BIN_SINGLE):
        if (root / single).is_file():
            return single, None
    raise CheckpointError(
        root,
        [
            Problem(
                "<checkpoint>",
                "<weights>",
                f"no weights found: expected {SAFETENSORS_INDEX}, {BIN_INDEX}, {SAFETENSORS_SINGLE} or {BIN_SINGLE}",
            )
        ],
    )


def _load_file(path: Path, checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(checkpoint_dir, [Problem(path.name, "<file>", "is listed but does not exist")]) from None
    except Exception as exc:  # a truncated or foreign file: name it rather than surface a pickle error
        raise CheckpointError(checkpoint_dir, [Problem(path.name, "<file>", f"cannot be read: {exc}")]) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(checkpoint_dir, [Problem(path.name, "<file>", "is not a name -> tensor mapping")])
    return state


def _read_weights(checkpoint_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (stale buffers dropped) and, per name, the file it was read from."""
    root = Path(checkpoint_dir)
    listing, weight_map = weight_files(root)
    shards = sorted(set(weight_map.values())) if weight_map is not None else [listing]
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    problems: list[Problem] = []
    for shard in shards:
        for name, tensor in _load_file(root / shard, root).items():
            if name in origin:
                problems.append(Problem(shard, name, f"is stored twice (also in {origin[name]})"))
                continue
            if weight_map is not None and weight_map.get(name) not in (None, shard):
                problems.append(Problem(shard, name, f"is here but {listing} puts it in {weight_map[name]}"))
            tensors[name], origin[name] = tensor, shard
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in origin:
                problems.append(Problem(shard, name, f"is listed in {listing} but absent from the shard"))
    if problems:
        raise CheckpointError(root, problems)
    for name in [n for n in tensors if is_stale_buffer(n)]:
        del tensors[name], origin[name]
    return tensors, origin


def load_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint under its released name, stale buffers (`*.rotary_emb.inv_freq`,
    CLIP `position_ids`) dropped. Safetensors or .bin, sharded with an index or a single file."""
    return _read_weights(checkpoint_dir)[0]


# --------------------------------------------------------------------------- checking


def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"config must be a mapping or an HF config, got {type(config).__name__}")


def _layer_hint(name: str, schedule: PmodSchedule) -> str:
    match = re.match(r"model\.layers\.(\d+)\.(decoder_layer\.)?", name)
    if not match:
        return ""
    layer = int(match.group(1))
    if schedule.is_pmod_layer(layer) and not match.group(2) and "router" not in name:
        return f" (layer {layer} is a p-MoD layer: its weights belong under model.layers.{layer}.decoder_layer.)"
    if not schedule.is_pmod_layer(layer) and (match.group(2) or ".router." in name):
        return f" (layer {layer} is an ordinary layer under this config's mod_target_layers)"
    return ""


def check_checkpoint(
    checkpoint_dir: str | Path,
    config: Any = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Raise `CheckpointError` unless the checkpoint holds exactly the weights its config implies.

    `config` defaults to the directory's config.json; `state_dict` (from `load_state_dict`) avoids
    reading the weights twice. Checks: the config keys (`validate_config`), the vision tower
    directory, the tokenizer, missing / unexpected weight names and their shapes.
    """
    root = Path(checkpoint_dir)
    config_file = "config.json"
    if config is None:
        if not (root / config_file).is_file():
            raise CheckpointError(root, [Problem(config_file, "<file>", "is missing")])
        config = _read_json(root / config_file, root)
    config = _as_dict(config)
    try:
        validate_config(config, root / config_file)
    except ConfigError as exc:  # re-anchor the file names on the checkpoint directory
        raise ConfigError(root, [Problem(config_file, p.key, p.message) for p in exc.problems]) from None

    problems: list[Problem] = []
    try:
        vision_config = load_vision_config(resolve_vision_tower(config["mm_vision_tower"], root))
    except (VisionTowerError, json.JSONDecodeError) as exc:
        raise CheckpointError(root, [Problem(config_file, "mm_vision_tower", str(exc))]) from None
    if config.get("mm_hidden_size") != vision_config["hidden_size"]:
        problems.append(
            Problem(
                config_file,
                "mm_hidden_size",
                f"is {config.get('mm_hidden_size')}, the vision tower's hidden_size is {vision_config['hidden_size']}",
            )
        )
    if not (root / "tokenizer.model").is_file():
        problems.append(Problem("tokenizer.model", "<file>", "is missing (the SentencePiece LLaMA tokenizer)"))

    listing, weight_map = weight_files(root)
    if state_dict is None:
        state_dict, origin = _read_weights(root)
    else:
        origin = {name: (weight_map or {}).get(name, listing) for name in state_dict}
    specs = expected_weight_specs(config, vision_config)
    schedule = PmodSchedule.from_config(config)

    for name, spec in specs.items():
        if name not in state_dict:
            if spec.required:
                problems.append(Problem(listing, name, "is missing" + _layer_hint(name, schedule)))
            continue
        tensor = state_dict[name]
        if tuple(tensor.shape) != spec.shape:
            problems.append(
                Problem(
                    origin.get(name, listing),
                    name,
                    f"has shape {list(tensor.shape)}, expected {list(spec.shape)} = [{', '.join(spec.dims)}] "
                    f"from {config_file}",
                )
            )
        elif not tensor.is_floating_point():
            problems.append(Problem(origin.get(name, listing), name, f"has dtype {tensor.dtype}, expected a float"))
    for name in state_dict:
        if name not in specs and not is_stale_buffer(name):
            problems.append(
                Problem(origin.get(name, listing), name, "is unexpected for this config" + _layer_hint(name, schedule))
            )
    if problems:
        raise CheckpointError(root, problems)
