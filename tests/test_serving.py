"""A real `pmod-serve` process answers image chats through the official `openai` client, exactly
as the reference does, and its /metrics report what the engine allocated."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from conftest import ALLOWED_IMAGE_HOST, make_image
from openai import AsyncOpenAI, BadRequestError, OpenAI

from model_registry import render_prompt
from pmod_serve.pmod.schedule import PmodSchedule, kept_target_count

MAX_TOKENS = 12


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def user_message(text: str, urls: list[str]) -> dict:
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                        {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def image_host():
    """A local HTTP server for image URLs (a loopback address the test server explicitly allows)."""
    images = {"/cat.png": png_bytes(make_image(500, 400, 31)), "/wide.png": png_bytes(make_image(900, 300, 32))}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = images.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            if body:
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((ALLOWED_IMAGE_HOST, 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://{ALLOWED_IMAGE_HOST}:{server.server_address[1]}", {k: make_image(*s) for k, s in
                                                         {"/cat.png": (500, 400, 31), "/wide.png": (900, 300, 32)}.items()}
    server.shutdown()


def chat(server, messages, stream: bool = False) -> list[int]:
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="EMPTY", timeout=300)
    kwargs = dict(model=server.model, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                  extra_body={"return_token_ids": True})
    if not stream:
        response = client.chat.completions.create(**kwargs)
        return list(response.choices[0].token_ids)
    ids: list[int] = []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if chunk.choices:
            ids.extend(getattr(chunk.choices[0], "token_ids", None) or [])
    return ids


def expected(reference, tiny_next, messages, images):
    return reference.generate(tiny_next, render_prompt(messages), images, MAX_TOKENS)


@pytest.mark.parametrize("stream", [False, True])
def test_data_url_image(pmod_server, tiny_next, reference, stream):
    image = make_image(640, 480, 41)
    messages = [user_message("What is in this image?", [data_url(image)])]
    assert chat(pmod_server, messages, stream) == expected(reference, tiny_next, messages, [image])


def test_http_url_image(pmod_server, tiny_next, reference, image_host):
    base, images = image_host
    messages = [user_message("Describe it.", [f"{base}/cat.png"])]
    assert chat(pmod_server, messages) == expected(reference, tiny_next, messages, [images["/cat.png"]])


def test_two_images_in_one_message_streaming(pmod_server, tiny_next, reference, image_host):
    base, images = image_host
    second = make_image(336, 336, 42)
    messages = [user_message("Compare them.", [f"{base}/wide.png", data_url(second)])]
    assert chat(pmod_server, messages, stream=True) == expected(
        reference, tiny_next, messages, [images["/wide.png"], second]
    )


def test_system_prompt_and_multi_turn(pmod_server, tiny_next, reference):
    image = make_image(400, 600, 43)
    messages = [
        {"role": "system", "content": "You are terse."},
        user_message("What is it?", [data_url(image)]),
        {"role": "assistant", "content": "A pattern."},
        {"role": "user", "content": "What colors?"},
    ]
    assert chat(pmod_server, messages) == expected(reference, tiny_next, messages, [image])


def test_concurrent_streaming_requests_match_reference(pmod_server, tiny_next, reference):
    """The core issue's acceptance, over HTTP: several prompts at once, streaming on."""
    cases = [([user_message(q, [data_url(img)])], [img]) for q, img in [
        ("What is this?", make_image(400, 300, 0)), ("Describe it.", make_image(300, 700, 1)),
        ("Any text?", make_image(672, 672, 2)), ("Colors?", make_image(1000, 200, 3)),
    ]] + [([{"role": "user", "content": "Tell me a story."}], [])]

    async def run_all():
        client = AsyncOpenAI(base_url=f"{pmod_server.base_url}/v1", api_key="EMPTY", timeout=600)

        async def one(messages):
            ids = []
            stream = await client.chat.completions.create(
                model=pmod_server.model, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                stream=True, extra_body={"return_token_ids": True})
            async for chunk in stream:
                if chunk.choices:
                    ids.extend(getattr(chunk.choices[0], "token_ids", None) or [])
            return ids

        return await asyncio.gather(*(one(m) for m, _ in cases))

    results = asyncio.run(run_all())
    for (messages, images), ids in zip(cases, results):
        assert ids == expected(reference, tiny_next, messages, images)


def test_completions_with_a_raw_prompt(pmod_server, tiny_next, reference):
    """/v1/completions with a raw vicuna prompt is tokenised like the released slow tokenizer."""
    prompt = render_prompt([{"role": "user", "content": "Tell me about the sea."}])
    client = OpenAI(base_url=f"{pmod_server.base_url}/v1", api_key="EMPTY", timeout=300)
    response = client.completions.create(model=pmod_server.model, prompt=prompt, max_tokens=MAX_TOKENS,
                                         temperature=0, extra_body={"return_token_ids": True})
    assert list(response.choices[0].token_ids) == reference.generate(tiny_next, prompt, [], MAX_TOKENS)


def test_private_image_hosts_are_refused_by_default(pmod_server):
    """Only ALLOWED_IMAGE_HOST is allowed on the test server; other non-public addresses are refused."""
    client = OpenAI(base_url=f"{pmod_server.base_url}/v1", api_key="EMPTY", timeout=60)
    for url in ["http://169.254.169.254/latest/meta-data", "http://10.1.2.3/x.png", "file:///etc/passwd",
                "http://127.0.0.1:9/x.png"]:
        with pytest.raises(BadRequestError):
            client.chat.completions.create(model=pmod_server.model, max_tokens=2,
                                           messages=[user_message("hi", [url])])
    assert httpx.get(f"{pmod_server.base_url}/health").status_code == 200


def test_metrics_follow_the_block_tables(pmod_server, tiny_next):
    config = json.loads((tiny_next / "config.json").read_text())
    schedule = PmodSchedule.from_config(config)
    before = pmod_server.metrics()
    image = make_image(672, 672, 51)  # 2x2 tiles: 576 + 48*49 visual tokens
    num_targets = 576 + 48 * 49
    chat(pmod_server, [user_message("Describe it.", [data_url(image)])])
    after = pmod_server.metrics()
    saved = sum(num_targets - kept_target_count(num_targets, r) for r in schedule.retention_ratio.values())
    assert after["pmod_kv_slots_saved_total"] - before.get("pmod_kv_slots_saved_total", 0) == saved
    assert after["pmod_visual_tokens_total"] - before.get("pmod_visual_tokens_total", 0) == num_targets
    assert after["pmod_request_kv_savings_ratio_count"] - before.get("pmod_request_kv_savings_ratio_count", 0) == 1
    # Idle again: nothing held.
    deadline = time.monotonic() + 10
    while pmod_server.metrics()["pmod_kv_blocks_in_use"] != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    idle = pmod_server.metrics()
    assert idle["pmod_kv_blocks_in_use"] == 0
    assert idle["pmod_kv_cache_savings_ratio"] == 0


def test_savings_gauge_during_a_long_generation(pmod_server):
    """While a long request decodes, the gauges are live and the ratio is the blocks' ratio.

    The scheduler publishes usage at most every 50 ms, and a slow client may read the stream after
    the engine has finished (vLLM then merges tokens into fewer chunks): so the first sample is
    polled for right after the first token, with ~199 decode steps still to run, and a later
    sample may find the engine idle again (both gauges 0).
    """
    client = OpenAI(base_url=f"{pmod_server.base_url}/v1", api_key="EMPTY", timeout=600)
    image = make_image(672, 672, 52)
    samples = []
    stream = client.chat.completions.create(
        model=pmod_server.model, messages=[user_message("Go on.", [data_url(image)])],
        max_tokens=200, temperature=0, stream=True, extra_body={"ignore_eos": True})
    for _chunk in stream:
        if not samples:  # the first chunk comes with the first token
            deadline = time.monotonic() + 5
            sample = pmod_server.metrics()
            while sample["pmod_kv_blocks_in_use"] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
                sample = pmod_server.metrics()
            samples.append(sample)
        elif samples and len(samples) < 4:
            samples.append(pmod_server.metrics())
    assert samples and samples[0]["pmod_kv_blocks_in_use"] > 0
    for sample in samples:
        in_use, dense = sample["pmod_kv_blocks_in_use"], sample["pmod_kv_blocks_dense_equivalent"]
        if in_use == dense == 0:
            assert sample["pmod_kv_cache_savings_ratio"] == 0  # finished before this scrape
            continue
        assert 0 < in_use < dense
        assert sample["pmod_kv_cache_savings_ratio"] == pytest.approx(1 - in_use / dense)
        assert 0.3 < sample["pmod_kv_cache_savings_ratio"] < 0.6
