"""With an API key, every route of the running app refuses a request without it (401), except
liveness/readiness (/health, /ping) and /metrics; admin routes (elastic EP) are not exposed (404)
unless the operator asked for them. Under `pmod-serve` and plain `vllm serve` alike.

The routes are not listed by hand: they are those of the running server's OpenAPI schema plus
those of the app vLLM's own `build_app` builds for the same arguments (which also has the routes
hidden from the schema: docs, mounts).
"""

from __future__ import annotations

import re

import httpx
import pytest
from conftest import API_KEY as KEY

OPEN = {"/health", "/ping", "/metrics"}


# `keyed_servers` (tests/conftest.py): pmod-serve and plain vllm serve, both with `--api-key KEY`.


@pytest.fixture(scope="module")
def app_routes(tiny_next) -> set[tuple[str, str]]:
    """(method, path) of the app vLLM builds for these arguments, hidden routes included."""
    from starlette.routing import Mount
    from vllm.entrypoints.openai.api_server import build_app
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", str(tiny_next), "--api-key", KEY])
    app = build_app(args, ("generate",), None)
    routes = set()
    for route in app.routes:
        if isinstance(route, Mount):
            routes |= {("GET", route.path), ("GET", route.path + "/x")}
            continue
        for method in getattr(route, "methods", None) or {"GET"}:
            if method != "HEAD":
                routes.add((method, route.path))
    return routes


def schema_routes(server) -> set[tuple[str, str]]:
    response = httpx.get(f"{server.base_url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert response.status_code == 200
    return {(method.upper(), path) for path, item in response.json()["paths"].items() for method in item}


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


@pytest.mark.parametrize("entry_point", ["pmod-serve", "vllm serve"])
def test_every_route_needs_the_key(keyed_servers, app_routes, entry_point):
    server = keyed_servers[entry_point]
    routes = schema_routes(server) | app_routes
    assert ("POST", "/invocations") in routes and ("POST", "/tokenize") in routes  # the walk is real
    admin = {path for _, path in routes if "elastic_ep" in path}
    assert admin, "vLLM 0.26 mounts elastic-EP routes; the walk should see them"
    for method, path in sorted(routes):
        url = f"{server.base_url}{concrete(path)}"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = httpx.request(method, url, json={}, headers=headers, timeout=60)
            if path in OPEN:
                assert response.status_code == 200, (method, path, response.status_code)
            elif path in admin:
                assert response.status_code == 404, (method, path, response.status_code)
            else:
                assert response.status_code in (401, 403), (method, path, headers, response.status_code,
                                                            response.text[:200])
    # The key itself works, on /v1 and off it.
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{server.base_url}/v1/models", headers=auth, timeout=60).status_code == 200
    tokens = httpx.post(f"{server.base_url}/tokenize", headers=auth, timeout=60,
                        json={"model": server.model, "prompt": "Hello"})
    assert tokens.status_code == 200 and tokens.json()["tokens"]
    chat = httpx.post(f"{server.base_url}/invocations", headers=auth, timeout=300,
                      json={"model": server.model, "max_tokens": 2,
                            "messages": [{"role": "user", "content": "Hi"}]})
    assert chat.status_code == 200, chat.text[:300]
    # Admin routes stay off with the key too.
    assert httpx.post(f"{server.base_url}/scale_elastic_ep", headers=auth, timeout=60,
                      json={"new_data_parallel_size": 2}).status_code == 404
