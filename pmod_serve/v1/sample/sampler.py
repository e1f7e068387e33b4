"""Log-probabilities of prompt tokens that are not in the model's vocabulary.

An `<image>` marker is expanded into image placeholder tokens whose id is one past the text
vocabulary (the released checkpoints have no image token; vLLM allows such ids for multimodal
placeholders: `InputProcessor._validate_model_input` accepts ids up to the tokenizer's, and
`SupportsMultiModal.configure_mm_token_handling` masks them out of the text embedding). The
embedding path is safe, but vLLM's prompt log-prob path is not: `GPUModelRunner.
_get_prompt_logprobs_dict` gathers, for every prompt position, the log-prob of the *next prompt
token* with `Sampler.gather_logprobs`, which indexes the `(tokens, vocab)` log-prob matrix with
the placeholder id. On CPU that raises `index N is out of bounds`, on a GPU it is a device-side
assert; either way the engine core dies. Any request with an image and `prompt_logprobs` (or
`echo` with `logprobs`) could do it.

`PmodSampler.gather_logprobs` defines the meaning instead: the model's vocabulary has no image
token, so it assigns an image placeholder probability 0. Its log-prob is `-inf` (vLLM's API
reports `-inf` as -9999.0, as for any impossible token) and its rank is `vocab_size + 1` (after
every vocabulary token); the top-k alternatives at that position are the model's real top-k.
Ids inside the vocabulary (every sampled token) are gathered exactly as vLLM does.
"""

from __future__ import annotations

import torch
from vllm.v1.outputs import LogprobsTensors
from vllm.v1.sample.sampler import Sampler


class PmodSampler(Sampler):
    @staticmethod
    def gather_logprobs(logprobs: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor) -> LogprobsTensors:
        vocab_size = logprobs.shape[-1]
        # No host synchronisation: clamp, gather with vLLM's code, then overwrite the target
        # column of the rows whose id is outside the vocabulary.
        outside = (token_ids < 0) | (token_ids >= vocab_size)
        gathered = Sampler.gather_logprobs(logprobs, num_logprobs, token_ids.clamp(0, vocab_size - 1))
        indices, values, ranks = gathered.logprob_token_ids, gathered.logprobs, gathered.selected_token_ranks
        indices[:, 0] = token_ids.to(indices.dtype)
        values[:, 0] = values[:, 0].masked_fill(outside, float("-inf"))
        ranks = torch.where(outside, torch.full_like(ranks, vocab_size + 1), ranks)
        return LogprobsTensors(indices, values, ranks)


class PmodLogprobsRunnerMixin:
    """Put before vLLM's model runner class: its sampler becomes `PmodSampler`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sampler = PmodSampler(
            logprobs_mode=self.model_config.logprobs_mode,
            use_fp64_gumbel=self.model_config.use_fp64_gumbel,
        )
