"""Prompt tokenisation (spec §1, Prompts): the released code's slow SentencePiece LlamaTokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_registry.chat_template import VICUNA_V1_SYSTEM_PROMPT
from model_registry.tokenizer import train_sentencepiece, write_tokenizer
from pmod_serve.prompt import IMAGE_MARKER, PromptTokenizer

IMAGE = -200  # the released code's IMAGE_TOKEN_INDEX; any id works as a placeholder
PROMPTS = [
    f"{VICUNA_V1_SYSTEM_PROMPT} USER: <image>\nWhat is in the image? ASSISTANT:",
    f"{VICUNA_V1_SYSTEM_PROMPT} USER: <image>\n<image>\nCompare the two pictures. ASSISTANT:",
    "<image>",
    "<image>\nDescribe the image in detail.",
    "Tell me about this <image>",
    "USER: <image><image> two markers back to back ASSISTANT: 42 dogs.</s>USER: and now? ASSISTANT:",
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
def slow_tokenizer(tokenizer_dir: Path):
    """transformers 5's pure-SentencePiece (slow) path. Its LlamaTokenizer class is fast-only now
    (`backend="sentencepiece"` / `use_fast=False` are ignored for it), but the generic
    SentencePieceBackend with legacy=True still behaves as the slow LlamaTokenizer of transformers 4."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    return SentencePieceBackend(
        vocab_file=str(tokenizer_dir / "tokenizer.model"),
        legacy=True,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
    )


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


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers_slow_path(tokenizer, slow_tokenizer, text: str) -> None:
    assert tokenizer.encode(text) == slow_tokenizer.encode(text, add_special_tokens=False)


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


@pytest.mark.parametrize("prompt", PROMPTS)
def test_encode_prompt_matches_released_algorithm(tokenizer, slow_tokenizer, prompt: str) -> None:
    expected = released_tokenizer_image_token(prompt, slow_tokenizer, IMAGE)
    got = tokenizer.encode_prompt(prompt, IMAGE)
    assert got == expected
    assert got[0] == tokenizer.bos_id and got.count(tokenizer.bos_id) == 1 + prompt.count("<s>")
    assert got.count(IMAGE) == prompt.count(IMAGE_MARKER)


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
