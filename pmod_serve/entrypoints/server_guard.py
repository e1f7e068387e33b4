"""Access control of the API server for p-MoD models: the API key on every route, admin routes off.

vLLM's `--api-key` (`AuthenticationMiddleware`) guards only paths under `/v1`, `/v2` and
`/inference`: `/invocations` (a full chat completion), `/tokenize`, `/detokenize`, `/pooling`-like
routes, `/generative_scoring`, `/load`, `/version`, the docs and the elastic-EP admin route
`/scale_elastic_ep` answer without a key, and `/scale_elastic_ep` is mounted even on a server that
never asked for elastic expert parallelism.

`ServerGuardMiddleware`, installed for p-MoD models under `pmod-serve` and plain `vllm serve`
alike (`install()`, called from the config hook, adds it to the app through vLLM's own
`--middleware` list), turns that around: with an API key set (`--api-key` or `VLLM_API_KEY`, as
vLLM reads them), every path needs `Authorization: Bearer <key>` except liveness/readiness
(`/health`, `/ping`) and `/metrics`, whatever routes this vLLM version mounts. The elastic-EP
routes answer 404 unless the server was started with vLLM's `--enable-elastic-ep`. Request bodies
are capped (413) before anything reads them.

`install()` also makes the Anthropic routes (`/v1/messages`, `/v1/messages/count_tokens`) answer
request errors as vLLM's OpenAI routes do: vLLM's Anthropic router turns *every* exception of
its handler into a 500 `internal_error`, so a refused image URL, an undecodable image or too
many `<image>` markers were 500s there while `/v1/chat/completions` answers 400.

And it refuses client-supplied multimodal `features` on vLLM's token-in/token-out route
`/inference/v1/generate` (400) unless the operator sets `PMOD_ALLOW_MM_FEATURES=1`: that route
hands pre-processed multimodal items and placeholder ranges straight to the engine, skipping the
renderer and the multimodal processor, so one request naming an image hash the engine never saw
kills the engine core (`RuntimeError: Encoder cache miss`). It is meant for a trusted render
service in front of the engine, not for clients.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sys

from pmod_serve import envs

OPEN_PATHS = frozenset({"/health", "/ping", "/metrics"})

MIDDLEWARE = "pmod_serve.entrypoints.server_guard.ServerGuardMiddleware"


def admin_paths() -> frozenset[str]:
    """The paths of vLLM's elastic-EP router (read from the router, not listed by hand)."""
    from vllm.entrypoints.serve.elastic_ep.api_router import router

    return frozenset(route.path for route in router.routes)


def _api_tokens(app) -> list[bytes]:
    import vllm.envs as envs

    args = getattr(getattr(app, "state", None), "args", None)
    keys = [key for key in ((getattr(args, "api_key", None) or []) or [envs.VLLM_API_KEY]) if key]
    return [hashlib.sha256(key.encode()).digest() for key in keys]


def _elastic_ep_enabled(app) -> bool:
    config = getattr(getattr(app, "state", None), "vllm_config", None)
    return bool(config is not None and config.parallel_config.enable_elastic_ep)


def _error(status: int, message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()


class ServerGuardMiddleware:
    def __init__(self, app) -> None:
        self.app = app
        self.admin_paths = admin_paths()
        self._tokens: list[bytes] | None = None

    def _authorized(self, scope) -> bool:
        if self._tokens is None:
            self._tokens = _api_tokens(scope.get("app"))
        if not self._tokens:
            return True
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(token.encode()).digest()
        match = False
        for expected in self._tokens:
            match |= secrets.compare_digest(digest, expected)
        return match

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if path in self.admin_paths and not _elastic_ep_enabled(scope.get("app")):
            return await self._refuse(scope, send, 404, "Not Found", "NotFoundError")
        if scope.get("method") != "OPTIONS" and path not in OPEN_PATHS and not self._authorized(scope):
            return await self._refuse(scope, send, 401, "Unauthorized: a valid API key is required", "AuthenticationError")
        if scope["type"] == "http":
            length = dict(scope.get("headers") or []).get(b"content-length")
            max_body_bytes = envs.PMOD_MAX_BODY_BYTES
            if length is not None and length.isdigit() and int(length) > max_body_bytes:
                return await self._refuse(scope, send, 413, f"request body exceeds {max_body_bytes} bytes",
                                          "RequestEntityTooLarge")
            receive = self._capped(receive, max_body_bytes)
        return await self.app(scope, receive, send)

    @staticmethod
    def _capped(receive, max_body_bytes: int):
        seen = 0

        async def capped():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > max_body_bytes:
                # Chunked upload past the cap: stop reading, as a disconnect.
                return {"type": "http.disconnect"}
            return message

        return capped

    @staticmethod
    async def _refuse(scope, send, status: int, message: str, kind: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        payload = _error(status, message, kind)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def install() -> None:
    """Make vLLM's `build_app` add `ServerGuardMiddleware` (outermost) to the app it builds.

    Called from the p-MoD config hook, i.e. in the API server process of a p-MoD model before the
    app is built. `build_app` adds the `--middleware` entries last, so the guard sees every
    request first; wrapping it here is what lets plain `vllm serve` have it with no flag.
    """
    for name in ("vllm.entrypoints.openai.api_server", "__main__"):
        module = sys.modules.get(name)
        spec = getattr(module, "__spec__", None)
        if module is None or getattr(spec, "name", name) != "vllm.entrypoints.openai.api_server":
            continue
        build_app = getattr(module, "build_app", None)
        if build_app is None or getattr(build_app, "_pmod_guarded", False):
            continue

        def guarded_build_app(args, *rest, _build_app=build_app, **kwargs):
            if MIDDLEWARE not in (args.middleware or []):
                args.middleware = [*(args.middleware or []), MIDDLEWARE]
            return _build_app(args, *rest, **kwargs)

        guarded_build_app._pmod_guarded = True
        module.build_app = guarded_build_app
    _anthropic_request_errors_are_4xx()
    _refuse_client_mm_features()


MM_FEATURES_ENV = "PMOD_ALLOW_MM_FEATURES"


def _refuse_client_mm_features() -> None:
    try:
        from vllm.entrypoints.scale_out.token_in_token_out.serving import ServingTokens
    except ImportError:  # pragma: no cover - a vLLM without the token-in/token-out API
        return
    original = ServingTokens.serve_tokens
    if getattr(original, "_pmod_guarded", False):
        return

    async def serve_tokens(self, request, raw_request=None):
        if request.features is not None and not envs.PMOD_ALLOW_MM_FEATURES:
            from vllm.exceptions import VLLMValidationError

            return self.create_error_response(VLLMValidationError(
                "multimodal `features` (pre-processed items) are not accepted from clients by this "
                f"server; send images through a chat route (an operator can allow them: {MM_FEATURES_ENV}=1)",
                parameter="features",
            ))
        return await original(self, request, raw_request)

    serve_tokens._pmod_guarded = True
    ServingTokens.serve_tokens = serve_tokens


def _anthropic_request_errors_are_4xx() -> None:
    try:
        from vllm.entrypoints.anthropic.serving import AnthropicServingMessages
    except ImportError:  # pragma: no cover - a vLLM without the Anthropic API
        return
    for name in ("create_messages", "count_tokens"):
        original = getattr(AnthropicServingMessages, name, None)
        if original is None or getattr(original, "_pmod_guarded", False):
            continue

        async def handler(self, request, raw_request=None, _original=original):
            try:
                return await _original(self, request, raw_request)
            except (ValueError, TypeError, OverflowError) as exc:
                # What vLLM's app-level exception handler does for the OpenAI routes: a 400
                # (VLLMValidationError and friends are ValueErrors); the router translates it.
                return self.create_error_response(exc)

        handler._pmod_guarded = True
        handler.__name__ = name
        setattr(AnthropicServingMessages, name, handler)
