"""End-to-end behaviour of the plain-PyTorch reference on tiny checkpoints in the released layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from model_registry import CheckpointError, build_tiny_checkpoint
from pmod_reference.model import LayerKVCache, PmodReference
from pmod_serve.pmod.schedule import kept_target_count
from pmod_serve.transformers_utils.chat_templates import VICUNA_V1_SYSTEM_PROMPT

PROMPT = f"{VICUNA_V1_SYSTEM_PROMPT} USER: <image>\nWhat is in the image? ASSISTANT:"


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def stripes_image(width: int, height: int) -> Image.Image:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, ::8] = (250, 220, 10)
    pixels[::5, :, 2] = 200
    return Image.fromarray(pixels)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="module")
def next_reference(tiny_root: Path) -> PmodReference:
    return PmodReference(build_tiny_checkpoint(tiny_root / "next", variant="next", seed=0))


@pytest.fixture(scope="module")
def v15_reference(tiny_root: Path) -> PmodReference:
    return PmodReference(build_tiny_checkpoint(tiny_root / "v15", variant="v15", seed=0))


# --------------------------------------------------------------------------------------------------
# Prompt ids and counts
# --------------------------------------------------------------------------------------------------


def test_prompt_token_ids_expand_each_image(next_reference: PmodReference) -> None:
    ref = next_reference
    images = [noise_image(200, 150, 0), noise_image(336, 336, 1)]
    # 200x150 -> 2x1 tiles, 48x24 map, rows int(150*24/200) = 18 (trim 15) -> 576 + 18*25 = 1026
    # 336x336 -> 2x1 tiles, 48x24 map, rows 24 -> 576 + 24*25 = 1176
    assert ref.visual_token_counts(images) == [1026, 1176]
    prompt = "USER: <image>\n<image>\nCompare. ASSISTANT:"
    ids = ref.prompt_token_ids(prompt, images)
    placeholder = ref.image_token_id
    assert placeholder == ref.llama_config.vocab_size  # one past the vocabulary
    unexpanded = ref.tokenizer.encode_prompt(prompt, placeholder)
    assert len(ids) == len(unexpanded) - 2 + 1026 + 1176
    first = ids.index(placeholder)
    assert ids[:first] == unexpanded[: unexpanded.index(placeholder)]
    assert ids[first : first + 1026] == [placeholder] * 1026
    assert ids[first + 1026] != placeholder  # the "\n" between the images
    with pytest.raises(ValueError, match="marker"):
        ref.prompt_token_ids(prompt, images[:1])


def test_v15_has_576_tokens_per_image(v15_reference: PmodReference) -> None:
    assert v15_reference.visual_token_counts([noise_image(1000, 200, 0), noise_image(50, 80, 1)]) == [
        576,
        576,
    ]


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["next", "v15"])
def test_greedy_generation_depends_on_the_image(variant: str, request) -> None:
    ref: PmodReference = request.getfixturevalue(f"{variant}_reference")
    images = [noise_image(200, 150, 0), stripes_image(150, 200), Image.new("RGB", (180, 180), (20, 90, 200))]
    outputs = [ref.generate(PROMPT, [image], max_new_tokens=6) for image in images]
    for output in outputs:
        assert 1 <= len(output) <= 6 and all(0 <= t < ref.llama_config.vocab_size for t in output)
        assert output[-1] == ref.tokenizer.eos_id or len(output) == 6
    assert len({tuple(output) for output in outputs}) == 3, outputs
    assert ref.generate(PROMPT, [images[0]], max_new_tokens=6) == outputs[0]  # deterministic
    text_only = ref.generate("USER: Describe a dog. ASSISTANT:", [], max_new_tokens=6)
    assert len(text_only) >= 1


def test_generation_stops_at_eos_and_includes_it(next_reference: PmodReference, monkeypatch) -> None:
    image = noise_image(200, 150, 0)
    first = next_reference.generate(PROMPT, [image], max_new_tokens=3)
    monkeypatch.setattr(next_reference.tokenizer, "eos_id", first[1])
    assert next_reference.generate(PROMPT, [image], max_new_tokens=3) == first[:2]
    assert next_reference.generate(PROMPT, [image], max_new_tokens=0) == []


@torch.no_grad()
def test_incremental_decoding_matches_a_full_prefill(v15_reference: PmodReference) -> None:
    """Decoded tokens attend to each layer's cached kept tokens: re-running the whole sequence at once
    (generated tokens as non-targets) gives the same logits."""
    ref = v15_reference
    image = stripes_image(150, 200)
    generated = ref.generate(PROMPT, [image], max_new_tokens=5)
    assert len(generated) == 5

    inputs = ref.prompt_inputs(PROMPT, [image])
    prompt_len = len(inputs.token_ids)
    fed = generated[:-1]
    embeds = torch.cat([ref.embed_prompt(inputs, [image]), ref.model.embed_tokens(torch.tensor(fed))])
    target_mask = torch.cat([inputs.target_mask, torch.zeros(len(fed), dtype=torch.bool)])
    caches = [LayerKVCache() for _ in ref.model.layers]
    hidden, _ = ref.model(embeds, torch.arange(len(embeds)), caches, target_mask)
    logits = ref.module.lm_head(hidden[prompt_len - 1 :])
    assert logits.argmax(-1).tolist() == generated
    assert [len(c) for c in caches] == ref.kv_slots(PROMPT, [image], num_generated=5)


# --------------------------------------------------------------------------------------------------
# KV slots and routing introspection
# --------------------------------------------------------------------------------------------------


def test_kv_slots_formula_and_real_cache(next_reference: PmodReference) -> None:
    ref = next_reference
    image = noise_image(200, 150, 3)
    num_prompt = len(ref.prompt_token_ids(PROMPT, [image]))
    num_targets = 1026  # vision_all: every visual token of the image
    for num_generated in (0, 1, 4):
        fed = max(num_generated - 1, 0)
        slots = ref.kv_slots(PROMPT, [image], num_generated)
        assert slots[:8] == [num_prompt + fed] * 8
        for layer in range(8, 32):
            ratio = ref.schedule.retention_ratio[layer]
            expected = num_prompt - num_targets + kept_target_count(num_targets, ratio) + fed
            assert slots[layer] == expected
    output = ref.generate_with_cache(PROMPT, [image], max_new_tokens=4)
    assert output.kv_cache_lengths == ref.kv_slots(PROMPT, [image], len(output.token_ids))
    # without images nothing is routed
    text = "USER: Describe a dog. ASSISTANT:"
    assert ref.kv_slots(text, [], 3) == [len(ref.prompt_token_ids(text, [])) + 2] * 32


def test_kept_indices(next_reference: PmodReference) -> None:
    ref = next_reference
    image = noise_image(200, 150, 3)
    ids = ref.prompt_token_ids(PROMPT, [image])
    is_visual = torch.tensor(ids) == ref.image_token_id
    kept = ref.kept_indices(PROMPT, [image])
    assert sorted(kept) == list(range(8, 32))
    slots = ref.kv_slots(PROMPT, [image], 0)
    for layer, positions in kept.items():
        assert positions == sorted(positions) and len(positions) == slots[layer]
        kept_mask = torch.zeros(len(ids), dtype=torch.bool)
        kept_mask[positions] = True
        assert kept_mask[~is_visual].all()  # every text token is kept
    # deeper layers keep fewer tokens, and which ones depends on the image
    assert len(kept[31]) < len(kept[8])
    other = ref.kept_indices(PROMPT, [stripes_image(200, 150)])
    assert other[20] != kept[20]


def test_vision_hr_spares_the_base_tokens(tiny_root: Path) -> None:
    checkpoint = build_tiny_checkpoint(
        tiny_root / "next_hr", variant="next", seed=0, mod_target_token_type="vision_hr"
    )
    ref = PmodReference(checkpoint)
    image = noise_image(200, 150, 3)
    ids = ref.prompt_token_ids(PROMPT, [image])
    first_visual = ids.index(ref.image_token_id)
    base = set(range(first_visual, first_visual + 576))
    slots = ref.kv_slots(PROMPT, [image], 1)
    assert slots[31] == len(ids) - 450 + kept_target_count(450, 0.15)  # 1026 - 576 = 450 targets
    for layer, positions in ref.kept_indices(PROMPT, [image]).items():
        assert base <= set(positions), layer


# --------------------------------------------------------------------------------------------------
# Malformed checkpoints
# --------------------------------------------------------------------------------------------------


@pytest.fixture()
def checkpoint_copy(tiny_root: Path, tmp_path: Path) -> Path:
    source = build_tiny_checkpoint(tiny_root / "v15", variant="v15", seed=0)
    return Path(shutil.copytree(source, tmp_path / "copy"))


def edit_config(checkpoint: Path, **changes) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    config.update(changes)
    (checkpoint / "config.json").write_text(json.dumps(config))


def test_missing_weight_is_named(checkpoint_copy: Path) -> None:
    index = json.loads((checkpoint_copy / "model.safetensors.index.json").read_text())
    name = "model.layers.12.router.router.weight"
    shard = checkpoint_copy / index["weight_map"][name]
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    del index["weight_map"][name]
    (checkpoint_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"router\.router\.weight") as error:
        PmodReference(checkpoint_copy)
    assert "missing" in str(error.value)


def test_misshaped_weight_is_named(checkpoint_copy: Path) -> None:
    index = json.loads((checkpoint_copy / "model.safetensors.index.json").read_text())
    name = "model.mm_projector.0.weight"
    shard = checkpoint_copy / index["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.mm_projector\.0\.weight"):
        PmodReference(checkpoint_copy)


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"mod_target_layers": "cosine_please"}, "mod_target_layers"),
        ({"mm_vision_tower": "no/such/tower"}, "mm_vision_tower"),
        ({"mm_hidden_size": 48}, "mm_hidden_size"),
    ],
)
def test_bad_config_is_named(checkpoint_copy: Path, changes: dict, needle: str) -> None:
    edit_config(checkpoint_copy, **changes)
    with pytest.raises(CheckpointError, match=needle):
        PmodReference(checkpoint_copy)


def test_missing_files_are_named(checkpoint_copy: Path) -> None:
    (checkpoint_copy / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        PmodReference(checkpoint_copy)
    (checkpoint_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        PmodReference(checkpoint_copy)
