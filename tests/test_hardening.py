"""Issue 14 under both entry points (`pmod-serve` and plain `vllm serve <checkpoint>`, no flag):

- every sampling option / chat extension that touches prompt tokens or log-probs, with an image,
  streaming and not, is answered (200 or a clean 4xx) and the server keeps serving;
- image-position prompt log-probs have their defined meaning (-inf, reported as -9999.0);
- a request refused for any reason does not poison its image: the same image and a new image
  both answer 200 afterwards;
- private, loopback, link-local and decimal-IP image URLs are refused on every route that loads
  images, before any connection (local listeners prove no connection is made; non-loopback
  addresses are never connected to: the refusal happens at the address check);
- the bad-input classes of test_bad_input.py under plain `vllm serve` too.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from conftest import ALLOWED_IMAGE_HOST, make_image
from test_bad_input import CASES, png_header_only


@pytest.fixture(scope="module")
def vocab_size(tiny_next) -> int:
    """The text vocabulary; the image placeholder id is this (one past it)."""
    return json.loads((tiny_next / "config.json").read_text())["vocab_size"]


def png_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_messages(url: str, text: str = "What is this?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def post(server, path: str, body: dict, timeout: float = 300) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=timeout)


def assert_serving(server, url: str | None = None) -> None:
    """Healthy, and a normal request (with `url` as its image, if given) answers 200."""
    assert httpx.get(f"{server.base_url}/health", timeout=30).status_code == 200
    messages = image_messages(url) if url else [{"role": "user", "content": "Say something."}]
    response = post(server, "/v1/chat/completions", {"model": server.model, "messages": messages, "max_tokens": 3})
    assert response.status_code == 200, response.text[:500]
    assert response.json()["choices"][0]["message"]["content"] is not None


def assert_clean_error(response: httpx.Response) -> str:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    body = response.json()
    message = (body.get("error") or {}).get("message")
    assert message, body
    return message


# --- 1. sampling options and chat extensions that touch prompt tokens or log-probs ----------------

def _options(image_id: int) -> dict[str, dict]:
    return {
        "prompt_logprobs": {"prompt_logprobs": 2},
        "prompt_logprobs=-1 (whole vocabulary)": {"prompt_logprobs": -1},
        "echo": {"echo": True},
        "echo with logprobs": {"echo": True, "logprobs": True, "top_logprobs": 2},
        "logprobs/top_logprobs": {"logprobs": True, "top_logprobs": 5},
        "absurd top_logprobs": {"logprobs": True, "top_logprobs": 100000},
        "return_tokens_as_token_ids": {"logprobs": True, "top_logprobs": 1, "return_tokens_as_token_ids": True},
        "return_token_ids": {"return_token_ids": True},
        "truncate_prompt_tokens": {"truncate_prompt_tokens": 20},
        "allowed_token_ids with the image id": {"allowed_token_ids": [image_id, 5]},
        "allowed_token_ids in vocabulary": {"allowed_token_ids": [5, 6, 7]},
        "logit_bias on the image id": {"logit_bias": {str(image_id): 50}},
        "logit_bias in vocabulary": {"logit_bias": {"5": 20}},
        "bad_words with <image>": {"bad_words": ["<image>"]},
        "bad_words": {"bad_words": ["hello", "the"]},
        "stop_token_ids with the image id": {"stop_token_ids": [image_id]},
        "beam search": {"use_beam_search": True, "n": 2},
        "structured output: json_object": {"response_format": {"type": "json_object"}},
        "structured output: regex": {"structured_outputs": {"regex": "[ab]{3}"}},
        "structured output: choice": {"structured_outputs": {"choice": ["yes", "no"]}},
        "penalties": {"repetition_penalty": 1.5, "presence_penalty": 1.0, "frequency_penalty": 1.0},
        "min_tokens": {"min_tokens": 2, "ignore_eos": True},
        "n=2": {"n": 2, "temperature": 1.0, "seed": 3},
        "special tokens": {"skip_special_tokens": False, "spaces_between_special_tokens": False},
        "continue_final_message": {"continue_final_message": True, "add_generation_prompt": False},
    }


OPTIONS = list(_options(0))


def read_stream(response: httpx.Response) -> tuple[bool, str | None]:
    """(finished with [DONE], error message if the stream carried one)."""
    done, error = False, None
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            continue
        event = json.loads(line[6:])
        if "error" in event:
            error = event["error"].get("message") or "?"
    return done, error


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("option", OPTIONS)
def test_option_with_image_then_still_serving(server, vocab_size, option, stream):
    url = png_url(make_image(320, 240, 200 + OPTIONS.index(option)))
    messages = image_messages(url)
    if option == "continue_final_message":
        messages.append({"role": "assistant", "content": "It is"})
    body = {"model": server.model, "messages": messages, "max_tokens": 3, "stream": stream, **_options(vocab_size)[option]}
    if not stream:
        response = post(server, "/v1/chat/completions", body)
        if response.status_code != 200:
            assert_clean_error(response)
    else:
        with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=300) as response:
            if response.status_code != 200:
                response.read()
                assert_clean_error(response)
            else:
                done, error = read_stream(response)
                assert done or error, "stream ended without [DONE] or an error event"
    assert_serving(server, url)


def test_image_prompt_logprobs_have_a_defined_meaning(server, vocab_size):
    """Image positions: the placeholder is not in the vocabulary, so its log-prob is -inf
    (vLLM reports -9999.0) and its rank vocab_size+1; text positions are ordinary log-probs."""
    url = png_url(make_image(336, 336, 250))
    body = {"model": server.model, "messages": image_messages(url), "max_tokens": 2, "prompt_logprobs": 1,
            "return_token_ids": True}
    response = post(server, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text[:500]
    result = response.json()
    ids, logprobs = result["prompt_token_ids"], result["prompt_logprobs"]
    assert len(ids) == len(logprobs) and logprobs[0] is None
    image_id = str(vocab_size)
    image_positions = [i for i, token in enumerate(ids) if token == vocab_size]
    assert len(image_positions) > 500
    for i in image_positions:
        entry = logprobs[i][image_id]
        assert entry["logprob"] == -9999.0 and entry["rank"] == vocab_size + 1
        assert entry["decoded_token"] == "<image>"
        assert len(logprobs[i]) == 2  # plus the model's top-1 at that position, a real token
    for i, token in enumerate(ids[1:], start=1):
        if token != vocab_size:
            assert -9999.0 < logprobs[i][str(token)]["logprob"] <= 0


def test_completions_echo_with_logprobs_and_raw_image_ids_is_refused_cleanly(server, vocab_size):
    """/v1/completions with token ids that include the image placeholder but no image."""
    body = {"model": server.model, "prompt": [1, 5, vocab_size, 6], "max_tokens": 2, "echo": True, "logprobs": 1}
    assert_clean_error(post(server, "/v1/completions", body))
    assert_serving(server)


def test_token_in_route_refuses_client_multimodal_features(server, vocab_size):
    """/inference/v1/generate hands client-supplied multimodal items to the engine: one request
    naming an image hash the engine never saw killed it (`Encoder cache miss`)."""
    base = {"model": server.model, "sampling_params": {"max_tokens": 2}}
    features = {"mm_hashes": {"image": ["0" * 64]}, "mm_placeholders": {"image": [{"offset": 1, "length": 1}]}}
    assert_clean_error(post(server, "/inference/v1/generate", {**base, "token_ids": [1, vocab_size, 6],
                                                               "features": features}))
    assert_clean_error(post(server, "/inference/v1/generate", {**base, "token_ids": [1, vocab_size, 6]}))
    assert post(server, "/inference/v1/generate", {**base, "token_ids": [1, 5, 6]}).status_code == 200
    assert_serving(server)


# --- 2. a refused request does not poison its image -----------------------------------------------

REFUSALS = {
    "literal <image> in the text": {"text": "<image>\nWhat is this?"},
    "max_tokens -1": {"max_tokens": -1},
    "temperature -3": {"temperature": -3},
    "absurd top_logprobs": {"logprobs": True, "top_logprobs": 100000},
    "prompt_logprobs beyond the limit": {"prompt_logprobs": 100000},
    "allowed_token_ids outside the vocabulary": {"allowed_token_ids": [10**6]},
    "logit_bias outside the vocabulary": {"logit_bias": {"1000000": 1}},
    "n 0": {"n": 0},
    "top_p 0": {"top_p": 0},
    "max_tokens beyond the context": {"max_tokens": 10**6, "extra_image": False},
}


@pytest.mark.parametrize("refusal", list(REFUSALS))
def test_refused_request_does_not_poison_its_image(server, refusal):
    seed = 300 + list(REFUSALS).index(refusal)
    url = png_url(make_image(360, 270, seed))
    extra = dict(REFUSALS[refusal])
    text = extra.pop("text", "What is this?")
    extra.pop("extra_image", None)
    body = {"model": server.model, "messages": image_messages(url, text), "max_tokens": 3, **extra}
    response = post(server, "/v1/chat/completions", body)
    assert_clean_error(response)
    for _ in range(2):
        assert_serving(server, url)  # the same image, twice
    assert_serving(server, png_url(make_image(360, 270, seed + 1000)))  # and a new one


def test_image_too_long_for_the_context_does_not_poison_it(server):
    """Refused by vLLM's prompt-length check, after the multimodal processor has run."""
    urls = [png_url(make_image(672, 672, 401)), png_url(make_image(672, 672, 402))]
    body = {"model": server.model, "max_tokens": 3, "messages": [{"role": "user", "content": [
        *({"type": "image_url", "image_url": {"url": u}} for u in urls), {"type": "text", "text": "Hi"}]}]}
    assert_clean_error(post(server, "/v1/chat/completions", body))
    for url in urls:
        assert_serving(server, url)


# --- 3. image URLs on every route that loads images -----------------------------------------------

def _chat(model, url):
    return {"model": model, "max_tokens": 2, "messages": image_messages(url)}


IMAGE_ROUTES = {
    "/v1/chat/completions": _chat,
    "/v1/chat/completions (stream)": lambda model, url: {**_chat(model, url), "stream": True},
    "/v1/chat/completions/batch": lambda model, url: {"model": model, "max_tokens": 2,
                                                      "messages": [image_messages(url)]},
    "/v1/chat/completions/render": lambda model, url: {"model": model, "messages": image_messages(url)},
    "/v1/messages": lambda model, url: {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": url}}, {"type": "text", "text": "Hi"}]}]},
    "/v1/messages/count_tokens": lambda model, url: {"model": model, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": url}}, {"type": "text", "text": "Hi"}]}]},
    "/v1/responses": lambda model, url: {"model": model, "max_output_tokens": 2, "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": url, "detail": "auto"}, {"type": "input_text", "text": "Hi"}]}]},
    "/invocations": _chat,
    "/tokenize": lambda model, url: {"model": model, "messages": image_messages(url)},
}


def route_path(route: str) -> str:
    return route.split(" ")[0]


def anthropic_base64(url: str) -> dict:
    media, _, data = url.partition(",")
    return {"type": "base64", "media_type": media[5:].split(";")[0], "data": data}


class Listener:
    """A TCP listener on a loopback address that counts connections."""

    def __init__(self, host: str, family=socket.AF_INET) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@pytest.fixture(scope="module")
def listeners():
    made = {"127.0.0.1": Listener("127.0.0.1"), "127.0.0.2": Listener("127.0.0.2")}
    try:
        made["::1"] = Listener("::1", socket.AF_INET6)
    except OSError:
        pass  # no IPv6 loopback here
    yield made
    for listener in made.values():
        listener.close()


def private_urls(listeners) -> list[str]:
    port1, port2 = listeners["127.0.0.1"].port, listeners["127.0.0.2"].port
    urls = [
        f"http://127.0.0.1:{port1}/a.png",
        f"http://localhost:{port1}/a.png",
        f"http://2130706433:{port1}/a.png",            # 127.0.0.1 as a decimal integer
        f"http://0x7f000001:{port1}/a.png",            # ... and in hex
        f"http://[::ffff:127.0.0.1]:{port1}/a.png",    # IPv4-mapped IPv6
        f"http://127.0.0.2:{port2}/a.png",
        f"https://127.0.0.1:{port1}/a.png",
        # Never connected to (refused at the address check, before any connection):
        "http://169.254.169.254/latest/meta-data/",    # link-local (cloud metadata)
        "http://10.0.0.1/a.png", "http://172.16.5.4/a.png", "http://192.168.1.1/a.png",  # private
        "http://167772161/a.png",                      # 10.0.0.1 as a decimal integer
        "http://[fe80::1]/a.png", "http://[fd00::1]/a.png",  # IPv6 link-local, unique-local
        "http://0.0.0.0/a.png", "http://100.64.0.1/a.png",   # unspecified, shared address space
    ]
    if "::1" in listeners:
        urls.append(f"http://[::1]:{listeners['::1'].port}/a.png")
    return urls


@pytest.mark.parametrize("route", list(IMAGE_ROUTES))
def test_private_image_urls_refused_on_every_route(server, listeners, route):
    before = {host: listener.connections for host, listener in listeners.items()}
    for url in private_urls(listeners):
        body = IMAGE_ROUTES[route](server.model, url)
        response = post(server, route_path(route), body, timeout=60)
        message = assert_clean_error(response)
        assert "non-public address" in message and "refused" in message, (url, message)
    assert {host: listener.connections for host, listener in listeners.items()} == before
    assert_serving(server)


@pytest.mark.parametrize("route", list(IMAGE_ROUTES))
def test_image_header_checks_on_every_route(server, route):
    """A decompression bomb and an empty image as data URLs: 4xx before anything decodes them."""
    for payload in (png_header_only(20000, 20000), png_header_only(0, 0), b"not an image at all"):
        url = "data:image/png;base64," + base64.b64encode(payload).decode()
        body = IMAGE_ROUTES[route](server.model, url)
        if route_path(route).startswith("/v1/messages"):
            body["messages"][0]["content"][0]["source"] = anthropic_base64(url)
        assert_clean_error(post(server, route_path(route), body, timeout=60))
    assert_serving(server)


@pytest.mark.parametrize("route", list(IMAGE_ROUTES))
def test_valid_image_on_every_route(server, route):
    url = png_url(make_image(300, 300, 500))
    body = IMAGE_ROUTES[route](server.model, url)
    if route_path(route).startswith("/v1/messages"):
        body["messages"][0]["content"][0]["source"] = anthropic_base64(url)
    response = post(server, route_path(route), body)
    assert response.status_code == 200, response.text[:500]


@pytest.fixture(scope="module")
def redirecting_host(listeners):
    """On the host pmod_server allows: /redirect points at a refused loopback listener."""
    target = f"http://127.0.0.1:{listeners['127.0.0.1'].port}/a.png"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(302)
            self.send_header("Location", target)
            self.end_headers()

        def log_message(self, *args):
            pass

    host = ThreadingHTTPServer((ALLOWED_IMAGE_HOST, 0), Handler)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    yield f"http://{ALLOWED_IMAGE_HOST}:{host.server_address[1]}"
    host.shutdown()


def test_redirects_and_unreachable_allowed_hosts_give_4xx(pmod_server, listeners, redirecting_host):
    before = listeners["127.0.0.1"].connections
    message = assert_clean_error(post(pmod_server, "/v1/chat/completions",
                                      _chat(pmod_server.model, f"{redirecting_host}/redirect")))
    assert "redirect" in message
    assert listeners["127.0.0.1"].connections == before
    with socket.socket() as probe:  # a port on the allowed host with nothing listening
        probe.bind((ALLOWED_IMAGE_HOST, 0))
        closed_port = probe.getsockname()[1]
    message = assert_clean_error(post(pmod_server, "/v1/chat/completions",
                                      _chat(pmod_server.model, f"http://{ALLOWED_IMAGE_HOST}:{closed_port}/a.png")))
    assert "failed" in message
    assert_serving(pmod_server)


# --- 4. the bad-input classes of test_bad_input.py, under plain `vllm serve` ----------------------

@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_classes_under_plain_vllm_serve(plain_server, case):
    body = {"model": plain_server.model, "messages": CASES[case], "max_tokens": 4}
    response = post(plain_server, "/v1/chat/completions", body)
    if case == "more images than allowed" and response.status_code == 200:
        pass  # plain `vllm serve` has no per-prompt image limit of 4 (pmod-serve's default)
    else:
        assert_clean_error(response)
    assert_serving(plain_server)
    assert_serving(plain_server, png_url(make_image(400, 300, 81)))  # test_bad_input's GOOD image



# Last in this module: after every refusal and option above, no KV block is held and no request
# is running or waiting. One test per server, so that each runs in the process of its server's
# other tests under pytest-xdist (tests/conftest.py).
def assert_nothing_held(server) -> None:
    from test_aborts import wait_idle

    assert wait_idle(server, timeout=120) == {"pmod_kv_blocks_in_use": 0, "vllm:kv_cache_usage_perc": 0,
                                              "vllm:num_requests_running": 0, "vllm:num_requests_waiting": 0}


def test_nothing_held_after_all_of_the_above_pmod_serve(pmod_server):
    assert_nothing_held(pmod_server)


def test_nothing_held_after_all_of_the_above_vllm_serve(plain_server):
    assert_nothing_held(plain_server)
