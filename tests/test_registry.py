"""The model registry: catalogue, release schedules, config validation, chat template, vision towers."""

from __future__ import annotations

import json
import math
import random

import pytest

from model_registry import (
    CATALOG,
    VICUNA_V1_SYSTEM_PROMPT,
    ConfigError,
    VisionTowerError,
    chat_template_path,
    full_size_config,
    load_preprocessor_config,
    load_vision_config,
    lookup,
    render_prompt,
    resolve_vision_tower,
    validate_config,
)
from pmod_serve.transformers_utils.vision_tower import BUNDLED_VISION_TOWERS

NEXT = "MCG-NJU/p-MoD-LLaVA-NeXT-7B"
V15 = "MCG-NJU/p-MoD-LLaVA-v1.5-7B"
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)

# ------------------------------------------------------------------------------------------ catalogue


def test_lookup_by_hub_id_alias_and_variant():
    assert lookup(NEXT).hub_id == NEXT
    assert lookup("MCG-NJU/p-MoD-LLaVA-NeXT").hub_id == NEXT
    assert lookup("mcg-nju/p-mod-llava-next-7b/").hub_id == NEXT
    assert lookup(V15).variant == "v15"
    assert lookup("next").hub_id == NEXT
    assert lookup("liuhaotian/llava-v1.5-7b") is None
    assert {entry.hub_id for entry in CATALOG} == {NEXT, V15}
    assert all(entry.chat_template == "vicuna_v1" for entry in CATALOG)


@pytest.mark.parametrize("hub_id", [NEXT, V15])
def test_released_config_values(hub_id):
    config = lookup(hub_id).released_config
    expected = {
        "model_type": "pmod_llava_llama",
        "architectures": ["PmodLlavaLlamaForCausalLM"],
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "intermediate_size": 11008,
        "vocab_size": 32000,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": 1024,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "max_num_patches": None,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "unfreeze_mm_vision_tower": True,
        "tokenizer_padding_side": "right",
        "mod_target_layers": "shiftedcos_decay_0.85_0.15",
        "mod_router_factor": 0.5,
        "mod_weight_norm": "tanh_0.2_1",
        "mod_target_token_type": "vision_all",
        "mod_bias_enabled": True,
    }
    for key, value in expected.items():
        assert config[key] == value, key
    if hub_id == NEXT:
        assert config["mm_patch_merge_type"] == "spatial_unpad"
        assert config["image_aspect_ratio"] == "anyres"
        assert config["image_grid_pinpoints"] == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        assert config["tokenizer_model_max_length"] == 4096
    else:
        assert config["mm_patch_merge_type"] == "flat"
        assert config["image_aspect_ratio"] == "pad"
        assert config["tokenizer_model_max_length"] == 2048


@pytest.mark.parametrize("hub_id", [NEXT, V15])
def test_release_prd_schedule(hub_id):
    schedule = lookup(hub_id).schedule
    assert schedule.num_layers == 32
    assert [layer for layer in range(32) if not schedule.is_pmod_layer(layer)] == list(range(8))
    assert sorted(schedule.retention_ratio) == list(range(8, 32))
    assert schedule.retention_ratio[8] == pytest.approx(0.8445, abs=1e-4)
    assert schedule.retention_ratio[8] == pytest.approx(math.cos(8 * math.pi / 31) / 2 + 0.5)
    assert schedule.retention_ratio[31] == 0.15
    ratios = [schedule.retention_ratio[layer] for layer in range(8, 32)]
    assert all(a >= b for a, b in zip(ratios, ratios[1:], strict=False))
    assert min(ratios) == 0.15  # the floor applies to the deepest layers
    assert (schedule.weight_norm.kind, schedule.weight_norm.scale, schedule.weight_norm.bias) == ("tanh", 0.2, 1.0)
    assert schedule.target_token_type == "vision_all" and schedule.router_bias


@pytest.mark.parametrize("variant", ["next", "v15", NEXT, "MCG-NJU/p-MoD-LLaVA-NeXT"])
def test_full_size_config_is_a_clean_release(variant):
    config = full_size_config(variant)
    entry = lookup(variant)
    assert validate_config(config, "config.json", entry) == []
    assert config["mod_target_layer_indices"] == list(range(8, 32))
    assert config["torch_dtype"] == "bfloat16"
    json.dumps(config)  # serialisable as config.json
    config["hidden_size"] = 1  # a fresh copy every call
    assert full_size_config(variant)["hidden_size"] == 4096
    with pytest.raises(KeyError, match="unknown p-MoD checkpoint"):
        full_size_config("llava-1.6")


# ------------------------------------------------------------------------------------------ validation


def _problem_keys(error: ConfigError) -> set[str]:
    return {problem.key for problem in error.problems}


def test_validate_config_names_file_and_key():
    config = full_size_config("next")
    config["mod_weight_norm"] = "relu_0.2_1"
    del config["mm_hidden_size"]
    config["mm_projector_type"] = "linear"
    config["image_grid_pinpoints"] = "[[336, 672]]"
    with pytest.raises(ConfigError) as info:
        validate_config(config, "/ckpt/config.json")
    assert _problem_keys(info.value) == {"mod_weight_norm", "mm_hidden_size", "mm_projector_type",
                                         "image_grid_pinpoints"}
    message = str(info.value)
    assert "/ckpt/config.json: 'mod_weight_norm'" in message and "relu_0.2_1" in message
    assert "/ckpt/config.json: 'mm_hidden_size': is missing" in message
    # Without raising, every problem comes back as a list.
    problems = validate_config(config, "/ckpt/config.json", raise_on_error=False)
    assert {p.key for p in problems} == _problem_keys(info.value)
    assert all(p.severity == "error" and p.file == "/ckpt/config.json" for p in problems)


@pytest.mark.parametrize(
    "key, value",
    [
        ("mod_target_layers", "shiftedsin_decay_0.85_0.15"),
        ("mod_target_token_type", "text"),
        ("mod_target_layer_indices", [0, 1, 2]),
        ("model_type", "llava_llama"),
        ("image_aspect_ratio", "square"),
        ("mm_patch_merge_type", "flat"),  # anyres needs spatial_unpad
        ("mm_use_im_start_end", True),
        ("rope_scaling", {"type": "linear", "factor": 2.0}),
        ("num_attention_heads", 3),
        ("max_num_patches", 0),
    ],
)
def test_validate_config_rejects_what_cannot_be_served(key, value):
    config = full_size_config("next")
    config[key] = value
    with pytest.raises(ConfigError) as info:
        validate_config(config, "config.json")
    assert key in _problem_keys(info.value)


def test_validate_config_reports_deviations_from_the_release():
    config = full_size_config("v15")
    config["hidden_size"] = 64
    config.pop("image_grid_pinpoints")  # absent is the same as the release's null
    deviations = validate_config(config, "config.json", lookup("v15"))
    assert [(p.key, p.severity) for p in deviations] == [("hidden_size", "deviation")]
    assert "is 64; MCG-NJU/p-MoD-LLaVA-v1.5-7B has 4096" in str(deviations[0])
    # A v1.5 config is not a NeXT release.
    keys = {p.key for p in validate_config(full_size_config("v15"), "config.json", lookup("next"))}
    assert {"image_aspect_ratio", "mm_patch_merge_type", "image_grid_pinpoints"} <= keys


# ------------------------------------------------------------------------------------------ template


def _image(url: str = "http://x/a.png") -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def llava_conv_vicuna_v1(system: str, turns: list[tuple[str, str | None]]) -> str:
    """LLaVA's Conversation.get_prompt for SeparatorStyle.TWO, sep " ", sep2 "</s>"."""
    seps = [" ", "</s>"]
    ret = system + seps[0]
    for i, (role, message) in enumerate(turns):
        ret += role + ": " + message + seps[i % 2] if message else role + ":"
    return ret


def test_single_image_question_renders_exactly():
    messages = [{"role": "user", "content": [_image(), _text("What is this?")]}]
    assert render_prompt(messages) == f"{SYSTEM} USER: <image>\nWhat is this? ASSISTANT:"
    assert VICUNA_V1_SYSTEM_PROMPT == SYSTEM


def test_text_only_and_string_content():
    assert render_prompt([{"role": "user", "content": "Hi there"}]) == f"{SYSTEM} USER: Hi there ASSISTANT:"
    # vLLM's string-content mode puts "<image>\n" in front itself; it is passed through unchanged.
    assert render_prompt([{"role": "user", "content": "<image>\nWhat?"}]) == f"{SYSTEM} USER: <image>\nWhat? ASSISTANT:"
    assert render_prompt([{"role": "user", "content": "Hi"}], add_generation_prompt=False) == f"{SYSTEM} USER: Hi "


def test_multi_turn_matches_llava_conversation():
    messages = [
        {"role": "user", "content": [_image(), _text("What is this?")]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "What colour is it?"},
    ]
    expected = llava_conv_vicuna_v1(
        SYSTEM, [("USER", "<image>\nWhat is this?"), ("ASSISTANT", "A cat."), ("USER", "What colour is it?"),
                 ("ASSISTANT", None)]
    )
    assert render_prompt(messages) == expected
    assert expected == f"{SYSTEM} USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: What colour is it? ASSISTANT:"


def test_system_message_overrides_the_default():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [_text("Hi")]}]
    assert render_prompt(messages) == "Be brief. USER: Hi ASSISTANT:"
    parts = [{"role": "system", "content": [_text("Be")]}, {"role": "user", "content": "Hi"}]
    assert render_prompt(parts) == "Be USER: Hi ASSISTANT:"


def test_several_images_come_first_in_order():
    content = [_text("Compare"), _image("a"), {"type": "image"}, _text("them.")]
    rendered = render_prompt([{"role": "user", "content": content}])
    assert rendered == f"{SYSTEM} USER: <image>\n<image>\nCompare\nthem. ASSISTANT:"


def test_random_conversations_match_llava_conversation():
    rng = random.Random(0)
    for _ in range(50):
        turns, messages = [], []
        for i in range(rng.randint(1, 5)):
            role = "user" if i % 2 == 0 else "assistant"
            text = rng.choice(["", "a", "two words", "ends with space ", "x\ny"])
            images = rng.randint(0, 2) if role == "user" else 0
            turns.append((role.upper(), "<image>\n" * images + text))
            messages.append({"role": role, "content": [_image()] * images + ([_text(text)] if text else [])})
        add = rng.random() < 0.7
        expected = llava_conv_vicuna_v1(SYSTEM, turns + ([("ASSISTANT", None)] if add else []))
        assert render_prompt(messages, add_generation_prompt=add) == expected


def test_template_file_and_transformers_rendering_agree():
    from transformers.utils.chat_template_utils import render_jinja_template

    path = chat_template_path("vicuna_v1")
    assert path.name == "vicuna_v1.jinja" and path.is_file()
    messages = [{"role": "user", "content": [_image(), _text("What is this?")]},
                {"role": "assistant", "content": "A dog."}, {"role": "user", "content": "Sure?"}]
    rendered = render_jinja_template([messages], chat_template=path.read_text(), add_generation_prompt=True)
    rendered = rendered[0] if isinstance(rendered, tuple) else rendered
    rendered = rendered[0] if isinstance(rendered, list) else rendered
    assert rendered == render_prompt(messages)
    with pytest.raises(KeyError, match="unknown chat template"):
        chat_template_path("chatml")


def test_vllm_passes_content_parts_to_the_template():
    """vLLM inspects the template to decide between string and OpenAI-part content: parts it must be,
    so that images stay where the user put them (one "<image>" per image part)."""
    hf_renderer = pytest.importorskip("vllm.renderers.hf")
    template = chat_template_path("vicuna_v1").read_text()
    assert hf_renderer._detect_content_format(template, default="string") == "openai"


def test_template_rejects_other_roles():
    with pytest.raises(Exception, match="vicuna_v1 takes user and assistant turns"):
        render_prompt([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])


# ------------------------------------------------------------------------------------------ vision towers


def test_bundled_clip_configs():
    tower = resolve_vision_tower("openai/clip-vit-large-patch14-336", "/nonexistent/checkpoint")
    assert tower == BUNDLED_VISION_TOWERS["openai/clip-vit-large-patch14-336"]
    vision = load_vision_config(tower)
    assert {k: vision[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                    "intermediate_size", "image_size", "patch_size", "hidden_act",
                                    "layer_norm_eps", "projection_dim")} == {
        "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
        "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        "projection_dim": 768}
    processor = load_preprocessor_config(tower)
    assert processor["crop_size"] == {"height": 336, "width": 336}
    assert processor["size"] == {"shortest_edge": 336}
    assert processor["resample"] == 3 and processor["rescale_factor"] == pytest.approx(1 / 255)
    assert processor["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert processor["image_std"] == [0.26862954, 0.26130258, 0.27577711]

    from transformers import CLIPVisionConfig

    hf = CLIPVisionConfig.from_pretrained(tower)
    assert (hf.hidden_size, hf.num_hidden_layers, hf.image_size // hf.patch_size) == (1024, 24, 24)


def test_resolve_local_towers(tmp_path):
    checkpoint = tmp_path / "ckpt"
    (checkpoint / "tower").mkdir(parents=True)
    (checkpoint / "tower" / "config.json").write_text("{}")
    assert resolve_vision_tower("tower", checkpoint) == (checkpoint / "tower").resolve()
    assert resolve_vision_tower("./tower", checkpoint) == (checkpoint / "tower").resolve()
    assert resolve_vision_tower(str(checkpoint / "tower"), "/elsewhere") == (checkpoint / "tower").resolve()
    with pytest.raises(VisionTowerError, match=r"config\.json: mm_vision_tower 'openai/clip-vit-base-patch32'"):
        resolve_vision_tower("openai/clip-vit-base-patch32", checkpoint)
    (checkpoint / "empty").mkdir()
    with pytest.raises(VisionTowerError, match="has no config.json"):
        resolve_vision_tower("empty", checkpoint)


def test_full_clip_config_and_legacy_preprocessor(tmp_path):
    vision = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": vision,
                                                      "text_config": {"hidden_size": 4}}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 28, "crop_size": 28}))
    loaded = load_vision_config(tmp_path)
    assert loaded["hidden_size"] == 8 and loaded["num_channels"] == 3
    processor = load_preprocessor_config(tmp_path)
    assert processor["size"] == {"shortest_edge": 28} and processor["crop_size"] == {"height": 28, "width": 28}
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(VisionTowerError, match="lacks intermediate_size"):
        load_vision_config(tmp_path)
