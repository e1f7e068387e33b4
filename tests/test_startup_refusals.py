"""Flags p-MoD cannot honour are refused at start-up with a message naming the flag, before any
engine starts (pmod_serve/model_executor/models/config.py), under plain `vllm serve` as under `pmod-serve`."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import VENV_BIN

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
    import logging

    from vllm.engine.arg_utils import EngineArgs

    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("vllm.pmod_serve")  # vLLM's loggers do not propagate to pytest's
    logger.addHandler(handler)
    try:
        EngineArgs(model=str(tiny_next), quantization=quantization, max_model_len=4096).create_engine_config()
    finally:
        logger.removeHandler(handler)
    assert len([m for m in messages if "--quantization fp8" in m]) == (1 if quantization else 0)
