"""Prompt tokenisation (docs/p-mod.md, "Prompts"): the released code's slow SentencePiece LlamaTokenizer,
in its legacy and non-legacy modes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_registry.tokenizer import train_sentencepiece, write_tokenizer
from pmod_serve.tokenizers.prompt import IMAGE_MARKER, SPIECE_UNDERLINE, PromptTokenizer
from pmod_serve.transformers_utils.chat_templates import VICUNA_V1_SYSTEM_PROMPT, render_prompt

IMAGE = -200  # the released code's IMAGE_TOKEN_INDEX; any id works as a placeholder
MULTI_TURN = render_prompt(
    [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A dog."},
        {"role": "user", "content": "And the color?"},
    ]
)  # "... USER: <image>\nWhat is this? ASSISTANT: A dog.</s>USER: And the color? ASSISTANT:"
PROMPTS = [
    f"{VICUNA_V1_SYSTEM_PROMPT} USER: <image>\nWhat is in the image? ASSISTANT:",
    f"{VICUNA_V1_SYSTEM_PROMPT} USER: <image>\n<image>\nCompare the two pictures. ASSISTANT:",
    "<image>",
    "<image>\nDescribe the image in detail.",
    "Tell me about this <image>",
    "USER: <image><image> two markers back to back ASSISTANT: 42 dogs.</s>USER: and now? ASSISTANT:",
    MULTI_TURN,
    "",
]
TEXTS = [
    " ASSISTANT:",
    "\nWhat is in the image?",
    "Hello</s>USER: hi<s>x<unk>",
    " ",
    "  two  spaces\n\n",
    "a</s> b",
    "</s>\n",
    "digits 12345 and ünïcödé ✓",
    "<s>",
    "<s>A chat",
    "</s>USER: and now?",
    "Hello <s>.",
    "x</s>",
    "</s></s>y",
    "▁",
    "▁▁x and a▁b",
    " </s>x",
]
MODES = [
    pytest.param(True, True, id="legacy"),
    pytest.param(False, True, id="non-legacy"),
    pytest.param(False, False, id="non-legacy-no-prefix-space"),
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(out, train_sentencepiece(seed=0), model_max_length=2048)
    return out


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> PromptTokenizer:
    return PromptTokenizer(tokenizer_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def non_legacy(tokenizer_dir: Path) -> PromptTokenizer:
    return PromptTokenizer(tokenizer_dir / "tokenizer.model", legacy=False)


def transformers4_slow_llama(vocab_file: Path, legacy: bool, add_prefix_space: bool = True):
    """transformers 4's slow LlamaTokenizer, rebuilt on transformers 5's pure-SentencePiece path.

    transformers 5's LlamaTokenizer class is fast-only (`backend="sentencepiece"` / `use_fast=False`
    are ignored for it). Its generic SentencePieceBackend still has the slow pieces: the special-token
    trie split, `legacy=False` loading the model without its dummy prefix, and `_tokenize`'s
    `unk_token + text` trick. What it lacks is the LlamaTokenizer.tokenize override (prefix "▁", drop
    a lone "▁" before a special token); it is copied below from transformers 4 (4.37-4.57)."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    class SlowLlamaTokenizer(SentencePieceBackend):
        def tokenize(self, text, **kwargs):
            if self.legacy or len(text) == 0:
                return super().tokenize(text, **kwargs)

            text = text.replace(SPIECE_UNDERLINE, " ")
            if add_prefix_space:
                text = SPIECE_UNDERLINE + text

            tokens = super().tokenize(text, **kwargs)

            if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.all_special_tokens:
                tokens = tokens[1:]
            return tokens

    return SlowLlamaTokenizer(
        vocab_file=str(vocab_file),
        legacy=legacy,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
    )


@pytest.fixture(scope="module")
def slow_tokenizers(tokenizer_dir: Path):
    """(ours, transformers 4's) for each mode."""
    model = tokenizer_dir / "tokenizer.model"
    return {
        (legacy, space): (
            PromptTokenizer(model, legacy=legacy, add_prefix_space=space),
            transformers4_slow_llama(model, legacy, space),
        )
        for legacy, space in [(True, True), (False, True), (False, False)]
    }


def pieces(tokenizer: PromptTokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.id_to_piece(i) for i in ids]


def test_leading_space_gives_two_underscores(tokenizer: PromptTokenizer) -> None:
    got = pieces(tokenizer, tokenizer.encode(" ASSISTANT:"))
    assert got[0] == "▁" and got[1].startswith("▁") and got[1] != "▁"
    assert "".join(got) == "▁▁ASSISTANT:"


def test_newline_after_image_marker(tokenizer: PromptTokenizer) -> None:
    ids = tokenizer.encode_prompt("<image>\nWhat is this?", IMAGE)
    assert ids[:2] == [tokenizer.bos_id, IMAGE]
    assert pieces(tokenizer, ids[2:4]) == ["▁", "<0x0A>"]


def test_special_token_strings_split_the_text(tokenizer: PromptTokenizer) -> None:
    ids = tokenizer.encode("Hello</s>USER: hi<s>x<unk>")
    assert (
        ids.count(tokenizer.eos_id) == 1 and ids.count(tokenizer.bos_id) == 1 and ids[-1] == tokenizer.unk_id
    )
    eos_at = ids.index(tokenizer.eos_id)
    assert ids[:eos_at] == tokenizer.encode("Hello")
    # each piece after a special token gets its own dummy prefix
    assert pieces(tokenizer, ids[eos_at + 1 : eos_at + 2])[0].startswith("▁")
    assert tokenizer.encode("") == [] and tokenizer.encode("</s>") == [tokenizer.eos_id]


@pytest.mark.parametrize(("legacy", "add_prefix_space"), MODES)
@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers_slow_path(slow_tokenizers, legacy, add_prefix_space, text: str) -> None:
    ours, slow = slow_tokenizers[legacy, add_prefix_space]
    assert ours.encode(text) == slow.encode(text, add_special_tokens=False)


def test_text_after_a_special_token(tokenizer, non_legacy) -> None:
    """The multi-turn case: "</s>USER:" gives "▁USER" in legacy mode, a bare "USER" in non-legacy."""
    for tok, prefixed in ((tokenizer, True), (non_legacy, False)):
        ids = tok.encode("A dog.</s>USER: And the color?")
        after = tok.id_to_piece(ids[ids.index(tok.eos_id) + 1])
        assert after.startswith(SPIECE_UNDERLINE) == prefixed, (tok.legacy, after)
    # non-legacy: exactly the SentencePiece pieces of "USER:..." without a dummy prefix
    ids = non_legacy.encode("</s>USER: hi")
    assert ids[0] == non_legacy.eos_id
    assert "".join(pieces(non_legacy, ids[1:])) == "USER:▁hi"
    assert "".join(pieces(tokenizer, tokenizer.encode("</s>USER: hi")[1:])) == "▁USER:▁hi"


def test_non_legacy_start_of_text(tokenizer, non_legacy) -> None:
    # The prefix "▁" alone before a leading special token is dropped, and then the text after it is bare.
    ids = non_legacy.encode("<s>What")
    assert ids[0] == non_legacy.bos_id and not non_legacy.id_to_piece(ids[1]).startswith(SPIECE_UNDERLINE)
    # A chunk of its own starts with one "▁" in both modes (also before "\n", as after <image>).
    for text in ("What is this?", " ASSISTANT:", "\nWhat"):
        assert non_legacy.encode(text) == tokenizer.encode(text), text
    # "▁" in the text is a space in non-legacy mode, a literal "▁" in legacy mode.
    assert non_legacy.encode("a▁b") == non_legacy.encode("a b")
    assert non_legacy.encode("") == [] and non_legacy.encode("</s>") == [non_legacy.eos_id]


def released_tokenizer_image_token(prompt: str, slow_tokenizer, image_token_index: int) -> list[int]:
    """What the released LLaVA code does: tokenise every chunk with BOS, keep only the first BOS,
    one image index between chunks."""

    def slow_llama(text: str) -> list[int]:  # the slow LlamaTokenizer: add_bos_token=True, no EOS
        return [slow_tokenizer.bos_token_id] + slow_tokenizer.encode(text, add_special_tokens=False)

    chunks = [slow_llama(chunk) for chunk in prompt.split(IMAGE_MARKER)]
    input_ids = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == slow_tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    separated = [x for chunk in chunks for x in (chunk, [image_token_index] * (offset + 1))][:-1]
    for part in separated:
        input_ids.extend(part[offset:])
    return input_ids


@pytest.mark.parametrize(("legacy", "add_prefix_space"), MODES)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_encode_prompt_matches_released_algorithm(slow_tokenizers, legacy, add_prefix_space, prompt) -> None:
    tokenizer, slow_tokenizer = slow_tokenizers[legacy, add_prefix_space]
    expected = released_tokenizer_image_token(prompt, slow_tokenizer, IMAGE)
    got = tokenizer.encode_prompt(prompt, IMAGE)
    assert got == expected
    assert got[0] == tokenizer.bos_id and got.count(tokenizer.bos_id) == 1 + prompt.count("<s>")
    assert got.count(IMAGE) == prompt.count(IMAGE_MARKER)
    assert tokenizer.encode_prompt(prompt, IMAGE, add_bos=False) == got[1:]


def test_multi_turn_prompt_differs_between_modes(tokenizer, non_legacy) -> None:
    legacy_ids, non_legacy_ids = (t.encode_prompt(MULTI_TURN, IMAGE) for t in (tokenizer, non_legacy))
    eos = legacy_ids.index(tokenizer.eos_id)
    assert non_legacy_ids.index(tokenizer.eos_id) == eos  # identical up to "</s>" ...
    assert legacy_ids[: eos + 1] == non_legacy_ids[: eos + 1]
    # ... then "▁USER: ..." (legacy: as if the text stood on its own) vs "USER: ..." (no "▁" at all)
    last_turn = "USER: And the color? ASSISTANT:"
    assert legacy_ids[eos + 1 :] == tokenizer.encode(last_turn) == non_legacy.encode(last_turn)
    assert "".join(pieces(tokenizer, legacy_ids[eos + 1 :])) == "▁" + last_turn.replace(" ", "▁")
    assert "".join(pieces(non_legacy, non_legacy_ids[eos + 1 :])) == last_turn.replace(" ", "▁")


@pytest.mark.parametrize(("legacy", "add_prefix_space"), MODES)
def test_chat_template_bos(slow_tokenizers, legacy, add_prefix_space) -> None:
    """A chat template renders "<s>" + prompt and vLLM encodes that without special tokens; the
    released code instead tokenises the prompt and adds the BOS id. pmod_serve.tokenizers.pmod therefore
    strips the "<s>" string and asks for BOS: `encode_prompt(prompt, add_bos=True)`. Encoding the
    "<s>" string itself agrees in legacy mode only: non-legacy drops the "▁" of the first word."""
    tokenizer, slow_tokenizer = slow_tokenizers[legacy, add_prefix_space]
    expected = released_tokenizer_image_token(MULTI_TURN, slow_tokenizer, IMAGE)
    assert tokenizer.encode_prompt(MULTI_TURN, IMAGE, add_bos=True) == expected
    naive = tokenizer.encode_prompt("<s>" + MULTI_TURN, IMAGE, add_bos=False)
    assert naive[0] == tokenizer.bos_id
    assert (naive == expected) == (legacy or not add_prefix_space)


def test_from_checkpoint_reads_tokenizer_config(tokenizer_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes((tokenizer_dir / "tokenizer.model").read_bytes())
    assert PromptTokenizer.from_checkpoint(tmp_path).legacy  # no tokenizer_config.json: legacy
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    for legacy, extra, expected in [
        (False, {}, (False, True)),
        (True, {}, (True, True)),
        (None, {}, (True, True)),
        (False, {"add_prefix_space": False}, (False, False)),
    ]:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": legacy, **extra}))
        loaded = PromptTokenizer.from_checkpoint(tmp_path)
        assert (loaded.legacy, loaded.add_prefix_space) == expected
    del config["legacy"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert PromptTokenizer.from_checkpoint(tmp_path).legacy


def test_fast_tokenizer_differs_on_leading_space(tokenizer, tokenizer_dir) -> None:
    """Why this module exists: transformers 5's (fast) LlamaTokenizer drops the lone ▁."""
    from transformers import AutoTokenizer

    fast = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert fast.encode(" ASSISTANT:", add_special_tokens=False) != tokenizer.encode(" ASSISTANT:")


def test_decode(tokenizer: PromptTokenizer) -> None:
    text = "What is in the image? Two dogs."
    ids = tokenizer.encode_prompt(text, IMAGE) + [tokenizer.eos_id]
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<s>" + text + "</s>"
    assert tokenizer.decode([IMAGE, 10_000_000]) == ""


@pytest.mark.parametrize("legacy", [True, False])
def test_vllm_tokenizer_mode_follows_the_checkpoint(tokenizer_dir: Path, tmp_path: Path, legacy: bool) -> None:
    """pmod_serve.tokenizers.pmod (the `pmod` tokenizer mode) reads `legacy` from tokenizer_config.json, and
    a chat-template prompt that starts with the "<s>" string encodes as the released code does."""
    pytest.importorskip("vllm")
    from pmod_serve.tokenizers.pmod import PmodTokenizer

    for name in ("tokenizer.model", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((tokenizer_dir / name).read_bytes())
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": legacy}))
    tok = PmodTokenizer.from_pretrained(str(tmp_path))
    slow = transformers4_slow_llama(tmp_path / "tokenizer.model", legacy)
    expected = released_tokenizer_image_token(MULTI_TURN, slow, tok.pmod_image_token_id)
    assert tok.encode("<s>" + MULTI_TURN, add_special_tokens=False) == expected  # chat template
    assert tok.encode(MULTI_TURN) == expected
    assert tok.encode(MULTI_TURN, add_special_tokens=False) == expected[1:]
    assert tok(["<s>" + MULTI_TURN], add_special_tokens=False)["input_ids"] == [expected]
