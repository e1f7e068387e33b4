"""pmod-serve: a vLLM 0.26 out-of-tree plugin serving p-MoD-LLaVA (LLaVA with Mixture-of-Depths
layers) with per-layer compacted paged KV cache.

The tree mirrors vLLM's own, as vllm-ascend and vllm-spyre do: a module lives where the vLLM part
it extends lives (`v1/core/sched/scheduler.py` subclasses `vllm.v1.core.sched.scheduler.Scheduler`).

    plugin.py                    the `vllm.general_plugins` entry point: registers everything below
    envs.py                      every PMOD_* environment variable
    PATCHES.md                   every vLLM internal pmod-serve relies on
    pmod/                        the p-MoD rules, no vLLM import: schedule, KV layout, routing, image layout
    model_executor/models/       the vLLM model (pmod_llava.py) and its config hook (config.py)
    multimodal/                  image pixels (CLIP crops), the safe media connector
    transformers_utils/configs/  the `pmod_llava_llama` transformers config type
    tokenizers/, renderers/      tokenizer mode `pmod` (released prompt encoding) and its renderer
    v1/core/                     scheduler, KV cache manager, prefix cache, KV accounting
    v1/worker/                   model-runner hooks, GPU/CPU workers, per-layer block tables
    v1/sample/                   prompt logprobs of image placeholders, sampling-parameter guard
    v1/metrics/                  the pmod_kv_* Prometheus series, engine core -> API server
    entrypoints/                 `pmod-serve` CLI, API-server guard, serving config hook, demo

The plain-PyTorch reference (the tests' and benchmarks' oracle) is the top-level `pmod_reference`
package of the repository, not part of this package.
"""
