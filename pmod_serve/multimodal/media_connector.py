"""Safe media loading for p-MoD models: a vLLM media connector every route goes through.

vLLM loads every `image_url` / `input_image` / Anthropic `image` source of every route (chat,
render, `/v1/messages`, `/v1/responses`, `/invocations`, offline `LLM.chat`) through the media
connector named by `VLLM_MEDIA_CONNECTOR` in `vllm.multimodal.media.MEDIA_CONNECTOR_REGISTRY`
(`vllm/entrypoints/chat_utils.py`). Its default, "http", fetches any URL, private addresses
included (SSRF), follows redirects, and decodes images with no bomb check. The plugin registers
`PmodMediaConnector` as "pmod" and, for p-MoD models, makes it the default
(`pmod_serve.entrypoints.serving_config`), so plain `vllm serve <checkpoint>` is protected with no flag:

- http(s) URLs: the host is resolved first and every address it resolves to must be public
  (not loopback, private, link-local, reserved, ...) unless allowed; the connection then goes to
  the address that was checked (no second resolution, so DNS rebinding cannot swap it), with no
  redirects, vLLM's fetch timeout (`VLLM_IMAGE_FETCH_TIMEOUT`) and a size cap. vLLM's
  `--allowed-media-domains` is honoured as vLLM does it. Anything refused or unreachable is a
  `ValueError`, which vLLM's API answers with a 400 and a clear message; nothing is connected to
  before the address check.
- `file:` URLs: only with vLLM's `--allowed-local-media-path` (vLLM's own rule), else a 400.
- every image (fetched, `data:` URL or file) is checked from its header before anything decodes
  it: a readable image of at least 1x1 and at most vLLM's `VLLM_MAX_IMAGE_PIXELS` pixels.

Loosened by environment (`pmod_serve.envs`; set by `pmod-serve` flags, inherited by every process):
  PMOD_MEDIA_ALLOW_HOSTS   comma-separated hosts, IPs or CIDRs allowed although not public ('*': any)
  PMOD_MEDIA_MAX_BYTES     size cap per fetched item (default 20 MiB)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import ipaddress
import socket
from urllib.parse import urlsplit, urlunsplit

import httpx
from PIL import Image, UnidentifiedImageError
from vllm.multimodal.media import MEDIA_CONNECTOR_REGISTRY, MediaConnector
from vllm.multimodal.media.image import ImageMediaIO

from pmod_serve import envs

CONNECTOR_NAME = "pmod"
DEFAULT_TIMEOUT = 5.0  # vLLM's VLLM_IMAGE_FETCH_TIMEOUT default


class MediaError(ValueError):
    """A refused image or URL: vLLM's API turns ValueError into an OpenAI-style 400."""


def max_image_pixels() -> int:
    import vllm.envs as envs

    limit = envs.VLLM_MAX_IMAGE_PIXELS
    pil_bomb = 2 * (Image.MAX_IMAGE_PIXELS or 0)  # where PIL itself raises DecompressionBombError
    candidates = [n for n in (limit, pil_bomb) if n and n > 0]
    return min(candidates) if candidates else 0


def check_image_bytes(payload: bytes) -> None:
    """Refuse what is not a readable image of a sane size, reading only its header."""
    try:
        with Image.open(io.BytesIO(payload)) as image:
            width, height = image.size
    except Image.DecompressionBombError as exc:
        raise MediaError(f"image refused as a possible decompression bomb: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MediaError("image data is not a readable image") from exc
    if width <= 0 or height <= 0:
        raise MediaError(f"image has no pixels ({width}x{height})")
    limit = max_image_pixels()
    if limit and width * height > limit:
        raise MediaError(f"image of {width}x{height} pixels exceeds the limit of {limit} pixels")


def decode_data_url(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise MediaError("only base64 data: URLs are supported for images")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError("image data URL is not valid base64") from exc


def _short(url: str) -> str:
    return repr(url[:100] + ("..." if len(url) > 100 else ""))


class MediaPolicy:
    """Which remote hosts may be fetched, and how."""

    def __init__(self) -> None:
        self.allow_hosts = envs.PMOD_MEDIA_ALLOW_HOSTS
        self.max_bytes = envs.PMOD_MEDIA_MAX_BYTES

    def _explicitly_allowed(self, host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        for entry in self.allow_hosts:
            if entry == "*" or entry.lower() == host.lower():
                return True
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
        return False

    @staticmethod
    def split(url: str) -> tuple[str, str, int]:
        parts = urlsplit(url)
        try:
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            raise MediaError(f"invalid image URL {_short(url)}") from exc
        if parts.scheme not in ("http", "https") or not host:
            raise MediaError(f"unsupported image URL {_short(url)}: use http(s) or a data: URL")
        return parts.scheme, host, port or (443 if parts.scheme == "https" else 80)

    def vet(self, host: str, infos: list) -> str:
        """The address to connect to, once every address `host` resolves to is acceptable."""
        addresses = []
        for info in infos:
            address = ipaddress.ip_address(info[4][0].split("%")[0])
            if not address.is_global and not self._explicitly_allowed(host, address):
                raise MediaError(
                    f"image host {host!r} resolves to a non-public address ({address}); refused "
                    "(an operator can allow it: PMOD_MEDIA_ALLOW_HOSTS or pmod-serve --media-allow-host)"
                )
            addresses.append(str(address))
        if not addresses:
            raise MediaError(f"cannot resolve image host {host!r}")
        addresses.sort(key=lambda a: ":" in a)  # IPv4 first: hosts without an IPv6 route
        return addresses[0]

    def resolve(self, host: str, port: int) -> str:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise MediaError(f"cannot resolve image host {host!r}") from exc
        return self.vet(host, infos)

    async def resolve_async(self, host: str, port: int) -> str:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise MediaError(f"cannot resolve image host {host!r}") from exc
        return self.vet(host, infos)

    @staticmethod
    def pinned_request(url: str, host: str, address: str) -> tuple[str, dict, dict]:
        """URL, headers and extensions that connect to `address` while speaking to `host`."""
        parts = urlsplit(url)
        literal = f"[{address}]" if ":" in address else address
        netloc = literal if parts.port is None else f"{literal}:{parts.port}"
        pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        host_header = parts.netloc.rpartition("@")[2]
        extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
        return pinned, {"Host": host_header}, extensions

    def _check_response(self, url: str, response: httpx.Response) -> None:
        if response.is_redirect:
            raise MediaError(f"fetching image {_short(url)} returned a redirect (HTTP {response.status_code}); "
                             "redirects are not followed")
        if response.status_code != 200:
            raise MediaError(f"fetching image {_short(url)} returned HTTP {response.status_code}")
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise MediaError(f"image at {_short(url)} exceeds {self.max_bytes} bytes")

    def _too_big(self, url: str, size: int) -> None:
        if size > self.max_bytes:
            raise MediaError(f"image at {_short(url)} exceeds {self.max_bytes} bytes")

    def fetch(self, url: str, timeout: float) -> bytes:
        scheme, host, port = self.split(url)
        address = self.resolve(host, port)
        pinned, headers, extensions = self.pinned_request(url, host, address)
        body = _Body(self, url)
        with _fetch_errors(url, timeout):
            with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
                with client.stream("GET", pinned, headers=headers, extensions=extensions) as response:
                    self._check_response(url, response)
                    for chunk in response.iter_bytes():
                        body.add(chunk)
        return body.bytes()

    async def fetch_async(self, url: str, timeout: float) -> bytes:
        scheme, host, port = self.split(url)
        address = await self.resolve_async(host, port)
        pinned, headers, extensions = self.pinned_request(url, host, address)
        body = _Body(self, url)
        with _fetch_errors(url, timeout):
            async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as client:
                async with client.stream("GET", pinned, headers=headers, extensions=extensions) as response:
                    self._check_response(url, response)
                    async for chunk in response.aiter_bytes():
                        body.add(chunk)
        return body.bytes()


class _Body:
    """A fetched image's bytes, refused as soon as they pass the size cap."""

    def __init__(self, fetcher, url: str) -> None:
        self.fetcher, self.url, self.chunks, self.size = fetcher, url, [], 0

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self.fetcher._too_big(self.url, self.size)
        self.chunks.append(chunk)

    def bytes(self) -> bytes:
        return b"".join(self.chunks)


@contextlib.contextmanager
def _fetch_errors(url: str, timeout: float):
    """httpx's errors as the MediaError (a 400) of a refused image fetch."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise MediaError(f"fetching image {_short(url)} timed out after {timeout:g}s") from exc
    except httpx.HTTPError as exc:
        raise MediaError(f"fetching image {_short(url)} failed: {exc.__class__.__name__}") from exc


@MEDIA_CONNECTOR_REGISTRY.register(CONNECTOR_NAME)
class PmodMediaConnector(MediaConnector):
    """vLLM's media connector with the checks above; data, file and http(s) URLs alike."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.policy = MediaPolicy()

    # -- what every URL goes through -----------------------------------------------------------

    def _classify(self, url: str) -> str:
        if url[:5].lower() == "data:":
            return "data"
        scheme = urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            return "http"
        if scheme == "file":
            if self.allowed_local_media_path is None:
                raise MediaError("file: URLs are refused (the server has no --allowed-local-media-path)")
            return "file"
        raise MediaError(f"unsupported media URL {_short(url)}: use http(s) or a data: URL")

    def _check_http(self, url: str) -> None:
        from urllib3.util import parse_url

        self.policy.split(url)
        try:
            self._assert_url_in_allowed_media_domains(parse_url(url))  # vLLM's --allowed-media-domains
        except ValueError as exc:
            raise MediaError(str(exc)) from exc

    @staticmethod
    def _decode(payload: bytes, media_io):
        if isinstance(media_io, ImageMediaIO):
            check_image_bytes(payload)
        try:
            return media_io.load_bytes(payload)
        except Image.DecompressionBombError as exc:
            raise MediaError(f"image refused as a possible decompression bomb: {exc}") from exc

    @classmethod
    def _decode_data_url(cls, url: str, media_io):
        return cls._decode(decode_data_url(url), media_io)

    @staticmethod
    def _timeout(fetch_timeout: int | float | None) -> float:
        return float(fetch_timeout) if fetch_timeout else DEFAULT_TIMEOUT

    # -- vLLM's entry points ---------------------------------------------------------------------

    def load_from_url(self, url: str, media_io, *, fetch_timeout: int | None = None):
        kind = self._classify(url)
        if kind == "data":
            if not isinstance(media_io, ImageMediaIO):
                return super().load_from_url(url, media_io, fetch_timeout=fetch_timeout)
            return self._decode_data_url(url, media_io)
        if kind == "file":
            return self._load_file_checked(url, media_io)
        self._check_http(url)
        return self._decode(self.policy.fetch(url, self._timeout(fetch_timeout)), media_io)

    async def load_from_url_async(self, url: str, media_io, *, fetch_timeout: int | None = None):
        from vllm.multimodal.media.connector import global_thread_pool

        loop = asyncio.get_running_loop()
        kind = self._classify(url)
        if kind == "data":
            if not isinstance(media_io, ImageMediaIO):
                return await super().load_from_url_async(url, media_io, fetch_timeout=fetch_timeout)
            return await loop.run_in_executor(global_thread_pool, self._decode_data_url, url, media_io)
        if kind == "file":
            return await loop.run_in_executor(global_thread_pool, self._load_file_checked, url, media_io)
        self._check_http(url)
        payload = await self.policy.fetch_async(url, self._timeout(fetch_timeout))
        return await loop.run_in_executor(global_thread_pool, self._decode, payload, media_io)

    def _load_file_checked(self, url: str, media_io):
        from urllib3.util import parse_url

        class _Checked:  # vLLM resolves and confines the path; the bytes pass our header check
            def __getattr__(self, name):
                return getattr(media_io, name)

            @staticmethod
            def load_file(filepath):
                return PmodMediaConnector._decode(filepath.read_bytes(), media_io)

        return self._load_file_url(parse_url(url), _Checked())
