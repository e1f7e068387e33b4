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

# Fixtures that start a vLLM engine or server: a test that uses one (directly or through another
# fixture) is marked `engine`, so `make test-fast` (`-m "not engine"`) leaves it out. Modules
# that start engines themselves declare `pytestmark = pytest.mark.engine`.
ENGINE_FIXTURES = {
    "llm_next", "llm_v15", "llm_small_pool", "llm_trained", "served",  # in-process engines
    "llm_prefix", "llm_prefix_small_pool",
    "pmod_server", "plain_server", "plain_vllm_server", "keyed_servers", "server",  # server processes
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if ENGINE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.engine)

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)



@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: the reference's models are tiny, and two OpenMP threads on a busy
    2-core machine spin against other processes (10x slower). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

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


# Reference tokens committed for the platform CI runs on, so a clean clone does not recompute
# them (minutes of float32 CPU work). Per platform: float32 near-ties may break differently on
# another CPU or torch build; elsewhere they are computed and cached as before.
# Refresh: python -m pytest, then copy .cache/tests/reference/*.json into the platform's folder.
GOLDEN_REFERENCE = Path(__file__).parent / "golden" / "reference"


def reference_platform() -> str:
    import platform

    import torch

    return f"{platform.machine()}-torch{torch.__version__}"


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
        golden = GOLDEN_REFERENCE / reference_platform() / f"{key}.json"
        if golden.exists():
            return json.loads(golden.read_text())
        path = CACHE / "reference" / f"{key}.json"
        if path.exists():
            return json.loads(path.read_text())
        if checkpoint not in self._references:
            from pmod_reference.model import PmodReference

            self._references[checkpoint] = PmodReference(checkpoint)
        # One thread: on a 2-core machine shared with engine threads, two are 3-20x slower.
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            ids = self._references[checkpoint].generate(prompt, images, max_new_tokens)
        finally:
            torch.set_num_threads(threads)
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


# In-process engines share vLLM's process-global distributed state: shutting one down (or letting
# it be garbage-collected) would break the others. They are therefore all session-scoped and
# live until the test process exits.


@pytest.fixture(scope="session")
def llm_next(tiny_next):
    """One in-process engine (so tests can read its scheduler) for the tiny NeXT checkpoint."""
    return make_llm(tiny_next)


@pytest.fixture(scope="session")
def llm_v15(tiny_v15):
    return make_llm(tiny_v15)


@pytest.fixture(scope="session")
def llm_small_pool(tiny_next):
    """384 layer-blocks: one 1536-token request in a dense layout (vLLM's start-up minimum) and
    about two of the preemption test's image requests; their decode growth forces preemption."""
    return make_llm(tiny_next, num_gpu_blocks_override=384, max_model_len=1536, max_num_seqs=4)


@pytest.fixture(scope="session")
def llm_prefix(tiny_next):
    """Prefix caching (on by default) with 32-token blocks, so that hits past an image are
    reached with short turns; vLLM's statistics on (`LLM.get_metrics`). Its routed steps run
    through torch.compile (the `aot_eager` backend: traced like on a GPU, without generating
    code), the way GPUs run them, instead of eagerly like the other CPU engines."""
    previous = os.environ.get("PMOD_ROUTED_STEP_COMPILE")
    os.environ["PMOD_ROUTED_STEP_COMPILE"] = "aot_eager"
    try:
        return make_llm(tiny_next, block_size=32, disable_log_stats=False)
    finally:
        if previous is None:
            del os.environ["PMOD_ROUTED_STEP_COMPILE"]
        else:
            os.environ["PMOD_ROUTED_STEP_COMPILE"] = previous


@pytest.fixture(scope="session")
def llm_prefix_small_pool(tiny_v15):
    """32-token blocks and 1056 layer-blocks (about one 1024-token request in a dense layout,
    vLLM's start-up minimum): requests sharing an image prefix still preempt each other."""
    return make_llm(tiny_v15, block_size=32, num_gpu_blocks_override=1056, max_model_len=1024, max_num_seqs=4)


def engine_scheduler(llm):
    """The scheduler of an in-process engine."""
    return llm.llm_engine.engine_core.engine_core.scheduler


def engine_runner(llm):
    """The model runner of an in-process engine (one worker)."""
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner


# --- real server processes ---------------------------------------------------------------------

class ServerProcess:
    """A `pmod-serve` / `vllm serve` process on a free loopback port, stopped at teardown."""

    def __init__(self, command: list[str], model: str, log_path: Path) -> None:
        import socket
        import subprocess

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.model = model
        self.log_path = log_path
        env = dict(os.environ)
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # servers use vLLM's default processes
        env.pop("PMOD_METRICS_DIR", None)  # each server gets its own metrics directory
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )

    def wait_ready(self, timeout: float = 600) -> None:
        from pmod_serve.entrypoints.demo import wait_healthy

        try:
            wait_healthy(self.base_url, self.process, timeout)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}; log: {self.log_path}") from exc

    def stop(self) -> None:
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except Exception:
                os.killpg(self.process.pid, signal.SIGKILL)
        self._log.close()

    def metrics(self) -> dict[str, float]:
        """pmod_* samples of /metrics (summed over label sets; buckets left out)."""
        from pmod_serve.entrypoints.demo import pmod_metrics

        return pmod_metrics(self.base_url)


VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"


# The test image host of `pmod_server`: a loopback address of its own, so that every other
# loopback address (127.0.0.1, localhost, 127.0.0.2, ::1) stays refused on that server too.
ALLOWED_IMAGE_HOST = "127.0.0.3"


@pytest.fixture(scope="session")
def pmod_server(tiny_next, tmp_path_factory):
    """`pmod-serve` on the tiny NeXT checkpoint; image URLs on ALLOWED_IMAGE_HOST allowed."""
    server = ServerProcess(
        [str(VENV_BIN / "pmod-serve"), str(tiny_next), "--served-model-name", "pmod-tiny",
         "--max-model-len", "4096", "--dtype", "float32", "--media-allow-host", ALLOWED_IMAGE_HOST],
        model="pmod-tiny",
        log_path=tmp_path_factory.mktemp("logs") / "pmod-serve.log",
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def plain_server(tiny_next, tmp_path_factory):
    """Plain `vllm serve <checkpoint>` with no flag but the address, as the README's first line.
    (vLLM serves the float32 checkpoint in bfloat16 here: no token-exact comparisons.)"""
    server = ServerProcess([str(VENV_BIN / "vllm"), "serve", str(tiny_next)], model=str(tiny_next),
                           log_path=tmp_path_factory.mktemp("logs") / "vllm-serve.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
