"""Clients that disconnect or cancel: every KV block of every layer group returns to the pool."""

from __future__ import annotations

import json
import time

import httpx
from conftest import make_image
from prometheus_client.parser import text_string_to_metric_families

from pmod_serve.entrypoints.demo import data_url


def engine_state(server) -> dict[str, float]:
    text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("pmod_kv_blocks_in_use", "vllm:kv_cache_usage_perc", "vllm:num_requests_running",
                               "vllm:num_requests_waiting"):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def wait_idle(server, timeout: float = 60) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    state = engine_state(server)
    while time.monotonic() < deadline and any(state.values()):
        time.sleep(0.5)
        state = engine_state(server)
    return state


def chat_body(server, image, **extra) -> dict:
    return {"model": server.model, "temperature": 0, "max_tokens": 300, "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                                      {"type": "text", "text": "Describe."}]}], **extra}


def test_disconnect_mid_stream_frees_every_block(pmod_server):
    body = chat_body(pmod_server, make_image(672, 672, 91), stream=True)
    with httpx.stream("POST", f"{pmod_server.base_url}/v1/chat/completions", json=body, timeout=300) as response:
        assert response.status_code == 200
        chunks = 0
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and json.loads(line[6:]).get("choices"):
                chunks += 1
            if chunks == 5:
                held = engine_state(pmod_server)["pmod_kv_blocks_in_use"]
                break  # leaving the block closes the connection mid-stream
    assert held > 0
    assert wait_idle(pmod_server) == {"pmod_kv_blocks_in_use": 0, "vllm:kv_cache_usage_perc": 0,
                                      "vllm:num_requests_running": 0, "vllm:num_requests_waiting": 0}


def test_disconnect_during_prefill_frees_every_block(pmod_server):
    body = chat_body(pmod_server, make_image(1008, 336, 92))
    try:
        httpx.post(f"{pmod_server.base_url}/v1/chat/completions", json=body, timeout=0.3)
    except httpx.TimeoutException:
        pass
    state = wait_idle(pmod_server)
    assert state["pmod_kv_blocks_in_use"] == 0 and state["vllm:kv_cache_usage_perc"] == 0


def test_parallel_sampling_n2_frees_every_block(pmod_server):
    body = chat_body(pmod_server, make_image(500, 500, 93), n=2, max_tokens=8, temperature=0.8, seed=1)
    response = httpx.post(f"{pmod_server.base_url}/v1/chat/completions", json=body, timeout=300)
    assert response.status_code == 200 and len(response.json()["choices"]) == 2
    state = wait_idle(pmod_server)
    assert state["pmod_kv_blocks_in_use"] == 0 and state["vllm:kv_cache_usage_perc"] == 0
