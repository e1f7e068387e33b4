"""ASGI middleware that fetches remote images itself, safely, before vLLM sees the request.

vLLM fetches `image_url` http(s) URLs from inside the server, which lets any client make the
server connect anywhere (SSRF). This middleware resolves each remote image URL of a chat request,
refuses loopback, private, link-local and other non-public addresses unless explicitly allowed,
enforces an optional domain allow-list, a timeout and a size cap, follows no redirects, and
replaces the URL with a `data:` URL of the fetched bytes. vLLM then never touches the network.

Configured by environment (set by `pmod-serve` flags; inherited by API server processes):
  PMOD_MEDIA_ALLOW_HOSTS     comma-separated hosts, IPs or CIDRs allowed even if not public
  PMOD_MEDIA_ALLOWED_DOMAINS comma-separated domains; if set, only these (and subdomains)
  PMOD_MEDIA_MAX_BYTES       size cap per image (default 20 MiB)
  PMOD_MEDIA_TIMEOUT         seconds per fetch (default 10)

Every image (fetched or given as a base64 `data:` URL) is also checked here: it must decode, be
a readable image, and have a size between 1x1 and vLLM's pixel limit (`VLLM_MAX_IMAGE_PIXELS`),
so that decompression bombs and empty images are refused with a 400 before anything decodes them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import json
import os
import socket
from urllib.parse import urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

CHAT_PATHS = ("/v1/chat/completions",)
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_TIMEOUT = 10.0
MAX_BODY_BYTES = 64 * 1024 * 1024  # the request body itself (data URLs included)


class MediaError(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def check_image_bytes(payload: bytes) -> None:
    """Refuse what is not a readable image of a sane size, reading only its header."""
    max_pixels = int(os.environ.get("VLLM_MAX_IMAGE_PIXELS", 178_956_970))
    try:
        with Image.open(io.BytesIO(payload)) as image:
            width, height = image.size
    except Image.DecompressionBombError as exc:
        raise MediaError(f"image refused as a possible decompression bomb: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MediaError("image data is not a readable image") from exc
    if width <= 0 or height <= 0:
        raise MediaError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise MediaError(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")


def decode_data_url(url: str) -> bytes | None:
    """The bytes of a base64 `data:` URL (None for other data URLs, which vLLM handles)."""
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        return None
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError("image data URL is not valid base64") from exc


def _split_env(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


class MediaPolicy:
    def __init__(self) -> None:
        self.allow_hosts = _split_env("PMOD_MEDIA_ALLOW_HOSTS")
        self.allowed_domains = [d.lower().lstrip(".") for d in _split_env("PMOD_MEDIA_ALLOWED_DOMAINS")]
        self.max_bytes = int(os.environ.get("PMOD_MEDIA_MAX_BYTES", DEFAULT_MAX_BYTES))
        self.timeout = float(os.environ.get("PMOD_MEDIA_TIMEOUT", DEFAULT_TIMEOUT))

    def _explicitly_allowed(self, host: str, address: ipaddress._BaseAddress) -> bool:
        for entry in self.allow_hosts:
            if entry == "*" or entry.lower() == host.lower():
                return True
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
        return False

    async def check(self, url: str) -> None:
        parts = urlsplit(url)
        host = parts.hostname
        if parts.scheme not in ("http", "https") or not host:
            raise MediaError(f"unsupported image URL {url[:100]!r}: use http(s) or a data: URL")
        if self.allowed_domains and not any(
            host.lower() == d or host.lower().endswith("." + d) for d in self.allowed_domains
        ):
            raise MediaError(f"image host {host!r} is not in the allowed media domains")
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80),
                                           type=socket.SOCK_STREAM)
        except OSError as exc:
            raise MediaError(f"cannot resolve image host {host!r}") from exc
        for info in infos:
            address = ipaddress.ip_address(info[4][0])
            if not address.is_global and not self._explicitly_allowed(host, address):
                raise MediaError(
                    f"image host {host!r} resolves to a non-public address ({address}); "
                    "refused (allow it with pmod-serve --media-allow-host)"
                )

    async def fetch(self, client: httpx.AsyncClient, url: str) -> str:
        await self.check(url)
        try:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise MediaError(f"fetching image {url[:100]!r} returned HTTP {response.status_code}")
                content_type = response.headers.get("content-type", "application/octet-stream").split(";")[0]
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise MediaError(f"image at {url[:100]!r} exceeds {self.max_bytes} bytes", 413)
                    chunks.append(chunk)
        except httpx.TimeoutException as exc:
            raise MediaError(f"fetching image {url[:100]!r} timed out after {self.timeout:g}s") from exc
        except httpx.HTTPError as exc:
            raise MediaError(f"fetching image {url[:100]!r} failed: {exc.__class__.__name__}") from exc
        payload = b"".join(chunks)
        check_image_bytes(payload)
        if not content_type.startswith("image/"):
            content_type = "image/png"  # vLLM sniffs the bytes; the type only labels the data URL
        return f"data:{content_type};base64,{base64.b64encode(payload).decode()}"


def _image_parts(body: dict):
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image_url":
                image_url = part.get("image_url")
                if isinstance(image_url, dict) and isinstance(image_url.get("url"), str):
                    yield image_url
                elif isinstance(image_url, str):
                    part["image_url"] = {"url": image_url}
                    yield part["image_url"]


def _error_body(message: str, status: int) -> bytes:
    error_type = "BadRequestError" if status == 400 else "RequestEntityTooLarge"
    return json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": status}}).encode()


class MediaGuardMiddleware:
    """Pass it to vLLM with `--middleware pmod_serve.media_guard.MediaGuardMiddleware`."""

    def __init__(self, app) -> None:
        self.app = app
        self.policy = MediaPolicy()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in CHAT_PATHS:
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY_BYTES:
                return await self._reject(send, f"request body exceeds {MAX_BODY_BYTES} bytes", 413)
        try:
            body = await self._inline_remote_images(body)
        except MediaError as exc:
            return await self._reject(send, str(exc), exc.status)

        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # disconnect notifications after the body
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _inline_remote_images(self, body: bytes) -> bytes:
        try:
            request = json.loads(body)
        except ValueError:
            return body  # vLLM answers malformed JSON itself
        if not isinstance(request, dict):
            return body
        parts = list(_image_parts(request))
        for part in parts:
            if part["url"].startswith("data:") and (payload := decode_data_url(part["url"])) is not None:
                check_image_bytes(payload)
        remote = [p for p in parts if not p["url"].startswith("data:")]
        if not remote:
            return body
        async with httpx.AsyncClient(timeout=self.policy.timeout, follow_redirects=False) as client:
            data_urls = await asyncio.gather(*(self.policy.fetch(client, p["url"]) for p in remote))
        for part, data_url in zip(remote, data_urls):
            part["url"] = data_url
        return json.dumps(request).encode()

    @staticmethod
    async def _reject(send, message: str, status: int) -> None:
        payload = _error_body(message, status)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})
