"""PMOD_RESERVE_PROMPTS_IN_PROGRESS (on by default): a waiting image request is admitted only if
the free KV pool holds its whole prompt once the running requests' unfinished prompts have what
they still need.

vLLM's own admission gate (`scheduler_reserve_full_isl`) checks each new request's whole prompt
against the free pool alone. When a step cannot take any more images (the encoder budget), it
admits the waiting image requests with only their pre-image tokens, each counting the same free
blocks, and later steps preempt them back (on an H200 at concurrency 256: 810 preemptions over
1,024 requests). The test sends twelve requests at once to an engine whose pool holds three, with
the gate off (vLLM's behaviour) and on."""

from __future__ import annotations

from conftest import drain_engine, engine_scheduler, make_image, vicuna_prompt
from vllm import SamplingParams

REQUESTS = 12


def _serve(llm, reserve: bool) -> tuple[dict[str, list[int]], dict[str, int]]:
    engine = llm.llm_engine
    scheduler = engine_scheduler(llm)
    pool = scheduler.kv_cache_manager.block_pool
    free_blocks = pool.get_num_free_blocks()
    counts = {"preemptions": 0, "most_prompts_in_progress": 0, "steps": 0}
    preempt, schedule = scheduler._preempt_request, scheduler.schedule

    def counted_preempt(request, timestamp):
        counts["preemptions"] += 1
        return preempt(request, timestamp)

    def counted_schedule(*args, **kwargs):
        output = schedule(*args, **kwargs)
        in_progress = sum(1 for request in scheduler.running if request.is_prefill_chunk)
        counts["most_prompts_in_progress"] = max(counts["most_prompts_in_progress"], in_progress)
        counts["steps"] += 1
        return output

    for index in range(REQUESTS):
        params = SamplingParams(temperature=0.0, max_tokens=4 + index % 3, ignore_eos=True)
        engine.add_request(f"reserve-{reserve}-{index}", {
            "prompt": vicuna_prompt("What is in the picture?", 1),
            "multi_modal_data": {"image": make_image(672, 672, 900 + index)}}, params)
    scheduler.reserve_prompts_in_progress = reserve
    scheduler._preempt_request, scheduler.schedule = counted_preempt, counted_schedule
    try:
        tokens = drain_engine(engine)
    finally:
        scheduler._preempt_request, scheduler.schedule = preempt, schedule
        scheduler.reserve_prompts_in_progress = True
    assert pool.get_num_free_blocks() == free_blocks  # every block back
    return tokens, counts


def test_admissions_reserve_what_prompts_in_progress_need(llm_kv_bound):
    assert engine_scheduler(llm_kv_bound).reserve_prompts_in_progress  # the default
    plain_tokens, plain = _serve(llm_kv_bound, reserve=False)
    tokens, reserved = _serve(llm_kv_bound, reserve=True)

    assert len(tokens) == REQUESTS and tokens == plain_tokens  # scheduling changes when, not what
    # vLLM's gate: requests admitted with their pre-image tokens beyond what the pool holds,
    # and preempted back.
    assert plain["most_prompts_in_progress"] > 3
    assert plain["preemptions"] > 0
    # With the reserve, no more prompts in progress than the pool can finish, and no preemption.
    assert reserved["most_prompts_in_progress"] <= 3
    assert reserved["preemptions"] == 0
