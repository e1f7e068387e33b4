"""Attention metadata per step: one build per retention-ratio class, or one for the whole stack
when no request of the step has skipped a token (text only), and tokens still equal the reference."""

from __future__ import annotations

import dataclasses

import torch
from conftest import engine_runner, make_image, vicuna_prompt
from vllm import SamplingParams

NEW_TOKENS = 8


class BuildCounter:
    """Counts the metadata builds of every step the model runner prepares."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.builds_per_step: list[int] = []
        self.layers_per_step: list[int] = []

    def __enter__(self):
        runner, counter = self.runner, self
        self.original = runner._build_pmod_attention_metadata

        def counted(stack, **kwargs):
            originals = [builder.build for builder in stack.builders]
            calls = [0]

            def wrap(build):
                def counted_build(*args, **kw):
                    calls[0] += 1
                    return build(*args, **kw)

                return counted_build

            for builder, build in zip(stack.builders, originals):
                builder.build = wrap(build)
            try:
                metadata = counter.original(stack, **kwargs)
            finally:
                for builder, build in zip(stack.builders, originals):
                    builder.build = build
            if kwargs.get("num_tokens"):
                counter.builds_per_step.append(calls[0])
                counter.layers_per_step.append(len(metadata))
            return metadata

        runner._build_pmod_attention_metadata = counted
        return self

    def __exit__(self, *exc) -> None:
        del self.runner._build_pmod_attention_metadata


def test_text_only_steps_build_once_image_steps_once_per_class(llm_next, tiny_next, reference):
    runner = engine_runner(llm_next)
    stack = runner._pmod_stack
    num_layers, num_classes = len(stack.layer_names), stack.num_classes
    assert num_classes > 2  # the tiny released-layout checkpoint keeps several ratios
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)

    text = vicuna_prompt("Tell me about cats and dogs.", 0)
    with BuildCounter(runner) as counter:
        (output,) = llm_next.generate([{"prompt": text}], greedy)
    assert list(output.outputs[0].token_ids) == reference.generate(tiny_next, text, [], NEW_TOKENS)
    assert counter.builds_per_step and set(counter.builds_per_step) == {1}
    assert set(counter.layers_per_step) == {num_layers}

    prompt, images = vicuna_prompt("What is shown in this image?", 1), [make_image(400, 300, 3)]
    with BuildCounter(runner) as counter:
        (output,) = llm_next.generate([{"prompt": prompt, "multi_modal_data": {"image": images}}], greedy)
    assert list(output.outputs[0].token_ids) == reference.generate(tiny_next, prompt, images, NEW_TOKENS)
    # Prefill and every decode step after it: the classes' compacted lengths differ.
    assert set(counter.builds_per_step) == {num_classes}
    assert set(counter.layers_per_step) == {num_layers}


def test_custom_ops_are_traced_native_and_run_their_kernel_eagerly():
    """Routed steps run eagerly: there a vLLM custom op calls its CUDA kernel; what torch.compile
    traces (every other step) keeps the native code Inductor fuses."""
    import torch

    from pmod_serve.model_executor.models.pmod_llava import _native_when_compiling

    calls: list[str] = []

    def native(x):
        calls.append("native")
        return x + 1

    def kernel(x):
        calls.append("kernel")
        return x + 1

    forward = _native_when_compiling(native, kernel)
    x = torch.zeros(3)
    forward(x)
    assert calls == ["kernel"]
    calls.clear()
    torch._dynamo.reset()
    torch.compile(forward, backend="eager", fullgraph=True)(x)
    assert calls == ["native"]


def _fields(metadata) -> dict:
    return {field.name: getattr(metadata, field.name) for field in dataclasses.fields(metadata)}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a == b


def test_flash_attention_classes_derived_from_one_build_equal_a_build_per_class(llm_next):
    """On GPUs (FlashAttention) a step builds class 0's metadata only; every other class's is
    derived from it. Checked here with vLLM's own FlashAttention builder on the CPU engine's real
    steps (an image prefill and decodes, so the classes' lengths differ): every layer's derived
    metadata equals, field by field, that builder's build of the layer's class with the layer's
    own block table and slot mapping. Fails when vLLM adds a field that depends on lengths.
    (FA3's ahead-of-time scheduler metadata, None in a derived class, is not built on a CPU.)"""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

    from pmod_serve.v1.worker.model_runner import _derived_class_fields

    runner = engine_runner(llm_next)
    stack = runner._pmod_stack
    spec = stack.builders[0].kv_cache_spec
    flash = FlashAttentionMetadataBuilder(spec, list(stack.layer_names), runner.vllm_config, runner.device)
    fields = _derived_class_fields(flash)
    assert fields == {"scheduler_metadata": None}

    compared: list[tuple[int, bool]] = []  # (classes with distinct lengths, prefill) per step
    original = runner._build_pmod_attention_metadata

    def checked(stack, **kwargs):
        # The step as the CPU runs it, recording what each class's build was given.
        given: dict[int, object] = {}
        builds = [builder.build for builder in stack.builders]

        def recording(k, build):
            def record(common_prefix_len, common_attn_metadata, **kw):
                given[k] = common_attn_metadata
                return build(common_prefix_len, common_attn_metadata, **kw)

            return record

        for k, builder in enumerate(stack.builders):
            builder.build = recording(k, builds[k])
        try:
            metadata = original(stack, **kwargs)
        finally:
            for builder, build in zip(stack.builders, builds):
                builder.build = build
        if not kwargs.get("num_tokens") or len(given) != stack.num_classes:
            return metadata
        # The same step through the derived path, with vLLM's FlashAttention builder.
        builders, derived_fields = stack.builders, stack.derived_class_fields
        stack.builders, stack.derived_class_fields = [flash], fields
        try:
            derived = original(stack, **kwargs)
        finally:
            stack.builders, stack.derived_class_fields = builders, derived_fields
        for layer, name in enumerate(stack.layer_names):
            k = int(stack.class_of_layer[layer])
            cpu = metadata[name]
            expected = flash.update_block_table(
                flash.build(common_prefix_len=0, common_attn_metadata=given[k]), cpu.block_table, cpu.slot_mapping
            )
            got, want = _fields(derived[name]), _fields(expected)
            assert got.keys() == want.keys()
            different = [field for field in want if not _same(got[field], want[field])]
            assert not different, f"layer {layer} (class {k}): {different}"
        lengths = {tuple(given[k].seq_lens.tolist()) for k in given}
        compared.append((len(lengths), given[0].max_query_len > 1))
        return metadata

    runner._build_pmod_attention_metadata = checked
    try:
        greedy = SamplingParams(temperature=0.0, max_tokens=4)
        prompt = vicuna_prompt("What is shown in this image?", 1)
        llm_next.generate([{"prompt": prompt, "multi_modal_data": {"image": [make_image(400, 300, 5)]}}], greedy)
    finally:
        del runner._build_pmod_attention_metadata
    assert any(prefill for _, prefill in compared) and any(not prefill for _, prefill in compared)
    assert all(distinct > 2 for distinct, _ in compared)
