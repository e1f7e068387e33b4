"""Flags p-MoD cannot honour are refused at start-up with a message naming the flag, before any
engine starts (pmod_serve/model_executor/models/config.py), under plain `vllm serve` as under `pmod-serve`."""

from __future__ import annotations

import json
import logging
import os
import subprocess

import pytest
from conftest import VENV_BIN, plugin_log_messages

pytestmark = pytest.mark.engine


@pytest.mark.parametrize(
    ("cli", "flags", "expected"),
    [
        ("pmod-serve", ["--pipeline-parallel-size", "2"], "pipeline parallelism (--pipeline-parallel-size 2)"),
        ("vllm", ["--speculative-config", json.dumps({"method": "ngram", "num_speculative_tokens": 2,
                                                       "prompt_lookup_max": 2})],
         "speculative decoding (--speculative-config)"),
    ],
)
def test_unsupported_flag_is_refused_at_startup(tiny_next, cli, flags, expected) -> None:
    command = [str(VENV_BIN / "pmod-serve"), str(tiny_next)] if cli == "pmod-serve" else \
        [str(VENV_BIN / "vllm"), "serve", str(tiny_next)]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    result = subprocess.run([*command, *flags, "--port", "0"], capture_output=True, text=True, timeout=300, env=env)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert expected in output, output[-3000:]
    assert "EngineCore" not in output  # refused while the configuration is built, no engine started


@pytest.mark.parametrize("quantization", ["fp8", None])
def test_fp8_weights_are_served_with_a_warning(tiny_next, quantization) -> None:
    """`--quantization fp8` is not refused (it serves, gpu_configs.json), but its measured quality
    cost on p-MoD is said at start-up; other configurations say nothing of it."""
    from vllm.engine.arg_utils import EngineArgs

    with plugin_log_messages(logging.WARNING) as messages:
        EngineArgs(model=str(tiny_next), quantization=quantization, max_model_len=4096).create_engine_config()
    assert len([m for m in messages if "--quantization fp8" in m]) == (1 if quantization else 0)


@pytest.mark.parametrize("block_size", [None, 16])
def test_kv_block_size_on_cuda_is_32_unless_given(tiny_next, monkeypatch, block_size) -> None:
    """On CUDA p-MoD's KV blocks hold 32 tokens (half the single-layer blocks per request of
    vLLM's 16), unless --block-size says otherwise; CPUs keep their backend's default. The CUDA
    case runs the same config hook with the platform reporting CUDA."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    from pmod_serve.model_executor.models.config import PMOD_CUDA_BLOCK_SIZE, PmodEngineConfig

    config = EngineArgs(model=str(tiny_next), max_model_len=4096, block_size=block_size).create_engine_config()
    assert config.cache_config.block_size != PMOD_CUDA_BLOCK_SIZE  # CPU: the backend's (128) or the given one
    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    PmodEngineConfig.verify_and_update_config(config)
    assert config.cache_config.block_size == (block_size or PMOD_CUDA_BLOCK_SIZE)
    # Marked as chosen, so the executor's per-backend default (Platform.update_block_size_for_backend) keeps it.
    assert config.cache_config.user_specified_block_size
