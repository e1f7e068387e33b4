"""Weightless model directories for the GPU check and benchmark (no hub access anywhere).

- `pmod-next-7b`: the p-MoD-LLaVA-NeXT-7B config.json (released layout) + tokenizer, for
  load_format="dummy" (`model_registry.tiny.write_full_size_config`).
- `llava-next-7b-hf`: vLLM's own `LlavaNextForConditionalGeneration` in the llava-hf layout with
  the same dimensions: Vicuna-7B (32 layers, hidden 4096, 32 MHA heads, MLP 11008, vocab 32064),
  CLIP ViT-L/14-336 (layer -2, CLS dropped), a 2-layer GELU projector, AnyRes with the same five
  pinpoints and an image-newline vector. Its tokenizer is the same SentencePiece model as the
  p-MoD directory's (the tiny one padded with never-produced pieces to Vicuna's 32000), plus the
  `<image>` (32000) and `<pad>` (32001) tokens llava-hf adds.
- tiny variants of both (`--tiny`, for CPU dry runs of the benchmark logic).
- `write_dense_twin`: a p-MoD checkpoint with routing off (no layer is a p-MoD layer, the routed
  layers' weights renamed as ordinary layers, routers dropped): the dense baseline of identical
  dimensions served through the same plugin and engine (`benchmarks.host_overhead`, and the CPU
  stand-in for the dense server in `benchmarks.e2e_serve`).

    python -m benchmarks.models OUT_DIR [--tiny]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from model_registry.catalog import NEXT_GRID_PINPOINTS

CLIP_L_336 = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "image_size": 336,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "num_channels": 3,
    "attention_dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
}

VICUNA_7B_TEXT = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "vocab_size": 32064,
    "hidden_act": "silu",
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "torch_dtype": "bfloat16",
}

# Tiny dimensions for CPU dry runs (head size 32: vLLM's CPU attention needs 32 or 64).
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 2}
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
               "projection_dim": 32}

IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def _write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def padded_tokenizer_model(model_bytes: bytes, vocab_size: int = 32000) -> bytes:
    """The SentencePiece model with UNUSED pieces appended up to `vocab_size` entries.

    The tiny tokenizer has 512 pieces; Vicuna's has 32000, and both layouts place `<image>` right
    past the text vocabulary (p-MoD: `vocab_size`, llava-hf: 32000). UNUSED pieces are never
    produced by the encoder, so every text encodes exactly as with the tiny tokenizer."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    model.ParseFromString(model_bytes)
    for i in range(len(model.pieces), vocab_size):
        piece = model.pieces.add()
        piece.piece = f"<unused_{i}>"
        piece.score = -1e9
        piece.type = pb.ModelProto.SentencePiece.UNUSED
    return model.SerializeToString()


def write_pmod_dir(out_dir: Path, tiny: bool = False) -> Path:
    from model_registry.tiny import TINY_TOWER_DIR, TINY_VISION_CONFIG, write_full_size_config
    from model_registry.tokenizer import write_tokenizer
    from pmod_serve.transformers_utils.vision_tower import BUNDLED_VISION_TOWERS, CLIP_VIT_L_336

    out_dir = Path(out_dir)
    write_full_size_config(out_dir, "next", seed=0)
    config = json.loads((out_dir / "config.json").read_text())
    model_bytes = (out_dir / "tokenizer.model").read_bytes()
    write_tokenizer(out_dir, padded_tokenizer_model(model_bytes, config["vocab_size"]),
                    config["tokenizer_model_max_length"])
    if tiny:
        config = json.loads((out_dir / "config.json").read_text())
        config.update(TINY_TEXT)
        config["mm_hidden_size"] = TINY_VISION_CONFIG["hidden_size"]
        config["mm_vision_tower"] = TINY_TOWER_DIR
        tower = out_dir / TINY_TOWER_DIR
        tower.mkdir(exist_ok=True)
        _write_json(tower / "config.json", TINY_VISION_CONFIG)
        bundled = BUNDLED_VISION_TOWERS[CLIP_VIT_L_336]
        shutil.copyfile(bundled / "preprocessor_config.json", tower / "preprocessor_config.json")
        _write_json(out_dir / "config.json", config)
    return out_dir


def write_llava_next_hf_dir(out_dir: Path, tokenizer_src: Path, tiny: bool = False) -> Path:
    """llava-hf LLaVA-NeXT (Vicuna-7B + CLIP-L/14-336) config, processor files and tokenizer."""
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_src))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})  # 32000, as llava-hf
    tokenizer.add_special_tokens({"pad_token": "<pad>"})  # 32001
    tokenizer.save_pretrained(str(out_dir))
    image_token_index = tokenizer.convert_tokens_to_ids("<image>")

    text = dict(VICUNA_7B_TEXT)
    vision = dict(CLIP_L_336)
    if tiny:
        text.update(TINY_TEXT)
        vision.update(TINY_VISION)
    config = {
        "architectures": ["LlavaNextForConditionalGeneration"],
        "model_type": "llava_next",
        "ignore_index": -100,
        "image_token_index": image_token_index,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_grid_pinpoints": NEXT_GRID_PINPOINTS,
        "image_seq_length": 576,
        "multimodal_projector_bias": True,
        "use_image_newline_parameter": True,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "text_config": text,
        "vision_config": vision,
    }
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    _write_json(
        out_dir / "preprocessor_config.json",
        {
            "aspect_ratio_setting": "anyres",
            "crop_size": {"height": 336, "width": 336},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_pad": True,
            "do_rescale": True,
            "do_resize": True,
            "image_grid_pinpoints": NEXT_GRID_PINPOINTS,
            "image_mean": IMAGE_MEAN,
            "image_std": IMAGE_STD,
            "image_processor_type": "LlavaNextImageProcessor",
            "processor_class": "LlavaNextProcessor",
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"shortest_edge": 336},
        },
    )
    _write_json(
        out_dir / "processor_config.json",
        {
            "processor_class": "LlavaNextProcessor",
            "image_token": "<image>",
            "patch_size": 14,
            "vision_feature_select_strategy": "default",
            "num_additional_image_tokens": 1,
        },
    )
    return out_dir


# shiftedcos: r_i = cos(i*pi/31)/2 + factor >= factor - 1/2; with factor 2 every r_i >= 1.5 exceeds
# the release's max ratio (0.85), so the schedule selects no layer (docs/p-mod.md, "Progressive ratio decay").
DENSE_TWIN_ROUTER_FACTOR = 2.0


def write_dense_twin(checkpoint: Path, out_dir: Path) -> Path:
    """`checkpoint` (released layout) with routing off, in `out_dir` (reused when built from the
    same source). Same tokenizer, tower and weights; one KV cache group. A weightless directory
    (for load_format="dummy") gets a weightless twin."""
    import torch
    from safetensors.torch import load_file, save_file

    from pmod_serve.pmod.schedule import PmodSchedule

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    stamp = {"source": str(checkpoint.resolve()),
             "source_config": (checkpoint / "config.json").read_text(),
             "router_factor": DENSE_TWIN_ROUTER_FACTOR}
    stamp_path = out_dir / ".dense_twin_stamp.json"
    if stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        return out_dir
    config = json.loads((checkpoint / "config.json").read_text())
    config["mod_router_factor"] = DENSE_TWIN_ROUTER_FACTOR
    config["mod_target_layer_indices"] = []
    if PmodSchedule.from_config(config).retention_ratio:
        raise RuntimeError("dense twin: the schedule still selects p-MoD layers")
    tensors: dict[str, torch.Tensor] = {}
    shards = sorted(checkpoint.glob("*.safetensors"))
    if not shards and any(checkpoint.glob("*.bin")):
        raise ValueError(f"{checkpoint}: only safetensors weights can be renamed")
    for shard in shards:
        for name, tensor in load_file(str(shard)).items():
            if ".router.router." in name:
                continue
            tensors[name.replace(".decoder_layer.", ".")] = tensor
    tmp = out_dir.parent / f".{out_dir.name}.building"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.index.json",
                                                                   ".pmod_tiny_stamp.json", ".dense_twin_stamp.json"))
    if tensors:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    _write_json(tmp / "config.json", config)
    _write_json(tmp / ".dense_twin_stamp.json", stamp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def prepare(out_root: Path, tiny: bool = False) -> dict[str, Path]:
    """Both benchmark model directories under `out_root` (reused when complete)."""
    out_root = Path(out_root)
    suffix = "-tiny" if tiny else ""
    pmod = out_root / f"pmod-next-7b{suffix}"
    llava = out_root / f"llava-next-7b-hf{suffix}"
    if not (pmod / "config.json").exists():
        write_pmod_dir(pmod, tiny=tiny)
    if not (llava / "config.json").exists():
        write_llava_next_hf_dir(llava, pmod, tiny=tiny)
    return {"pmod": pmod, "baseline": llava}


def prepare_tiny_checkpoints(out_root: Path) -> dict[str, Path]:
    """The tiny random-weight checkpoints of the CPU exactness tests (seed 0)."""
    from model_registry import build_tiny_checkpoint

    out_root = Path(out_root)
    return {
        "next": build_tiny_checkpoint(out_root / "tiny-next", variant="next", seed=0),
        "v15": build_tiny_checkpoint(out_root / "tiny-v15", variant="v15", seed=0),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--tiny", action="store_true", help="tiny dims (CPU dry runs)")
    parser.add_argument("--with-tiny-checkpoints", action="store_true")
    args = parser.parse_args()
    print(prepare(args.out, tiny=args.tiny))
    if args.with_tiny_checkpoints:
        print(prepare_tiny_checkpoints(args.out))


if __name__ == "__main__":
    main()
