"""vLLM tokenizer mode `pmod`: the checkpoint's HF tokenizer, encoding as the released slow one.

transformers 5 only offers the fast (tokenizers-backed) LLaMA tokenizer, which encodes prompt
pieces differently from the slow SentencePiece tokenizer the checkpoints were trained with
(docs/p-mod.md, "Prompts"). This mode keeps the HF tokenizer for everything else (vocabulary, decoding, chat
templates) and routes encoding through `PromptTokenizer`. `<image>` becomes one placeholder token
just past the text vocabulary, which the multimodal processor expands into the image's visual
tokens.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, BatchEncoding
from vllm.tokenizers.hf import CachedHfTokenizer, get_cached_tokenizer

from pmod_serve.tokenizers.prompt import (
    IMAGE_MARKER,
    PromptTokenizer,
    read_tokenizer_config,
    slow_tokenizer_options,
)

TOKENIZER_MODE = "pmod"


def _find_tokenizer_model(path_or_repo_id: str | Path, **hub_kwargs) -> Path:
    local = Path(path_or_repo_id) / "tokenizer.model"
    if local.is_file():
        return local
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(str(path_or_repo_id), "tokenizer.model", **hub_kwargs))


def _find_tokenizer_config(path_or_repo_id: str | Path, **hub_kwargs) -> Path | None:
    """The checkpoint's tokenizer_config.json, or None when it has none."""
    local = Path(path_or_repo_id)
    if local.is_dir():
        config = local / "tokenizer_config.json"
        return config if config.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(str(path_or_repo_id), "tokenizer_config.json", **hub_kwargs))
    except EntryNotFoundError:
        return None


def prompt_tokenizer_for(path_or_repo_id: str | Path, **hub_kwargs) -> PromptTokenizer:
    """The checkpoint's slow-tokenizer emulation: its tokenizer.model, with the `legacy` /
    `add_prefix_space` settings of its tokenizer_config.json (local directory or hub repo)."""
    config = read_tokenizer_config(_find_tokenizer_config(path_or_repo_id, **hub_kwargs))
    return PromptTokenizer(
        _find_tokenizer_model(path_or_repo_id, **hub_kwargs), **slow_tokenizer_options(config)
    )


class PmodTokenizer(CachedHfTokenizer):
    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, *args, **kwargs):
        hub_kwargs = {k: kwargs[k] for k in ("revision",) if kwargs.get(k)}
        if kwargs.get("download_dir"):
            hub_kwargs["cache_dir"] = kwargs["download_dir"]
        prompt_tokenizer = prompt_tokenizer_for(path_or_repo_id, **hub_kwargs)
        hf_tokenizer = AutoTokenizer.from_pretrained(
            path_or_repo_id,
            *args,
            trust_remote_code=kwargs.pop("trust_remote_code", False),
            revision=kwargs.pop("revision", None),
            cache_dir=kwargs.pop("download_dir", None),
            **kwargs,
        )
        return slow_encoding(hf_tokenizer, prompt_tokenizer)


def slow_encoding(hf_tokenizer, prompt_tokenizer: PromptTokenizer):
    """Return `hf_tokenizer` (a copy) whose `encode`/`__call__` follow the slow tokenizer."""
    hf_tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_MARKER]})
    image_token_id = hf_tokenizer.convert_tokens_to_ids(IMAGE_MARKER)
    bos_token = hf_tokenizer.bos_token or "<s>"
    base = get_cached_tokenizer(hf_tokenizer)

    def encode_text(text: str, add_special_tokens: bool) -> list[int]:
        # A chat template that starts with the BOS string means "BOS, then the first piece",
        # exactly what the released code feeds the model.
        if text.startswith(bos_token):
            text, add_special_tokens = text[len(bos_token) :], True
        return prompt_tokenizer.encode_prompt(text, image_token_id, add_bos=add_special_tokens)

    class PmodSlowTokenizer(base.__class__):  # type: ignore[misc,valid-type]
        pmod_image_token_id = image_token_id

        def encode(self, text, text_pair=None, add_special_tokens=True, truncation=None, max_length=None, **kw):
            if text_pair is not None or not isinstance(text, str):
                return super().encode(text, text_pair, add_special_tokens, truncation, max_length, **kw)
            ids = encode_text(text, add_special_tokens)
            return _truncate(ids, truncation, max_length, self.truncation_side)

        def __call__(self, text=None, text_pair=None, add_special_tokens=True, truncation=None,
                     max_length=None, **kw):
            unsupported = kw.get("return_offsets_mapping") or kw.get("return_tensors") or text_pair
            if unsupported or text is None:
                return super().__call__(text, text_pair, add_special_tokens=add_special_tokens,
                                        truncation=truncation, max_length=max_length, **kw)
            texts = [text] if isinstance(text, str) else list(text)
            encoded = [
                _truncate(encode_text(t, add_special_tokens), truncation, max_length, self.truncation_side)
                for t in texts
            ]
            input_ids = encoded[0] if isinstance(text, str) else encoded
            attention_mask = [1] * len(input_ids) if isinstance(text, str) else [[1] * len(e) for e in encoded]
            return BatchEncoding({"input_ids": input_ids, "attention_mask": attention_mask})

        def __reduce__(self):
            return slow_encoding, (hf_tokenizer, prompt_tokenizer)

    PmodSlowTokenizer.__name__ = f"PmodSlow{hf_tokenizer.__class__.__name__}"
    base.__class__ = PmodSlowTokenizer
    return base


def _truncate(ids: list[int], truncation, max_length: int | None, side: str) -> list[int]:
    if not truncation or max_length is None or len(ids) <= max_length:
        return ids
    return ids[-max_length:] if side == "left" else ids[:max_length]
