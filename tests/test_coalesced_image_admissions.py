"""PMOD_COALESCE_IMAGE_ADMISSIONS: under KV pressure, image requests are admitted two at a time.

A full KV cache frees about one request's blocks per step, so each routed step would prefill a
single image while its host cost is nearly that of two. With the option on, a step where the pool
fits the first waiting image request but not the second runs its decodes alone, and the next
step prefills both (pmod_serve.v1.core.sched.scheduler._hold_image_admissions). The test runs
the same requests (staggered lengths, so they finish one by one) through a pool that holds three
of them, with the option off and on. Whether it pays on a GPU is for a GPU run to show."""

from __future__ import annotations

from conftest import drain_engine, engine_scheduler, make_image, vicuna_prompt
from vllm import SamplingParams

REQUESTS = 10


def _serve(llm, coalesce: bool) -> tuple[dict[str, list[int]], list[dict]]:
    engine = llm.llm_engine
    scheduler = engine_scheduler(llm)
    pool = scheduler.kv_cache_manager.block_pool
    free_blocks = pool.get_num_free_blocks()
    scheduler.coalesce_image_admissions = coalesce
    steps: list[dict] = []
    schedule = scheduler.schedule

    def recorded(*args, **kwargs):
        waiting_images = sum(1 for request in scheduler.waiting if request.mm_features)
        decoding = sum(1 for request in scheduler.running if not request.is_prefill_chunk)
        output = schedule(*args, **kwargs)
        steps.append({"waiting_images": waiting_images, "decoding": decoding,
                      "images": sum(len(inputs) for inputs in output.scheduled_encoder_inputs.values()),
                      "held": scheduler.image_admissions_held})
        return output

    for index in range(REQUESTS):
        # Staggered lengths: requests finish one by one, each freeing room for about one more.
        params = SamplingParams(temperature=0.0, max_tokens=6 + index, ignore_eos=True)
        engine.add_request(f"coalesce-{coalesce}-{index}", {
            "prompt": vicuna_prompt("Describe it.", 1),
            "multi_modal_data": {"image": make_image(672, 672, 500 + index)}}, params)
    scheduler.schedule = recorded
    try:
        tokens = drain_engine(engine)
    finally:
        scheduler.schedule = schedule
        scheduler.coalesce_image_admissions = False
        scheduler.image_admissions_held = False
    assert pool.get_num_free_blocks() == free_blocks  # every block back
    return tokens, steps


def _lone_images(steps: list[dict]) -> int:
    """Steps that prefilled one image beside decodes while another image request waited."""
    return sum(1 for step in steps if step["images"] == 1 and step["decoding"] and step["waiting_images"] >= 2)


def test_image_admissions_coalesce_under_kv_pressure(llm_kv_bound):
    plain_tokens, plain_steps = _serve(llm_kv_bound, coalesce=False)
    tokens, steps = _serve(llm_kv_bound, coalesce=True)

    assert len(plain_tokens) == len(tokens) == REQUESTS
    assert tokens == plain_tokens  # scheduling changes when, not what
    # Without the option the full pool admits images one at a time beside decodes...
    assert _lone_images(plain_steps) >= 2
    # ...with it, some steps hold their admissions, never two in a row, and fewer lone images.
    held = [step["held"] for step in steps]
    assert any(held)
    assert not any(a and b for a, b in zip(held, held[1:]))
    assert all(step["images"] == 0 for step in steps if step["held"])
    assert _lone_images(steps) < _lone_images(plain_steps)
    assert sum(1 for step in steps if step["images"] == 2) > sum(1 for step in plain_steps if step["images"] == 2)
