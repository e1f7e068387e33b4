"""Prompt tokenisation of p-MoD-LLaVA, as the released code does it (docs/p-mod.md, "Prompts").

The released code tokenises with the *slow* SentencePiece ``LlamaTokenizer`` of transformers 4: the
prompt is split at every literal ``<image>``, each chunk is tokenised on its own (BOS kept only on
the first), and one image placeholder marks each split. Inside a chunk the slow tokenizer first
splits off the special token strings and then hands every remaining non-empty piece to
SentencePiece. How it does that depends on the checkpoint's ``tokenizer_config.json`` ``legacy`` flag:

- ``legacy=True`` (transformers 4's default when the flag is absent): every piece gets
  SentencePiece's own dummy prefix ``▁``. Hence ``" ASSISTANT:"`` starts with two ``▁``, a ``"\\n"``
  right after ``<image>`` becomes ``▁`` + ``<0x0A>``, and the text after a special token such as
  ``"</s>"`` starts with ``▁`` too.
- ``legacy=False``: the SentencePiece model runs without its dummy prefix. The whole text gets one
  ``▁`` in front instead (``add_prefix_space``, default true; a ``▁`` already in the text counts as a
  space), a piece that starts with ``▁``/space keeps exactly that one, and a piece that does not
  (the text right after ``"</s>"`` in a multi-turn prompt) gets none. A lone leading ``▁`` right
  before a special token is dropped.

Special tokens are taken to be the usual LLaMA ones (``<unk>``, ``<s>``, ``</s>``) with no
``lstrip``/``rstrip``. transformers' fast tokenizer differs from both modes on such pieces.

This module talks to the ``sentencepiece`` library directly so that the behaviour cannot drift with
transformers versions.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import sentencepiece as spm

IMAGE_MARKER = "<image>"
SPIECE_UNDERLINE = "▁"


def slow_tokenizer_options(tokenizer_config: Mapping[str, Any] | None) -> dict[str, bool]:
    """``PromptTokenizer`` keyword arguments from a ``tokenizer_config.json``: its ``legacy`` flag
    (absent or null: True, transformers 4's default) and ``add_prefix_space`` (absent: True)."""
    config = tokenizer_config or {}
    legacy = config.get("legacy")
    add_prefix_space = config.get("add_prefix_space")
    return {
        "legacy": True if legacy is None else bool(legacy),
        "add_prefix_space": True if add_prefix_space is None else bool(add_prefix_space),
    }


def read_tokenizer_config(path: str | os.PathLike | None) -> dict[str, Any]:
    """The JSON object in ``path``; an empty one when there is no such file."""
    if path is None or not Path(path).is_file():
        return {}
    config = json.loads(Path(path).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object")
    return config


def _without_dummy_prefix(model_file: str) -> spm.SentencePieceProcessor:
    """The model with ``normalizer_spec.add_dummy_prefix`` off, as the non-legacy slow tokenizer loads it."""
    from sentencepiece import sentencepiece_model_pb2  # needs protobuf: only the non-legacy mode does

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


class PromptTokenizer:
    """Slow-``LlamaTokenizer``-equivalent tokenisation on top of a SentencePiece model file."""

    def __init__(
        self,
        tokenizer_model_path: str | os.PathLike,
        legacy: bool | None = None,
        add_prefix_space: bool | None = None,
    ):
        model_file = os.fspath(tokenizer_model_path)
        # None means what transformers 4 does when the config does not say: legacy, with a prefix space.
        self.legacy = True if legacy is None else bool(legacy)
        self.add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
        self.sp = spm.SentencePieceProcessor(model_file=model_file)  # as shipped (dummy prefix on)
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.unk_id: int = self.sp.unk_id()
        # The special tokens the slow tokenizer splits off before SentencePiece sees the text.
        self.special_tokens: dict[str, int] = {
            self.sp.id_to_piece(token_id): token_id
            for token_id in (self.unk_id, self.bos_id, self.eos_id)
            if token_id >= 0
        }
        # Longest first, as the slow tokenizer's trie matches the longest token at a position.
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")

        if not self.legacy:
            self._sp_no_prefix = _without_dummy_prefix(model_file)
            # The non-legacy slow tokenizer encodes a piece that starts with "▁"/" " as
            # encode(unk_token + piece) minus the ids of unk_token (SentencePiece would drop the "▁").
            self._unk_text = self.sp.id_to_piece(self.unk_id)
            self._unk_text_length = len(self._sp_no_prefix.encode(self._unk_text))

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | os.PathLike) -> PromptTokenizer:
        """The tokenizer of a checkpoint directory: its ``tokenizer.model``, with ``legacy`` and
        ``add_prefix_space`` from its ``tokenizer_config.json`` (defaults when absent)."""
        checkpoint_dir = Path(checkpoint_dir)
        config = read_tokenizer_config(checkpoint_dir / "tokenizer_config.json")
        return cls(checkpoint_dir / "tokenizer.model", **slow_tokenizer_options(config))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def _encode_piece(self, piece: str) -> list[int]:
        """SentencePiece ids of a piece of text without special token strings (slow ``_tokenize``)."""
        if self.legacy:
            return self.sp.encode(piece)  # with SentencePiece's own dummy prefix
        if not piece.startswith((SPIECE_UNDERLINE, " ")):
            return self._sp_no_prefix.encode(piece)  # no "▁" at all
        ids = self._sp_no_prefix.encode(self._unk_text + piece)
        return ids[self._unk_text_length :] if len(ids) >= self._unk_text_length else ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS, special token strings mapped to their ids."""
        if not self.legacy and text:
            text = text.replace(SPIECE_UNDERLINE, " ")
            if self.add_prefix_space:
                text = SPIECE_UNDERLINE + text
        tokens: list[tuple[int, bool]] = []  # (id, whether it is a special token string)
        for piece in self._special_split.split(text):
            if not piece:
                continue
            if piece in self.special_tokens:
                tokens.append((self.special_tokens[piece], True))
            else:
                tokens.extend((token_id, False) for token_id in self._encode_piece(piece))
        # Non-legacy: a leading lone "▁" right before a special token ("<s>...", "</s>...") is dropped.
        if (
            not self.legacy
            and len(tokens) > 1
            and not tokens[0][1]
            and self.sp.id_to_piece(tokens[0][0]) == SPIECE_UNDERLINE
            and tokens[1][1]
        ):
            tokens = tokens[1:]
        return [token_id for token_id, _ in tokens]

    def encode_prompt(self, prompt: str, image_token_id: int, add_bos: bool = True) -> list[int]:
        """BOS (when ``add_bos``), then each ``<image>``-separated chunk tokenised on its own, with one
        ``image_token_id`` per ``<image>`` marker (the caller expands it to the image's visual tokens)."""
        ids = [self.bos_id] if add_bos else []
        for index, chunk in enumerate(prompt.split(IMAGE_MARKER)):
            if index > 0:
                ids.append(image_token_id)
            ids.extend(self.encode(chunk))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; ids outside the vocabulary (image placeholders) are dropped."""
        text, run = "", []
        specials = {token_id: token for token, token_id in self.special_tokens.items()}
        for token_id in (int(i) for i in ids):
            if not 0 <= token_id < self.vocab_size:
                continue
            if token_id in specials:
                if not skip_special_tokens:
                    text, run = text + self.sp.decode(run) + specials[token_id], []
                continue
            run.append(token_id)
        return text + self.sp.decode(run)

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)
