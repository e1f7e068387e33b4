"""Worker for p-MoD models on GPUs: vLLM's worker with the p-MoD model runner."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch
from vllm.logger import init_logger
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from pmod_serve import envs
from pmod_serve.v1.sample.sampler import PmodLogprobsRunnerMixin
from pmod_serve.v1.worker.model_runner import V1_RUNNER_REQUIRED, PmodRunnerMixin

logger = init_logger("vllm.pmod_serve")


class AllocatorWatch:
    """Reports, at most every `interval_s` while steps run, when PyTorch's CUDA caching allocator
    had to go to the driver. Once serving, vLLM's steps should be served from its cache; new
    device allocations mean step-to-step size changes the cache cannot serve, and a retry
    (`num_alloc_retries`: the cache emptied to retry a failed allocation) synchronises the whole
    device, which costs the overlap of host and GPU that async scheduling relies on."""

    COUNTERS = ("num_alloc_retries", "num_device_alloc", "num_device_free")

    def __init__(self, memory_stats: Callable[[], dict], interval_s: float = 10.0) -> None:
        self.memory_stats = memory_stats
        self.interval_s = interval_s
        self.counts: dict[str, int] | None = None
        self.polled_at = 0.0

    def poll(self) -> dict[str, int] | None:
        """The counters' growth since the last poll, when a poll is due and they grew."""
        now = time.monotonic()
        if now - self.polled_at < self.interval_s:
            return None
        stats = self.memory_stats()
        counts = {name: int(stats.get(name, 0)) for name in self.COUNTERS}
        previous, previous_at = self.counts, self.polled_at
        self.counts, self.polled_at = counts, now
        if previous is None:
            return None  # the first poll is the baseline: start-up allocates on purpose
        growth = {name: counts[name] - previous[name] for name in self.COUNTERS}
        if not any(growth.values()):
            return None
        log = logger.warning if growth["num_alloc_retries"] else logger.info
        log("p-MoD: the CUDA caching allocator went to the driver in the last %.0f s: %d allocation "
            "retries (each empties the cache and synchronises the device), %d cudaMalloc, %d cudaFree",
            now - previous_at, *(growth[name] for name in self.COUNTERS))
        return growth


def limit_intra_op_threads() -> None:
    """One PyTorch intra-op thread in this engine process unless `OMP_NUM_THREADS` says otherwise:
    what vLLM gives its multiprocess GPU workers (`set_multiprocessing_worker_envs`), here also
    for one GPU, where vLLM runs the worker inside the engine process with a thread per core.
    The engine's CPU tensor work is small copies (vLLM stacks a step's image pixels), and split
    over threads that the API server's image decoding keeps off the cores, each waits for the
    slowest: at concurrency 256 on an H200, 11-27 ms per step to stack two images' 3.4 MB of
    pixels, with the GPU idle behind it (benchmarks/results/c256_profile/)."""
    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > 1:
        logger.info("p-MoD: PyTorch intra-op threads %d -> 1 in the engine process (set OMP_NUM_THREADS to choose)",
                    torch.get_num_threads())
        torch.set_num_threads(1)


def start_sync_debug() -> None:
    """`PMOD_CUDA_SYNC_DEBUG` ("warn" or "error"): from now on PyTorch reports each operation that
    waits for the GPU. Started after the warm-up, whose waits (profiling, CUDA graph capture) are
    deliberate; Python's default warning filter shows each once per source line."""
    mode = envs.PMOD_CUDA_SYNC_DEBUG
    if mode is None:
        return
    if mode not in ("warn", "error"):
        raise ValueError(f"PMOD_CUDA_SYNC_DEBUG={mode!r}: expected 'warn' or 'error'")
    torch.cuda.set_sync_debug_mode(mode)
    logger.warning("p-MoD: PMOD_CUDA_SYNC_DEBUG=%s: operations that wait for the GPU are reported from now on "
                   "(a diagnostic; it costs host time)", mode)


class PmodGPUModelRunner(PmodLogprobsRunnerMixin, PmodRunnerMixin, GPUModelRunner):
    def __init__(self, vllm_config, device: torch.device) -> None:
        super().__init__(vllm_config, device)
        self.allocator_watch = AllocatorWatch(lambda: torch.cuda.memory_stats(device))

    def execute_model(self, *args, **kwargs):
        output = super().execute_model(*args, **kwargs)
        self.allocator_watch.poll()
        return output


class PmodGPUWorker(Worker):
    def init_device(self) -> None:
        super().init_device()
        limit_intra_op_threads()
        if self.use_v2_model_runner:
            raise RuntimeError(V1_RUNNER_REQUIRED)
        # vLLM builds its own runner in init_device; swap in ours before any model is loaded.
        self.model_runner = PmodGPUModelRunner(self.vllm_config, self.device)
        if isinstance(self.device, torch.device) and self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.model_config.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
            # A float32 model computes in IEEE float32: vLLM already keeps matmuls off TF32; cuDNN
            # convolutions (the CLIP patch embedding) and fused SDPA kernels (the CLIP attention)
            # may still use TF32, and p-MoD's top-k routing can turn that error into different
            # kept tokens. Only float32 models are affected (bf16/fp16 never use TF32).
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.enable_flash_sdp(False)
            torch.backends.cuda.enable_mem_efficient_sdp(False)
            torch.backends.cuda.enable_cudnn_sdp(False)

    def compile_or_warm_up_model(self):
        result = super().compile_or_warm_up_model()
        # Steps that route visual tokens have their own compiled pieces (see RoutedSteps).
        self.model_runner._pmod_model().warm_up_routed_steps()
        start_sync_debug()
        return result
