"""Steps that route visual tokens run their whole decoder (`RoutedSteps.decoder`) as one graph,
compiled once for every token count and batch, when `PMOD_ROUTED_STEP_COMPILE` names a backend (inductor on GPUs); here the `llm_prefix`
engine traces it with torch.compile's `aot_eager` backend, so what dynamo captures (modules
inlined, dynamic token counts, no graph break) is what computes the tokens."""

from __future__ import annotations

import logging

from conftest import engine_runner, make_image, vicuna_prompt
from vllm import SamplingParams

NEW_TOKENS = 12


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_traced_routed_steps_match_reference_without_recompiling(llm_prefix, tiny_next, reference):
    model = engine_runner(llm_prefix)._pmod_model()
    assert model.model.routed_steps.backend == "aot_eager"
    graphs = unique_graphs()
    assert graphs > 0  # the worker compiled the decoder at start-up (`warm_up_routed_steps`)

    # A batch routes several requests at once (several top-k segments), then a two-image prompt;
    # fresh images, so every prefill routes (a prefix-cache hit covers at most the system prompt).
    cases = [(vicuna_prompt("What is shown in this image?", 1), [make_image(w, h, 700 + seed)])
             for seed, (w, h) in enumerate([(400, 300), (300, 700), (672, 672)])]
    cases.append((vicuna_prompt("Compare the two images.", 2), [make_image(400, 300, 711), make_image(336, 900, 712)]))
    outputs = llm_prefix.generate(
        [{"prompt": prompt, "multi_modal_data": {"image": images}} for prompt, images in cases[:3]],
        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS),
    )
    outputs += llm_prefix.generate([{"prompt": cases[3][0], "multi_modal_data": {"image": cases[3][1]}}],
                                   SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))
    for (prompt, images), output in zip(cases, outputs):
        assert list(output.outputs[0].token_ids) == reference.generate(tiny_next, prompt, images, NEW_TOKENS)
    # Warm-up compiled every piece for any token count: new sizes and batches reuse the graphs.
    assert unique_graphs() == graphs


def test_steps_too_small_to_compile_run_eagerly(llm_prefix):
    """torch.compile specialises sizes 0 and 1 (one target in a step, a layer keeping one token:
    a new graph to compile in the middle of serving, a minute on a 7B) and cannot trace a layer
    that keeps no token. Such steps run eagerly; the others reuse the start-up graph."""
    import torch
    from vllm.forward_context import set_forward_context

    from pmod_serve.pmod.routing import RoutingPlan

    model = engine_runner(llm_prefix)._pmod_model()
    steps = model.model.routed_steps
    graphs = unique_graphs()
    generator = torch.Generator().manual_seed(0)
    # (tokens in the step, targets per routed request, whether it runs compiled)
    cases = [(50, [1], False), (2, [1], False), (7, [6], False), (3, [3], False),
             (200, [1, 150], True), (300, [200], True)]
    for num_tokens, segments, compiled in cases:
        plan = RoutingPlan.of(segments, model.model.retention_ratios)
        # Inputs made outside inference mode, as the runner's (inference tensors would be
        # another graph's inputs).
        routing = plan.routing(torch.arange(num_tokens - sum(segments), num_tokens))
        assert steps.compiles(routing, num_tokens) is compiled, (num_tokens, segments)
        positions = torch.arange(num_tokens)
        embeddings = torch.randn(num_tokens, model.config.hidden_size, generator=generator) * 0.02
        model.set_pmod_routing(routing)
        try:
            # No attention metadata: attention is skipped, as in the start-up warm-up (so the
            # values are not meaningful; what matters is which path ran and what it compiled).
            with torch.inference_mode(), set_forward_context(None, model.vllm_config):
                hidden = model.forward(None, positions, inputs_embeds=embeddings)
        finally:
            model.set_pmod_routing(None)
        assert hidden.shape == (num_tokens, model.config.hidden_size)
    assert unique_graphs() == graphs


def test_steps_of_more_targets_than_the_limit_run_eagerly(llm_prefix):
    """`PMOD_ROUTED_STEP_COMPILE_MAX_TARGETS` (4,096 by default; this engine lifts it): a step
    with more targets runs eagerly, whatever its number of requests; a limit that leaves the
    start-up warm-up nothing to compile is refused."""
    import dataclasses

    import pytest
    import torch

    from pmod_serve.pmod.routing import RoutingPlan

    model = engine_runner(llm_prefix)._pmod_model()
    limited = dataclasses.replace(model.model.routed_steps, max_targets=199)
    for num_tokens, segments, compiled in [(300, [200], False), (300, [199], True), (400, [150, 100], False),
                                           (200, [1, 150], True)]:
        routing = RoutingPlan.of(segments, model.model.retention_ratios).routing(
            torch.arange(num_tokens - sum(segments), num_tokens))
        assert limited.compiles(routing, num_tokens) is compiled, (num_tokens, segments)

    steps = model.model.routed_steps
    model.model.routed_steps = dataclasses.replace(steps, max_targets=1)
    try:
        with pytest.raises(ValueError, match="PMOD_ROUTED_STEP_COMPILE_MAX_TARGETS=1 leaves no step to compile"):
            model.warm_up_routed_steps()
    finally:
        model.model.routed_steps = steps


def test_routed_steps_run_eagerly_unless_a_backend_is_asked_for(monkeypatch, caplog):
    """Eager by default (measured faster end to end on a GPU); a torch.compile backend when
    `PMOD_ROUTED_STEP_COMPILE` names one, with a warning for inductor outside the configuration
    whose compiled decoder was checked on a GPU (CUDA, vLLM compiling, one GPU per engine,
    unquantized)."""
    from types import SimpleNamespace

    from vllm.config import CompilationMode

    from pmod_serve.model_executor.models import pmod_llava

    def backend(mode=CompilationMode.VLLM_COMPILE, tensor_parallel=1, quantization=None, kv_cache_dtype="auto",
                elementwise_norm=True):
        config = SimpleNamespace(compilation_config=SimpleNamespace(mode=mode),
                                 parallel_config=SimpleNamespace(tensor_parallel_size=tensor_parallel),
                                 model_config=SimpleNamespace(quantization=quantization),
                                 cache_config=SimpleNamespace(cache_dtype=kv_cache_dtype))
        schedule = SimpleNamespace(weight_norm=SimpleNamespace(elementwise=elementwise_norm))
        return pmod_llava.routed_step_backend(schedule, config)

    def warned(**settings) -> bool:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vllm.pmod_serve"):
            assert backend(**settings) == "inductor"
        return "not checked" in caplog.text

    monkeypatch.delenv("PMOD_ROUTED_STEP_COMPILE", raising=False)
    monkeypatch.setattr(pmod_llava.current_platform, "is_cuda", lambda: True)
    assert backend() is None
    monkeypatch.setenv("PMOD_ROUTED_STEP_COMPILE", "inductor")
    assert not warned()
    assert warned(mode=CompilationMode.NONE)  # --enforce-eager
    assert warned(tensor_parallel=2)
    assert warned(quantization="fp8")
    assert warned(kv_cache_dtype="fp8")
    assert backend(elementwise_norm=False) is None  # a softmax router norm: per request, eager
    monkeypatch.setattr(pmod_llava.current_platform, "is_cuda", lambda: False)
    assert warned()  # a CPU
    monkeypatch.setenv("PMOD_ROUTED_STEP_COMPILE", "aot_eager")
    assert backend(tensor_parallel=2) == "aot_eager"
