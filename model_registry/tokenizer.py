"""A small LLaMA-style SentencePiece tokenizer, trained locally for tiny test checkpoints.

Trained with the settings of LLaMA's tokenizer.model (BPE, byte fallback, dummy prefix, no
whitespace normalisation, split digits, <unk>=0 <s>=1 </s>=2) so that it tokenises like Vicuna's
(docs/p-mod.md, "Prompts": "\n" after "<image>" becomes "▁" + "<0x0A>"), on deterministic English-ish text.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

from pmod_serve.transformers_utils.chat_templates import VICUNA_V1_SYSTEM_PROMPT

DEFAULT_VOCAB_SIZE = 512
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

_WORDS = (
    "the a an of and to in is are was were be it this that these those there here with on at by for "
    "from as or not no yes what which who where when how why many much some any all each every "
    "image picture photo scene view man woman person people child dog cat bird horse car bus train "
    "street road building house room table chair bed window door wall floor sky cloud sun water "
    "river sea tree grass flower field mountain snow red blue green yellow white black brown gray "
    "orange pink purple left right top bottom middle front behind next near far small large big "
    "little tall short long old young new two three four five several standing sitting walking "
    "holding wearing looking playing eating riding carrying shows contains appears seems describe "
    "detail details question answer please tell me you your can could would should will do does "
    "count number color shape text sign letter word written read its their his her they we "
    "assistant user helpful detailed polite curious artificial intelligence chat between gives"
).split()
_QUESTIONS = (
    "What is in the image?",
    "What is this?",
    "Describe the image in detail.",
    "How many people are there?",
    "What color is the car?",
    "Is there a dog in the picture?",
    "What is written on the sign?",
    "Where was this photo taken?",
)


def training_sentences(seed: int, count: int = 2000) -> list[str]:
    """Deterministic training text: vicuna_v1 conversations around random English-ish sentences."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 16))]
        sentence = " ".join(words).capitalize() + rng.choice((".", "?", "!", ",", ";", ":"))
        number = str(rng.randint(0, 10 ** rng.randint(1, 4)))
        kind = rng.random()
        if kind < 0.3:
            sentences.append(f"{VICUNA_V1_SYSTEM_PROMPT} USER: {rng.choice(_QUESTIONS)} ASSISTANT: {sentence}")
        elif kind < 0.5:
            sentences.append(f"USER: {sentence} ASSISTANT: {number} {sentence.lower()}")
        else:
            sentences.append(f"{sentence} ({number}) \"{rng.choice(_WORDS)}\" - {rng.choice(_WORDS)}'s")
    return sentences


def train_sentencepiece(
    seed: int = 0, vocab_size: int = DEFAULT_VOCAB_SIZE, extra_sentences: tuple[str, ...] = ()
) -> bytes:
    """The serialised tokenizer.model (identical bytes for identical arguments). ``extra_sentences``
    are added to the training text (a trained checkpoint's task vocabulary)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([*training_sentences(seed), *extra_sentences]),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        character_coverage=1.0,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        num_threads=1,  # deterministic merges
        minloglevel=2,
    )
    return model.getvalue()


def tokenizer_files(model_bytes: bytes, model_max_length: int) -> dict[str, bytes]:
    """tokenizer.model plus the JSON files of Vicuna's slow LlamaTokenizer (no chat template)."""

    def as_json(value: Any) -> bytes:
        return (json.dumps(value, indent=2) + "\n").encode()

    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "right",
        "pad_token": None,
        "sp_model_kwargs": {},
        **special,
    }
    return {
        "tokenizer.model": model_bytes,
        "tokenizer_config.json": as_json(tokenizer_config),
        "special_tokens_map.json": as_json(special),
    }


def write_tokenizer(out_dir: str | Path, model_bytes: bytes, model_max_length: int) -> None:
    for name, data in tokenizer_files(model_bytes, model_max_length).items():
        (Path(out_dir) / name).write_bytes(data)


def vocab_size_of(model_bytes: bytes) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=model_bytes).get_piece_size()
