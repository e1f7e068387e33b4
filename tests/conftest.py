"""Shared fixtures: tiny checkpoints, test images, cached reference outputs, shared engines.

Engines are expensive on CPU (~30-60 s to start), so each kind is started once per session.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Before anything imports vLLM.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
# Trust the CPU flags instead of compiling one probe program per vector ISA at every start.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Engines in this process run their core in-process, so tests can read the scheduler's state.
# (Server tests start their own processes with vLLM's default multiprocessing.)
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("PMOD_TEST_CACHE", REPO / ".cache" / "tests"))

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def vicuna_prompt(question: str, num_images: int) -> str:
    """The released single-turn vicuna_v1 prompt, images first."""
    images = "<image>\n" * num_images
    return f"{VICUNA_SYSTEM} USER: {images}{question} ASSISTANT:"


def make_image(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic image with structure (gradients plus noise), not pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [(x * (seed + 1) * 7) % 256, (y * (seed + 3) * 5) % 256, ((x + y) * (seed + 5)) % 256], axis=-1
    )
    noise = rng.integers(0, 64, (height, width, 3))
    return Image.fromarray(((base + noise) % 256).astype(np.uint8))


@pytest.fixture(scope="session")
def tiny_next() -> Path:
    from model_registry import build_tiny_checkpoint

    return build_tiny_checkpoint(CACHE / "tiny-next", variant="next", seed=0)


@pytest.fixture(scope="session")
def tiny_v15() -> Path:
    from model_registry import build_tiny_checkpoint

    return build_tiny_checkpoint(CACHE / "tiny-v15", variant="v15", seed=0)


class ReferenceCache:
    """`PmodReference.generate` results, cached on disk by checkpoint, prompt and images."""

    def __init__(self) -> None:
        self._references: dict[Path, object] = {}

    def generate(self, checkpoint: Path, prompt: str, images: list[Image.Image], max_new_tokens: int) -> list[int]:
        stamp = (checkpoint / ".pmod_tiny_stamp.json").read_text() if (checkpoint / ".pmod_tiny_stamp.json").exists() else str(checkpoint)
        key = hashlib.sha256(
            json.dumps([stamp, prompt, max_new_tokens]).encode()
            + b"".join(image.tobytes() + repr(image.size).encode() for image in images)
        ).hexdigest()[:24]
        path = CACHE / "reference" / f"{key}.json"
        if path.exists():
            return json.loads(path.read_text())
        if checkpoint not in self._references:
            from pmod_serve.reference import PmodReference

            self._references[checkpoint] = PmodReference(checkpoint)
        ids = self._references[checkpoint].generate(prompt, images, max_new_tokens)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ids))
        return ids


@pytest.fixture(scope="session")
def reference() -> ReferenceCache:
    return ReferenceCache()


def make_llm(checkpoint: Path, **kwargs):
    from vllm import LLM

    kwargs.setdefault("max_model_len", 4096)
    return LLM(model=str(checkpoint), dtype="float32", seed=0, **kwargs)


@pytest.fixture(scope="session")
def llm_next(tiny_next):
    """One in-process engine (so tests can read its scheduler) for the tiny NeXT checkpoint."""
    llm = make_llm(tiny_next)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def engine_scheduler(llm):
    """The scheduler of an in-process engine."""
    return llm.llm_engine.engine_core.engine_core.scheduler
