"""Send the requests and measure: what `vllm bench serve` does, plus what we need on top.

Reused from vLLM 0.26 (`vllm.benchmarks`), by import:
- `async_request_openai_chat_completions` (the `openai-chat` backend): streams one chat
  completion and measures TTFT, inter-token latencies and end-to-end latency;
- `get_request`: the arrival process (request rate, Poisson or gamma with `burstiness`);
- `freeze_gc_heap`: no garbage-collector pauses of the (large) vLLM heap inside measurements;
- `calculate_metrics` (in `loadtests.report`): percentiles, throughput, goodput.

Added here:
- a hard time bound per phase (in-flight requests are cancelled at the limit) and a per-request
  timeout; every run also stops after its request count;
- the HTTP status of every request (vLLM's request function keeps only the reason phrase), read
  with an aiohttp trace, for the error breakdown;
- a guard that refuses any request to another origin than `--base-url` (including redirects)
  and ignores proxy settings from the environment;
- non-streaming requests (`--no-stream`);
- `/metrics` sampling during the run (p-MoD KV savings over time, vLLM queue and KV usage) and
  before/after snapshots for the server's metric deltas.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import json
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np
from tqdm.asyncio import tqdm
from vllm.benchmarks.lib.endpoint_request_func import (
    RequestFuncInput,
    RequestFuncOutput,
    async_request_openai_chat_completions,
)
from vllm.benchmarks.serve import get_request
from vllm.utils.gc_utils import freeze_gc_heap

from loadtests import metrics as m
from loadtests.workload import WorkloadSpec, build_requests

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
METRICS_PATH = "/metrics"

# Per request (each runs in its own task, so its own context): the HTTP status seen by the trace.
_REQUEST_STATE: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "loadtests_request_state", default=None
)


class OffTargetError(aiohttp.ClientError):
    """A request (or a redirect) to anything but the origin of --base-url."""


def normalize_base_url(url: str) -> str:
    """`http://host:port[/prefix]` without a trailing `/` or `/v1`."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--base-url must be an http(s) URL, got {url!r}")
    if parts.query or parts.fragment:
        raise ValueError("--base-url must not have a query or fragment")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return f"{parts.scheme}://{parts.netloc}{path}"


def _origin(url: Any) -> tuple[str, str, int | None]:
    parts = urlsplit(str(url))
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def guard_trace(base_url: str) -> aiohttp.TraceConfig:
    """Records each response's status; refuses other origins and any redirect."""
    allowed = _origin(base_url)
    trace = aiohttp.TraceConfig()

    async def on_start(session, ctx, params):  # noqa: ANN001
        if _origin(params.url) != allowed:
            raise OffTargetError(f"refusing {params.url}: only {base_url} is targeted")

    async def on_redirect(session, ctx, params):  # noqa: ANN001
        state = _REQUEST_STATE.get()
        if state is not None:
            state["status"] = params.response.status
        raise OffTargetError(f"refusing to follow a {params.response.status} redirect from {params.url}")

    async def on_end(session, ctx, params):  # noqa: ANN001
        state = _REQUEST_STATE.get()
        if state is not None:
            state["status"] = params.response.status
            if params.response.status >= 400:
                # vLLM's request functions keep only the reason phrase and never read an error's
                # body: read it here, for the report's error examples.
                with contextlib.suppress(Exception):
                    state["body"] = (await asyncio.wait_for(params.response.text(), 5))[:2000]

    trace.on_request_start.append(on_start)
    trace.on_request_redirect.append(on_redirect)
    trace.on_request_end.append(on_end)
    return trace


def auth_headers() -> dict[str, str]:
    """The same credentials vLLM's request functions send (OPENAI_API_KEY)."""
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


async def request_chat_nonstreaming(
    request_func_input: RequestFuncInput, session: aiohttp.ClientSession, pbar: tqdm | None = None
) -> RequestFuncOutput:
    """One non-streaming chat completion (vLLM's request functions always stream).

    Only the end-to-end latency is measurable; `ttft` is set to it and ignored by the report."""
    payload: dict[str, Any] = {
        "model": request_func_input.model_name or request_func_input.model,
        "messages": request_func_input.chat_messages,
        "max_completion_tokens": request_func_input.output_len,
        "stream": False,
    }
    if request_func_input.ignore_eos:
        payload["ignore_eos"] = True
    if request_func_input.extra_body:
        payload.update(request_func_input.extra_body)
    headers = {"Content-Type": "application/json", **auth_headers()}
    if request_func_input.request_id:
        headers["x-request-id"] = request_func_input.request_id
    output = RequestFuncOutput(prompt_len=request_func_input.prompt_len)
    start = time.perf_counter()
    output.start_time = start
    try:
        async with session.post(request_func_input.api_url, json=payload, headers=headers) as response:
            if response.status == 200:
                body = await response.json(content_type=None)
                output.latency = output.ttft = time.perf_counter() - start
                choices = body.get("choices") or []
                output.generated_text = (
                    (choices[0].get("message") or {}).get("content") or "" if choices else ""
                )
                usage = body.get("usage") or {}
                output.output_tokens = usage.get("completion_tokens") or 0
                if usage.get("prompt_tokens") is not None:
                    output.prompt_len = usage["prompt_tokens"]
                output.success = bool(choices)
                if not choices:
                    output.error = "response has no choices"
            else:
                output.error = response.reason or ""
    except Exception:
        output.error = "".join(traceback.format_exception(*sys.exc_info()))
    if pbar is not None:
        pbar.update(1)
    return output


@dataclass
class RequestRecord:
    index: int
    request_id: str
    state: str = "queued"  # queued -> in_flight -> done | cancelled (in flight at the time limit)
    sent_at: float | None = None  # seconds since the phase started
    status: int | None = None
    error_body: str | None = None  # the body of a 4xx/5xx response
    output: RequestFuncOutput | None = None


@dataclass
class PhaseResult:
    records: list[RequestRecord]
    duration_s: float
    stopped_by: str  # "requests" or "time_limit"
    started_at: float  # wall clock (time.time())
    points: list[dict[str, Any]] = field(default_factory=list)  # /metrics samples
    before: m.Snapshot | None = None
    after: m.Snapshot | None = None
    scrapes: int = 0
    scrape_errors: list[str] = field(default_factory=list)
    max_in_flight: int = 0


@dataclass
class RunOptions:
    base_url: str
    model: str | None = None
    label: str | None = None
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    concurrency: list[int] = field(default_factory=lambda: [8])
    request_rate: float = float("inf")
    burstiness: float = 1.0
    stream: bool = True
    ignore_eos: bool = False
    extra_body: dict[str, Any] | None = None
    warmup: int = 1
    time_limit_s: float = 600.0
    request_timeout_s: float | None = None
    ready_timeout_s: float = 60.0
    metrics: bool = True
    metrics_interval_s: float = 1.0
    goodput: dict[str, float] | None = None
    per_request: bool = False
    progress: bool = True

    def validate(self) -> None:
        self.base_url = normalize_base_url(self.base_url)
        if self.workload.num_requests < 1:
            raise ValueError("--requests must be at least 1")
        if not self.concurrency or any(c < 0 for c in self.concurrency):
            raise ValueError("--concurrency must be >= 0 (0: no limit)")
        if not (self.time_limit_s > 0 and np.isfinite(self.time_limit_s)):
            raise ValueError("--time-limit must be a positive number of seconds")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError("--request-timeout must be positive")
        if not self.request_rate > 0:
            raise ValueError("--request-rate must be positive (or inf)")
        if not self.burstiness > 0:
            raise ValueError("--burstiness must be positive")
        if self.warmup < 0:
            raise ValueError("--warmup must be >= 0")
        if not self.metrics_interval_s > 0:
            raise ValueError("--metrics-interval must be positive")
        if not 0 < self.ready_timeout_s <= 3600:
            raise ValueError("--ready-timeout must be in (0, 3600]")


class Client:
    """HTTP sessions bound to one base URL."""

    def __init__(self, options: RunOptions, concurrency: int) -> None:
        self.options = options
        self.base_url = options.base_url
        self.api_url = self.base_url + CHAT_PATH
        self.metrics_url = self.base_url + METRICS_PATH
        timeout = aiohttp.ClientTimeout(total=options.request_timeout_s or options.time_limit_s)
        connector = aiohttp.TCPConnector(
            limit=concurrency or 0, limit_per_host=concurrency or 0, keepalive_timeout=60, force_close=False
        )
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, trust_env=False, trace_configs=[guard_trace(self.base_url)]
        )
        # Scrapes get their own connection so a saturated pool cannot delay them.
        self.scrape_session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=10),
            trust_env=False,
            trace_configs=[guard_trace(self.base_url)],
        )

    async def close(self) -> None:
        await self.session.close()
        await self.scrape_session.close()

    async def scrape(self) -> m.Snapshot:
        async with self.scrape_session.get(self.metrics_url, headers=auth_headers()) as response:
            if response.status != 200:
                raise RuntimeError(f"GET {self.metrics_url}: HTTP {response.status}")
            text = await response.text()
        # Parsing a large exposition takes milliseconds: keep it off the event loop that times requests.
        return await asyncio.to_thread(m.parse_metrics, text)

    async def served_models(self, deadline: float) -> list[str]:
        """Wait (until `deadline`, perf_counter) for GET /v1/models to answer; the model ids."""
        last_error = ""
        while True:
            try:
                async with self.scrape_session.get(
                    self.base_url + MODELS_PATH, headers=auth_headers()
                ) as resp:
                    if resp.status == 200:
                        body = await resp.json(content_type=None)
                        return [str(item.get("id")) for item in body.get("data", [])]
                    last_error = f"HTTP {resp.status}"
            except OffTargetError:
                raise
            except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, ValueError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            if time.perf_counter() + 1.0 > deadline:
                raise TimeoutError(f"{self.base_url}{MODELS_PATH} not ready: {last_error}")
            await asyncio.sleep(1.0)


def _request_input(client: Client, model: str, request: Any, options: RunOptions) -> RequestFuncInput:
    return RequestFuncInput(
        prompt=request.prompt,
        api_url=client.api_url,
        prompt_len=request.prompt_len,
        output_len=request.expected_output_len,
        model=model,
        model_name=model,
        multi_modal_content=request.multi_modal_data,
        ignore_eos=options.ignore_eos,
        extra_body=options.extra_body,
        request_id=request.request_id,
        chat_messages=request.chat_messages,
    )


async def run_phase(
    client: Client,
    model: str,
    requests: list[Any],
    concurrency: int,
    options: RunOptions,
    seed: int,
    sample_metrics: bool,
    desc: str,
) -> PhaseResult:
    """Send `requests` (arrivals from vLLM's `get_request`) with at most `concurrency` in flight.

    Stops when every request has finished or at `options.time_limit_s`, whichever comes first;
    requests in flight at the limit are cancelled and recorded as such."""
    request_func = async_request_openai_chat_completions if options.stream else request_chat_nonstreaming
    records = [RequestRecord(i, r.request_id or str(i)) for i, r in enumerate(requests)]
    by_id = {id(r): i for i, r in enumerate(requests)}
    semaphore = asyncio.Semaphore(concurrency) if concurrency else None
    in_flight = 0
    result = PhaseResult(records=records, duration_s=0.0, stopped_by="requests", started_at=time.time())

    # Poisson / gamma inter-arrival times come from numpy's global RNG, as in `vllm bench serve`.
    np.random.seed(seed)
    random.seed(seed)

    if sample_metrics:
        try:
            result.before = await client.scrape()
            result.scrapes += 1
        except Exception as exc:  # a server without /metrics is still load-tested
            result.scrape_errors.append(f"{type(exc).__name__}: {exc}")

    pbar = tqdm(total=len(requests), desc=desc, disable=not options.progress, file=sys.stderr, leave=False)
    start = time.perf_counter()
    deadline = start + options.time_limit_s
    stop_sampling = asyncio.Event()

    async def sampler() -> None:
        while True:
            t = time.perf_counter() - start
            try:
                snapshot = await client.scrape()
                result.scrapes += 1
                result.points.append(
                    {"t": round(t, 3), "in_flight": in_flight, **m.kv_savings_point(snapshot)}
                )
            except Exception as exc:
                result.scrape_errors.append(f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop_sampling.wait(), options.metrics_interval_s)
            if stop_sampling.is_set():
                return

    async def send(index: int, request_input: RequestFuncInput) -> None:
        nonlocal in_flight
        record = records[index]
        if semaphore is not None:
            await semaphore.acquire()
        try:
            if time.perf_counter() >= deadline:
                return
            record.state, record.sent_at = "in_flight", time.perf_counter() - start
            in_flight += 1
            result.max_in_flight = max(result.max_in_flight, in_flight)
            state: dict[str, Any] = {"status": None}
            _REQUEST_STATE.set(state)
            try:
                output = await request_func(
                    request_func_input=request_input, session=client.session, pbar=pbar
                )
            except asyncio.CancelledError:
                record.state = "cancelled"
                raise
            finally:
                in_flight -= 1
            record.output, record.status, record.state = output, state["status"], "done"
            record.error_body = state.get("body")
        finally:
            if semaphore is not None:
                semaphore.release()

    tasks: list[asyncio.Task] = []

    async def dispatch_and_wait() -> None:
        async for request, _rate in get_request(requests, options.request_rate, options.burstiness):
            if time.perf_counter() >= deadline:
                break
            index = by_id[id(request)]
            tasks.append(asyncio.create_task(send(index, _request_input(client, model, request, options))))
        if tasks:
            await asyncio.gather(*tasks)

    sampler_task = asyncio.create_task(sampler()) if sample_metrics and result.before is not None else None
    try:
        await asyncio.wait_for(dispatch_and_wait(), timeout=max(0.0, deadline - time.perf_counter()))
    except asyncio.TimeoutError:
        result.stopped_by = "time_limit"
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for record in records:
            if record.state == "in_flight":
                record.state = "cancelled"
    finally:
        result.duration_s = time.perf_counter() - start
        pbar.close()
        if sampler_task is not None:
            stop_sampling.set()
            await sampler_task

    if sample_metrics and result.before is not None:
        # vLLM's and p-MoD's counters are updated as outputs are processed: let the last land.
        await asyncio.sleep(0.5)
        try:
            result.after = await client.scrape()
            result.scrapes += 1
        except Exception as exc:
            result.scrape_errors.append(f"{type(exc).__name__}: {exc}")
    return result


def _log(message: str) -> None:
    print(f"[loadtests] {message}", file=sys.stderr, flush=True)


def level_seed(seed: int, concurrency: int) -> int:
    """The requests' seed at one concurrency level: each level sends fresh requests (a level
    re-sending the previous level's images would hit the server's prefix and multimodal caches),
    and a level gets the same requests whatever else is in the sweep, on every server."""
    return seed + 1_000_003 * concurrency


WARMUP_SEED_OFFSET = 999_983


async def run_async(options: RunOptions) -> dict[str, Any]:
    """Ready check, warm-up, then one measured phase per concurrency level; the report dict."""
    from loadtests.report import build_report, build_run

    options.validate()
    spec = options.workload
    if len(set(options.concurrency)) != len(options.concurrency):
        raise ValueError("--concurrency levels must be distinct")
    runs: list[dict[str, Any]] = []
    warmup_summary: dict[str, Any] | None = None
    model = options.model
    client = Client(options, max(options.concurrency) if all(options.concurrency) else 0)
    try:
        # Fail early on bad workload options, before waiting for the server.
        build_requests(spec, 1, spec.seed, request_id_prefix="check-")
        models = await client.served_models(time.perf_counter() + options.ready_timeout_s)
        if model is None:
            if not models:
                raise RuntimeError(f"{client.base_url}{MODELS_PATH} lists no model; pass --model")
            model = models[0]
        elif models and model not in models:
            raise RuntimeError(f"model {model!r} is not served at {client.base_url} (served: {models})")
        _log(f"target {client.api_url}, model {model}")
        if options.warmup:
            warm_requests, _ = build_requests(
                spec, options.warmup, spec.seed + WARMUP_SEED_OFFSET, request_id_prefix="warmup-"
            )
            _log(f"warm-up: {len(warm_requests)} requests")
            freeze_gc_heap()
            warm = await run_phase(
                client,
                model,
                warm_requests,
                options.concurrency[0],
                options,
                seed=spec.seed + WARMUP_SEED_OFFSET,
                sample_metrics=False,
                desc="warm-up",
            )
            done = [r for r in warm.records if r.state == "done"]
            warmup_summary = {
                "requests": len(warm_requests),
                "completed": sum(1 for r in done if r.output and r.output.success),
                "failed": sum(1 for r in done if not (r.output and r.output.success)),
                "duration_s": round(warm.duration_s, 3),
                "stopped_by": warm.stopped_by,
            }
            del warm_requests, warm
        for level in options.concurrency:
            seed = level_seed(spec.seed, level)
            prep_start = time.perf_counter()
            requests, info = build_requests(spec, spec.num_requests, seed, request_id_prefix=f"c{level}-")
            _log(
                f"measuring: {len(requests)} requests ({spec.dataset}, prepared in "
                f"{time.perf_counter() - prep_start:.1f}s), concurrency {level or 'unlimited'}, "
                f"request rate {options.request_rate}, time limit {options.time_limit_s}s"
            )
            # With vLLM imported the heap holds ~500k objects and a full collection stalls the event
            # loop for ~1 s, which would land in the latencies: freeze them, as `vllm bench serve` does.
            freeze_gc_heap()
            phase = await run_phase(
                client,
                model,
                requests,
                level,
                options,
                seed=seed,
                sample_metrics=options.metrics,
                desc=f"concurrency {level or 'inf'}",
            )
            run = build_run(phase, level, options, info, client.metrics_url)
            run["seed"] = seed
            runs.append(run)
            del requests, info, phase
            _log(
                f"concurrency {level or 'unlimited'}: {run['requests']['completed']} ok, "
                f"{run['errors']['count']} errors, {run['requests']['cancelled']} cancelled, "
                f"{run['throughput_rps']:.3f} req/s, stopped by {run['stopped_by']}"
            )
    finally:
        await client.close()
        gc.unfreeze()
    return build_report(runs, options, model or "", warmup_summary, client.api_url, client.metrics_url)


def run(options: RunOptions) -> dict[str, Any]:
    return asyncio.run(run_async(options))
