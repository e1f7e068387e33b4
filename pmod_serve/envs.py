"""Every `PMOD_*` environment variable pmod-serve reads, in one place (as `vllm.envs` does for
`VLLM_*`). Values are read when accessed (`pmod_serve.envs.PMOD_MEDIA_MAX_BYTES`), so what
`pmod-serve` or the plugin sets for the processes it starts is seen there."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_MEDIA_MAX_BYTES = 20 * 1024 * 1024


def _int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else default


def _list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


environment_variables: dict[str, Callable[[], Any]] = {
    # Directory of the Prometheus multiprocess files the engine core writes the pmod_kv_* series
    # to and the API server reads (set by the plugin when vLLM does not set one).
    "PMOD_METRICS_DIR": lambda: os.environ.get("PMOD_METRICS_DIR") or None,
    # The served model's vocabulary size, for sampling-parameter checks in API server processes
    # (set by the engine when it loads the model).
    "PMOD_MODEL_VOCAB_SIZE": lambda: (
        int(os.environ["PMOD_MODEL_VOCAB_SIZE"]) if os.environ.get("PMOD_MODEL_VOCAB_SIZE", "").isdigit() else None
    ),
    # Largest request body the API server accepts, in bytes (413 beyond).
    "PMOD_MAX_BODY_BYTES": lambda: _int("PMOD_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES),
    # "1": accept precomputed multimodal features on /inference/v1/generate (refused by default).
    "PMOD_ALLOW_MM_FEATURES": lambda: os.environ.get("PMOD_ALLOW_MM_FEATURES") == "1",
    # Hosts, IPs or CIDRs images may be fetched from although not public ("*": any); set by
    # `pmod-serve --media-allow-host`.
    "PMOD_MEDIA_ALLOW_HOSTS": lambda: _list("PMOD_MEDIA_ALLOW_HOSTS"),
    # Size cap per fetched image, in bytes; set by `pmod-serve --media-max-bytes`.
    "PMOD_MEDIA_MAX_BYTES": lambda: _int("PMOD_MEDIA_MAX_BYTES", DEFAULT_MEDIA_MAX_BYTES),
    # How steps that route visual tokens run their decoder (pmod_serve.model_executor.models.
    # pmod_llava.routed_step_backend): "eager" (the default, with vLLM's CUDA kernels), or a
    # torch.compile backend for their decoder ("inductor"; "aot_eager" traces without generating
    # code, for tests).
    "PMOD_ROUTED_STEP_COMPILE": lambda: os.environ.get("PMOD_ROUTED_STEP_COMPILE", "eager").strip() or "eager",
    # With a torch.compile backend for routed steps: the most target tokens a step may route and
    # still run compiled (more run eagerly). The compiled top-k sorts all of a step's targets
    # twice per p-MoD layer; PyTorch's CUDA sort does up to 4,096 values in one kernel and more as
    # a cub radix sort of ~9 launches, which made loaded compiled steps cost the host more than
    # eager ones (benchmarks/results/routed_compile_gpu/, step 5).
    "PMOD_ROUTED_STEP_COMPILE_MAX_TARGETS": lambda: _int("PMOD_ROUTED_STEP_COMPILE_MAX_TARGETS", 4096),
    # "1": build every retention-ratio class's attention metadata with the backend's builder, also
    # where one build per step serves them all (pmod_serve.v1.worker.model_runner.
    # _class_field_deriver: FlashAttention and the CPU backend); for A/B checks of the two paths.
    "PMOD_ATTENTION_METADATA_PER_CLASS": lambda: os.environ.get("PMOD_ATTENTION_METADATA_PER_CLASS") == "1",
    # "1": when the KV cache has room for one waiting image request but not two, hold image
    # admissions for one step so that the next routed step prefills two images (pmod_serve.v1.
    # core.sched.scheduler). Experimental: a routed step's host cost is nearly fixed per step.
    "PMOD_COALESCE_IMAGE_ADMISSIONS": lambda: os.environ.get("PMOD_COALESCE_IMAGE_ADMISSIONS") == "1",
    # "0": admit a waiting image request as vLLM does, against the free KV pool alone; by default
    # the pool must also hold what the running requests' unfinished prompts still need
    # (pmod_serve.v1.core.sched.scheduler._fits_beside_prompts_in_progress).
    "PMOD_RESERVE_PROMPTS_IN_PROGRESS": lambda: os.environ.get("PMOD_RESERVE_PROMPTS_IN_PROGRESS", "1") != "0",
    # "warn" or "error": once the GPU engine serves (after its warm-up), PyTorch reports every
    # operation that makes the host wait for the GPU (`torch.cuda.set_sync_debug_mode`): a
    # warning with its source line, or an error. A diagnostic for benchmarks: such a wait in a
    # step costs async scheduling's overlap of host and GPU.
    "PMOD_CUDA_SYNC_DEBUG": lambda: os.environ.get("PMOD_CUDA_SYNC_DEBUG", "").strip() or None,
    # Show the demo server's log on the terminal (`make demo`).
    "PMOD_DEMO_VERBOSE": lambda: bool(os.environ.get("PMOD_DEMO_VERBOSE")),
}


def __getattr__(name: str) -> Any:
    if name in environment_variables:
        return environment_variables[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(environment_variables)
