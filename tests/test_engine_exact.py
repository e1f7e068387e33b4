"""The vLLM p-MoD model's greedy tokens equal the plain-PyTorch reference, token for token."""

from __future__ import annotations

import pytest
from conftest import make_image, vicuna_prompt
from vllm import SamplingParams

NEW_TOKENS = 16
QUESTION = "What is shown in this image?"
# Four aspect ratios: landscape, portrait, square 2x2 tiles, very wide.
SIZES = [(400, 300), (300, 700), (672, 672), (1000, 200)]


def greedy(max_tokens: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens)


def request(prompt, images):
    return {"prompt": prompt, "multi_modal_data": {"image": images}} if images else {"prompt": prompt}


def test_batched_single_image_prompts_match_reference(llm_next, tiny_next, reference):
    cases = [(vicuna_prompt(QUESTION, 1), [make_image(w, h, seed)]) for seed, (w, h) in enumerate(SIZES)]
    outputs = llm_next.generate([request(p, imgs) for p, imgs in cases], greedy())
    for (prompt, images), output in zip(cases, outputs):
        expected = reference.generate(tiny_next, prompt, images, NEW_TOKENS)
        assert list(output.outputs[0].token_ids) == expected, images[0].size
    # Different images give different continuations: the model is not degenerate.
    assert len({tuple(o.outputs[0].token_ids) for o in outputs}) > 1


def test_two_image_prompt_matches_reference(llm_next, tiny_next, reference):
    prompt = vicuna_prompt("Compare the two images.", 2)
    # Two images whose visual tokens together stay within max_model_len (4096).
    images = [make_image(400, 300, 11), make_image(336, 900, 12)]
    (output,) = llm_next.generate([request(prompt, images)], greedy())
    assert list(output.outputs[0].token_ids) == reference.generate(tiny_next, prompt, images, NEW_TOKENS)


def test_text_only_prompt_matches_reference(llm_next, tiny_next, reference):
    prompt = vicuna_prompt("Tell me about cats and dogs.", 0)
    (output,) = llm_next.generate([request(prompt, [])], greedy())
    assert list(output.outputs[0].token_ids) == reference.generate(tiny_next, prompt, [], NEW_TOKENS)


def test_prompt_tokens_match_reference(llm_next, tiny_next):
    """The processor inserts exactly the spec's visual tokens, tokenised like the slow tokenizer."""
    from pmod_reference.model import PmodReference

    reference_model = PmodReference(tiny_next)
    prompt = vicuna_prompt(QUESTION, 2)
    images = [make_image(400, 300, 1), make_image(1000, 200, 2)]
    (output,) = llm_next.generate([request(prompt, images)], greedy(1))
    assert list(output.prompt_token_ids) == reference_model.prompt_token_ids(prompt, images)


@pytest.mark.parametrize("size", [(512, 384), (300, 300)])
def test_v15_checkpoint_matches_reference(tiny_v15, reference, size, llm_v15):
    prompt = vicuna_prompt(QUESTION, 1)
    images = [make_image(*size, 7)]
    (output,) = llm_v15.generate([request(prompt, images)], greedy())
    assert list(output.outputs[0].token_ids) == reference.generate(tiny_v15, prompt, images, NEW_TOKENS)
