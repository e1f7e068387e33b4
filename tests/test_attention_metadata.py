"""Attention metadata per step: one build per retention-ratio class, or one for the whole stack
when no request of the step has skipped a token (text only), and tokens still equal the reference."""

from __future__ import annotations

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
