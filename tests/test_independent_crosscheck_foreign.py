"""The reference agrees token for token with the independent implementation on checkpoints in the
released layout that this project did not produce (transformers' LLaMA and CLIP modules, renamed,
PyTorch .bin shards; see independent_impl.make_foreign_checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest
from independent_impl import make_foreign_checkpoint
from test_independent_crosscheck import CASES, assert_same_generation

pytestmark = pytest.mark.usefixtures("single_thread")

pytest.importorskip("pmod_reference.model")


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.getbasetemp() / "pmod-independent"
    return {variant: make_foreign_checkpoint(root / f"foreign-{variant}", variant, seed=0)
            for variant in ("next", "v15")}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant", ["next", "v15"])
def test_reference_matches_independent_implementation_on_foreign_checkpoints(foreign, variant, case):
    assert_same_generation(foreign[variant], case)
