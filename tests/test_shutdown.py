"""Graceful shutdown: SIGTERM lets in-flight requests finish (pmod-serve drains for up to
--shutdown-timeout seconds), then the server exits 0.

The server is the API-keyed pmod-serve of tests/test_api_key.py (`keyed_servers`): a server that
has already served, ended here after that module's tests (tests/conftest.py: DRAINING_MODULES),
rather than one more server started for this test alone."""

from __future__ import annotations

import json
import signal
import threading

import httpx
import pytest
from conftest import API_KEY

pytestmark = pytest.mark.engine  # a server (keyed_servers)


def test_sigterm_drains_in_flight_requests_and_exits_0(keyed_servers):
    server = keyed_servers["pmod-serve"]
    try:
        assert server.process.poll() is None, "the server was stopped before this test"
        body = {"model": server.model, "max_tokens": 120, "ignore_eos": True, "stream": True, "temperature": 0,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "Tell me a long story."}]}
        chunks, finished = [], []

        def stream() -> None:
            with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=300,
                              headers={"Authorization": f"Bearer {API_KEY}"}) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        finished.append(True)
                    elif line.startswith("data: "):
                        chunks.append(json.loads(line[6:]))
                        if len(chunks) == 3:
                            # As Kubernetes does: SIGTERM to the server process only.
                            server.process.send_signal(signal.SIGTERM)

        client = threading.Thread(target=stream)
        client.start()
        client.join(timeout=300)
        assert server.process.wait(timeout=120) == 0
        assert finished, "the in-flight request was cut off"
        usage = [c["usage"] for c in chunks if c.get("usage")]
        assert usage and usage[-1]["completion_tokens"] == 120  # all of it, though SIGTERM came at chunk 3
    finally:
        server.stop()
