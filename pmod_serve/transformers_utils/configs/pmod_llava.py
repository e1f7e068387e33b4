"""The `pmod_llava_llama` config type of the released checkpoints (spec §3).

The released `config.json` is a LLaMA config plus the LLaVA `mm_*` and p-MoD `mod_*` keys, which
`PretrainedConfig` keeps as plain attributes. Registering the type lets transformers (and so
vLLM) load it without `trust_remote_code`.
"""

from transformers import LlamaConfig

PMOD_MODEL_TYPE = "pmod_llava_llama"
PMOD_ARCHITECTURE = "PmodLlavaLlamaForCausalLM"


class PmodLlavaConfig(LlamaConfig):
    model_type = PMOD_MODEL_TYPE
