"""Schema-driven fuzzing of the chat endpoint and a burst far beyond capacity: the server answers
every request with a result or a clean 4xx/429/503, stays healthy, and releases every block."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
from conftest import make_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_aborts import wait_idle

TINY_PNG = io.BytesIO()
make_image(64, 48, 101).save(TINY_PNG, format="PNG")
TINY_URL = "data:image/png;base64," + base64.b64encode(TINY_PNG.getvalue()).decode()

text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.floats(allow_nan=False), text)
content_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": text}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries(
        {"url": st.one_of(st.just(TINY_URL), st.just("data:image/png;base64,AAAA"), text)})}),
    st.fixed_dictionaries({"type": text, "payload": json_scalar}),
)
message = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant", "system", "tool", "nobody"]),
    "content": st.one_of(text, st.lists(content_part, max_size=3), json_scalar),
})
chat_request = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(message, max_size=3), json_scalar)},
    optional={
        "max_tokens": st.one_of(st.integers(-2, 4), json_scalar),
        "temperature": st.one_of(st.floats(-1, 3, allow_nan=False), json_scalar),
        "n": st.integers(-1, 2),
        "stream": st.booleans(),
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(-1, 3),
    },
)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=chat_request)
def test_fuzzed_chat_requests_never_break_the_server(pmod_server, body):
    body = {"model": pmod_server.model, **body}
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 4:
        body["max_tokens"] = 4
    response = httpx.post(f"{pmod_server.base_url}/v1/chat/completions", json=body, timeout=300)
    assert response.status_code in (200, 400, 404, 413, 422), (response.status_code, response.text[:300])
    if response.status_code != 200:
        assert response.json()["error"]["message"]
    assert httpx.get(f"{pmod_server.base_url}/health", timeout=30).status_code == 200


def test_burst_far_beyond_capacity(pmod_server):
    """96 image requests at once against a CPU server with room for a few: they queue, none fail
    with a server error, the server stays healthy, and every block comes back."""
    image = io.BytesIO()
    make_image(336, 336, 102).save(image, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(image.getvalue()).decode()
    body = {"model": pmod_server.model, "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "Hi"}]}]}

    async def burst():
        async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=200)) as client:
            return await asyncio.gather(*(client.post(f"{pmod_server.base_url}/v1/chat/completions", json=body)
                                          for _ in range(96)))

    statuses = [r.status_code for r in asyncio.run(burst())]
    assert set(statuses) <= {200, 429, 503}, statuses
    assert statuses.count(200) > 0
    assert httpx.get(f"{pmod_server.base_url}/health", timeout=30).status_code == 200
    state = wait_idle(pmod_server, timeout=120)
    assert state["pmod_kv_blocks_in_use"] == 0 and state["vllm:kv_cache_usage_perc"] == 0
