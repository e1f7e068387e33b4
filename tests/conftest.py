"""Shared fixtures: tiny checkpoints, test images, cached reference outputs, shared engines.

Engines are expensive on CPU (~30-60 s to start), so each kind is started once per session.
`make test` runs the suite in two processes (pytest-xdist, `--dist loadgroup`): the tests that
share an engine or server run in the process that started it (see SHARED_INSTANCES).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
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
# Under pytest-xdist (`make test`: two test processes on a 2-core machine), one OpenMP thread per
# process, and each process's server engines bound to a core of their own: otherwise in-process
# engines of both processes run 2 threads each on 2 cores and spin against each other, and every
# server's engine binds to core 0 (vLLM's automatic binding reserves the last core).
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... in an xdist worker
if XDIST_WORKER and int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _cores = sorted(os.sched_getaffinity(0))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(_cores[int(XDIST_WORKER[2:]) % len(_cores)]))

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("PMOD_TEST_CACHE", REPO / ".cache" / "tests"))

# Fixtures that start a vLLM engine or server: a test that uses one (directly or through another
# fixture) is marked `engine`, so `make test-fast` (`-m "not engine"`) leaves it out. Modules
# that start engines themselves declare `pytestmark = pytest.mark.engine`.
ENGINE_FIXTURES = {
    "llm_next", "llm_v15", "llm_small_pool", "llm_trained", "served",  # in-process engines
    "llm_prefix", "llm_prefix_small_pool", "llm_two_images_per_step",
    "pmod_server", "plain_server", "plain_vllm_server", "keyed_servers", "server",  # server processes
}


# Engines and servers that live once per test process (session-scoped), by the fixture that
# gives them: under pytest-xdist (`--dist loadgroup`), every test that uses one runs in the same
# process (xdist_group), so each starts once, and a test that reads its counters (metrics
# deltas, an idle block pool) sees no other test's requests in flight. Tests parametrized over
# the `server` fixture below use the server of their parameter.
SHARED_INSTANCES = {
    "pmod_server": "pmod-server", "plain_server": "plain-server", "plain_vllm_server": "plain-server",
    "keyed_servers": "keyed-servers",
    "llm_next": "llm-next", "llm_v15": "llm-v15", "llm_small_pool": "llm-small-pool", "llm_prefix": "llm-prefix",
    "llm_prefix_small_pool": "llm-prefix-small-pool", "llm_trained": "llm-trained", "served": "llm-trained",
    "llm_two_images_per_step": "llm-two-images-per-step",
}
SERVER_PARAMS = {"pmod-serve": "pmod_server", "vllm serve": "plain_server"}
# Modules kept in one process for their session-scoped fixtures (deploy checks run once), and
# the two whose engines bind a thread to each core (data parallel, tensor parallel: both cores
# each), one after the other: side by side, their four bound engines leave the data-parallel
# test's API server too little CPU to sample its metrics while requests run.
MODULE_GROUPS = {"test_deploy.py": "deploy",
                 "test_data_parallel.py": "both-cores", "test_tensor_parallel_cpu.py": "both-cores"}
# Under xdist, these groups are handed out first (one to each process), each starting with its
# soak (test_soak.py: a fixed 50 s of traffic), so that the two soaks run side by side; the
# rest of the suite follows.
FIRST_GROUPS = ("pmod-server", "plain-server")
FIRST_MODULES = ("test_soak.py",)
# Modules whose tests end a shared server (test_shutdown.py: SIGTERM to the API-keyed pmod-serve):
# each runs right after the last other test of its group, whatever the order of collection.
DRAINING_MODULES = ("test_shutdown.py",)


def _instances(item) -> set[str]:
    names = set(getattr(item, "fixturenames", ())) | _session_servers(item)
    return {SHARED_INSTANCES[name] for name in names if name in SHARED_INSTANCES}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups and `-m` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if ENGINE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.engine)
    # One group per shared instance; a test using two joins their groups (none does today).
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    used = {item.nodeid: sorted(_instances(item)) for item in items}
    for names in used.values():
        for name in names[1:]:
            parent[root(name)] = root(names[0])
    for item in items:
        if _group(item):
            continue
        group = root(used[item.nodeid][0]) if used[item.nodeid] else MODULE_GROUPS.get(item.path.name)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    for item in [item for item in items if item.path.name in DRAINING_MODULES and _group(item)]:
        others = [i for i, other in enumerate(items) if _group(other) == _group(item) and other is not item
                  and other.path.name not in DRAINING_MODULES]
        if others and others[-1] > items.index(item):
            items.remove(item)
            items.insert(others[-1], item)  # right after the last other (one place left after the removal)
    if XDIST_WORKER:
        # Hand out the longest groups first, then engine tests, then the rest (with
        # `--no-loadscope-reorder`, xdist follows this order); collection order within each,
        # but FIRST_MODULES first.
        def rank(item) -> tuple[int, bool]:
            tier = 0 if _group(item) in FIRST_GROUPS else 1 if item.get_closest_marker("engine") else 2
            return tier, item.path.name not in FIRST_MODULES

        items.sort(key=rank)
        if os.environ.get(GROUPS_FILE_VAR):
            _write_groups(items, Path(os.environ[GROUPS_FILE_VAR]))


# pytest-xdist 3.8 passes a test's xdist_group to its scheduler by renaming the test's node id,
# which pytest 9.2 no longer lets it do (pytest-xdist issue #1386): `--dist loadgroup` would
# silently spread every group over the workers. So each worker writes the groups of its
# collection to a file the controller names, and the controller's scheduler reads them there.
GROUPS_FILE_VAR = "PMOD_TEST_XDIST_GROUPS"


def _group(item) -> str | None:
    return next((str(m.args[0]) for m in item.iter_markers("xdist_group") if m.args), None)


def _write_groups(items, path: Path) -> None:
    groups = {item.nodeid: group for item in items if (group := _group(item))}
    tmp = path.with_name(f"{path.name}.{XDIST_WORKER}")
    tmp.write_text(json.dumps(groups))
    os.replace(tmp, path)  # every worker collects the same tests, so writes the same groups


def pytest_configure(config):
    if not XDIST_WORKER and getattr(config.option, "dist", "no") == "loadgroup" and not os.environ.get(GROUPS_FILE_VAR):
        import tempfile

        config._pmod_groups_dir = tempfile.mkdtemp(prefix="pmod-xdist-groups-")
        os.environ[GROUPS_FILE_VAR] = str(Path(config._pmod_groups_dir) / "groups.json")  # workers inherit it


def pytest_unconfigure(config):
    directory = getattr(config, "_pmod_groups_dir", None)
    if directory:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
        os.environ.pop(GROUPS_FILE_VAR, None)


try:
    from xdist.scheduler import LoadGroupScheduling
except ImportError:  # pytest-xdist not installed: the suite runs in one process
    LoadGroupScheduling = None
else:

    class _FileGroupScheduling(LoadGroupScheduling):
        """`--dist loadgroup` with the groups the workers wrote (see GROUPS_FILE_VAR)."""

        _groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self._groups is None:  # first called once every worker has collected
                path = os.environ.get(GROUPS_FILE_VAR)
                self._groups = json.loads(Path(path).read_text()) if path and Path(path).exists() else {}
            group = self._groups.get(nodeid)
            return f"group:{group}" if group else super()._split_scope(nodeid)

    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(config, log):
        if config.getvalue("dist") == "loadgroup":
            return _FileGroupScheduling(config, log)
        return None

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


@contextlib.contextmanager
def plugin_log_messages(level: int = logging.INFO):
    """The messages the plugin's logger ("vllm.pmod_serve") emits at `level` or above while
    inside. A handler on that logger itself: vLLM's "vllm" logger stops propagation to the root
    logger (caplog's) once vLLM's logging is configured, which depends on what ran before in the
    same worker."""
    messages: list[str] = []
    handler = logging.Handler(level)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("vllm.pmod_serve")
    previous_level = logger.level
    logger.setLevel(min(level, logger.getEffectiveLevel()))
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


def make_image(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic image with structure (gradients plus noise), not pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [(x * (seed + 1) * 7) % 256, (y * (seed + 3) * 5) % 256, ((x + y) * (seed + 5)) % 256], axis=-1
    )
    noise = rng.integers(0, 64, (height, width, 3))
    return Image.fromarray(((base + noise) % 256).astype(np.uint8))


def cache_lock(name: str):
    """A lock on CACHE/<name> shared by the test processes (pytest-xdist workers, other runs)."""
    from filelock import FileLock

    CACHE.mkdir(parents=True, exist_ok=True)
    return FileLock(str(CACHE / f".{name}.lock"))


@pytest.fixture(scope="session")
def tiny_next() -> Path:
    from model_registry import build_tiny_checkpoint

    with cache_lock("tiny-next"):  # the builder is safe to race; the lock saves the second build
        return build_tiny_checkpoint(CACHE / "tiny-next", variant="next", seed=0)


@pytest.fixture(scope="session")
def tiny_v15() -> Path:
    from model_registry import build_tiny_checkpoint

    with cache_lock("tiny-v15"):
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
        path.parent.mkdir(parents=True, exist_ok=True)
        with cache_lock(f"reference-{key}"):  # another test process may be computing it
            if path.exists():
                return json.loads(path.read_text())
            ids = self._compute(checkpoint, prompt, images, max_new_tokens)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(ids))
            os.replace(tmp, path)  # readers never see a partial file
        return ids

    def _compute(self, checkpoint: Path, prompt: str, images: list[Image.Image], max_new_tokens: int) -> list[int]:
        if checkpoint not in self._references:
            from pmod_reference.model import PmodReference

            self._references[checkpoint] = PmodReference(checkpoint)
        # One thread: on a 2-core machine shared with engine threads, two are 3-20x slower.
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._references[checkpoint].generate(prompt, images, max_new_tokens)
        finally:
            torch.set_num_threads(threads)


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
    code), the way GPUs run them, instead of eagerly like the other CPU engines; steps of any
    number of targets, so that steps of several images run compiled too (on a GPU, by default,
    only steps of at most 4,096 targets do: `PMOD_ROUTED_STEP_COMPILE_MAX_TARGETS`)."""
    settings = {"PMOD_ROUTED_STEP_COMPILE": "aot_eager", "PMOD_ROUTED_STEP_COMPILE_MAX_TARGETS": "1000000"}
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        return make_llm(tiny_next, block_size=32, disable_log_stats=False)
    finally:
        for name, value in previous.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def llm_two_images_per_step(tiny_next):
    """An 8192-token step budget, as vLLM's API server sets on large GPUs: two 672x672 images
    (2,928 visual tokens each) per step."""
    return make_llm(tiny_next, max_num_batched_tokens=8192)


@pytest.fixture(scope="session")
def llm_kv_bound(tiny_next):
    """Two 672x672 images per step (8192 tokens) and 32-token blocks in a pool of 5,200
    layer-blocks: three such requests fit (~1,650 blocks each), a fourth waits, as in a loaded
    server whose KV cache is full."""
    return make_llm(tiny_next, max_num_batched_tokens=8192, block_size=32, num_gpu_blocks_override=5200)


@pytest.fixture(scope="session")
def llm_prefix_small_pool(tiny_v15):
    """32-token blocks and 1056 layer-blocks (about one 1024-token request in a dense layout,
    vLLM's start-up minimum): requests sharing an image prefix still preempt each other."""
    return make_llm(tiny_v15, block_size=32, num_gpu_blocks_override=1056, max_model_len=1024, max_num_seqs=4)


def drain_engine(engine) -> dict[str, list[int]]:
    """Step an in-process engine until every request finished: each request's tokens, by the
    last `-`-separated part of its id."""
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                tokens[output.request_id.rsplit("-", 1)[1]] = list(output.outputs[0].token_ids)
    return tokens


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
        # A process group of its own (stop() signals the server and its engine processes at once),
        # but not a session of its own: Linux schedules each session as one task group
        # (autogroup), and a vLLM worker polls its input queue for a second after each step, so
        # a server in a session of its own took up to half a core from the tests while in use.
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        self.process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, **group,
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
        _RUNNING["pmod_server"] = server
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
        _RUNNING["plain_server"] = server
        yield server
    finally:
        server.stop()


API_KEY = "test-key-4b1d"


class ServerGroup(dict):
    """Server processes by entry point, stopped together."""

    def stop(self) -> None:
        for server in self.values():
            server.stop()


@pytest.fixture(scope="session")
def keyed_servers(tiny_next, tmp_path_factory):
    """Both entry points with `--api-key API_KEY`, started together (CPU start-up is the slow
    part). test_api_key.py walks their routes; test_shutdown.py then ends the pmod-serve one with
    SIGTERM, after every other test that uses them (DRAINING_MODULES)."""
    logs = tmp_path_factory.mktemp("logs")
    servers = ServerGroup({
        "pmod-serve": ServerProcess([str(VENV_BIN / "pmod-serve"), str(tiny_next), "--api-key", API_KEY,
                                     "--max-model-len", "2048"], model=str(tiny_next),
                                    log_path=logs / "pmod-serve-key.log"),
        "vllm serve": ServerProcess([str(VENV_BIN / "vllm"), "serve", str(tiny_next), "--api-key", API_KEY,
                                     "--max-model-len", "2048"], model=str(tiny_next),
                                    log_path=logs / "vllm-serve-key.log"),
    })
    try:
        for server in servers.values():
            server.wait_ready()
        _RUNNING["keyed_servers"] = servers
        yield servers
    finally:
        servers.stop()


@pytest.fixture(params=list(SERVER_PARAMS), scope="module")
def server(request):
    """Each entry point's session server in turn: `pmod_server`, then `plain_server`."""
    return request.getfixturevalue(SERVER_PARAMS[request.param])


# The session servers hold ~3.5 GB each. Each is stopped right after the last test that uses it
# (in collection order, which is also the order within an xdist process: a server's tests form
# one group), rather than at the end of the session, so later engines have the memory.
# (`keyed_servers`: both at once.)
_RUNNING: dict[str, ServerProcess | ServerGroup] = {}
_LAST_USER: dict[str, str] = {}  # session server fixture -> node id of its last test


def _session_servers(item) -> set[str]:
    names = set(getattr(item, "fixturenames", ()))
    callspec = getattr(item, "callspec", None)
    if "server" in names and callspec is not None and "server" in callspec.params:
        names.add(SERVER_PARAMS[callspec.params["server"]])
    return names & {*SERVER_PARAMS.values(), "keyed_servers"}


def pytest_collection_finish(session):
    for item in session.items:  # after deselection
        for name in _session_servers(item):
            _LAST_USER[name] = item.nodeid


def pytest_runtest_logfinish(nodeid, location):
    for name, last in _LAST_USER.items():
        if last == nodeid and name in _RUNNING:
            _RUNNING.pop(name).stop()
