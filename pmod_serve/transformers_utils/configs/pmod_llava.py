"""The `pmod_llava_llama` config type of the released checkpoints (docs/p-mod.md, "config.json").

The released `config.json` is a LLaMA config plus the LLaVA `mm_*` and p-MoD `mod_*` keys, which
`PretrainedConfig` keeps as plain attributes. Registering the type lets transformers (and so
vLLM) load it without `trust_remote_code`. The model type and architecture names are defined
here once (the model registry's catalogue checks checkpoints against them).
"""

from transformers import LlamaConfig

PMOD_MODEL_TYPE = "pmod_llava_llama"
PMOD_ARCHITECTURE = "PmodLlavaLlamaForCausalLM"


class PmodLlavaConfig(LlamaConfig):
    model_type = PMOD_MODEL_TYPE
