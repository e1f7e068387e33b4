"""Refuse sampling parameters that name the image placeholder (an id past the model's vocabulary).

The p-MoD tokenizer has one token more than the model: `<image>`, whose id (`vocab_size`) only
ever stands for image positions in a prompt. vLLM validates some output-side token ids against
the *tokenizer* (`SamplingParams._validate_allowed_token_ids` uses `len(tokenizer)`, and
`update_from_tokenizer` checks `bad_words` against `tokenizer.max_token_id`), so
`allowed_token_ids: [vocab_size]` or `bad_words: ["<image>"]` pass validation and then index the
`(batch, vocab_size)` logits masks past their end in the engine (`InputBatch.add_request`, the
bad-words processor): the engine core dies. (`logit_bias` and `logprob_token_ids` are checked
against the model's vocabulary and are fine.)

`PmodSamplingGuard` is a logits processor that changes no logits (argmax invariant, identity);
it exists for vLLM's `LogitsProcessor.validate_params` hook, which vLLM calls for every request
in the API process (`SamplingParams.verify`) before anything reaches the engine, turning these
into a 400. The config hook adds it to `model_config.logits_processors` for p-MoD models.
"""

from __future__ import annotations

import os

import torch
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from pmod_serve import envs
from pmod_serve.tokenizers.prompt import IMAGE_MARKER

FQCN = "pmod_serve.v1.sample.logits_processor:PmodSamplingGuard"
VOCAB_ENV = "PMOD_MODEL_VOCAB_SIZE"


class PmodSamplingGuard(LogitsProcessor):
    vocab_size: int | None = None  # set by the config hook in the API process

    @classmethod
    def model_vocab_size(cls) -> int | None:
        if cls.vocab_size is not None:
            return cls.vocab_size
        return envs.PMOD_MODEL_VOCAB_SIZE

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        vocab_size = cls.model_vocab_size()
        if vocab_size is not None and sampling_params.allowed_token_ids:
            outside = [t for t in sampling_params.allowed_token_ids if not 0 <= t < vocab_size]
            if outside:
                raise VLLMValidationError(
                    f"allowed_token_ids contains token ids outside the model's vocabulary of "
                    f"{vocab_size}: {outside[:10]} (id {vocab_size} is the image placeholder, "
                    "which the model never generates)",
                    parameter="allowed_token_ids", value=outside[:10],
                )
        if any(IMAGE_MARKER in word for word in sampling_params.bad_words or []):
            raise VLLMValidationError(
                f"bad_words may not contain {IMAGE_MARKER!r}: it is the image placeholder, not a "
                "token the model can generate", parameter="bad_words", value=IMAGE_MARKER,
            )

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


def install(model_config) -> None:
    vocab_size = model_config.get_vocab_size()
    PmodSamplingGuard.vocab_size = vocab_size
    os.environ[VOCAB_ENV] = str(vocab_size)  # for API server processes started after this one
    processors = list(model_config.logits_processors or [])
    if FQCN not in processors and PmodSamplingGuard not in processors:
        model_config.logits_processors = [*processors, FQCN]
