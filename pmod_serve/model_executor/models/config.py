"""Engine settings p-MoD models need, applied through vLLM's per-architecture config hook (the
`VerifyAndUpdateConfig` classes of `vllm/model_executor/models/config.py`, hence this module's place).

vLLM calls `PmodEngineConfig` for `PmodLlavaLlamaForCausalLM` only, so other models served by
the same installation are untouched. What it switches, and why:

- tokenizer mode `pmod`: the released slow-tokenizer encoding (pmod_serve.tokenizers.pmod);
- the p-MoD worker and scheduler: per-layer compacted KV in one KV cache group, one-step visual prefill;
- prefix caching stays as vLLM sets it (on by default): compacted layer blocks are named by
  their content per layer (pmod_serve.v1.core.prefix_cache), so hits are exact;
- `max_num_batched_tokens >= max_model_len`: a request's visual tokens must fit in one step;
- an encoder cache of two steps' encoder budgets (vLLM's: one): with async scheduling a step's
  images are still cached when the next step is scheduled, and one new image per step leaves
  p-MoD's routed steps host-bound;
- KV blocks of 32 tokens on CUDA unless `--block-size` is given (vLLM's default is 16): p-MoD
  allocates per layer, so a request holds ~17x the blocks of a dense one;
- torch.compile and CUDA graphs as vLLM sets them, except for steps that route visual tokens
  (top-k, gathers of a data-dependent size): those skip vLLM's graph (pmod_serve.model_executor.models.pmod_llava
  sets vLLM's `skip_compiled`, pmod_serve.v1.worker.model_runner forces eager execution) and run
  their decoder eagerly with vLLM's CUDA kernels, or as their own compiled graph
  (`PMOD_ROUTED_STEP_COMPILE`). On CPUs everything runs eagerly.
- `--quantization fp8` is served with a warning: routing decisions amplify the FP8 weight error
  (benchmarks/results/gpu_configs.json, `fp8_weights`).
- speculative decoding and pipeline parallelism are refused.
"""

from __future__ import annotations

import logging

from vllm.model_executor.models.config import VerifyAndUpdateConfig

from pmod_serve.tokenizers.pmod import TOKENIZER_MODE

logger = logging.getLogger("vllm.pmod_serve")  # shown with vLLM's log configuration

# KV block size (tokens) on CUDA unless --block-size is given; vLLM's default is 16.
PMOD_CUDA_BLOCK_SIZE = 32
# The encoder cache holds this many steps' encoder budgets (vLLM's default: one).
ENCODER_CACHE_STEPS = 2


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
        scheduler_config = vllm_config.scheduler_config
        parallel_config = vllm_config.parallel_config

        if vllm_config.speculative_config is not None:
            raise ValueError("p-MoD models do not support speculative decoding (--speculative-config)")
        if model_config.quantization == "fp8":
            logger.warning(
                "p-MoD with --quantization fp8: each p-MoD layer's top-k routing can flip on FP8 "
                "error and amplify it (a trained checkpoint's first-token log-probabilities moved by "
                "up to 1.49 nats with FP8 weights and activations, its dense twin's by 0.62; weight-only "
                "FP8, VLLM_TEST_FORCE_FP8_MARLIN=1, stayed within 0.51; benchmarks/results/"
                "gpu_configs.json). --kv-cache-dtype fp8 alone stayed within 0.52 nats"
            )
        if parallel_config.pipeline_parallel_size > 1:
            raise ValueError(
                "p-MoD models do not support pipeline parallelism (--pipeline-parallel-size "
                f"{parallel_config.pipeline_parallel_size}); use --tensor-parallel-size or --data-parallel-size"
            )
        if scheduler_config.disable_hybrid_kv_cache_manager:
            raise ValueError(
                "p-MoD needs vLLM's hybrid KV cache manager: its KV cache spec (the whole decoder in one "
                "group, per-layer block tables) is a custom one; drop --disable-hybrid-kv-cache-manager"
            )

        if scheduler_config.max_num_batched_tokens < model_config.max_model_len:
            logger.info(
                "p-MoD: max_num_batched_tokens raised from %d to max_model_len=%d so that a "
                "request's visual tokens always fit in one step",
                scheduler_config.max_num_batched_tokens,
                model_config.max_model_len,
            )
            scheduler_config.max_num_batched_tokens = model_config.max_model_len
            scheduler_config.max_num_encoder_input_tokens = model_config.max_model_len
        # Room for two steps' images in the encoder cache. A step's images stay in the cache until
        # the engine has the step's output; with async scheduling (vLLM's default) the next step
        # is scheduled before that, so a cache of one step's encoder budget (vLLM's default) admits
        # one new 672x672 LLaVA-NeXT image per step, and a p-MoD step of one image is host-bound
        # (its routed decoder runs eagerly). Two steps' worth lets each step take what its budget
        # allows. The cache holds image embeddings (2,928 x 4,096 bf16 = 23 MiB each).
        scheduler_config.encoder_cache_size = max(
            scheduler_config.encoder_cache_size, ENCODER_CACHE_STEPS * scheduler_config.max_num_encoder_input_tokens
        )

        cache_config = vllm_config.cache_config
        if current_platform.is_cuda() and not cache_config.user_specified_block_size:
            # A 7B image request holds ~3,300 single-layer blocks at vLLM's 16 tokens per block
            # (dense LLaVA-NeXT ~190), which the scheduler allocates, names and frees one by one.
            # 32 halves them, for at most 16 more slots per layer and request (KV 0.569 -> 0.574 of
            # dense): on one H200, 1.14x / 1.20x the requests/s at concurrency 32 / 256, TPOT c=1
            # unchanged (benchmarks/results/e2e_serve_run8.json against e2e_serve_run8_bs16.json, one
            # session). Marked as the user's choice so that the executor's per-backend default
            # (Platform.update_block_size_for_backend) does not reset it.
            cache_config.block_size = PMOD_CUDA_BLOCK_SIZE
            cache_config.user_specified_block_size = True

        if scheduler_config.scheduler_cls is None:
            scheduler_config.scheduler_cls = "pmod_serve.v1.core.sched.scheduler.make_pmod_scheduler"
        if parallel_config.worker_cls == "auto":
            parallel_config.worker_cls = (
                "pmod_serve.v1.worker.cpu_worker.PmodCPUWorker"
                if current_platform.is_cpu()
                else "pmod_serve.v1.worker.gpu_worker.PmodGPUWorker"
            )

        if current_platform.is_cpu():
            # vLLM's CPU backend would compile with inductor; the tiny CPU checkpoints gain nothing
            # from it and every engine start would pay for it.
            from vllm.config.compilation import CompilationMode

            if not model_config.enforce_eager:
                logger.info("p-MoD: running eagerly on CPU")
            model_config.enforce_eager = True
            vllm_config.compilation_config.mode = CompilationMode.NONE
        # On GPUs vLLM's defaults stand: torch.compile and CUDA graphs (full graphs for decode
        # batches, piecewise ones for other batches) for every step that routes nothing; a step
        # that routes visual tokens runs eagerly (pmod_serve.model_executor.models.pmod_llava, pmod_serve.v1.worker.model_runner).
