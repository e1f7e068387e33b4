"""Tiny p-MoD checkpoints in exactly the released layout (docs/p-mod.md, "The released checkpoint layout"), for tests and CPU runs.

    python -m model_registry.tiny --variant next --out /tmp/pmod-tiny-next --seed 0

The language model keeps the release's 32 layers, so the real PRD schedule applies (layers 8-31 are
p-MoD layers), at hidden size 64 (2 heads of 32: a head size vLLM's CPU attention supports). The
CLIP tower is tiny but keeps 336-pixel tiles of 14-pixel patches: 24x24 = 576 features per tile, as
the real one. Weights are random (seeded), scaled so the model is far from degenerate: generations
depend on the image, and router logits spread over tanh's range so top-k depends on the image too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from model_registry.catalog import VARIANTS, full_size_config
from model_registry.checkpoint import (
    BIN_INDEX,
    SAFETENSORS_INDEX,
    expected_weight_specs,
)
from model_registry.tokenizer import train_sentencepiece, vocab_size_of, write_tokenizer
from pmod_serve.transformers_utils.vision_tower import BUNDLED_VISION_TOWERS

# Bump when the produced files change, so cached builds are rebuilt.
BUILDER_VERSION = 2
STAMP_FILE = ".pmod_tiny_stamp.json"
TINY_TOWER_DIR = "clip-vit-tiny-patch14-336"

TINY_TEXT_CONFIG: dict[str, Any] = {
    "num_hidden_layers": 32,
    "hidden_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
}

TINY_VISION_CONFIG: dict[str, Any] = {
    "architectures": ["CLIPVisionModel"],
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_channels": 3,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 32,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "torch_dtype": "float32",
}

# ---------------------------------------------------------------------------- config


def tiny_config(variant: str, vocab_size: int, **overrides: Any) -> dict[str, Any]:
    """config.json of a tiny checkpoint: the release's mm_* / mod_* keys at tiny dimensions."""
    entry = VARIANTS[variant]
    config: dict[str, Any] = {
        key: value
        for key, value in entry.released_config.items()
        if not (key == "image_grid_pinpoints" and value is None)  # LLaVA-1.5 configs lack the key
    }
    config.update(TINY_TEXT_CONFIG)
    config.update(
        {
            "vocab_size": vocab_size,
            "mm_vision_tower": TINY_TOWER_DIR,
            "mm_hidden_size": TINY_VISION_CONFIG["hidden_size"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "rope_scaling": None,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "use_cache": True,
            "use_mm_proj": True,
        }
    )
    config.update(overrides)
    return dict(sorted(config.items()))


# ---------------------------------------------------------------------------- weights


# Gains over the unit-variance 1/sqrt(fan_in) init, found by measuring the model on images: sharper
# attention (q, k) makes the output depend on individual image tokens, damped residual branches
# (o, down) keep the current token's embedding visible so generations do not collapse into loops.
_MATRIX_GAINS = {"q_proj": 2.0, "k_proj": 2.0, "o_proj": 0.3, "down_proj": 0.3}


def _router_std(layer: int, hidden: int) -> float:
    # The residual stream grows slowly with depth; this keeps the router logits' spread across the
    # image tokens of a layer around 1, so tanh neither saturates nor stays linear.
    expected_rms = math.sqrt(1.0 + 0.1 * layer)
    return 1.5 / (math.sqrt(hidden) * expected_rms)


def _init_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    def normal(std: float) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float32) * std

    leaf = name.rsplit(".", 2)[-2]  # the module: "input_layernorm", "mlp", ...
    if ".router.router." in name:
        if name.endswith(".bias"):
            return normal(0.1)
        return normal(_router_std(int(name.split(".")[2]), shape[1]))
    if name.endswith("embed_tokens.weight") or name.endswith("image_newline"):
        return normal(1.0)
    if name.endswith("class_embedding"):
        return normal(1.0)
    if name.endswith("position_embedding.weight"):
        return normal(0.1)
    if name.endswith("patch_embedding.weight"):
        return normal(1.0 / math.sqrt(shape[1] * shape[2] * shape[3]))
    if "norm" in leaf or "layrnorm" in leaf:
        # RMSNorm / LayerNorm: weights 1 + small noise, biases small noise.
        return 1.0 + normal(0.05) if name.endswith("weight") else normal(0.05)
    if name.endswith(".bias"):
        return normal(0.02)
    if len(shape) == 2:
        gain = _MATRIX_GAINS.get(leaf, 1.0) if name.startswith("model.layers.") else 1.0
        return normal(gain / math.sqrt(shape[1]))  # 1/sqrt(fan_in): unit-scale activations
    raise ValueError(f"no initialiser for {name} {shape}")


def tiny_state_dict(config: dict[str, Any], vision_config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights for every name of the released layout, plus a stale RoPE buffer."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, spec in expected_weight_specs(config, vision_config).items():
        state[name] = _init_tensor(name, spec.shape, generator).contiguous()
        if name == "model.layers.0.post_attention_layernorm.weight":
            # What transformers < 4.32 saved with every LLaMA layer; loaders must ignore it.
            head_dim = config["hidden_size"] // config["num_attention_heads"]
            exponent = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
            state["model.layers.0.self_attn.rotary_emb.inv_freq"] = 1.0 / (config["rope_theta"] ** exponent)
    return state


def _shard(names: list[str], state: dict[str, torch.Tensor], num_shards: int) -> list[list[str]]:
    total = sum(state[n].numel() * state[n].element_size() for n in names)
    shards: list[list[str]] = [[]]
    filled = 0
    for name in names:
        if filled >= total * len(shards) / num_shards and len(shards) < num_shards:
            shards.append([])
        shards[-1].append(name)
        filled += state[name].numel() * state[name].element_size()
    return shards


def write_weights(out_dir: Path, state: dict[str, torch.Tensor], fmt: str, num_shards: int) -> list[str]:
    """Weights in the HF naming of `fmt` ("safetensors" or "bin"): `num_shards` shards plus the index
    file, or the single model.safetensors / pytorch_model.bin when `num_shards` is 1."""
    shards = _shard(list(state), state, num_shards)
    count = len(shards)
    stem, suffix, index_name = {
        "safetensors": ("model", "safetensors", SAFETENSORS_INDEX),
        "bin": ("pytorch_model", "bin", BIN_INDEX),
    }[fmt]
    weight_map: dict[str, str] = {}
    files = []
    for number, names in enumerate(shards, start=1):
        file_name = f"{stem}-{number:05d}-of-{count:05d}.{suffix}" if count > 1 else f"{stem}.{suffix}"
        tensors = {name: state[name] for name in names}
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(out_dir / file_name), metadata={"format": "pt"})
        else:
            torch.save(tensors, str(out_dir / file_name))
        os.chmod(out_dir / file_name, 0o644)  # safetensors creates files readable by the owner only
        weight_map.update(dict.fromkeys(names, file_name))
        files.append(file_name)
    if count == 1:
        return files
    total_size = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / index_name).write_text(json.dumps(index, indent=2) + "\n")
    return [*files, index_name]


# ---------------------------------------------------------------------------- builder


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def _stamp_args(variant: str, seed: int, fmt: str, num_shards: int, overrides: dict[str, Any]) -> dict[str, Any]:
    return {
        "builder_version": BUILDER_VERSION,
        "variant": variant,
        "seed": seed,
        "fmt": fmt,
        "num_shards": num_shards,
        "overrides": json.loads(json.dumps(overrides, sort_keys=True)),
    }


def _is_complete(out_dir: Path, args: dict[str, Any]) -> bool:
    try:
        stamp = json.loads((out_dir / STAMP_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if stamp.get("args") != args:
        return False
    return all((out_dir / name).is_file() and (out_dir / name).stat().st_size == size
               for name, size in stamp.get("files", {}).items())


def _install(tmp_dir: Path, out_dir: Path, args: dict[str, Any]) -> None:
    """Move a finished build into place; a stale build of ours is replaced, foreign content is not."""
    if out_dir.exists():
        if _is_complete(out_dir, args):  # built concurrently by someone else
            shutil.rmtree(tmp_dir)
            return
        if (out_dir / STAMP_FILE).exists():
            shutil.rmtree(out_dir)
        elif out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        else:
            shutil.rmtree(tmp_dir)
            raise FileExistsError(
                f"{out_dir} exists and was not built by model_registry.tiny ({STAMP_FILE} missing); "
                "refusing to overwrite it"
            )
    try:
        os.rename(tmp_dir, out_dir)
    except OSError:
        if not _is_complete(out_dir, args):
            raise
        shutil.rmtree(tmp_dir)


def build_tiny_checkpoint(
    out_dir: str | Path,
    variant: str = "next",
    seed: int = 0,
    *,
    fmt: str = "safetensors",
    num_shards: int = 2,
    **overrides: Any,
) -> Path:
    """Build (or reuse, if already built with the same arguments) a tiny checkpoint in `out_dir`.

    variant: "next" (anyres + spatial_unpad + image_newline) or "v15" (pad + flat).
    fmt: "safetensors" or "bin" shards (`num_shards` of them) with the HF index file.
    overrides: config.json keys to replace (e.g. num_hidden_layers=4); dimensions follow them.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: expected one of {sorted(VARIANTS)}")
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"unknown fmt {fmt!r}: expected 'safetensors' or 'bin'")
    if num_shards < 1:
        raise ValueError("num_shards must be at least 1")
    out_dir = Path(out_dir).resolve()
    args = _stamp_args(variant, seed, fmt, num_shards, overrides)
    if _is_complete(out_dir, args):
        return out_dir

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    try:
        tokenizer_model = train_sentencepiece(seed)
        config = tiny_config(variant, vocab_size_of(tokenizer_model), **overrides)
        vision_config = dict(TINY_VISION_CONFIG)
        tower_dir = tmp_dir / TINY_TOWER_DIR
        tower_dir.mkdir()
        _write_json(tower_dir / "config.json", vision_config)
        bundled = BUNDLED_VISION_TOWERS["openai/clip-vit-large-patch14-336"]
        shutil.copyfile(bundled / "preprocessor_config.json", tower_dir / "preprocessor_config.json")

        _write_json(tmp_dir / "config.json", config)
        _write_json(tmp_dir / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
        write_tokenizer(tmp_dir, tokenizer_model, config["tokenizer_model_max_length"])
        write_weights(tmp_dir, tiny_state_dict(config, vision_config, seed), fmt, num_shards)

        files = sorted(str(p.relative_to(tmp_dir)) for p in tmp_dir.rglob("*") if p.is_file())
        _write_json(
            tmp_dir / STAMP_FILE,
            {"args": args, "files": {name: (tmp_dir / name).stat().st_size for name in files}},
        )
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    _install(tmp_dir, out_dir, args)
    return out_dir


def write_full_size_config(out_dir: str | Path, variant: str = "next", seed: int = 0) -> Path:
    """A weightless 7B checkpoint directory (config.json + tokenizer) for load_format="dummy".

    The tokenizer is the tiny one: its ids fit in the 32000-entry vocabulary.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = full_size_config(variant)
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    write_tokenizer(out_dir, train_sentencepiece(seed), config["tokenizer_model_max_length"])
    return out_dir


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m model_registry.tiny", description="Build a tiny p-MoD checkpoint in the released layout."
    )
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="next")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", dest="fmt", choices=("safetensors", "bin"), default="safetensors")
    parser.add_argument("--num-shards", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", type=_parse_override, default=[],
                        metavar="KEY=JSON", help="override a config.json key (repeatable)")
    parser.add_argument("--full-size", action="store_true",
                        help="write the release's 7B config.json + a tokenizer only (for load_format=dummy)")
    args = parser.parse_args(argv)
    if args.full_size:
        print(write_full_size_config(args.out, args.variant, args.seed))
        return
    print(build_tiny_checkpoint(args.out, args.variant, args.seed, fmt=args.fmt, num_shards=args.num_shards,
                                **dict(args.overrides)))


if __name__ == "__main__":
    main()
