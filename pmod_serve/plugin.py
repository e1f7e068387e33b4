"""vLLM general plugin: teaches vLLM the released p-MoD-LLaVA checkpoints.

`register()` runs in every process vLLM starts (API server, engine core, workers) through the
`vllm.general_plugins` entry point. It registers the `pmod_llava_llama` config type, the
`PmodLlavaLlamaForCausalLM` architecture, the `pmod` tokenizer mode, the p-MoD KV-cache spec,
the "pmod" media connector (`pmod_serve.multimodal.media_connector`), and a per-architecture config hook that
switches on, for p-MoD models only, the engine settings they need (`PmodEngineConfig`) and the
serving safety settings (`pmod_serve.entrypoints.serving_config`: processor cache, media connector, API-key
guard on every route).
"""

from __future__ import annotations

from pmod_serve.transformers_utils.configs.pmod_llava import PMOD_ARCHITECTURE, PMOD_MODEL_TYPE

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True

    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.logger import init_logger
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers.registry import TokenizerRegistry

    from pmod_serve.entrypoints.serving_config import PmodServingConfig
    from pmod_serve.tokenizers.pmod import TOKENIZER_MODE
    from pmod_serve.transformers_utils.configs.pmod_llava import PmodLlavaConfig
    from pmod_serve.v1.core.kv_cache_manager import register_kv_cache_spec
    from pmod_serve.v1.metrics.prometheus import register_api_collector

    AutoConfig.register(PMOD_MODEL_TYPE, PmodLlavaConfig, exist_ok=True)
    if PMOD_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # A lazy "module:Class" reference keeps torch-heavy imports out of processes that never
        # build the model.
        ModelRegistry.register_model(PMOD_ARCHITECTURE, "pmod_serve.model_executor.models.pmod_llava:PmodLlavaLlamaForCausalLM")
    if TOKENIZER_MODE not in TokenizerRegistry.tokenizers:
        TokenizerRegistry.register(TOKENIZER_MODE, "pmod_serve.tokenizers.pmod", "PmodTokenizer")
    if TOKENIZER_MODE not in RENDERER_REGISTRY.renderers:
        # vLLM's HF renderer, plus a check that <image> markers match the images.
        RENDERER_REGISTRY.register(TOKENIZER_MODE, "pmod_serve.renderers.pmod", "PmodRenderer")
    MODELS_CONFIG_MAP[PMOD_ARCHITECTURE] = PmodServingConfig
    # The safe media connector, registered in every process (the config hook selects it).
    import pmod_serve.multimodal.media_connector  # noqa: F401
    register_kv_cache_spec()
    _register_chat_template_fallback()
    # The first process to load the plugin (the API server) picks the metrics directory that
    # the engine processes it starts inherit, and serves what they write there.
    register_api_collector()
    # Under the "vllm" logger namespace, so it shows with vLLM's own log configuration.
    init_logger("vllm.pmod_serve").info(
        "pmod-serve plugin registered: %s, config type %s, tokenizer mode %s",
        PMOD_ARCHITECTURE, PMOD_MODEL_TYPE, TOKENIZER_MODE,
    )


def _register_chat_template_fallback() -> None:
    try:
        from vllm.transformers_utils.chat_templates.registry import register_chat_template_fallback_path

        from pmod_serve.transformers_utils.chat_templates import chat_template_path
    except ImportError:  # pragma: no cover - older vLLM or a partial install
        return
    register_chat_template_fallback_path(PMOD_MODEL_TYPE, chat_template_path("vicuna_v1"))
