"""The same protections on the offline path (`LLM`, an in-process engine) and at the unit level:
prompt log-probs of image positions, the sampler's gather, and image URLs through `LLM.chat`."""

from __future__ import annotations

import math
import socket
import threading

import pytest
import torch
from conftest import make_image, vicuna_prompt


def test_gather_logprobs_matches_vllm_inside_the_vocabulary_and_defines_the_rest():
    from vllm.v1.sample.sampler import Sampler

    from pmod_serve.v1.sample.sampler import PmodSampler

    torch.manual_seed(0)
    logprobs = torch.randn(6, 50).log_softmax(-1)
    inside = torch.tensor([0, 7, 49, 3, 3, 12], dtype=torch.int64)
    expected = Sampler.gather_logprobs(logprobs, 3, inside)
    got = PmodSampler.gather_logprobs(logprobs, 3, inside)
    for a, b in zip(expected[:3], got[:3]):
        assert torch.equal(a, b)

    with pytest.raises((RuntimeError, IndexError)):  # what killed the engine
        Sampler.gather_logprobs(logprobs, 3, torch.tensor([0, 50, 50, 1, 2, 3]))
    mixed = torch.tensor([0, 50, 50, 1, -1, 3], dtype=torch.int64)
    ids, values, ranks = PmodSampler.gather_logprobs(logprobs, 3, mixed)[:3]
    reference = Sampler.gather_logprobs(logprobs, 3, mixed.clamp(0, 49))
    assert ids[:, 0].tolist() == mixed.tolist()
    outside = [1, 2, 4]
    for row in range(6):
        if row in outside:
            assert values[row, 0].item() == -math.inf and ranks[row].item() == 51
        else:
            assert values[row, 0].item() == logprobs[row, mixed[row]].item()
            assert ranks[row].item() == reference.selected_token_ranks[row].item()
        # The top-k alternatives are the model's, whatever the target.
        assert torch.equal(ids[row, 1:], expected.logprob_token_ids[row, 1:])


def test_offline_prompt_logprobs_with_an_image(llm_next, tiny_next):
    import json

    from vllm import SamplingParams

    vocab_size = json.loads((tiny_next / "config.json").read_text())["vocab_size"]
    image = make_image(300, 200, 601)
    out = llm_next.generate({"prompt": vicuna_prompt("What is it?", 1), "multi_modal_data": {"image": image}},
                            SamplingParams(max_tokens=3, prompt_logprobs=1, temperature=0))[0]
    image_positions = [i for i, t in enumerate(out.prompt_token_ids) if t == vocab_size]
    assert image_positions
    for i in image_positions:
        assert out.prompt_logprobs[i][vocab_size].logprob == -math.inf
    assert len(out.outputs[0].token_ids) == 3
    # The engine is alive and exact afterwards.
    again = llm_next.generate({"prompt": vicuna_prompt("What is it?", 1), "multi_modal_data": {"image": image}},
                              SamplingParams(max_tokens=3, temperature=0))[0]
    assert again.outputs[0].token_ids == out.outputs[0].token_ids


def test_offline_chat_refuses_loopback_image_urls_without_connecting(llm_next):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.2)
    connections = []

    def accept():
        try:
            connections.append(listener.accept())
        except OSError:
            pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    for url in (f"http://127.0.0.1:{port}/a.png", f"http://localhost:{port}/a.png"):
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "Hi"}]}]
        with pytest.raises(ValueError, match="non-public address"):
            llm_next.chat(messages)
    thread.join()
    listener.close()
    assert connections == []
