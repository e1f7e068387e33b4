"""Bad input gets an OpenAI-style 4xx with a clear message, and nothing else happens: after each
case the server is healthy and a normal request still answers exactly."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import httpx
import pytest
from conftest import make_image

from model_registry import render_prompt


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny (invalid) pixel stream."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 16)) + \
        png_chunk(b"IEND", b"")


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(payload: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(payload).decode()


def image_message(urls: list[str], text: str = "What is this?") -> dict:
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                        {"type": "text", "text": text}]}


GOOD = png(make_image(400, 300, 81))
CASES = {
    "invalid base64": [image_message(["data:image/png;base64,@@@not-base64@@@"])],
    "not an image": [image_message([data_url(b"hello, I am a text file" * 10)])],
    "truncated png": [image_message([data_url(GOOD[: len(GOOD) // 3])])],
    "decompression bomb 20000x20000": [image_message([data_url(png_header_only(20000, 20000))])],
    "zero-sized image": [image_message([data_url(png_header_only(0, 0))])],
    "more images than allowed": [image_message([data_url(GOOD)] * 5)],
    "<image> markers that do not match the images": [image_message([data_url(GOOD)], "<image>\nand <image>")],
    "prompt plus visual tokens beyond max_model_len": [
        image_message([data_url(png(make_image(672, 672, 82))), data_url(png(make_image(672, 672, 83)))])
    ],
    "unknown content part type": [{"role": "user", "content": [{"type": "hologram", "data": "x"}]}],
}


def post_chat(server, body, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/chat/completions", timeout=300, **kwargs,
                      **({"json": body} if not isinstance(body, (bytes, str)) else {"content": body}))


def assert_still_serving(server, tiny_next, reference) -> None:
    assert httpx.get(f"{server.base_url}/health", timeout=30).status_code == 200
    messages = [{"role": "user", "content": "Say something."}]
    response = post_chat(server, {"model": server.model, "messages": messages, "max_tokens": 6,
                                  "temperature": 0, "return_token_ids": True})
    assert response.status_code == 200, response.text
    ids = response.json()["choices"][0]["token_ids"]
    assert ids == reference.generate(tiny_next, render_prompt(messages), [], 6)


def assert_openai_error(response: httpx.Response, status: set[int]) -> str:
    assert response.status_code in status, (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert error["message"]
    return error["message"]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_content_is_refused_cleanly(pmod_server, tiny_next, reference, case):
    body = {"model": pmod_server.model, "messages": CASES[case], "max_tokens": 4}
    assert_openai_error(post_chat(pmod_server, body), {400, 413, 422})
    assert_still_serving(pmod_server, tiny_next, reference)


def test_malformed_json(pmod_server, tiny_next, reference):
    response = post_chat(pmod_server, b'{"model": "pmod-tiny", "messages": [', headers={"content-type": "application/json"})
    assert_openai_error(response, {400, 422})
    assert_still_serving(pmod_server, tiny_next, reference)


def test_oversized_body(pmod_server, tiny_next, reference):
    huge = data_url(b"\0" * (65 * 1024 * 1024))
    body = {"model": pmod_server.model, "messages": [image_message([huge])], "max_tokens": 2}
    assert_openai_error(post_chat(pmod_server, body), {413})
    assert_still_serving(pmod_server, tiny_next, reference)


def test_disallowed_image_hosts(pmod_server, tiny_next, reference):
    for url in ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/a.png", "http://[::1]:9/a.png",
                "file:///etc/passwd", "ftp://example.com/a.png"]:
        body = {"model": pmod_server.model, "messages": [image_message([url])], "max_tokens": 2}
        message = assert_openai_error(post_chat(pmod_server, body), {400})
        assert "refused" in message or "unsupported" in message or "resolve" in message
    assert_still_serving(pmod_server, tiny_next, reference)
