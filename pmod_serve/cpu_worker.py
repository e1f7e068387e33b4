"""Worker for p-MoD models on CPUs: vLLM's CPU worker with the p-MoD model runner."""

from __future__ import annotations

import torch
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from pmod_serve.logprobs import PmodLogprobsRunnerMixin
from pmod_serve.runner import PmodRunnerMixin


class PmodCPUModelRunner(PmodLogprobsRunnerMixin, PmodRunnerMixin, CPUModelRunner):
    pass


class PmodCPUWorker(CPUWorker):
    def init_device(self) -> None:
        super().init_device()
        if self.use_v2_model_runner:
            raise RuntimeError("p-MoD needs vLLM's V1 model runner: set VLLM_USE_V2_MODEL_RUNNER=0")
        # vLLM builds its own runner in init_device; swap in ours before any model is loaded.
        self.model_runner = PmodCPUModelRunner(self.vllm_config, torch.device("cpu"))
