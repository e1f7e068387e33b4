"""Attention metadata per step: one build (class 0's) where the backend lets the other
retention-ratio classes derive theirs from it (FlashAttention, the CPU backend); otherwise one
build per class, or one for the whole stack when no request of the step has skipped a token
(text only). Derived metadata equals a build per class, field by field; tokens equal the reference."""

from __future__ import annotations

import contextlib
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


def class_builders(runner, builder_cls) -> list:
    """A `builder_cls` builder for each retention-ratio class's layers."""
    stack = runner._pmod_stack
    spec = stack.builders[0].kv_cache_spec
    return [builder_cls(spec, [stack.layer_names[layer] for layer in layers], runner.vllm_config, runner.device)
            for layers in stack.class_layers]


@contextlib.contextmanager
def stack_builds(stack, builders: list, deriver, shared_builds: bool):
    """The stack builds its metadata with `builders` and `deriver` (None: a build per class,
    one per step with `shared_builds` when every class has the same lengths)."""
    saved = stack.builders, stack.class_field_deriver, stack.shared_builds
    stack.builders, stack.class_field_deriver, stack.shared_builds = builders, deriver, shared_builds
    try:
        yield
    finally:
        stack.builders, stack.class_field_deriver, stack.shared_builds = saved


def test_one_build_per_step_on_cpu_and_one_per_class_without_derivation(llm_next, tiny_next, reference):
    runner = engine_runner(llm_next)
    stack = runner._pmod_stack
    num_layers, num_classes = len(stack.layer_names), stack.num_classes
    assert num_classes > 2  # the tiny released-layout checkpoint keeps several ratios
    assert stack.class_field_deriver is not None and len(stack.builders) == 1
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    text = vicuna_prompt("Tell me about cats and dogs.", 0)
    prompt, images = vicuna_prompt("What is shown in this image?", 1), [make_image(400, 300, 3)]

    for per_class in (False, True):
        with contextlib.ExitStack() as mode:
            if per_class:  # as backends without derivation run it
                mode.enter_context(stack_builds(stack, class_builders(runner, type(stack.builders[0])), None, True))
            with BuildCounter(runner) as counter:
                (output,) = llm_next.generate([{"prompt": text}], greedy)
            assert list(output.outputs[0].token_ids) == reference.generate(tiny_next, text, [], NEW_TOKENS)
            assert counter.builds_per_step and set(counter.builds_per_step) == {1}
            assert set(counter.layers_per_step) == {num_layers}

            with BuildCounter(runner) as counter:
                (output,) = llm_next.generate([{"prompt": prompt, "multi_modal_data": {"image": images}}], greedy)
            assert list(output.outputs[0].token_ids) == reference.generate(tiny_next, prompt, images, NEW_TOKENS)
            # Prefill and every decode step after it: the classes' compacted lengths differ.
            assert set(counter.builds_per_step) == ({num_classes} if per_class else {1})
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


def _same_kind(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and (a.shape, a.dtype) == (b.shape, b.dtype)
    return a == b


def _fields(metadata) -> dict:
    return {field.name: getattr(metadata, field.name) for field in dataclasses.fields(metadata)}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a == b


def check_derived_equals_per_class(runner, llm, builder_cls, requests, opaque=None) -> list[tuple[int, bool]]:
    """Every step of `requests` through the engine, and beside it twice more with `builder_cls`:
    one build per class (the reference), and one build with the other classes derived. Every
    layer's derived metadata must equal the reference's, field by field; `opaque` maps a field
    that cannot be compared by value to a check of the derived metadata's fields instead. Per
    step: (classes with distinct lengths, prefill)."""
    from pmod_serve.v1.worker.model_runner import _class_field_deriver

    opaque = opaque or {}
    stack = runner._pmod_stack
    one = builder_cls(stack.builders[0].kv_cache_spec, list(stack.layer_names), runner.vllm_config, runner.device)
    deriver = _class_field_deriver(one)
    assert deriver is not None
    per_class = class_builders(runner, builder_cls)
    steps: list[tuple[int, bool]] = []
    original = runner._build_pmod_attention_metadata

    def run_as(builders, derive, **kwargs):
        with stack_builds(stack, builders, derive, shared_builds=derive is None):
            return original(stack, **kwargs)

    def checked(stack_, **kwargs):
        metadata = original(stack_, **kwargs)
        if not kwargs.get("num_tokens"):
            return metadata
        expected = run_as(per_class, None, **kwargs)
        derived = run_as([one], deriver, **kwargs)
        assert derived.keys() == expected.keys() == metadata.keys()
        for layer, name in enumerate(stack.layer_names):
            got, want = _fields(derived[name]), _fields(expected[name])
            assert got.keys() == want.keys()
            different = [field for field in want if field not in opaque and not _same(got[field], want[field])]
            different += [field for field, check in opaque.items()
                          if not (_same_kind(got[field], want[field]) and check(got))]
            assert not different, f"layer {layer} (class {int(stack.class_of_layer[layer])}): {different}"
        class_seq_lens = {tuple(expected[stack.layer_names[layers[0]]].seq_lens.tolist()) for layers in stack.class_layers}
        steps.append((len(class_seq_lens), kwargs["max_query_len"] > 1))
        return metadata

    runner._build_pmod_attention_metadata = checked
    try:
        for request in requests:  # one at a time: a text-only step has equal lengths in every class
            llm.generate([request], SamplingParams(temperature=0.0, max_tokens=4))
    finally:
        del runner._build_pmod_attention_metadata
    return steps


def test_flash_attention_classes_derived_from_one_build_equal_a_build_per_class(llm_next):
    """On GPUs (FlashAttention) a step builds class 0's metadata only; every other class's is
    derived from it. Checked here with vLLM's own FlashAttention builder on the CPU engine's real
    steps (an image prefill and decodes, so the classes' lengths differ; a text-only request,
    where they are equal). Fails when vLLM adds a field that depends on lengths. (FA3's
    ahead-of-time scheduler metadata, None in a derived class, is not built on a CPU.)"""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

    from pmod_serve.v1.worker.model_runner import _class_field_deriver

    runner = engine_runner(llm_next)
    flash = FlashAttentionMetadataBuilder(runner._pmod_stack.builders[0].kv_cache_spec, ["x"], runner.vllm_config,
                                          runner.device)
    assert _class_field_deriver(flash)({}) == {"scheduler_metadata": None}
    steps = check_derived_equals_per_class(runner, llm_next, FlashAttentionMetadataBuilder, derivation_requests())
    assert any(prefill for _, prefill in steps) and any(not prefill for _, prefill in steps)
    assert any(distinct > 2 for distinct, _ in steps) and any(distinct == 1 for distinct, _ in steps)


def test_cpu_classes_derived_from_one_build_equal_a_build_per_class(llm_next, monkeypatch):
    """The CPU backend derives too (each class with its own scheduler metadata from the kernel's
    scheduler): the same field-by-field check with vLLM's CPU builder. The scheduler metadata
    is an opaque byte buffer (a C++ struct with pointers and unset padding: two calls on the same
    lengths differ), so what is checked is that each layer's came from its own class's lengths."""
    from vllm import _custom_ops
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadataBuilder

    runner = engine_runner(llm_next)
    assert type(runner._pmod_stack.builders[0]) is CPUAttentionMetadataBuilder
    made: list[tuple[torch.Tensor, list[int], list[int]]] = []
    scheduler = _custom_ops.cpu_attn_get_scheduler_metadata

    def recorded(*args, **kwargs):
        result = scheduler(*args, **kwargs)
        made.append((result, kwargs["seq_lens"].tolist(), kwargs["query_start_loc"].tolist()))
        return result

    def from_own_lengths(fields: dict) -> bool:
        (seq_lens, query_start_loc), = [(s, q) for r, s, q in made if r is fields["scheduler_metadata"]]
        return seq_lens == fields["seq_lens"].tolist() and query_start_loc == fields["query_start_loc"].tolist()

    monkeypatch.setattr(_custom_ops, "cpu_attn_get_scheduler_metadata", recorded)
    steps = check_derived_equals_per_class(runner, llm_next, CPUAttentionMetadataBuilder, derivation_requests(),
                                           opaque={"scheduler_metadata": from_own_lengths})
    assert any(prefill for _, prefill in steps) and any(not prefill for _, prefill in steps)
    assert any(distinct > 2 for distinct, _ in steps) and any(distinct == 1 for distinct, _ in steps)


def derivation_requests() -> list[dict]:
    return [{"prompt": vicuna_prompt("What is shown in this image?", 1), "multi_modal_data": {"image": [make_image(400, 300, 5)]}},
            {"prompt": vicuna_prompt("Tell me about cats and dogs.", 0)}]
