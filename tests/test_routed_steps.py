"""Steps that route visual tokens run their whole decoder (`RoutedSteps.decoder`) as one graph,
compiled once for every token count and batch. On GPUs that is inductor; here the `llm_prefix`
engine traces it with torch.compile's `aot_eager` backend, so what dynamo captures (modules
inlined, dynamic token counts, no graph break) is what computes the tokens."""

from __future__ import annotations

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
