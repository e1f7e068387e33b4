"""The trained tiny p-MoD-LLaVA: its config (released v1.5 layout at tiny dimensions), its initial
weights, and writing a checkpoint directory the plugin and the reference load unchanged.

Layout: `model_registry`'s tiny ``v15`` config (``image_aspect_ratio: pad``, ``mm_patch_merge_type:
flat``, ``mlp2x_gelu``, CLIP layer -2 patch features, the release's ``mod_*`` keys:
``shiftedcos_decay_0.85_0.15``, factor 0.5, ``tanh_0.2_1``, ``vision_all``, router bias) with
  - a LLaMA decoder of ``NUM_LAYERS`` = 16 layers (not 32: training time), hidden 64 (2 heads of 32,
    a head size vLLM's CPU attention supports), MLP 128, vocabulary 640 (model_registry's
    SentencePiece tokenizer, trained on its corpus plus the task's sentences). The PRD formula keeps
    the released constant 31 whatever the depth, so layers 0-7 are ordinary and layers 8-15 are
    p-MoD layers with retention ratios 0.844, 0.806, 0.764, 0.720, 0.674, 0.625, 0.576, 0.525;
  - a CLIP tower (3 layers, hidden 64; layer -2 feeds the projector) of 112-pixel images in
    14-pixel patches: 8x8 = 64 visual tokens per image (its preprocessor_config resizes and crops
    to 112).
The dense baseline has the same config except ``mod_target_layers: shiftedcos_decay_0.0_0.0``,
which selects no layer (the schedule's smallest ratio at depth 16 is 0.525): every layer is an
ordinary LLaMA layer, no router weights.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from model_registry.checkpoint import expected_weight_specs
from model_registry.tiny import tiny_config, write_weights
from model_registry.tokenizer import train_sentencepiece, vocab_size_of, write_tokenizer
from pmod_serve.transformers_utils.vision_tower import BUNDLED_VISION_TOWERS
from pmod_train import shapes

NUM_LAYERS = 16
# Large enough that every question word and answer of the task is one SentencePiece piece.
VOCAB_SIZE = 640
IMAGE_SIDE = 112
PATCH = 14
TOWER_DIR = "clip-vit-shapes-patch14-112"
PMOD_TARGET_LAYERS = "shiftedcos_decay_0.85_0.15"  # the releases' schedule
DENSE_TARGET_LAYERS = "shiftedcos_decay_0.0_0.0"  # no layer qualifies: a dense LLaVA

TEXT_CONFIG: dict[str, Any] = {
    "num_hidden_layers": NUM_LAYERS,
    "hidden_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 4096,  # pmod-serve --demo serves with --max-model-len 4096
}

VISION_CONFIG: dict[str, Any] = {
    "architectures": ["CLIPVisionModel"],
    "model_type": "clip_vision_model",
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 3,  # layer -2: the output of the second layer feeds the projector
    "num_attention_heads": 2,
    "num_channels": 3,
    "image_size": IMAGE_SIDE,
    "patch_size": PATCH,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 64,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "torch_dtype": "float32",
}


def tokenizer_model() -> bytes:
    """model_registry's LLaMA-style SentencePiece tokenizer, its corpus plus the task's sentences."""
    return train_sentencepiece(0, VOCAB_SIZE, extra_sentences=tuple(shapes.tokenizer_sentences()))


def model_config(dense: bool, vocab_size: int) -> dict[str, Any]:
    config = tiny_config(
        "v15",
        vocab_size,
        **TEXT_CONFIG,
        mm_vision_tower=TOWER_DIR,
        mm_hidden_size=VISION_CONFIG["hidden_size"],
        mod_target_layers=DENSE_TARGET_LAYERS if dense else PMOD_TARGET_LAYERS,
    )
    return config


def preprocessor_config() -> dict[str, Any]:
    bundled = BUNDLED_VISION_TOWERS["openai/clip-vit-large-patch14-336"] / "preprocessor_config.json"
    config = json.loads(bundled.read_text())
    config["crop_size"] = {"height": IMAGE_SIDE, "width": IMAGE_SIDE}
    config["size"] = {"shortest_edge": IMAGE_SIDE}
    return config


def initial_state_dict(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Seeded initialisation of every weight of the released layout, scaled for a narrow model.

    Linear weights N(0, 1/fan_in) (unit-scale activations; GPT-2's fixed 0.02 is ~1/sqrt(width) of a
    768-wide model and leaves a 64-wide one with uniform attention that barely trains), residual
    output projections (o_proj, down_proj, CLIP out_proj/fc2) further scaled by 1/sqrt(2 * layers),
    token embeddings and image_newline N(0, 1), norms 1, biases 0. Routers start near w = 1 for every
    token (weight N(0, 0.01/hidden), bias 0): routing is near-random at first and is learned with
    the LLM.
    """
    generator = torch.Generator().manual_seed(seed)
    depth = config["num_hidden_layers"]
    vision_depth = VISION_CONFIG["num_hidden_layers"]
    state: dict[str, torch.Tensor] = {}
    for name, spec in expected_weight_specs(config, VISION_CONFIG).items():
        shape = spec.shape
        leaf = name.rsplit(".", 2)[-2]
        if ".router.router." in name:
            std = 0.0 if name.endswith(".bias") else 0.1 / math.sqrt(shape[1])
        elif name.endswith(".bias"):
            std = 0.0
        elif "norm" in leaf or "layrnorm" in leaf:
            state[name] = torch.ones(shape)
            continue
        elif name.endswith("embed_tokens.weight") or name.endswith("image_newline"):
            std = 1.0
        elif name.endswith("class_embedding") or name.endswith("position_embedding.weight"):
            std = 0.5  # where a patch is matters as much as what it shows
        elif name.endswith("patch_embedding.weight"):
            std = 1.0 / math.sqrt(shape[1] * shape[2] * shape[3])
        else:
            std = 1.0 / math.sqrt(shape[1])
            if leaf in ("o_proj", "down_proj"):
                std /= math.sqrt(2 * depth)
            elif leaf in ("out_proj", "fc2"):
                std /= math.sqrt(2 * vision_depth)
        state[name] = (torch.randn(shape, generator=generator) * std).contiguous()
    return state


def write_checkpoint(out_dir: str | Path, config: dict[str, Any], state: dict[str, torch.Tensor],
                     tokenizer: bytes, extra_files: dict[str, Any] | None = None) -> Path:
    """A checkpoint directory in the released layout: config, tokenizer, CLIP tower config, one
    safetensors file (``extra_files``: more JSON files, e.g. the training record)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    tower = out_dir / TOWER_DIR
    tower.mkdir()
    (tower / "config.json").write_text(json.dumps(VISION_CONFIG, indent=2) + "\n")
    (tower / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(), indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=2) + "\n"
    )
    write_tokenizer(out_dir, tokenizer, config["tokenizer_model_max_length"])
    write_weights(out_dir, {name: t.detach().contiguous() for name, t in state.items()}, "safetensors", 1)
    for name, value in (extra_files or {}).items():
        (out_dir / name).write_text(json.dumps(value, indent=2) + "\n")
    return out_dir


def build_initial_checkpoint(out_dir: str | Path, dense: bool, seed: int) -> Path:
    tokenizer = tokenizer_model()
    config = model_config(dense, vocab_size_of(tokenizer))
    return write_checkpoint(out_dir, config, initial_state_dict(config, seed), tokenizer)
