"""Engine settings p-MoD models need, applied through vLLM's per-architecture config hook.

vLLM calls `PmodEngineConfig` for `PmodLlavaLlamaForCausalLM` only, so other models served by
the same installation are untouched. What it switches, and why:

- tokenizer mode `pmod`: the released slow-tokenizer encoding (pmod_serve.tokenizer);
- the p-MoD worker and scheduler: compacted KV groups, one-step visual prefill;
- prefix caching off: blocks of a compacted group hold a different token subset per layer, so
  vLLM's per-group content hashing would share blocks that do not match (refused if asked for);
- `max_num_batched_tokens >= max_model_len`: a request's visual tokens must fit in one step;
- no torch.compile, and CUDA graphs for decode steps only (`FULL_DECODE_ONLY`): routing is
  data-dependent (top-k, gathers of a data-dependent size), so prefill steps run eagerly, while a
  decode step routes nothing and replays a full graph (pmod_serve.runner keeps the compacted
  attention inputs in per-ratio persistent buffers for it). On CPUs everything runs eagerly.
- speculative decoding and pipeline parallelism are refused.
"""

from __future__ import annotations

import logging

from vllm.model_executor.models.config import VerifyAndUpdateConfig

from pmod_serve.tokenizer import TOKENIZER_MODE

logger = logging.getLogger("vllm.pmod_serve")  # shown with vLLM's log configuration


class PmodEngineConfig(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        if model_config.tokenizer_mode in ("auto", "hf", "slow"):
            model_config.tokenizer_mode = TOKENIZER_MODE
        elif model_config.tokenizer_mode != TOKENIZER_MODE:
            raise ValueError(
                f"p-MoD checkpoints need tokenizer_mode={TOKENIZER_MODE!r} "
                f"(the released slow-tokenizer encoding), got {model_config.tokenizer_mode!r}"
            )

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from vllm.platforms import current_platform

        model_config = vllm_config.model_config
        cache_config = vllm_config.cache_config
        scheduler_config = vllm_config.scheduler_config
        parallel_config = vllm_config.parallel_config

        if vllm_config.speculative_config is not None:
            raise ValueError("p-MoD models do not support speculative decoding")
        if parallel_config.pipeline_parallel_size > 1:
            raise ValueError("p-MoD models do not support pipeline parallelism; use tensor parallelism")
        if scheduler_config.disable_hybrid_kv_cache_manager:
            raise ValueError("p-MoD needs vLLM's hybrid KV cache manager (one KV group per retention ratio)")

        if cache_config.enable_prefix_caching:
            logger.info("p-MoD: prefix caching disabled (compacted KV blocks are not content-addressable)")
        cache_config.enable_prefix_caching = False

        if scheduler_config.max_num_batched_tokens < model_config.max_model_len:
            logger.info(
                "p-MoD: max_num_batched_tokens raised from %d to max_model_len=%d so that a "
                "request's visual tokens always fit in one step",
                scheduler_config.max_num_batched_tokens,
                model_config.max_model_len,
            )
            scheduler_config.max_num_batched_tokens = model_config.max_model_len
            scheduler_config.max_num_encoder_input_tokens = model_config.max_model_len
            scheduler_config.encoder_cache_size = max(
                scheduler_config.encoder_cache_size, model_config.max_model_len
            )

        if scheduler_config.scheduler_cls is None:
            scheduler_config.scheduler_cls = "pmod_serve.scheduler.make_pmod_scheduler"
        if parallel_config.worker_cls == "auto":
            parallel_config.worker_cls = (
                "pmod_serve.cpu_worker.PmodCPUWorker"
                if current_platform.is_cpu()
                else "pmod_serve.worker.PmodGPUWorker"
            )

        if current_platform.is_cpu() or model_config.enforce_eager:
            if not model_config.enforce_eager:
                logger.info("p-MoD: running eagerly (data-dependent routing)")
            model_config.enforce_eager = True
            return
        from vllm.config.compilation import CompilationMode, CUDAGraphMode

        compilation_config = vllm_config.compilation_config
        if compilation_config.mode not in (None, CompilationMode.NONE):
            logger.info("p-MoD: torch.compile is not used (data-dependent routing); compilation mode set to NONE")
        compilation_config.mode = CompilationMode.NONE
        if compilation_config.cudagraph_mode not in (CUDAGraphMode.NONE, CUDAGraphMode.FULL_DECODE_ONLY):
            if compilation_config.cudagraph_mode is not None:
                logger.info(
                    "p-MoD: cudagraph_mode %s replaced by FULL_DECODE_ONLY (prefill routes tokens eagerly)",
                    getattr(compilation_config.cudagraph_mode, "name", compilation_config.cudagraph_mode),
                )
            compilation_config.cudagraph_mode = CUDAGraphMode.FULL_DECODE_ONLY
