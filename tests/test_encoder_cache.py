"""The encoder cache holds two steps' images (pmod_serve.model_executor.models.config).

With async scheduling, vLLM's default on GPUs, the engine schedules a step before it has the
previous step's output, so the previous step's images are still in the encoder cache. With
vLLM's default cache of one step's encoder budget that step then admits no new image (on
average one image per step at concurrency 256 on an H200, where each p-MoD step of one image is
host-bound). CPU engines schedule synchronously, so the test schedules twice in a row, as the
async scheduler does, and checks that each step takes what its budget allows."""

from __future__ import annotations

from conftest import engine_scheduler, make_image, vicuna_prompt
from vllm import SamplingParams

from pmod_serve.model_executor.models.config import ENCODER_CACHE_STEPS


def test_back_to_back_steps_each_take_a_full_budget_of_images(llm_two_images_per_step):
    engine = llm_two_images_per_step.llm_engine
    scheduler = engine_scheduler(llm_two_images_per_step)
    budget = engine.vllm_config.scheduler_config.max_num_encoder_input_tokens
    assert scheduler.encoder_cache_manager.cache_size == ENCODER_CACHE_STEPS * budget
    pool = scheduler.kv_cache_manager.block_pool
    free_blocks = pool.get_num_free_blocks()

    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for index in range(6):
        image = make_image(672, 672, index)  # 2,928 visual tokens: two fit an 8192-token step
        engine.add_request(f"enc-{index}", {"prompt": vicuna_prompt("Describe it.", 1),
                                            "multi_modal_data": {"image": image}}, params)
    request_ids = list(scheduler.requests)
    try:
        images_per_step = []
        for _ in range(2):
            output = scheduler.schedule()  # the second before the first step's output, as async scheduling does
            images_per_step.append(sum(len(inputs) for inputs in output.scheduled_encoder_inputs.values()))
        # vLLM's default cache (one step's budget) gives [2, 0].
        assert images_per_step == [2, 2]
    finally:
        engine.abort_request(request_ids, internal=True)
        while engine.has_unfinished_requests():
            engine.step()
        engine.step()  # hands the aborted requests' ids to the runner
    assert not scheduler.requests
    assert pool.get_num_free_blocks() == free_blocks
