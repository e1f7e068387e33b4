"""Seeded sampling when a request's prefill is split over steps, on CPU.

Two 672x672-image requests do not fit one step together (`max_num_batched_tokens` = 4096): the
second prefills only its text before the image in the first step, and the token sampled for it
there is discarded. vLLM rewinds a seeded request's generator by Philox offsets for that, which
CPU generators do not have: the engine core died ("CPU Generator does not use offset", found by
`n=2` with `seed` through the server). `pmod_serve.v1.worker.cpu_worker` restores the generator's state
instead."""

from __future__ import annotations

from conftest import engine_scheduler, make_image, vicuna_prompt
from vllm import SamplingParams


def test_seeded_request_split_over_steps_samples_as_alone(llm_next, monkeypatch) -> None:
    first = {"prompt": vicuna_prompt("Describe it.", 1), "multi_modal_data": {"image": make_image(672, 672, 301)}}
    second = {"prompt": vicuna_prompt("What is there?", 1), "multi_modal_data": {"image": make_image(672, 672, 302)}}
    # Both seeded: vLLM's CPU sampler draws a batch that mixes greedy and random requests
    # without the per-request generators, so only all-seeded batches are reproducible there.
    seeded_first = SamplingParams(temperature=0.9, max_tokens=6, seed=11)
    seeded_second = SamplingParams(temperature=0.9, max_tokens=12, seed=7)

    scheduler = engine_scheduler(llm_next)
    partial = []
    schedule = scheduler.schedule

    def recording_schedule(*args, **kwargs):
        output = schedule(*args, **kwargs)
        for request in output.scheduled_new_reqs:
            scheduled = output.num_scheduled_tokens[request.req_id]
            if request.num_computed_tokens + scheduled < len(request.prompt_token_ids):
                partial.append(request.req_id)
        return output

    monkeypatch.setattr(scheduler, "schedule", recording_schedule)
    together = llm_next.generate([first, second], [seeded_first, seeded_second], use_tqdm=False)
    assert partial, "the second request's prefill was expected to be split over two steps"
    monkeypatch.undo()
    # The discarded sample left the seeded stream untouched: the same tokens as the request alone.
    (alone,) = llm_next.generate([second], seeded_second, use_tqdm=False)
    assert len(together[1].outputs[0].token_ids) == 12
    assert together[1].outputs[0].token_ids == alone.outputs[0].token_ids
