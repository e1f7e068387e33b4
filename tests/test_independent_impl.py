"""The independent implementation of the spec runs, is not degenerate, and follows the spec's
counts; the foreign checkpoints it builds are in the released layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from independent_impl import (
    IndependentPmod,
    make_foreign_checkpoint,
    prd_schedule,
    sample_image,
    vicuna_prompt,
)

from model_registry import check_checkpoint, load_state_dict
from model_registry.tiny import build_tiny_checkpoint

QUESTION = "What is in the image?"


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.getbasetemp() / "pmod-independent"
    return {
        "tiny-next": build_tiny_checkpoint(root / "tiny-next", "next", seed=0),
        "tiny-v15": build_tiny_checkpoint(root / "tiny-v15", "v15", seed=0),
        "foreign-next": make_foreign_checkpoint(root / "foreign-next", "next", seed=0),
        "foreign-v15": make_foreign_checkpoint(root / "foreign-v15", "v15", seed=0),
    }


_MODELS: dict[Path, IndependentPmod] = {}


def model(path: Path) -> IndependentPmod:
    if path not in _MODELS:
        _MODELS[path] = IndependentPmod(path)
    return _MODELS[path]


# ------------------------------------------------------------------------------------------ foreign


@pytest.mark.parametrize("variant", ["next", "v15"])
def test_foreign_checkpoint_is_in_the_released_layout(checkpoints, variant):
    path = checkpoints[f"foreign-{variant}"]
    check_checkpoint(path)  # model_registry agrees on every name and shape
    index = json.loads((path / "pytorch_model.bin.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert "model.layers.8.decoder_layer.self_attn.rotary_emb.inv_freq" in index["weight_map"]
    state = load_state_dict(path)
    assert not any(name.endswith("inv_freq") for name in state)
    assert ("model.image_newline" in state) == (variant == "next")
    config = json.loads((path / "config.json").read_text())
    assert config["mod_target_layer_indices"] == list(range(8, 32))
    assert json.loads((path / "clip_tower" / "config.json").read_text())["model_type"] == "clip"
    assert json.loads((path / "clip_tower" / "preprocessor_config.json").read_text())["size"] == 336
    assert make_foreign_checkpoint(path, variant, seed=0) == path  # reused


# ------------------------------------------------------------------------------------------ spec counts


def test_prd_schedule_of_the_release():
    schedule = prd_schedule({"num_hidden_layers": 32, "mod_target_layers": "shiftedcos_decay_0.85_0.15",
                             "mod_router_factor": 0.5})
    assert sorted(schedule) == list(range(8, 32))
    assert schedule[8] == pytest.approx(0.8445, abs=1e-4) and schedule[31] == 0.15
    assert sorted(prd_schedule({"num_hidden_layers": 8, "mod_target_layers": "interleave"})) == [1, 3, 5, 7]


@pytest.mark.parametrize(
    "size, tokens",
    [
        ((672, 672), 576 + 48 * 49),  # 2x2 tiles, nothing trimmed
        ((400, 300), 576 + 24 * 33),  # 2x1 tiles, 8 columns trimmed per side
        ((300, 700), 576 + 56 * 25),  # 1x3 tiles, 8 rows trimmed per side
        ((1000, 200), 576 + 14 * 73),  # 3x1 tiles, 5 rows trimmed per side
        ((336, 336), 576 + 24 * 25),  # 1x2 tiles (first of two equally good grids)
    ],
)
def test_anyres_visual_token_counts(checkpoints, size, tokens):
    features, targets = model(checkpoints["tiny-next"]).image_tokens(sample_image(*size, seed=0))
    assert features.shape == (tokens, 64)
    assert bool(targets.all())  # vision_all: base, high-res and newline tokens are all targets


def test_pad_layout_gives_576_tokens(checkpoints):
    features, targets = model(checkpoints["tiny-v15"]).image_tokens(sample_image(1000, 200, seed=0))
    assert features.shape == (576, 64) and bool(targets.all())


def test_prompt_tokenisation_is_slow_llama_style(checkpoints):
    tokenizer = model(checkpoints["tiny-next"]).tokenizer
    pieces = tokenizer.encode_prompt("USER: <image>\nHi ASSISTANT: ok</s>USER: <image>\nMore ASSISTANT:")
    assert len(pieces) == 3
    assert pieces[0][0] == 1 and all(1 not in piece for piece in pieces[1:])
    sp = tokenizer.sp
    assert [sp.id_to_piece(i) for i in pieces[1][:2]] == ["▁", "<0x0A>"]  # "\n" after <image>
    assert 2 in pieces[1]  # "</s>" in the text is the EOS id, not characters
    after_eos = pieces[1][pieces[1].index(2) + 1]
    assert sp.id_to_piece(after_eos).startswith("▁")  # legacy: a new dummy prefix after a special token


# ------------------------------------------------------------------------------------------ behaviour


@pytest.mark.parametrize("name", ["tiny-next", "tiny-v15", "foreign-next", "foreign-v15"])
def test_generation_depends_on_the_image(checkpoints, name):
    pmod = model(checkpoints[name])
    prompt = vicuna_prompt(QUESTION, 1)
    outputs = [tuple(pmod.generate(prompt, [sample_image(w, h, seed)], 8))
               for seed, (w, h) in enumerate([(336, 336), (400, 300), (300, 400)])]
    assert len(set(outputs)) == 3, outputs
    assert all(len(out) == 8 or out[-1] == 2 for out in outputs)
    assert max(len(set(out)) for out in outputs) >= 4  # not one token repeated
    text_only = pmod.generate(vicuna_prompt("Tell me a story.", 0), [], 8)
    assert 1 <= len(text_only) <= 8 and tuple(text_only) not in outputs


@pytest.mark.parametrize("name", ["tiny-next", "foreign-next"])
def test_routing_follows_the_spec_and_depends_on_the_image(checkpoints, name):
    pmod = model(checkpoints[name])
    prompt = vicuna_prompt(QUESTION, 1)
    traces = []
    for seed in (1, 2):
        trace: dict = {}
        generated = pmod.generate(prompt, [sample_image(400, 300, seed)], 4, trace=trace)
        traces.append((trace, generated))
    (trace, generated), (other, _) = traces
    num_prompt, num_targets = trace["num_prompt_tokens"], trace["num_targets"]
    assert num_targets == 576 + 24 * 33
    fed = len(generated) - 1
    for layer in range(32):
        if layer < 8:
            assert trace["kv_slots"][layer] == num_prompt + fed
            continue
        ratio = pmod.schedule[layer]
        kept_targets = int(np.float32(num_targets) * np.float32(ratio))  # float32, as the released code
        assert len(trace[layer]["kept"]) == num_prompt - num_targets + kept_targets
        assert trace["kv_slots"][layer] == num_prompt - num_targets + kept_targets + fed
        # Router logits spread over tanh's range: top-k is a real choice, not saturation.
        weights = torch.tanh(trace[layer]["router_logits"])
        assert float(weights.std()) > 0.15
        assert float((weights.abs() > 0.999).float().mean()) < 0.05
    differing = [layer for layer in range(8, 32) if trace[layer]["kept"] != other[layer]["kept"]]
    assert 8 in differing and len(differing) == 24


def test_text_only_prompt_is_never_routed(checkpoints):
    trace: dict = {}
    generated = model(checkpoints["tiny-v15"]).generate(vicuna_prompt("Hello?", 0), [], 3, trace=trace)
    assert trace["num_targets"] == 0
    assert trace["kv_slots"] == [trace["num_prompt_tokens"] + len(generated) - 1] * 32
    assert not any(isinstance(key, int) for key in trace)


def test_image_count_must_match_markers(checkpoints):
    with pytest.raises(ValueError, match="1 <image> markers but 2 images"):
        model(checkpoints["tiny-v15"]).generate(vicuna_prompt(QUESTION, 1), [sample_image(8, 8, 0)] * 2, 1)
