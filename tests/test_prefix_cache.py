"""Exact prefix caching across the image (issue #17): hits reuse the compacted KV of the image
and earlier turns, their tokens equal the reference's, shared blocks are really shared, and
every block is accounted for."""

from __future__ import annotations

import contextlib
import hashlib
import sys

import numpy as np
import pytest
import torch
from conftest import engine_runner, engine_scheduler, make_image, vicuna_prompt
from vllm import SamplingParams

from pmod_serve.pmod.kv_layout import RequestKVLayout, RequestTargets
from pmod_serve.v1.core.kv_accounting import kv_usage
from pmod_serve.v1.core.prefix_cache import LayerBlockKeys, find_prefix_hit

BLOCK = 32
# The releases' shape: 8 ordinary layers, then 24 p-MoD layers with decaying ratios.
RATIOS = [None] * 8 + [round(0.85 - 0.03 * i, 2) for i in range(24)]
LONG_QUESTION = (
    "Please describe the image in detail: the colors, the shapes, the objects, what each part "
    "shows, and how they relate."
)


# --- the hit rule, without an engine ------------------------------------------------------------


def token_hashes(num_tokens: int, seed: str = "a") -> list[bytes]:
    """Stand-ins for vLLM's chained hashes of full token blocks."""
    hashes, parent = [], seed.encode()
    for _ in range(num_tokens // BLOCK):
        parent = hashlib.sha256(parent).digest()
        hashes.append(parent)
    return hashes


def layer_names(keys: LayerBlockKeys, layer: int, start: int, stop: int) -> list[bytes]:
    """Names of `layer`'s blocks `start` .. `stop - 1`, up to the first one without a name."""
    return keys.names(np.array([layer]), np.array([start]), np.array([stop]))[2]


def key(keys: LayerBlockKeys, layer: int, index: int) -> bytes | None:
    """The name of `layer`'s block `index`, or None while it has none."""
    names = layer_names(keys, layer, index, index + 1)
    return names[0] if names else None


def layout_of(ranges, images=None) -> RequestKVLayout:
    return RequestKVLayout(RequestTargets(tuple(ranges), tuple(images or ranges)), RATIOS, BLOCK)


class Cache:
    """A prefix cache holding every block a request named up to `num_tokens` tokens."""

    def __init__(self, layout: RequestKVLayout, hashes: list[bytes], num_tokens: int) -> None:
        keys = LayerBlockKeys(layout, hashes)
        full = layout.layer_slots(num_tokens) // BLOCK
        self.blocks = {}
        for layer in range(layout.num_layers):
            for index in range(int(full[layer])):
                name = key(keys, layer, index)
                if name is not None:
                    self.blocks[name] = (layer, index)

    def hit(self, layout: RequestKVLayout, hashes: list[bytes], max_tokens: int):
        return find_prefix_hit(layout, LayerBlockKeys(layout, hashes), max_tokens, self.blocks.get)


def brute_force_hit(layout: RequestKVLayout, cache: Cache, max_tokens: int) -> int:
    """The largest resumable token count whose slots every layer's cached run covers."""
    runs = []
    for layer in range(layout.num_layers):
        run = 0
        while any(value == (layer, run) for value in cache.blocks.values()):
            run += 1
        runs.append(run)
    start, end = layout.span_start, layout.span_end
    for n in range(max_tokens, -1, -1):
        if start < n < end:
            continue
        if (-(-layout.layer_slots(n) // BLOCK) <= np.array(runs)).all():
            return n
    return 0


@pytest.mark.parametrize(("named_up_to", "max_tokens"), [(1200, 1150), (1100, 1150), (1030, 1150), (1200, 1000)])
def test_hit_is_the_longest_every_layer_covers(named_up_to, max_tokens):
    layout = layout_of([(40, 1000)])
    hashes = token_hashes(1200)
    cache = Cache(layout, hashes[: named_up_to // BLOCK], named_up_to)
    blocks, hit = cache.hit(layout, hashes, max_tokens)
    assert hit == brute_force_hit(layout, cache, max_tokens)
    if named_up_to == 1200:
        assert hit == max_tokens
    # Every layer's blocks, in order, layer after layer, as many as its slots at the hit need.
    counts = layout.layer_blocks(hit)
    assert blocks == [(layer, index) for layer, count in enumerate(counts) for index in range(count)]


def test_hit_ending_inside_the_span_is_refused():
    layout = layout_of([(40, 1000)])
    hashes = token_hashes(1200)
    cache = Cache(layout, hashes, 1200)
    # Tokens in common end inside the span: the hit resumes before it (block 1 of every layer
    # holds routed slots, named by the whole span).
    _, hit = cache.hit(layout, hashes[:20], 1150)
    assert hit == 32
    # Even with every block cached, a lookup capped inside the span stops at its start.
    _, hit = cache.hit(layout, hashes, 500)
    assert hit == 40


def test_names_depend_on_layer_and_routing():
    hashes = token_hashes(1200)
    one_image = LayerBlockKeys(layout_of([(40, 1000)]), hashes)
    two_images = LayerBlockKeys(layout_of([(40, 600), (700, 1000)]), hashes)
    text = LayerBlockKeys(layout_of([]), hashes)
    # Before the span: dense KV, shared with a text-only request, different per layer.
    assert key(one_image, 20, 0) == key(text, 20, 0) == key(two_images, 20, 0)
    assert key(one_image, 20, 0) != key(one_image, 21, 0)
    # From the span on: the target ranges decide what a layer holds.
    assert key(one_image, 20, 5) != key(two_images, 20, 5)
    assert key(one_image, 20, 5) != key(one_image, 21, 5)
    # A routed block is named by the whole span (its dependency position is the span's end).
    assert key(LayerBlockKeys(layout_of([(40, 1000)]), hashes[:31]), 20, 1) is None
    assert key(one_image, 20, 1) is not None


def dependency(layout: RequestKVLayout, layer: int, slot: int) -> int:
    """The module docstring's rule, one slot at a time: the last original position the KV of
    `layer`'s compacted `slot` depends on."""
    if not layout.routed or slot < layout.span_start:
        return slot
    skipped = int(layout.skipped[layer])
    return layout.span_end - 1 if slot < layout.span_end - skipped else slot + skipped


@pytest.mark.parametrize("ranges", [[(40, 1000)], [(40, 600), (700, 1000)], []])
@pytest.mark.parametrize("num_hashes", [1, 20, 31, 37])
def test_block_names_follow_the_dependency_rule(ranges, num_hashes):
    layout = layout_of(ranges)
    keys = LayerBlockKeys(layout, token_hashes(1200)[:num_hashes])
    for layer in (0, 7, 8, 20, 31):
        for start, stop in ((0, 38), (1, 5), (30, 38), (5, 5)):
            _, indexes, names, covered = keys.names(np.array([layer]), np.array([start]), np.array([stop]))
            originals = [dependency(layout, layer, (i + 1) * BLOCK - 1) // BLOCK for i in range(start, stop)]
            named = [i for i, block in zip(range(start, stop), originals) if block < num_hashes]
            assert indexes == named == list(range(start, start + len(named)))
            assert covered == [(block + 1) * BLOCK for block in originals[: len(named)]]
            assert names == [key(keys, layer, i) for i in named] == layer_names(keys, layer, start, stop)
    # All layers in one call: the same names, layer after layer.
    layers = np.array([3, 9, 30])
    starts, stops = np.array([0, 4, 30]), np.array([38, 20, 38])
    assert keys.names(layers, starts, stops)[2] == [
        name for layer, start, stop in zip(layers, starts, stops) for name in layer_names(keys, int(layer), start, stop)]
    all_names = keys.names(np.arange(layout.num_layers), np.zeros(layout.num_layers, dtype=np.int64),
                           np.full(layout.num_layers, 38))[2]
    assert len(set(all_names)) == len(all_names)


# --- the engine -----------------------------------------------------------------------------


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def visual_token_count(llm, prompt: str, image) -> int:
    image_token_id = llm.llm_engine.model_config.hf_config.vocab_size
    (output,) = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": [image]}}], greedy(1))
    return list(output.prompt_token_ids).count(image_token_id)


def prefix_cache_counters(llm) -> dict[str, float]:
    return {m.name: m.value for m in llm.get_metrics() if m.name.startswith("vllm:prefix_cache_")}


def check_accounting(scheduler) -> None:
    """The blocks in use that the metrics report are the blocks the running requests hold,
    each counted once, and every block's reference count is the number of requests holding it."""
    pool = scheduler.kv_cache_manager.block_pool
    referenced = {}
    for blocks in scheduler.pmod_kv_manager.req_to_blocks.values():
        for block in blocks:
            referenced[block.block_id] = referenced.get(block.block_id, 0) + 1
    assert kv_usage(scheduler).layer_blocks == len(referenced)
    for block_id, count in referenced.items():
        assert pool.blocks[block_id].ref_cnt == count


def check_layer_tables(scheduler, runner) -> None:
    """The scheduler's per-layer view of each request's blocks (what it names in the prefix
    cache) is the model runner's per-layer block table."""
    table = runner._pmod_stack.table
    for request_id, state in scheduler.pmod_kv_manager.layer_blocks_of.items():
        row = runner.input_batch.req_id_to_index.get(request_id)
        if row is None:
            continue
        for layer, blocks in enumerate(state.layers):
            assert table.tables.np[layer, row, : table.held[row, layer]].tolist() == [b.block_id for b in blocks]


def check_idle(scheduler, runner) -> None:
    pool = scheduler.kv_cache_manager.block_pool
    assert not scheduler.requests
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1
    assert all(block.ref_cnt == 0 for block in pool.blocks[1:])
    manager = scheduler.pmod_kv_manager
    assert not manager.req_to_blocks and not manager.layer_blocks_of and not manager.layouts
    assert not runner._pmod_stack.table.parked
    assert kv_usage(scheduler).layer_blocks == 0


def test_three_turn_conversation_hits_past_the_image(llm_prefix, tiny_next, reference):
    scheduler, runner = engine_scheduler(llm_prefix), engine_runner(llm_prefix)
    image = make_image(336, 336, 61)
    prompt = vicuna_prompt(LONG_QUESTION, 1)
    visual_tokens = visual_token_count(llm_prefix, vicuna_prompt("Fresh.", 1), make_image(336, 336, 62))
    before = prefix_cache_counters(llm_prefix)
    hits, answer = [], ""
    for turn, question in enumerate(["", "What colors are there?", "And which shapes?"]):
        if turn:
            prompt = f"{prompt} {answer}</s>USER: {question} ASSISTANT:"
        (output,) = llm_prefix.generate([{"prompt": prompt, "multi_modal_data": {"image": [image]}}], greedy(48))
        answer = output.outputs[0].text
        assert list(output.outputs[0].token_ids) == reference.generate(tiny_next, prompt, [image], 48), turn
        hits.append(output.num_cached_tokens)
        check_idle(scheduler, runner)
    assert hits[0] < visual_tokens  # the system prompt's blocks, from the request above
    assert hits[1] > visual_tokens and hits[2] > hits[1] > visual_tokens, (hits, visual_tokens)
    after = prefix_cache_counters(llm_prefix)
    assert after["vllm:prefix_cache_hits"] - before.get("vllm:prefix_cache_hits", 0) >= hits[1] + hits[2]


def test_concurrent_conversations_share_the_image_blocks(llm_prefix, tiny_next, reference):
    """Two conversations about one image, both turns side by side: the second conversation's
    first turn and both second turns hit, and running requests hold the same blocks."""
    engine = llm_prefix.llm_engine
    scheduler, runner = engine_scheduler(llm_prefix), engine_runner(llm_prefix)
    image = make_image(336, 336, 63)
    first = vicuna_prompt(LONG_QUESTION, 1)
    prompts = {"conv-a": first, "conv-b": first}
    seconds = {"conv-a": "What colors are there?", "conv-b": "Is there any text?"}
    answers = {}
    for turn in range(2):
        if turn:
            prompts = {name: f"{p} {answers[name]}</s>USER: {seconds[name]} ASSISTANT:" for name, p in prompts.items()}
        for name, prompt in prompts.items():
            engine.add_request(f"{name}-{turn}", {"prompt": prompt, "multi_modal_data": {"image": [image]}}, greedy(40))
        outputs, shared = {}, 0
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    outputs[output.request_id.rsplit("-", 1)[0]] = output
            check_accounting(scheduler)
            check_layer_tables(scheduler, runner)
            held = [{b.block_id for b in blocks} for blocks in scheduler.pmod_kv_manager.req_to_blocks.values()]
            if len(held) == 2:
                shared = max(shared, len(held[0] & held[1]))
        for name, output in outputs.items():
            answers[name] = output.outputs[0].text
            expected = reference.generate(tiny_next, prompts[name], [image], 40)
            assert list(output.outputs[0].token_ids) == expected, (turn, name)
        # conv-b's first turn hits conv-a's (admitted in the same step), and both second turns
        # hit their first turns: the image's blocks are shared, not copied.
        assert all(output.num_cached_tokens > 1000 for output in outputs.values()) or turn == 0
        assert max(output.num_cached_tokens for output in outputs.values()) > 1000
        assert shared > 0
        check_idle(scheduler, runner)


def test_hit_ending_inside_the_span_recomputes_exactly(llm_prefix, tiny_next, reference):
    """A request whose tokens match a cached request into its own visual span (a second image
    follows: top-k spans both) resumes before its first image, and still equals the reference."""
    scheduler = engine_scheduler(llm_prefix)
    image_a, image_b = make_image(336, 336, 64), make_image(400, 300, 65)
    one = vicuna_prompt("Compare the two images.", 1)
    llm_prefix.generate([{"prompt": one, "multi_modal_data": {"image": [image_a]}}], greedy(8))
    two = vicuna_prompt("Compare the two images.", 2)
    (output,) = llm_prefix.generate([{"prompt": two, "multi_modal_data": {"image": [image_a, image_b]}}], greedy(16))
    image_token_id = llm_prefix.llm_engine.model_config.hf_config.vocab_size
    first_visual = list(output.prompt_token_ids).index(image_token_id)
    assert 0 < output.num_cached_tokens <= first_visual  # the system prompt's blocks only
    assert list(output.outputs[0].token_ids) == reference.generate(tiny_next, two, [image_a, image_b], 16)
    assert not scheduler.requests


def test_slots_of_shared_blocks_are_not_rewritten(llm_prefix, monkeypatch):
    """The step after a hit writes no KV into the shared blocks: their slots map to -1 (on the
    host path, and on the device path large GPU steps take)."""
    engine = llm_prefix.llm_engine
    runner = engine_runner(llm_prefix)
    stack = runner._pmod_stack
    image = make_image(336, 336, 66)
    prompt = vicuna_prompt(LONG_QUESTION, 1)
    llm_prefix.generate([{"prompt": prompt, "multi_modal_data": {"image": [image]}}], greedy(40))
    engine.add_request("rewrite", {"prompt": prompt + " Yes.", "multi_modal_data": {"image": [image]}}, greedy(4))
    engine.step()  # the hit's step: the recomputed tokens
    scheduler = engine_scheduler(llm_prefix)
    (request,) = scheduler.requests.values()
    hit = scheduler.pmod_kv_manager.prefix_hits[request.request_id]
    layout = runner._pmod_layouts[request.request_id]
    held_slots = layout.layer_blocks(hit) * BLOCK  # what the shared blocks hold per layer
    slots_at_hit = layout.layer_slots(hit)
    assert hit > layout.span_end and (held_slots > slots_at_hit).any()
    slot_mapping = stack.table.slot_mapping.np
    row = runner.input_batch.req_id_to_index[request.request_id]
    tables = stack.table.tables.np[:, row]
    num_new = request.num_prompt_tokens - hit
    for layer in range(len(stack.layer_names)):
        slots = slot_mapping[layer, :num_new].tolist()
        indices = range(int(slots_at_hit[layer]), int(slots_at_hit[layer]) + num_new)
        expected = [-1 if c < held_slots[layer] else int(tables[layer, c // BLOCK]) * BLOCK + c % BLOCK for c in indices]
        assert slots == expected, layer
    # The device path (here on CPU tensors), from the same step's buffers.
    import pmod_serve.v1.worker.model_runner as runner_module

    host_result = slot_mapping[:, :num_new].copy()
    stack.table.written[row] = held_slots[stack.table.class_first_layer]
    slot_mapping[:, :num_new] = 0
    monkeypatch.setattr(runner_module, "HOST_SLOT_MAPPING_MAX_TOKENS", 0)
    monkeypatch.setattr(stack.table, "host_only", False)
    with device_moves_in(monkeypatch, runner_module.__file__) as moves:
        runner._pmod_slot_mapping(stack, runner._pmod_step.num_scheduled_tokens)
    assert (slot_mapping[:, :num_new] == host_result).all()
    # Host data reaches the device through the stack's pinned buffers only: `Tensor.to(device)`
    # of a host array waits for the GPU to finish its queued work (on an H200 at c=256 this
    # step waited up to 31 ms for the previous one, each image prefill after a hit).
    assert moves == [], moves
    monkeypatch.undo()
    stack.table.written[row] = 0
    while engine.has_unfinished_requests():
        engine.step()


@contextlib.contextmanager
def device_moves_in(monkeypatch, source_file: str):
    """The lines of `source_file` that call `Tensor.to` with a device while this lasts."""
    moves: list[int] = []
    to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        caller = sys._getframe(1)
        if isinstance(target, (torch.device, str)) and caller.f_code.co_filename == source_file:
            moves.append(caller.f_lineno)
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    try:
        yield moves
    finally:
        monkeypatch.setattr(torch.Tensor, "to", to)


def test_hits_after_preemption_stay_exact(llm_prefix_small_pool, tiny_v15, reference):
    engine = llm_prefix_small_pool.llm_engine
    scheduler, runner = engine_scheduler(llm_prefix_small_pool), engine_runner(llm_prefix_small_pool)
    image = make_image(336, 336, 67)
    prompts = [vicuna_prompt(f"{LONG_QUESTION} {tail}", 1) for tail in ("Briefly.", "In detail.", "As a poem.")]
    for index, prompt in enumerate(prompts):
        engine.add_request(f"pre-{index}", {"prompt": prompt, "multi_modal_data": {"image": [image]}}, greedy(200))
    outputs, preempted_hits = {}, set()
    manager = scheduler.pmod_kv_manager
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                outputs[output.request_id] = list(output.outputs[0].token_ids)
        for request in scheduler.requests.values():
            if request.num_preemptions and manager.prefix_hits.get(request.request_id, 0) > 0:
                preempted_hits.add(request.request_id)
        check_accounting(scheduler)
        check_layer_tables(scheduler, runner)
    assert preempted_hits, "no request came back from preemption with a prefix-cache hit"
    for index, prompt in enumerate(prompts):
        assert outputs[f"pre-{index}"] == reference.generate(tiny_v15, prompt, [image], 200), index
    check_idle(scheduler, runner)
