"""The GPU worker's parts that run without a GPU: the engine process's intra-op threads, the
`PMOD_CUDA_SYNC_DEBUG` switch, and the runner's report of CUDA caching-allocator trips to the
driver (`AllocatorWatch`).

This machine has no CUDA device, so the allocator's counters come from a recorded sequence of
`torch.cuda.memory_stats()` values (the keys PyTorch reports); on a GPU the runner reads the real
ones after every step, at most every 10 s."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from pmod_serve.v1.worker.gpu_worker import AllocatorWatch, start_sync_debug

# In a fresh interpreter: vLLM's CPU worker, once it has run in a process (as in other tests of
# this session), replaces `torch.set_num_threads` with a no-op there.
THREADS_SCRIPT = """
import os, torch
from pmod_serve.v1.worker.gpu_worker import limit_intra_op_threads
torch.set_num_threads(2)
limit_intra_op_threads()
alone = torch.get_num_threads()
os.environ["OMP_NUM_THREADS"] = "2"
torch.set_num_threads(2)
limit_intra_op_threads()
print(alone, torch.get_num_threads())
"""


def test_engine_process_computes_on_one_thread_unless_omp_num_threads_says():
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    result = subprocess.run([sys.executable, "-c", THREADS_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300, check=True)
    # One thread without the variable; the operator's choice with it.
    assert result.stdout.split()[-2:] == ["1", "2"], result.stdout + result.stderr


def test_sync_debug_starts_only_when_asked(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.delenv("PMOD_CUDA_SYNC_DEBUG", raising=False)
    start_sync_debug()
    monkeypatch.setenv("PMOD_CUDA_SYNC_DEBUG", "warn")
    start_sync_debug()
    assert modes == ["warn"]
    monkeypatch.setenv("PMOD_CUDA_SYNC_DEBUG", "loud")
    with pytest.raises(ValueError, match="PMOD_CUDA_SYNC_DEBUG"):
        start_sync_debug()


def test_reports_growth_after_the_first_poll(monkeypatch, caplog):
    readings = iter([
        {"num_alloc_retries": 0, "num_device_alloc": 40, "num_device_free": 2, "active.all.current": 9},
        {"num_alloc_retries": 0, "num_device_alloc": 40, "num_device_free": 2},
        {"num_alloc_retries": 0, "num_device_alloc": 43, "num_device_free": 2},
        {"num_alloc_retries": 2, "num_device_alloc": 47, "num_device_free": 9},
    ])
    clock = iter([100.0, 105.0, 111.0, 122.0, 135.0])
    monkeypatch.setattr("pmod_serve.v1.worker.gpu_worker.time.monotonic", lambda: next(clock))
    watch = AllocatorWatch(lambda: next(readings), interval_s=10.0)

    caplog.set_level(logging.INFO, logger="vllm.pmod_serve")
    monkeypatch.setattr(logging.getLogger("vllm.pmod_serve"), "propagate", True)
    assert watch.poll() is None  # 100 s: the baseline (start-up allocates on purpose)
    assert watch.poll() is None  # 105 s: not due, nothing read
    assert watch.poll() is None  # 111 s: due, nothing grew
    assert watch.poll() == {"num_alloc_retries": 0, "num_device_alloc": 3, "num_device_free": 0}
    assert caplog.records[-1].levelno == logging.INFO
    assert watch.poll() == {"num_alloc_retries": 2, "num_device_alloc": 4, "num_device_free": 7}
    assert caplog.records[-1].levelno == logging.WARNING
    assert "2 allocation retries" in caplog.records[-1].getMessage()
    assert "in the last 13 s" in caplog.records[-1].getMessage()
