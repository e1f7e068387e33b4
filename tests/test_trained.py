"""The trained tiny p-MoD model (`pmod_train`): training, accuracy served through vLLM, exactness
against the reference, routing maps.

The accuracy threshold comes from the committed table (`benchmarks/results/accuracy.json`): the
served model must stay within `ACCURACY_MARGIN` of the p-MoD accuracy measured there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_llm
from vllm import SamplingParams

from pmod_train import forward, shapes, train
from pmod_train.paths import PMOD_CHECKPOINT

NUM_HELDOUT = 40  # the first 40 pictures of the benchmark's held-out stream
ACCURACY_MARGIN = 0.1
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def reference(single_thread):
    from pmod_reference.model import PmodReference

    return PmodReference(PMOD_CHECKPOINT)


@pytest.fixture(scope="module")
def heldout() -> list[shapes.Example]:
    return shapes.heldout(NUM_HELDOUT)


@pytest.fixture(scope="session")
def llm_trained():
    """In-process engines share vLLM's process-global state: like conftest's, this one lives until
    the test process exits (a module-scoped engine, collected early, would break the others)."""
    return make_llm(PMOD_CHECKPOINT, max_model_len=512)


@pytest.fixture(scope="module")
def served(heldout, llm_trained):
    """Greedy outputs of the trained p-MoD checkpoint, served by vLLM with the plugin."""
    llm = llm_trained
    requests = [{"prompt": forward.vicuna_prompt(e.question), "multi_modal_data": {"image": [e.image]}}
                for e in heldout]
    return llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS))


def test_training_steps_reduce_the_loss_deterministically(tmp_path: Path, single_thread):
    from pmod_train.checkpoint import build_initial_checkpoint

    init = build_initial_checkpoint(tmp_path / "init", dense=False, seed=0)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        reference = train.load_trainable(init)
        runs.append(train.train_steps(reference, 6, batch_size=4, lr=2e-3, warmup=1, weight_decay=0.01,
                                      seed=0, total_steps=6))
    first, second = runs
    assert first == second  # same seed, same threads: bit-identical losses
    assert first[-1] < 0.7 * first[0], first


def test_batched_training_forward_is_the_reference(reference):
    """The training forward (batched, shared prefix) gives the reference's hidden states and kept tokens."""
    from pmod_reference.model import LayerKVCache

    conversations = [shapes.conversation(7, i) for i in range(3)]
    batch = forward.make_batch(reference, [image for image, _ in conversations], [t for _, t in conversations])
    prefix = batch.prefix_embeds.shape[1]
    with torch.no_grad():
        hidden, routings = forward.decoder_forward(reference, batch)
        for row, (image, turns) in enumerate(conversations):
            inputs = reference.prompt_inputs(forward.vicuna_prompt(turns[0][0]), [image])
            ids = list(inputs.token_ids)
            for number, (question, answer) in enumerate(turns):
                if number:
                    ids += reference.tokenizer.encode(f"USER: {question} ASSISTANT:")
                ids += forward.answer_ids(reference, answer)
            fed = ids[len(inputs.token_ids) : -1]
            embeds = torch.cat([reference.embed_prompt(inputs, [image]), reference.model.embed_tokens(torch.tensor(fed))])
            mask = torch.zeros(len(embeds), dtype=torch.bool)
            mask[: len(inputs.token_ids)] = inputs.target_mask
            expected, expected_routings = reference.model(
                embeds, torch.arange(len(embeds)), [LayerKVCache() for _ in reference.model.layers], mask)
            length = len(embeds) - prefix
            torch.testing.assert_close(hidden[row, :length], expected[prefix:], rtol=1e-5, atol=1e-5)
            assert sorted(routings) == sorted(expected_routings)
            for layer, routing in expected_routings.items():
                kept = [i - prefix for i in routing.kept_indices.tolist() if i >= prefix]
                assert routing.kept_indices[:prefix].tolist() == list(range(prefix))
                assert routings[layer].kept_index[row, : len(kept)].tolist() == kept, layer


def test_served_accuracy_above_committed_threshold(served, heldout):
    committed = json.loads((REPO / "benchmarks" / "results" / "accuracy.json").read_text())
    threshold = committed["pmod_accuracy"] - ACCURACY_MARGIN
    answers = [output.outputs[0].text for output in served]
    right = sum(answer.strip().lower().rstrip(".") == e.answer for answer, e in zip(answers, heldout))
    accuracy = right / len(heldout)
    assert accuracy >= threshold, (accuracy, threshold, list(zip(answers, [e.answer for e in heldout])))


def test_served_tokens_equal_reference_on_trained_checkpoint(served, heldout, reference):
    for output, example in zip(served, heldout):
        expected = reference.generate(forward.vicuna_prompt(example.question), [example.image], MAX_NEW_TOKENS)
        assert list(output.outputs[0].token_ids) == expected, example.question


def test_routing_map_keeps_what_the_schedule_says(reference, tmp_path: Path):
    from pmod_train import routing_map

    example = shapes.example(shapes.HELDOUT_SEED, 3)
    routing = routing_map.compute(reference, example.image, example.question)
    expected = routing_map.expected_counts(routing)
    assert sorted(routing.kept) == sorted(reference.schedule.retention_ratio)
    assert {layer: len(kept) for layer, kept in routing.kept.items()} == expected
    assert all(0 <= i < routing.grid**2 for kept in routing.kept.values() for i in kept)
    out = routing_map.draw(reference, example.image, routing, tmp_path / "map.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
