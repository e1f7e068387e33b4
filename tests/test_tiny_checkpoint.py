"""Tiny checkpoints: released layout (docs/p-mod.md, "The released checkpoint layout"), determinism, caching, and checkpoint errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file

from model_registry import CheckpointError, check_checkpoint, load_state_dict, lookup, validate_config
from model_registry.checkpoint import expected_weight_shapes
from model_registry.tiny import STAMP_FILE, build_tiny_checkpoint, write_full_size_config
from pmod_serve.transformers_utils.vision_tower import load_vision_config, resolve_vision_tower

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "pmod-tiny"


@pytest.fixture(scope="session")
def next_dir(tiny_root) -> Path:
    return build_tiny_checkpoint(tiny_root / "next-0", "next", seed=0)


@pytest.fixture(scope="session")
def v15_dir(tiny_root) -> Path:
    return build_tiny_checkpoint(tiny_root / "v15-0", "v15", seed=0)


def _shard_contents(checkpoint: Path) -> dict[str, dict[str, torch.Tensor]]:
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    return {name: load_file(str(checkpoint / name)) for name in sorted(set(index["weight_map"].values()))}


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    target = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, target)
    return target


# ------------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("variant", ["next", "v15"])
def test_config_is_the_release_at_tiny_size(variant, next_dir, v15_dir):
    checkpoint = next_dir if variant == "next" else v15_dir
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model_type"] == "pmod_llava_llama"
    assert config["architectures"] == ["PmodLlavaLlamaForCausalLM"]
    assert config["torch_dtype"] == "float32"
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]) == (32, 64, 2)
    assert (config["num_key_value_heads"], config["intermediate_size"]) == (2, 128)
    assert (config["rms_norm_eps"], config["rope_theta"], config["max_position_embeddings"]) == (1e-5, 10000.0, 4096)
    sp = spm.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    assert config["vocab_size"] == sp.get_piece_size() == 512
    # Only the sizes differ from the release; every mm_* / mod_* key keeps its released value.
    deviations = {p.key for p in validate_config(config, checkpoint / "config.json", lookup(variant))}
    assert deviations == {"hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                          "vocab_size", "mm_vision_tower", "mm_hidden_size"}
    tower = resolve_vision_tower(config["mm_vision_tower"], checkpoint)
    assert tower.parent == checkpoint and not Path(config["mm_vision_tower"]).is_absolute()
    vision = load_vision_config(tower)
    assert (vision["image_size"] // vision["patch_size"]) ** 2 == 576
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["hidden_act"]) == (32, 3, "quick_gelu")
    assert config["mm_hidden_size"] == vision["hidden_size"]
    assert (tower / "preprocessor_config.json").is_file()
    expected_layout = {"next": ("anyres", "spatial_unpad"), "v15": ("pad", "flat")}[variant]
    assert (config["image_aspect_ratio"], config["mm_patch_merge_type"]) == expected_layout


@pytest.mark.parametrize("variant", ["next", "v15"])
def test_weights_in_the_released_names(variant, next_dir, v15_dir):
    checkpoint = next_dir if variant == "next" else v15_dir
    state = load_state_dict(checkpoint)
    for layer in range(8):
        for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                     "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                     "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"):
            assert f"model.layers.{layer}.{name}" in state
            assert f"model.layers.{layer}.decoder_layer.{name}" not in state
    for layer in range(8, 32):
        assert state[f"model.layers.{layer}.decoder_layer.self_attn.q_proj.weight"].shape == (64, 64)
        assert state[f"model.layers.{layer}.decoder_layer.mlp.down_proj.weight"].shape == (64, 128)
        assert f"model.layers.{layer}.self_attn.q_proj.weight" not in state
        router_weight = state[f"model.layers.{layer}.router.router.weight"]
        router_bias = state[f"model.layers.{layer}.router.router.bias"]
        assert router_weight.shape == (1, 64) and router_bias.shape == (1,)
        assert router_weight.abs().min() > 0 and router_bias.abs().min() > 0
    for name, shape in {
        "model.embed_tokens.weight": (512, 64), "model.norm.weight": (64,), "lm_head.weight": (512, 64),
        "model.mm_projector.0.weight": (64, 32), "model.mm_projector.0.bias": (64,),
        "model.mm_projector.2.weight": (64, 64), "model.mm_projector.2.bias": (64,),
        "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight": (32, 3, 14, 14),
        "model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight": (577, 32),
        "model.vision_tower.vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight": (64, 32),
        "model.vision_tower.vision_tower.vision_model.post_layernorm.bias": (32,),
    }.items():
        assert tuple(state[name].shape) == shape, name
    assert ("model.image_newline" in state) == (variant == "next")
    assert all(t.dtype == torch.float32 for t in state.values())
    # Norm weights are 1 plus a little noise.
    norm = state["model.layers.3.input_layernorm.weight"]
    assert 0.7 < float(norm.min()) and float(norm.max()) < 1.3 and float(norm.std()) > 0
    # The stale RoPE buffer is in the files but not in the loaded state dict.
    raw = {name for tensors in _shard_contents(checkpoint).values() for name in tensors}
    assert raw - set(state) == {"model.layers.0.self_attn.rotary_emb.inv_freq"}


def test_weights_load_into_transformers_modules(next_dir):
    """The names and shapes are those transformers' own LLaMA and CLIP modules use."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    state = load_state_dict(next_dir)
    config = json.loads((next_dir / "config.json").read_text())
    llama = LlamaForCausalLM(LlamaConfig(**{k: config[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "rms_norm_eps", "max_position_embeddings")}))
    renamed = {name.replace(".decoder_layer.", "."): tensor for name, tensor in state.items()
               if name.startswith(("model.layers.", "model.embed_tokens", "model.norm", "lm_head"))
               and ".router." not in name}
    llama.load_state_dict(renamed, strict=True)
    vision_dir = resolve_vision_tower(config["mm_vision_tower"], next_dir)
    clip = CLIPVisionModel(CLIPVisionConfig.from_pretrained(vision_dir))
    prefix = "model.vision_tower.vision_tower.vision_model."
    clip.load_state_dict({n[len(prefix):]: t for n, t in state.items() if n.startswith(prefix)}, strict=True)


@pytest.mark.parametrize("variant", ["next", "v15"])
def test_shards_index_and_size(variant, next_dir, v15_dir):
    checkpoint = next_dir if variant == "next" else v15_dir
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    shards = _shard_contents(checkpoint)
    assert len(shards) >= 2
    assert index["weight_map"] == {name: shard for shard, tensors in shards.items() for name in tensors}
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for tensors in shards.values() for t in tensors.values())
    total = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    assert 2e6 < total < 10e6, total
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "LlamaTokenizer"
    assert (tokenizer_config["add_bos_token"], tokenizer_config["add_eos_token"], tokenizer_config["legacy"]) == (
        True, False, True)
    assert tokenizer_config["padding_side"] == "right" and "chat_template" not in tokenizer_config
    assert json.loads((checkpoint / "generation_config.json").read_text())["eos_token_id"] == 2
    assert json.loads((checkpoint / "special_tokens_map.json").read_text())["eos_token"] == "</s>"


def test_tokenizer_is_llama_like(next_dir):
    sp = spm.SentencePieceProcessor(model_file=str(next_dir / "tokenizer.model"))
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    # Every piece gets a dummy prefix; "\n" has no piece of its own and falls back to a byte.
    assert sp.encode("\nWhat is this?", out_type=str)[:2] == ["▁", "<0x0A>"]
    assert sp.encode(" USER", out_type=str) == ["▁", "▁USER"]  # a leading space: two "▁" (docs/p-mod.md, "Prompts")
    assert sp.encode("2024", out_type=str) == ["▁", "2", "0", "2", "4"]  # split digits
    assert sp.decode(sp.encode("héllo wörld")) == "héllo wörld"  # byte fallback round trip
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
    assert len(sp.encode(system)) < len(system) / 3  # trained on it: merges, not characters
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(next_dir).convert_tokens_to_ids("</s>") == 2


# ------------------------------------------------------------------------------------------ builder


def test_builder_is_deterministic(tmp_path, next_dir):
    again = build_tiny_checkpoint(tmp_path / "again", "next", seed=0)
    files = sorted(p.relative_to(next_dir) for p in next_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        assert (next_dir / name).read_bytes() == (again / name).read_bytes(), name
    other = load_state_dict(build_tiny_checkpoint(tmp_path / "seed1", "next", seed=1))
    assert not torch.equal(other["lm_head.weight"], load_state_dict(next_dir)["lm_head.weight"])


def test_builder_reuses_complete_builds_and_rebuilds_changed_ones(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "ckpt", "v15", seed=3, num_hidden_layers=12)
    stamp = path / STAMP_FILE
    mtime = stamp.stat().st_mtime_ns
    assert build_tiny_checkpoint(tmp_path / "ckpt", "v15", seed=3, num_hidden_layers=12) == path
    assert stamp.stat().st_mtime_ns == mtime  # reused, not rebuilt
    config = json.loads((path / "config.json").read_text())
    assert config["num_hidden_layers"] == 12
    assert sum(".router.router.weight" in n for n in load_state_dict(path)) == 4  # layers 8..11

    (path / "model-00002-of-00002.safetensors").unlink()  # incomplete: rebuilt
    build_tiny_checkpoint(tmp_path / "ckpt", "v15", seed=3, num_hidden_layers=12)
    assert (path / "model-00002-of-00002.safetensors").is_file()

    build_tiny_checkpoint(tmp_path / "ckpt", "v15", seed=3, num_hidden_layers=12, num_shards=3)  # new args
    assert len(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert (path / "model-00003-of-00003.safetensors").is_file()
    assert not (path / "model-00002-of-00002.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no build leftovers

    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        build_tiny_checkpoint(tmp_path / "foreign", "v15")
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_bin_format_holds_the_same_weights(tmp_path, next_dir):
    path = build_tiny_checkpoint(tmp_path / "bin", "next", seed=0, fmt="bin", num_shards=3)
    index = json.loads((path / "pytorch_model.bin.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"pytorch_model-0000{i}-of-00003.bin" for i in (1, 2, 3)]
    assert not list(path.glob("*.safetensors"))
    from_bin, from_safetensors = load_state_dict(path), load_state_dict(next_dir)
    assert from_bin.keys() == from_safetensors.keys()
    assert all(torch.equal(from_bin[name], from_safetensors[name]) for name in from_bin)
    check_checkpoint(path)
    # One shard: the single-file names, no index.
    for fmt, single in (("bin", "pytorch_model.bin"), ("safetensors", "model.safetensors")):
        path = build_tiny_checkpoint(tmp_path / f"single-{fmt}", "next", seed=0, fmt=fmt, num_shards=1)
        assert sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".safetensors", ".json")
                      and "model" in p.name) == [single]
        state = load_state_dict(path)
        assert state.keys() == from_safetensors.keys() and torch.equal(state["lm_head.weight"],
                                                                         from_safetensors["lm_head.weight"])
        check_checkpoint(path)


def test_cli_builds_the_same_checkpoint(tmp_path, v15_dir):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "model_registry.tiny", "--variant", "v15", "--out", str(tmp_path / "cli"),
         "--seed", "0"], capture_output=True, text=True, env=env, check=True, cwd=tmp_path)
    built = Path(result.stdout.strip())
    assert built == (tmp_path / "cli").resolve()
    assert (built / STAMP_FILE).read_text() == (v15_dir / STAMP_FILE).read_text()


def test_full_size_config_directory(tmp_path):
    path = write_full_size_config(tmp_path / "full", "next")
    config = json.loads((path / "config.json").read_text())
    assert validate_config(config, path / "config.json", lookup("next")) == []
    assert not list(path.glob("*.safetensors")) and not list(path.glob("*.bin"))
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    assert sp.get_piece_size() <= config["vocab_size"] == 32000
    shapes = expected_weight_shapes(config, load_vision_config(resolve_vision_tower(config["mm_vision_tower"], path)))
    assert shapes["model.layers.8.decoder_layer.mlp.up_proj.weight"] == (11008, 4096)
    assert shapes["model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight"] == (577, 1024)
    assert sum(n.endswith("router.router.weight") for n in shapes) == 24


# ------------------------------------------------------------------------------------------ errors


def test_check_checkpoint_accepts_both_variants(next_dir, v15_dir):
    check_checkpoint(next_dir)
    config = json.loads((v15_dir / "config.json").read_text())
    check_checkpoint(v15_dir, config, load_state_dict(v15_dir))


def _rewrite_shard(checkpoint: Path, name: str, edit) -> str:
    """Apply `edit(tensors)` to the shard holding `name`; returns the shard's file name."""
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][name]
    tensors = load_file(str(checkpoint / shard))
    edit(tensors)
    save_file(tensors, str(checkpoint / shard), metadata={"format": "pt"})
    return shard


def _errors(checkpoint: Path) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        check_checkpoint(checkpoint)
    return info.value


def test_missing_key_names_the_file_and_key(tmp_path, next_dir):
    checkpoint = _copy(next_dir, tmp_path)
    name = "model.layers.12.router.router.weight"
    shard = _rewrite_shard(checkpoint, name, lambda tensors: tensors.pop(name))
    # Still listed in the index: the shard is named.
    error = _errors(checkpoint)
    assert [(p.file, p.key) for p in error.problems] == [(shard, name)]
    assert f"{shard}: '{name}': is listed in model.safetensors.index.json but absent" in str(error)
    # Dropped from the index too: the weight is missing for the config.
    index_path = checkpoint / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][name]
    index_path.write_text(json.dumps(index))
    error = _errors(checkpoint)
    assert [(p.file, p.key) for p in error.problems] == [("model.safetensors.index.json", name)]
    assert "is missing" in str(error)


def test_shape_mismatch_names_the_file_key_and_expectation(tmp_path, next_dir):
    checkpoint = _copy(next_dir, tmp_path)
    name = "model.layers.20.decoder_layer.mlp.up_proj.weight"
    shard = _rewrite_shard(checkpoint, name, lambda tensors: tensors.update({name: torch.zeros(96, 64)}))
    error = _errors(checkpoint)
    assert [(p.file, p.key) for p in error.problems] == [(shard, name)]
    assert "has shape [96, 64], expected [128, 64] = [intermediate_size, hidden_size]" in str(error)
    assert str(checkpoint) in str(error)


def test_unknown_weight_norm_names_config_and_key(tmp_path, next_dir):
    checkpoint = _copy(next_dir, tmp_path)
    config = json.loads((checkpoint / "config.json").read_text())
    config["mod_weight_norm"] = "relu_0.2_1"
    (checkpoint / "config.json").write_text(json.dumps(config))
    error = _errors(checkpoint)
    assert [(p.file, p.key) for p in error.problems] == [("config.json", "mod_weight_norm")]
    assert "config.json: 'mod_weight_norm'" in str(error) and "relu_0.2_1" in str(error)


def test_unexpected_and_misplaced_weights(tmp_path, next_dir):
    checkpoint = _copy(next_dir, tmp_path)
    old = "model.layers.9.decoder_layer.mlp.up_proj.weight"
    new = "model.layers.9.mlp.up_proj.weight"  # a p-MoD layer's weight stored as an ordinary layer's
    shard = _rewrite_shard(checkpoint, old, lambda t: t.update({new: t.pop(old), "model.extra.weight": torch.ones(2)}))
    index_path = checkpoint / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][new] = index["weight_map"].pop(old)
    index["weight_map"]["model.extra.weight"] = shard
    index_path.write_text(json.dumps(index))
    error = _errors(checkpoint)
    problems = {p.key: p for p in error.problems}
    assert set(problems) == {old, new, "model.extra.weight"}
    assert problems[new].file == shard and "unexpected" in problems[new].message
    assert "belong under model.layers.9.decoder_layer." in problems[new].message
    assert problems[old].file == "model.safetensors.index.json"


def test_vision_tower_and_weight_files_errors(tmp_path, next_dir):
    checkpoint = _copy(next_dir, tmp_path)
    shutil.rmtree(checkpoint / json.loads((checkpoint / "config.json").read_text())["mm_vision_tower"])
    error = _errors(checkpoint)
    assert [(p.file, p.key) for p in error.problems] == [("config.json", "mm_vision_tower")]

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_state_dict(empty)
    broken = _copy(next_dir, tmp_path / "broken")
    (broken / "model-00001-of-00002.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors: '<file>': cannot be read"):
        load_state_dict(broken)
