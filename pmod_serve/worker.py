"""Worker for p-MoD models on GPUs: vLLM's worker with the p-MoD model runner."""

from __future__ import annotations

import torch
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from pmod_serve.runner import PmodRunnerMixin


class PmodGPUModelRunner(PmodRunnerMixin, GPUModelRunner):
    pass


class PmodGPUWorker(Worker):
    def init_device(self) -> None:
        super().init_device()
        if self.use_v2_model_runner:
            raise RuntimeError("p-MoD needs vLLM's V1 model runner: set VLLM_USE_V2_MODEL_RUNNER=0")
        # vLLM builds its own runner in init_device; swap in ours before any model is loaded.
        self.model_runner = PmodGPUModelRunner(self.vllm_config, self.device)
        if isinstance(self.device, torch.device) and self.device.type == "cuda":
            torch.cuda.empty_cache()
