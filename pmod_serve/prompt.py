"""Prompt tokenisation of p-MoD-LLaVA, as the released code does it (spec §1, "Prompts").

The released code tokenises with the *slow* SentencePiece ``LlamaTokenizer``: the prompt is split
at every literal ``<image>``, each chunk is tokenised on its own (BOS kept only on the first), and one
image placeholder marks each split. Inside a chunk the slow tokenizer first splits off the special
token strings and then hands every remaining non-empty piece to SentencePiece, which gives each
piece its own dummy prefix ``▁``. Hence ``" ASSISTANT:"`` starts with two ``▁`` and a ``"\\n"`` right
after ``<image>`` becomes ``▁`` + ``<0x0A>``; transformers' fast tokenizer differs on such pieces.

This module talks to the ``sentencepiece`` library directly so that the behaviour cannot drift with
transformers versions.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

import sentencepiece as spm

IMAGE_MARKER = "<image>"


class PromptTokenizer:
    """Slow-``LlamaTokenizer``-equivalent tokenisation on top of a SentencePiece model file."""

    def __init__(self, tokenizer_model_path: str | os.PathLike):
        self.sp = spm.SentencePieceProcessor(model_file=os.fspath(tokenizer_model_path))
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

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS, special token strings mapped to their ids."""
        ids: list[int] = []
        for piece in self._special_split.split(text):
            if not piece:
                continue
            if piece in self.special_tokens:
                ids.append(self.special_tokens[piece])
            else:
                # Each piece gets SentencePiece's own dummy prefix (legacy slow-tokenizer behaviour).
                ids.extend(self.sp.encode(piece))
        return ids

    def encode_prompt(self, prompt: str, image_token_id: int) -> list[int]:
        """BOS, then each ``<image>``-separated chunk tokenised on its own, with one ``image_token_id``
        per ``<image>`` marker (the caller expands it to the image's visual tokens)."""
        ids = [self.bos_id]
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
