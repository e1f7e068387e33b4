"""Worker for p-MoD models on GPUs: vLLM's worker with the p-MoD model runner."""

from __future__ import annotations

import torch
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from pmod_serve.v1.sample.sampler import PmodLogprobsRunnerMixin
from pmod_serve.v1.worker.model_runner import V1_RUNNER_REQUIRED, PmodRunnerMixin


class PmodGPUModelRunner(PmodLogprobsRunnerMixin, PmodRunnerMixin, GPUModelRunner):
    pass


class PmodGPUWorker(Worker):
    def init_device(self) -> None:
        super().init_device()
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
        return result
