"""The plain-PyTorch reference (pmod_reference.model) agrees token for token with the independent
implementation of the spec (tests/independent_impl.py) on the tiny checkpoints of model_registry.

The foreign checkpoints, which this project's builder did not produce, are in
test_independent_crosscheck_foreign.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from independent_impl import IndependentPmod, sample_image, vicuna_prompt

from model_registry.tiny import build_tiny_checkpoint

pytest.importorskip("pmod_reference.model")

MAX_NEW_TOKENS = 16
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
# (image sizes, prompt): every single-image size of the issue, two images, text only, and a
# multi-turn prompt whose "</s>" must be the EOS id in both tokenisers.
CASES = {
    "672x672": ([(672, 672)], vicuna_prompt("What is in the image?", 1)),
    "400x300": ([(400, 300)], vicuna_prompt("Describe the image in detail.", 1)),
    "300x700": ([(300, 700)], vicuna_prompt("What is in the image?", 1)),
    "1000x200": ([(1000, 200)], vicuna_prompt("What is written on the sign?", 1)),
    "336x336": ([(336, 336)], vicuna_prompt("What is this?", 1)),
    "two-images": ([(400, 300), (300, 700)], vicuna_prompt("Compare the two images.", 2)),
    "text-only": ([], vicuna_prompt("Tell me a story about a cat.", 0)),
    "multi-turn": (
        [(500, 400), (336, 600)],
        f"{SYSTEM} USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: <image>\nAnd this one? ASSISTANT:",
    ),
}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.getbasetemp() / "pmod-independent"
    return {variant: build_tiny_checkpoint(root / f"tiny-{variant}", variant, seed=0) for variant in ("next", "v15")}


_MODELS: dict[tuple[str, Path], object] = {}


def models(checkpoint: Path):
    from pmod_reference.model import PmodReference

    if ("ref", checkpoint) not in _MODELS:
        _MODELS["ref", checkpoint] = PmodReference(checkpoint)
        _MODELS["ind", checkpoint] = IndependentPmod(checkpoint)
    return _MODELS["ref", checkpoint], _MODELS["ind", checkpoint]


def assert_same_generation(checkpoint: Path, case: str) -> None:
    sizes, prompt = CASES[case]
    images = [sample_image(width, height, seed=number + 7) for number, (width, height) in enumerate(sizes)]
    reference, independent = models(checkpoint)
    expected = independent.generate(prompt, images, MAX_NEW_TOKENS)
    actual = reference.generate(prompt, images, MAX_NEW_TOKENS)
    assert len(expected) == MAX_NEW_TOKENS or expected[-1] == 2
    first_difference = next((i for i, (a, b) in enumerate(zip(actual, expected, strict=False)) if a != b), None)
    assert actual == expected, f"{checkpoint.name} {case}: first difference at token {first_difference}"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant", ["next", "v15"])
def test_reference_matches_independent_implementation(tiny, variant, case):
    assert_same_generation(tiny[variant], case)
