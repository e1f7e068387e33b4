"""The plugin reaches vLLM through its `vllm.general_plugins` entry point, in fresh processes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import make_image, vicuna_prompt

PROBE = r"""
import sys
import transformers, vllm
from vllm.platforms import current_platform
assert "pmod_serve" not in sys.modules
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm import ModelRegistry
assert "pmod_serve.plugin" in sys.modules, "entry point not loaded"
assert "PmodLlavaLlamaForCausalLM" in ModelRegistry.get_supported_archs()
from transformers import AutoConfig
assert AutoConfig.for_model("pmod_llava_llama").__class__.__name__ == "PmodLlavaConfig"
print(vllm.__version__, current_platform.device_type, transformers.__version__)
"""


def test_toolchain_and_registry_after_loading_plugins():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-3:] == ["0.26.0", "cpu", "5.16.0"]


@pytest.fixture(scope="module")
def plain_vllm_server(plain_server):
    """`vllm serve <dir>` with no flag but the address (conftest's session server): plugin,
    template and settings come along."""
    return plain_server


def test_plain_vllm_serve_loads_the_plugin_and_renders_exactly(plain_vllm_server, tiny_next):
    """Plugin, chat-template fallback, slow-tokenizer encoding and visual-token layout, with no flag.

    vLLM serves float32 checkpoints in bfloat16 unless told otherwise (its dtype rule, kept as
    is), so token-for-token generation against the float32 reference is tested on the
    `--dtype float32` server (test_serving.py); here the prompt must match exactly."""
    import base64
    import io

    from openai import OpenAI

    from pmod_reference.model import PmodReference

    image = make_image(500, 375, 61)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    client = OpenAI(base_url=f"{plain_vllm_server.base_url}/v1", api_key="EMPTY", timeout=300)
    response = client.chat.completions.create(
        model=plain_vllm_server.model, max_tokens=12, temperature=0, extra_body={"return_token_ids": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": "What is this?"}]}],
    )
    prompt = vicuna_prompt("What is this?", 1)
    assert response.prompt_token_ids == PmodReference(tiny_next).prompt_token_ids(prompt, [image])
    assert len(response.choices[0].token_ids) == 12
    log = plain_vllm_server.log_path.read_text()
    # Nothing but vLLM's entry-point loading can have imported the plugin in that process.
    assert "pmod-serve plugin registered: PmodLlavaLlamaForCausalLM" in log
    # The exact answer above also shows the registry's vicuna_v1 template was the fallback.
    metrics = plain_vllm_server.metrics()
    assert metrics["pmod_visual_tokens_total"] > 0
