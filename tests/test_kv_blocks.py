"""KV allocation follows PRD: every layer holds exactly the blocks docs/p-mod.md ("KV cache of one request") gives, read from the
engine's own block tables; every block returns to the pool; preemption stays exact."""

from __future__ import annotations

import math

from conftest import engine_runner, engine_scheduler, make_image, vicuna_prompt
from vllm import SamplingParams

from pmod_serve.pmod.schedule import PmodSchedule, kept_target_count
from pmod_serve.v1.core.kv_accounting import kv_usage

# ~60 tokens with the tiny tokenizer, like the acceptance's 60-token question.
LONG_QUESTION = (
    "Please describe the image in detail: the colors, the shapes, the objects, what each part "
    "shows, and how the parts relate to each other, then say what the photo is about."
)


def expected_blocks(schedule: PmodSchedule, prompt_len: int, num_targets: int, fed: int, block_size: int):
    """docs/p-mod.md, "KV cache of one request", per layer: P - T + trunc(T*ratio) + G slots (p-MoD) or P + G (ordinary)."""
    blocks = {}
    for layer in range(schedule.num_layers):
        if schedule.is_pmod_layer(layer):
            kept = kept_target_count(num_targets, schedule.retention_ratio[layer])
            slots = prompt_len - num_targets + kept + fed
        else:
            slots = prompt_len + fed
        blocks[layer] = math.ceil(slots / block_size)
    return blocks


def actual_blocks(scheduler, runner, request_id: str) -> dict[int, int]:
    """Blocks each layer holds for the request, from the model runner's per-layer block tables,
    checked against the blocks the scheduler's KV manager lent it from the pool."""
    from vllm.model_executor.models.utils import extract_layer_index

    stack = runner._pmod_stack
    row = runner.input_batch.req_id_to_index[request_id]
    held = stack.table.held[row]
    tables = stack.table.tables.np[:, row]
    layer_block_ids = [tables[layer, : held[layer]].tolist() for layer in range(len(stack.layer_names))]
    lent = [block.block_id for block in scheduler.pmod_kv_manager.req_to_blocks[request_id]]
    # Every lent block serves exactly one layer, and no layer uses a block it was not lent.
    assert sorted(b for ids in layer_block_ids for b in ids) == sorted(lent)
    return {extract_layer_index(name): len(layer_block_ids[layer]) for layer, name in enumerate(stack.layer_names)}
def engine_request(scheduler, external_id: str):
    (request,) = [r for r in scheduler.requests.values() if r.request_id.startswith(external_id)]
    return request


def check_request(scheduler, runner, request, schedule, image_token_id):
    prompt_len = request.num_prompt_tokens
    num_targets = list(request.prompt_token_ids).count(image_token_id)
    fed = request.num_computed_tokens - prompt_len
    assert fed >= 0
    block_size = scheduler.pmod_kv_manager.block_size
    expected = expected_blocks(schedule, prompt_len, num_targets, fed, block_size)
    assert actual_blocks(scheduler, runner, request.request_id) == expected
    return expected


def test_block_tables_follow_prd_and_return_to_pool(llm_next, tiny_next):
    engine = llm_next.llm_engine
    scheduler = engine_scheduler(llm_next)
    runner = engine_runner(llm_next)
    schedule = PmodSchedule.from_config(llm_next.llm_engine.model_config.hf_config)
    image_token_id = llm_next.llm_engine.model_config.hf_config.vocab_size
    pool = scheduler.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()

    sizes = {"kv-a": (672, 672), "kv-b": (400, 300), "kv-c": (300, 700)}
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for seed, (request_id, size) in enumerate(sizes.items()):
        prompt = vicuna_prompt("Describe it.", 1)
        engine.add_request(request_id, {"prompt": prompt, "multi_modal_data": {"image": make_image(*size, seed)}}, params)

    decode_steps_checked = {request_id: set() for request_id in sizes}
    aborted = False
    while engine.has_unfinished_requests():
        engine.step()
        for request_id in sizes:
            matches = [r for r in scheduler.requests.values() if r.request_id.startswith(request_id)]
            if not matches:
                continue
            request = matches[0]
            if request.num_computed_tokens < request.num_prompt_tokens:
                continue
            check_request(scheduler, runner, request, schedule, image_token_id)
            decode_steps_checked[request_id].add(request.num_computed_tokens - request.num_prompt_tokens)
        if not aborted and 16 in decode_steps_checked["kv-b"]:
            engine.abort_request([r.request_id for r in scheduler.requests.values() if r.request_id.startswith("kv-b")])
            aborted = True

    # Checked right after prefill (G=0) and after 16 decode steps (G=16), for every request.
    for request_id, fed in decode_steps_checked.items():
        assert {0, 16} <= fed, (request_id, sorted(fed))
    assert aborted
    assert not scheduler.requests
    assert pool.get_num_free_blocks() == free_at_start
    for manager in scheduler.kv_cache_manager.coordinator.single_type_managers:
        assert not manager.req_to_blocks
    assert not scheduler.pmod_kv_manager.layouts
    assert not runner._pmod_stack.table.parked


def test_kv_savings_for_a_2x2_tile_request(llm_next, capsys):
    """Blocks used against a dense layout for a 672x672 image (2x2 tiles), a ~60-token question and
    128 output tokens. Theory for the 7B schedule: 0.561 of dense."""
    engine = llm_next.llm_engine
    scheduler = engine_scheduler(llm_next)
    runner = engine_runner(llm_next)
    schedule = PmodSchedule.from_config(engine.model_config.hf_config)
    image_token_id = engine.model_config.hf_config.vocab_size
    prompt = vicuna_prompt(LONG_QUESTION, 1)
    # The cache of a request that has produced 128 tokens holds P + 127 fed tokens; one more
    # token keeps the request alive (not yet freed) at that point.
    params = SamplingParams(temperature=0.0, max_tokens=129, ignore_eos=True)
    engine.add_request("ratio", {"prompt": prompt, "multi_modal_data": {"image": make_image(672, 672, 3)}}, params)
    last = None
    while engine.has_unfinished_requests():
        engine.step()
        if scheduler.requests:
            request = engine_request(scheduler, "ratio")
            if request.num_computed_tokens - request.num_prompt_tokens == 127:
                expected = check_request(scheduler, runner, request, schedule, image_token_id)
                last = (request.num_prompt_tokens, kv_usage(scheduler, per_request=True).requests[request.request_id], expected)
    assert last is not None
    prompt_len, usage, expected = last
    num_targets = 576 + 48 * 49
    slots = sum(
        prompt_len - num_targets + kept_target_count(num_targets, schedule.retention_ratio[layer]) + 127
        if schedule.is_pmod_layer(layer) else prompt_len + 127
        for layer in range(schedule.num_layers)
    )
    theory = slots / ((prompt_len + 127) * schedule.num_layers)
    block_ratio = usage.layer_blocks / usage.dense_layer_blocks
    with capsys.disabled():
        print(
            f"\n[kv] NeXT 672x672 (2x2 tiles, {num_targets} visual tokens), prompt {prompt_len} tokens, "
            f"128 output: {usage.layer_blocks} layer-blocks vs {usage.dense_layer_blocks} dense "
            f"= {block_ratio:.3f} of dense (slot theory {theory:.3f})"
        )
    assert usage.layer_blocks == sum(expected.values())
    assert abs(block_ratio - theory) < 0.02
    assert 0.55 < theory < 0.58


def test_preempted_requests_still_match_reference(llm_small_pool, tiny_next, reference):
    scheduler = engine_scheduler(llm_small_pool)
    prompts = [
        (vicuna_prompt(question, 1), [make_image(336, 336, seed)])
        for seed, question in enumerate(["Describe it.", "What colors?", "Is there text?", "Where?"], 21)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=160, ignore_eos=True)
    preemptions = []
    engine = llm_small_pool.llm_engine
    for index, (prompt, images) in enumerate(prompts):
        engine.add_request(f"pre-{index}", {"prompt": prompt, "multi_modal_data": {"image": images}}, params)
    outputs = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                outputs[output.request_id] = list(output.outputs[0].token_ids)
        preemptions.extend(r.num_preemptions for r in scheduler.requests.values())
    assert max(preemptions, default=0) > 0, "the small pool did not force a preemption"
    for index, (prompt, images) in enumerate(prompts):
        assert outputs[f"pre-{index}"] == reference.generate(tiny_next, prompt, images, 160)
