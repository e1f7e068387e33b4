"""Serving-side safety settings for p-MoD models, applied through the per-architecture config hook.

`PmodServingConfig` is what the plugin registers in vLLM's `MODELS_CONFIG_MAP`: the engine
settings of `PmodEngineConfig`, plus two that keep bad requests from breaking the server. Both
run in the API server process when its `VllmConfig` is built (the engine core receives that
config), under `pmod-serve` and plain `vllm serve` alike, and for p-MoD models only.

1. The multimodal processor cache is kept in the API process only ("processor_only").
   vLLM's default ("lru") mirrors the cache across processes: the API process records an item as
   sent while it renders the request and from then on sends only its hash, trusting the engine
   core to have received it (`vllm/multimodal/cache.py`, `MultiModalProcessorSenderCache`). But
   the request can still be refused after rendering (sampling parameters are validated and the
   prompt length is checked after the multimodal processor ran: `max_tokens: -1`,
   `temperature: -3`, too large `top_logprobs`, a prompt longer than the model), and then the
   engine never receives the item: every later request with the same image fails in the engine
   with `AssertionError: Expected a cached item for mm_hash=...` (500). "processor_only" is the
   mode vLLM itself uses when it cannot mirror (several API servers): the API process still
   caches processed images, and always sends the item, so there is no mirror to desynchronise.
2. Media are loaded through `pmod_serve.multimodal.media_connector.PmodMediaConnector` (vLLM's media connector
   registry) unless the operator chose a connector with `VLLM_MEDIA_CONNECTOR`.
3. `pmod_serve.v1.sample.logits_processor.PmodSamplingGuard` validates sampling parameters that name the
   image placeholder id (past the model's vocabulary), which vLLM checks against the tokenizer
   only and which would otherwise index the engine's logits masks out of bounds.
4. The API server gets `pmod_serve.entrypoints.server_guard.ServerGuardMiddleware`: the API key on every route
   but health and metrics, admin routes off unless asked for, a request body cap.
"""

from __future__ import annotations

import logging
import os

from pmod_serve.model_executor.models.config import PmodEngineConfig

logger = logging.getLogger("vllm.pmod_serve")

SAFE_MM_CACHE_TYPE = "processor_only"


class PmodServingConfig(PmodEngineConfig):
    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        PmodEngineConfig.verify_and_update_config(vllm_config)
        apply_serving_safety(vllm_config)


def apply_serving_safety(vllm_config) -> None:
    mm_config = vllm_config.model_config.multimodal_config
    if mm_config is not None and mm_config.mm_processor_cache_type != SAFE_MM_CACHE_TYPE:
        logger.info(
            "p-MoD: multimodal processor cache type %r replaced by %r (the API process caches "
            "processed images and always sends them: a request refused after rendering cannot "
            "leave the engine without an image the API process believes it has)",
            mm_config.mm_processor_cache_type, SAFE_MM_CACHE_TYPE,
        )
        mm_config.mm_processor_cache_type = SAFE_MM_CACHE_TYPE
    use_safe_media_connector()
    from pmod_serve.entrypoints.server_guard import install
    from pmod_serve.v1.sample import logits_processor

    logits_processor.install(vllm_config.model_config)

    install()


def use_safe_media_connector() -> None:
    from pmod_serve.multimodal.media_connector import CONNECTOR_NAME

    chosen = os.environ.get("VLLM_MEDIA_CONNECTOR")
    if chosen is None:
        os.environ["VLLM_MEDIA_CONNECTOR"] = CONNECTOR_NAME
        logger.info("p-MoD: media are loaded by the %r connector (no private addresses, header "
                    "checks before decoding)", CONNECTOR_NAME)
    elif chosen != CONNECTOR_NAME:
        logger.warning("p-MoD: VLLM_MEDIA_CONNECTOR=%s set by the operator: image URLs are NOT "
                       "checked by pmod-serve's media connector", chosen)
