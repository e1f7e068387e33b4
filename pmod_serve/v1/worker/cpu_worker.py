"""Worker for p-MoD models on CPUs: vLLM's CPU worker with the p-MoD model runner."""

from __future__ import annotations

import numpy as np
import torch
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from pmod_serve.v1.sample.sampler import PmodLogprobsRunnerMixin
from pmod_serve.v1.worker.model_runner import V1_RUNNER_REQUIRED, PmodRunnerMixin


class SeededPartialPrefillMixin:
    """Seeded sampling in a partial prefill without killing the engine.

    A request whose prompt is not finished in a step (a chunked prefill, or the text before an
    image that does not fit the step) still gets a token sampled, which vLLM discards
    (`GPUModelRunner._bookkeeping_sync`); to leave a seeded request's random stream as if nothing
    was sampled, vLLM rewinds its generator by Philox offsets, `gen.set_offset(gen.get_offset() - 4)`.
    CPU generators have no offset: that line raises "CPU Generator does not use offset" and the
    engine core dies, so any client sending `seed` with `n > 1` or concurrent prompts could take a
    CPU server down. Here the generators of those requests are saved before sampling and restored
    after, which is what the rewind means, and vLLM's rewind does not see them."""

    def _sample(self, logits, spec_decode_metadata):
        generators = self.input_batch.generators
        self._saved_generator_states = {}
        if generators:
            num_reqs = self.input_batch.num_reqs
            for index in np.nonzero(self.discard_request_mask.np[:num_reqs])[0].tolist():
                generator = generators.get(index)
                if generator is not None:
                    self._saved_generator_states[index] = generator.get_state()
        return super()._sample(logits, spec_decode_metadata)

    def _bookkeeping_sync(self, *args, **kwargs):
        saved = getattr(self, "_saved_generator_states", None) or {}
        generators = self.input_batch.generators
        held = {index: generators.pop(index) for index in saved if index in generators}
        try:
            return super()._bookkeeping_sync(*args, **kwargs)
        finally:
            for index, generator in held.items():
                generator.set_state(saved[index])
                generators[index] = generator
            self._saved_generator_states = {}


class PmodCPUModelRunner(SeededPartialPrefillMixin, PmodLogprobsRunnerMixin, PmodRunnerMixin, CPUModelRunner):
    pass


class PmodCPUWorker(CPUWorker):
    def init_device(self) -> None:
        super().init_device()
        if self.use_v2_model_runner:
            raise RuntimeError(V1_RUNNER_REQUIRED)
        # vLLM builds its own runner in init_device; swap in ours before any model is loaded.
        self.model_runner = PmodCPUModelRunner(self.vllm_config, torch.device("cpu"))

    def compile_or_warm_up_model(self):
        result = super().compile_or_warm_up_model()
        # As on GPUs: a compiled routed-step decoder (PMOD_ROUTED_STEP_COMPILE) compiles at start-up.
        self.model_runner._pmod_model().warm_up_routed_steps()
        return result
