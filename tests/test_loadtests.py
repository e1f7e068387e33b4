"""`loadtests` against a fake OpenAI-compatible server on 127.0.0.1 (fast; no model, no engine).

The fake streams SSE chat completions the way vLLM's OpenAI server does (a role chunk, one chunk
per token, a finish chunk, a usage chunk, `[DONE]`), checks the requests (model, data: URL
images it can decode), and serves `/metrics` with vLLM-like `vllm:*` series and, unless told
otherwise, the p-MoD series. The test against the real tiny demo server is
tests/test_loadtests_server.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from PIL import Image
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from loadtests import metrics as lm
from loadtests.report import SUMMARY_KEYS, validate_report

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(180)

FAKE_SAVINGS = 0.4  # the fake holds 6 blocks where a dense cache would hold 10


class FakeServer:
    """An OpenAI-compatible chat server with Prometheus metrics, in a thread of its own."""

    def __init__(
        self,
        *,
        model: str = "fake-pmod",
        pmod: bool = True,
        prefill_s: float = 0.01,
        token_s: float = 0.002,
        fail_every: int = 0,
        fail_status: int = 500,
        redirect_to: str | None = None,
        usage: bool = True,
    ) -> None:
        self.model, self.pmod, self.prefill_s, self.token_s = model, pmod, prefill_s, token_s
        self.fail_every, self.fail_status, self.redirect_to, self.usage = (
            fail_every,
            fail_status,
            redirect_to,
            usage,
        )
        self.hits: list[tuple[str, str]] = []
        self.bodies: list[dict[str, Any]] = []
        self.by_request_id: dict[str, Any] = {}
        self.images: list[dict[str, Any]] = []  # decoded images: format, size, sha
        self.chat_count = 0
        self.active = 0
        self.max_active = 0
        self.registry = CollectorRegistry()
        labels = ("model_name", "engine")
        r = self.registry
        self.running = Gauge("vllm:num_requests_running", "running", labels, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "waiting", labels, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "usage", labels, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "prompt", labels, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "generation", labels, registry=r)
        self.success = Counter("vllm:request_success", "success", (*labels, "finished_reason"), registry=r)
        self.ttft_hist = Histogram("vllm:time_to_first_token_seconds", "ttft", labels, registry=r)
        if pmod:
            self.in_use = Gauge("pmod_kv_blocks_in_use", "in use", labels, registry=r)
            self.dense = Gauge("pmod_kv_blocks_dense_equivalent", "dense", labels, registry=r)
            self.ratio = Gauge("pmod_kv_cache_savings_ratio", "ratio", labels, registry=r)
            self.visual = Counter("pmod_visual_tokens", "visual", labels, registry=r)
            self.slots_saved = Counter("pmod_kv_slots_saved", "saved", labels, registry=r)
            self.request_savings = Histogram(
                "pmod_request_kv_savings_ratio",
                "per request",
                labels,
                registry=r,
                buckets=[round(0.05 * i, 2) for i in range(1, 20)],
            )
        self._labels = {"model_name": model, "engine": "0"}
        self._update_gauges()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> FakeServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_route("*", "/{tail:.*}", self._other)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    # -- handlers --------------------------------------------------------------------------
    async def _other(self, request: web.Request) -> web.Response:
        self.hits.append((request.method, request.path))
        return web.json_response({"error": "not found"}, status=404)

    async def _models(self, request: web.Request) -> web.Response:
        self.hits.append((request.method, request.path))
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _metrics(self, request: web.Request) -> web.Response:
        self.hits.append((request.method, request.path))
        return web.Response(body=generate_latest(self.registry), content_type="text/plain")

    def _update_gauges(self) -> None:
        labels = self._labels
        self.running.labels(**labels).set(self.active)
        self.kv_usage.labels(**labels).set(min(1.0, 0.1 * self.active))
        self.waiting.labels(**labels).set(0)
        if self.pmod:
            self.in_use.labels(**labels).set(6 * self.active)
            self.dense.labels(**labels).set(10 * self.active)
            self.ratio.labels(**labels).set(FAKE_SAVINGS if self.active else 0.0)

    def _check_images(self, messages: list[dict[str, Any]]) -> int:
        count = 0
        for message in messages:
            content = message.get("content")
            for part in content if isinstance(content, list) else []:
                if part.get("type") != "image_url":
                    continue
                url = part["image_url"]["url"]
                header, data = url.split(",", 1)
                assert header.startswith("data:image/") and header.endswith(";base64"), header
                raw = base64.b64decode(data)
                with Image.open(io.BytesIO(raw)) as image:
                    image.load()
                    self.images.append(
                        {
                            "format": image.format,
                            "size": image.size,
                            "mime": header[5:-7],
                            "sha": hashlib.sha256(raw).hexdigest(),
                        }
                    )
                count += 1
        return count

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.hits.append((request.method, request.path))
        if self.redirect_to:
            raise web.HTTPTemporaryRedirect(self.redirect_to)
        body = await request.json()
        self.bodies.append(body)
        self.by_request_id[request.headers.get("x-request-id", "")] = body["messages"]
        self.chat_count += 1
        if body.get("model") != self.model:
            return web.json_response({"error": {"message": "model not found"}}, status=404)
        if self.fail_every and self.chat_count % self.fail_every == 0:
            return web.json_response({"error": {"message": "injected failure"}}, status=self.fail_status)
        images = self._check_images(body["messages"])
        n_tokens = int(body.get("max_completion_tokens") or 16)
        prompt_tokens = 20 + 100 * images
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self._update_gauges()
        labels = self._labels
        try:
            await asyncio.sleep(self.prefill_s)
            self.prompt_tokens.labels(**labels).inc(prompt_tokens)
            self.ttft_hist.labels(**labels).observe(self.prefill_s)
            if self.pmod:
                self.visual.labels(**labels).inc(100 * images)
                self.slots_saved.labels(**labels).inc(40 * images)
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": n_tokens,
                "total_tokens": prompt_tokens + n_tokens,
            }
            if not body.get("stream"):
                await asyncio.sleep(self.token_s * n_tokens)
                self._finish(n_tokens)
                reply = {
                    "id": "x",
                    "object": "chat.completion",
                    "model": self.model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "tok " * n_tokens},
                            "finish_reason": "length",
                        }
                    ],
                }
                if self.usage:
                    reply["usage"] = usage
                return web.json_response(reply)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)

            async def send(obj: Any) -> None:
                await response.write(
                    f"data: {json.dumps(obj) if not isinstance(obj, str) else obj}\n\n".encode()
                )

            def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
                return {
                    "id": "x",
                    "object": "chat.completion.chunk",
                    "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }

            await send(chunk({"role": "assistant", "content": ""}))
            for i in range(n_tokens):
                if i:
                    await asyncio.sleep(self.token_s)
                await send(chunk({"content": f"tok{i} "}))
            self._finish(n_tokens)
            await send(chunk({}, "length"))
            if self.usage and (body.get("stream_options") or {}).get("include_usage"):
                await send(
                    {
                        "id": "x",
                        "object": "chat.completion.chunk",
                        "model": self.model,
                        "choices": [],
                        "usage": usage,
                    }
                )
            await send("[DONE]")
            await response.write_eof()
            return response
        finally:
            self.active -= 1
            self._update_gauges()

    def _finish(self, n_tokens: int) -> None:
        labels = self._labels
        self.generation_tokens.labels(**labels).inc(n_tokens)
        self.success.labels(**labels, finished_reason="length").inc()
        if self.pmod:
            self.request_savings.labels(**labels).observe(FAKE_SAVINGS)


def run_cli(*args: str) -> int:
    from loadtests.cli import main

    return main(list(args))


def base_args(server: FakeServer, out: Path, *extra: str) -> list[str]:
    return [
        "--base-url",
        server.base_url,
        "--model",
        server.model,
        "--json",
        str(out),
        "--no-progress",
        "--seed",
        "1",
        "--image-sizes",
        "64x48:1,96x96:1",
        "--input-len",
        "24",
        "--output-len",
        "8",
        "--metrics-interval",
        "0.02",
        "--time-limit",
        "60",
        *extra,
    ]


def assert_summary(summary: dict[str, Any]) -> None:
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["n"] > 0
    assert 0 < summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["max"]
    assert summary["mean"] > 0


# ---------------------------------------------------------------------------------------------
def test_report_against_fake_pmod_server(tmp_path: Path) -> None:
    out = tmp_path / "pmod.json"
    with FakeServer(prefill_s=0.03, token_s=0.01) as server:
        rc = run_cli(
            *base_args(
                server,
                out,
                "--requests",
                "10",
                "--concurrency",
                "1,4",
                "--warmup",
                "2",
                "--label",
                "pmod",
                "--per-request",
            )
        )
        hits = list(server.hits)
        images = list(server.images)
        bodies = list(server.bodies)
        max_active = server.max_active
    assert rc == 0
    report = json.loads(out.read_text())
    assert validate_report(report) == []
    assert report["schema"] == "pmod-loadtest/1"
    assert report["label"] == "pmod"
    assert report["target"]["model"] == "fake-pmod"
    assert report["warmup"]["completed"] == 2
    assert [run["concurrency"] for run in report["sweep"]] == [1, 4]
    assert report["concurrency"] == 4 and report["ttft_ms"] == report["sweep"][-1]["ttft_ms"]
    assert max_active <= 4

    for run in report["sweep"]:
        assert run["stopped_by"] == "requests"
        assert run["requests"] == {
            "planned": 10,
            "sent": 10,
            "completed": 10,
            "failed": 0,
            "cancelled": 0,
            "not_sent": 0,
            "max_in_flight": run["concurrency"],
        }
        assert run["errors"] == {"count": 0, "by_status": {}, "examples": []}
        for key in ("ttft_ms", "tpot_ms", "e2e_ms", "itl_ms"):
            assert_summary(run[key])
        assert run["ttft_ms"]["p50"] >= 25  # the fake's 30 ms prefill
        assert run["ttft_ms"]["p50"] < run["e2e_ms"]["p50"]
        assert 5 < run["tpot_ms"]["p50"] < 200  # 10 ms per token, loosely
        assert run["throughput_rps"] > 0 and run["output_tokens_per_s"] > 0
        assert run["throughput_rps"] == pytest.approx(10 / run["duration_s"], rel=0.01)
        assert run["tokens"]["output_total"] == 80 and run["tokens"]["output_count_source"] == {"usage": 10}
        assert run["tokens"]["input_total"] == 10 * 120  # the fake's usage: 20 + 100 per image
        assert run["images"]["total"] == 10 and set(run["images"]["sizes"]) <= {"64x48", "96x96"}
        # p-MoD KV savings from /metrics
        assert run["kv_savings_ratio"] == pytest.approx(FAKE_SAVINGS)
        kv = run["kv_savings"]
        assert kv["available"] and kv["busy_samples"] >= 1 and kv["samples"] >= kv["busy_samples"]
        assert kv["request_mean"] == pytest.approx(FAKE_SAVINGS) and kv["requests_observed"] == 10
        # metric deltas cover the measured run only (not the warm-up, nor the other level)
        sm = run["server_metrics"]
        assert sm["available"] and sm["scrape_errors"] == 0
        assert sm["counters"]["vllm:generation_tokens_total"] == 80
        assert sm["counters"]['vllm:request_success_total{finished_reason="length"}'] == 10
        assert sm["counters"]["vllm:prompt_tokens_total"] == run["tokens"]["input_total"]
        assert sm["counters"]["pmod_visual_tokens_total"] == 1000
        assert sm["histograms"]["vllm:time_to_first_token_seconds"]["count"] == 10
        assert sm["histograms"]["pmod_request_kv_savings_ratio"]["mean"] == pytest.approx(FAKE_SAVINGS)
        assert sm["sampled"]["num_requests_running"]["max"] <= run["concurrency"]
        assert run["timeseries"] and all(
            {"t", "in_flight", "kv_savings_ratio"} <= set(p) for p in run["timeseries"]
        )
        assert [p["t"] for p in run["timeseries"]] == sorted(p["t"] for p in run["timeseries"])
        assert len(run["per_request"]) == 10 and all(r["status"] == 200 for r in run["per_request"])

    # what the server received: realistic image chat, decodable data: URLs, only allowed paths
    assert {path for _, path in hits} <= {"/v1/models", "/v1/chat/completions", "/metrics"}
    assert len(bodies) == 2 + 2 * 10
    assert all(body["stream"] and body["max_completion_tokens"] == 8 for body in bodies)
    content = bodies[-1]["messages"][-1]["content"]
    assert content[0]["type"] == "image_url" and content[-1]["type"] == "text"
    assert {img["size"] for img in images} <= {(64, 48), (96, 96)}
    assert {img["format"] for img in images} == {"JPEG"}
    # every level sends fresh requests (no server cache hits from the previous level), as does the warm-up
    assert len({json.dumps(b["messages"]) for b in bodies}) == 22
    assert [run["seed"] for run in report["sweep"]] == [1 + 1_000_003, 1 + 4 * 1_000_003]


def test_baseline_server_reports_null_kv_savings(tmp_path: Path) -> None:
    out = tmp_path / "baseline.json"
    with FakeServer(model="llava-next", pmod=False) as server:
        assert run_cli(*base_args(server, out, "--requests", "4", "--concurrency", "2")) == 0
    report = json.loads(out.read_text())
    assert validate_report(report) == []
    assert "sweep" not in report
    assert report["kv_savings_ratio"] is None
    assert report["kv_savings"]["available"] is False and report["kv_savings"]["request_mean"] is None
    assert report["server_metrics"]["available"] is True
    assert not any(key.startswith("pmod_") for key in report["server_metrics"]["counters"])
    assert report["server_metrics"]["counters"]["vllm:generation_tokens_total"] == 32
    assert all(p["kv_savings_ratio"] is None for p in report["timeseries"])


def test_errors_are_broken_down_by_status(tmp_path: Path) -> None:
    out = tmp_path / "errors.json"
    with FakeServer(fail_every=3, fail_status=503) as server:
        rc = run_cli(*base_args(server, out, "--requests", "9", "--concurrency", "1", "--warmup", "0"))
    assert rc == 0
    report = json.loads(out.read_text())
    assert validate_report(report) == []
    assert report["errors"]["count"] == 3 and report["errors"]["by_status"] == {"503": 3}
    assert report["requests"]["completed"] == 6 and report["requests"]["failed"] == 3
    assert report["errors"]["examples"][0]["status"] == "503"
    assert report["errors"]["examples"][0]["message"] == "injected failure"  # the server's error body
    # --fail-on-errors turns that into a failing exit status
    with FakeServer(fail_every=2, fail_status=429) as server:
        rc = run_cli(
            *base_args(
                server, out, "--requests", "4", "--concurrency", "2", "--warmup", "0", "--fail-on-errors"
            )
        )
    assert rc == 1
    assert json.loads(out.read_text())["errors"]["by_status"] == {"429": 2}


def test_unreachable_server_fails_fast(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    rc = run_cli(
        "--base-url",
        f"http://127.0.0.1:{port}",
        "--model",
        "m",
        "--requests",
        "2",
        "--ready-timeout",
        "1.5",
        "--json",
        str(tmp_path / "x.json"),
        "--no-progress",
    )
    assert rc == 2
    assert time.monotonic() - start < 30
    assert "not ready" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_wrong_model_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with FakeServer() as server:
        rc = run_cli(
            "--base-url", server.base_url + "/v1/", "--model", "nope", "--requests", "1", "--no-progress"
        )
    assert rc == 2
    assert "not served" in capsys.readouterr().err


def test_time_limit_bounds_the_run(tmp_path: Path) -> None:
    out = tmp_path / "bounded.json"
    with FakeServer(token_s=0.5) as server:  # each request would take ~25 s
        start = time.monotonic()
        rc = run_cli(
            *base_args(
                server,
                out,
                "--requests",
                "6",
                "--concurrency",
                "2",
                "--warmup",
                "0",
                "--output-len",
                "50",
                "--time-limit",
                "2",
            )
        )
        elapsed = time.monotonic() - start
        time.sleep(0.3)
        active_after = server.active
    assert rc == 0
    assert elapsed < 15
    assert active_after == 0  # the cancelled requests were closed, so the server stopped them
    report = json.loads(out.read_text())
    assert validate_report(report) == []
    assert report["stopped_by"] == "time_limit"
    assert 2 <= report["duration_s"] < 4
    assert report["requests"]["cancelled"] == 2 and report["requests"]["not_sent"] == 4
    assert report["requests"]["completed"] == 0 and report["errors"]["count"] == 0
    assert report["e2e_ms"]["p50"] is None and report["throughput_rps"] == 0


def test_request_timeout_is_an_error(tmp_path: Path) -> None:
    out = tmp_path / "timeout.json"
    with FakeServer(token_s=0.5) as server:
        rc = run_cli(
            *base_args(
                server,
                out,
                "--requests",
                "2",
                "--concurrency",
                "2",
                "--warmup",
                "0",
                "--output-len",
                "50",
                "--request-timeout",
                "0.5",
            )
        )
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["errors"]["by_status"] == {"timeout": 2}
    assert report["stopped_by"] == "requests"


def test_poisson_arrivals_without_concurrency_limit(tmp_path: Path) -> None:
    out = tmp_path / "rate.json"
    with FakeServer() as server:
        rc = run_cli(
            *base_args(
                server, out, "--requests", "20", "--concurrency", "0", "--request-rate", "40", "--warmup", "0"
            )
        )
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["config"]["request_rate"] == 40 and report["request_rate"] == 40
    assert report["requests"]["completed"] == 20
    # vLLM's get_request spreads 20 arrivals over 20 / 40 = 0.5 s
    assert report["duration_s"] >= 0.45


def test_no_stream_measures_end_to_end_only(tmp_path: Path) -> None:
    out = tmp_path / "nostream.json"
    with FakeServer() as server:
        rc = run_cli(*base_args(server, out, "--requests", "4", "--concurrency", "2", "--no-stream"))
        bodies = list(server.bodies)
    assert rc == 0
    assert all(body["stream"] is False for body in bodies)
    report = json.loads(out.read_text())
    assert validate_report(report) == []
    for key in ("ttft_ms", "tpot_ms", "itl_ms"):
        assert report[key]["p50"] is None and report[key]["n"] == 0
    assert_summary(report["e2e_ms"])
    assert report["tokens"]["output_total"] == 32 and report["requests"]["completed"] == 4


def test_output_tokens_without_usage_come_from_stream_chunks(tmp_path: Path) -> None:
    out = tmp_path / "nousage.json"
    with FakeServer(usage=False) as server:
        assert run_cli(*base_args(server, out, "--requests", "3", "--concurrency", "1")) == 0
    run = json.loads(out.read_text())
    # one role chunk + 8 content chunks + the finish chunk, each with `choices`
    assert run["tokens"]["output_count_source"] == {"stream_chunks": 3}
    assert run["tokens"]["output_total"] == 3 * 10


def test_redirects_to_other_urls_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "redirect.json"
    with FakeServer() as elsewhere:
        with FakeServer(redirect_to=elsewhere.base_url + "/v1/chat/completions") as server:
            rc = run_cli(*base_args(server, out, "--requests", "2", "--concurrency", "1", "--warmup", "0"))
        assert elsewhere.hits == []
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["errors"]["by_status"] == {"refused_redirect_307": 2}


def test_off_target_requests_are_refused() -> None:
    from loadtests.runner import OffTargetError, guard_trace

    async def attempt() -> None:
        async with aiohttp.ClientSession(trace_configs=[guard_trace("http://127.0.0.1:9")]) as session:
            with pytest.raises(OffTargetError):
                await session.get("http://127.0.0.2:9/metrics")

    asyncio.run(attempt())


def test_folder_images_png_multi_image(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "a.png")
    Image.new("RGB", (50, 70), (10, 200, 10)).save(folder / "b.jpg", format="JPEG")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "folder.json"
    with FakeServer() as server:
        rc = run_cli(
            *base_args(
                server,
                out,
                "--requests",
                "6",
                "--concurrency",
                "2",
                "--warmup",
                "0",
                "--image-dir",
                str(folder),
                "--images-per-request",
                "1-3",
            )
        )
        images = list(server.images)
        bodies = list(server.bodies)
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report["images"]["sizes"]) <= {"40x30", "50x70"}
    assert report["images"]["total"] == len(images) and 6 <= len(images) <= 18
    assert {(img["mime"], img["size"]) for img in images} <= {
        ("image/png", (40, 30)),
        ("image/jpeg", (50, 70)),
    }
    # two files, but every image sent is distinct (a noise patch per request)
    assert len({img["sha"] for img in images}) == len(images)
    counts = {sum(p["type"] == "image_url" for p in b["messages"][-1]["content"]) for b in bodies}
    assert counts <= {1, 2, 3}


def test_workload_is_deterministic_in_the_seed() -> None:
    from loadtests.workload import WorkloadSpec, build_requests

    spec = WorkloadSpec(
        num_requests=5,
        image_sizes="32x32:1,48x40:2",
        input_len=200,
        images_per_request=(0, 2),
        image_format="png",
        system_prompt="Be brief.",
    )
    a, info_a = build_requests(spec, 5, seed=3, request_id_prefix="r")
    b, _ = build_requests(spec, 5, seed=3, request_id_prefix="r")
    c, _ = build_requests(spec, 5, seed=4, request_id_prefix="r")
    assert [r.chat_messages for r in a] == [r.chat_messages for r in b]
    assert [r.chat_messages for r in a] != [r.chat_messages for r in c]
    assert all(r.chat_messages[0] == {"role": "system", "content": "Be brief."} for r in a)
    assert all(r.expected_output_len == spec.output_len for r in a)
    text = a[0].chat_messages[-1]["content"][-1]["text"]
    assert text.startswith("Context: ") and 120 <= len(text.split()) <= 200  # ~200 tokens
    for r in a:
        parts = r.chat_messages[-1]["content"][:-1]
        assert len(parts) == len(info_a[r.request_id]["images"]) <= 2
        for part in parts:
            assert part["image_url"]["url"].startswith("data:image/png;base64,")


def test_random_mm_dataset_from_vllm(tmp_path: Path, tiny_next: Path) -> None:
    """`--dataset random-mm` is vLLM's RandomMultiModalDataset (random tokens, random-pixel JPEGs)."""
    out = tmp_path / "rmm.json"
    with FakeServer() as server:
        rc = run_cli(
            *base_args(
                server,
                out,
                "--requests",
                "3",
                "--concurrency",
                "3",
                "--dataset",
                "random-mm",
                "--tokenizer",
                str(tiny_next),
                "--image-sizes",
                "40x32",
                "--warmup",
                "0",
            )
        )
        images = list(server.images)
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["config"]["dataset"] == "random-mm" and report["requests"]["completed"] == 3
    assert report["images"]["sizes"] == {"40x32": 3}
    assert {img["size"] for img in images} == {(40, 32)}


# -- /metrics arithmetic ----------------------------------------------------------------------
def test_metrics_weighted_savings_resets_and_inf_bucket_counts() -> None:
    text = """# TYPE pmod_kv_cache_savings_ratio gauge
pmod_kv_cache_savings_ratio{engine="0",model_name="m"} 0.5
pmod_kv_cache_savings_ratio{engine="1",model_name="m"} 0.2
# TYPE pmod_kv_blocks_dense_equivalent gauge
pmod_kv_blocks_dense_equivalent{engine="0",model_name="m"} 30
pmod_kv_blocks_dense_equivalent{engine="1",model_name="m"} 10
# TYPE pmod_kv_blocks_in_use gauge
pmod_kv_blocks_in_use{engine="0",model_name="m"} 15
pmod_kv_blocks_in_use{engine="1",model_name="m"} 8
"""
    point = lm.kv_savings_point(lm.parse_metrics(text))
    assert point["busy"] is True
    assert point["kv_savings_ratio"] == pytest.approx(
        1 - 23 / 40
    )  # dense-weighted = 1 - sum(in_use)/sum(dense)
    idle = lm.kv_savings_point(lm.parse_metrics(text.replace(" 30\n", " 0\n").replace(" 10\n", " 0\n")))
    assert idle["busy"] is False

    before = lm.parse_metrics("""# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{engine="0",model_name="m"} 100
vllm:generation_tokens_total{engine="1",model_name="m"} 50
# TYPE pmod_request_kv_savings_ratio histogram
pmod_request_kv_savings_ratio_bucket{engine="0",le="0.5",model_name="m"} 1
pmod_request_kv_savings_ratio_bucket{engine="0",le="+Inf",model_name="m"} 2
pmod_request_kv_savings_ratio_sum{engine="0",model_name="m"} 0.9
""")
    after = lm.parse_metrics("""# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{engine="0",model_name="m"} 130
vllm:generation_tokens_total{engine="1",model_name="m"} 70
# TYPE pmod_request_kv_savings_ratio histogram
pmod_request_kv_savings_ratio_bucket{engine="0",le="0.5",model_name="m"} 2
pmod_request_kv_savings_ratio_bucket{engine="0",le="+Inf",model_name="m"} 4
pmod_request_kv_savings_ratio_sum{engine="0",model_name="m"} 1.9
""")
    assert lm.counter_deltas(before, after) == {"vllm:generation_tokens_total": 50}
    assert lm.counter_deltas(after, before) == {"vllm:generation_tokens_total": 150}  # reset: the new value
    hist = lm.histogram_deltas(before, after)
    assert hist["pmod_request_kv_savings_ratio"] == {
        "count": 2,
        "sum": pytest.approx(1.0),
        "mean": pytest.approx(0.5),
    }
    kv = lm.summarize_kv_savings(
        [
            {"kv_savings_ratio": 0.0, "busy": False},
            {"kv_savings_ratio": 0.3, "busy": True},
            {"kv_savings_ratio": 0.5, "busy": True},
        ],
        before,
        after,
    )
    assert kv["mean"] == pytest.approx(0.4) and kv["mean_all_samples"] == pytest.approx(0.8 / 3)
    assert kv["request_mean"] == pytest.approx(0.5) and kv["requests_observed"] == 2
    assert kv["note"] is None
    idle_only = lm.summarize_kv_savings([{"kv_savings_ratio": 0.0, "busy": False}], before, after)
    assert idle_only["available"] and idle_only["mean"] is None and "metrics-interval" in idle_only["note"]
    assert idle_only["request_mean"] == pytest.approx(0.5)
    baseline = lm.summarize_kv_savings([{"kv_savings_ratio": None, "busy": True}], before, after)
    assert not baseline["available"] and baseline["mean"] is None


# -- compare ---------------------------------------------------------------------------------
def _report_pair(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "pmod.json", tmp_path / "base.json"
    with FakeServer(model="pmod-tiny", token_s=0.003) as server:
        assert (
            run_cli(*base_args(server, a, "--requests", "6", "--concurrency", "1,2,8", "--label", "p-MoD"))
            == 0
        )
        sent_a = dict(server.by_request_id)
    with FakeServer(model="llava", pmod=False, token_s=0.006) as server:
        assert (
            run_cli(*base_args(server, b, "--requests", "6", "--concurrency", "8,2,1", "--label", "baseline"))
            == 0
        )
        sent_b = dict(server.by_request_id)
    # both sides got the very same requests at each level, whatever the order of the sweep
    assert len(sent_a) == 1 + 18 and sent_a == sent_b
    assert {"c1-0", "c2-5", "c8-3", "warmup-0"} <= set(sent_a)
    return a, b


def test_compare_markdown_and_plots(tmp_path: Path) -> None:
    from loadtests.compare import MATPLOTLIB_PIN, compare

    a, b = _report_pair(tmp_path)
    result = compare([a], [b], tmp_path / "cmp")
    md = Path(result["markdown"]).read_text()
    assert "# Load test: p-MoD vs baseline" in md
    for level in (1, 2, 8):
        assert f"## Concurrency {level}" in md
    assert "| Metric | p-MoD | baseline | p-MoD vs baseline |" in md
    kv_row = next(line for line in md.splitlines() if line.startswith("| KV savings ratio"))
    assert "0.400" in kv_row and "n/a" in kv_row
    assert next(line for line in md.splitlines() if line.startswith("| TTFT p99 (ms)")).count("|") == 5
    assert "Warning" not in md  # same workload on both sides
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert result["plots"] == []
        assert MATPLOTLIB_PIN in result["plots_skipped"] and "markdown" in result["plots_skipped"]
    else:
        names = sorted(p.name for p in result["plots"])
        assert names == [
            "kv_savings_over_time.png",
            "latency_vs_concurrency.png",
            "throughput_vs_concurrency.png",
        ]
        for path in result["plots"]:
            with Image.open(path) as png:
                assert png.format == "PNG" and png.size[0] > 500

    # separate reports per concurrency on one side work too, and a differing workload is flagged
    with FakeServer(model="llava", pmod=False) as server:
        c = tmp_path / "base_c4.json"
        assert run_cli(*base_args(server, c, "--requests", "5", "--concurrency", "4")) == 0
    result = compare([a], [b, c], tmp_path / "cmp2", labels=("pmod", "base"), make_plots=False)
    md = Path(result["markdown"]).read_text()
    assert "## Concurrency 4" in md and "Warning: the workloads differ in requests" in md
    assert result["plots_skipped"] == "--no-plots"


def test_compare_rejects_non_reports(tmp_path: Path) -> None:
    from loadtests.compare import compare

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "something-else"}))
    with pytest.raises(ValueError, match="not a loadtests report"):
        compare([bad], [bad], tmp_path / "out")


# -- the command line as users run it, in a fresh interpreter ---------------------------------
def test_cli_end_to_end_in_a_subprocess(tmp_path: Path) -> None:
    out = tmp_path / "cli.json"
    with FakeServer() as server:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "loadtests",
                "--base-url",
                server.base_url,
                "--model",
                server.model,
                "--requests",
                "4",
                "--concurrency",
                "2",
                "--json",
                str(out),
                "--image-sizes",
                "64x64",
                "--output-len",
                "4",
                "--time-limit",
                "60",
                "--metrics-interval",
                "0.01",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=150,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4/4 ok" in proc.stdout and f"report: {out}" in proc.stdout
    report = json.loads(out.read_text())
    assert validate_report(report) == [] and report["kv_savings_ratio"] == pytest.approx(FAKE_SAVINGS)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtests",
            "compare",
            str(out),
            str(out),
            "--out-dir",
            str(tmp_path / "cmp"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## Concurrency 2" in proc.stdout and (tmp_path / "cmp" / "compare.md").exists()


def test_imports_stay_light() -> None:
    """Running never imports vLLM's model modules (llava, pixtral, ...) nor torchvision.

    Compare mode never imports vLLM at all."""
    code = (
        "import sys, loadtests.compare, loadtests.cli\n"
        "assert not any(k == 'vllm' or k.startswith('vllm.') for k in sys.modules), 'compare imported vllm'\n"
        "import loadtests.runner, loadtests.workload, loadtests.report\n"
        "def real(k):  # transformers registers file-less alias stubs for its image processors\n"
        "    return getattr(sys.modules[k], '__file__', None) is not None\n"
        "bad = [k for k in list(sys.modules) if k.startswith('torchvision')\n"
        "       or (('llava' in k or 'pixtral' in k) and real(k))\n"
        "       or (k.startswith('vllm.model_executor.models.')\n"
        "           and k.split('.')[3] not in ('registry', 'interfaces', 'interfaces_base'))]\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image-sizes", "big"], "bad image size"),
        (["--images-per-request", "3-1"], "bad count"),
        (["--goodput", "latency:5"], "Invalid metric name"),
        (["--dataset", "random-mm"], "needs --tokenizer"),
        (["--concurrency", "2,2"], "distinct"),
    ],
)
def test_bad_options_fail_before_any_request(
    extra: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with FakeServer() as server:
        rc = run_cli("--base-url", server.base_url, "--requests", "1", "--no-progress", *extra)
        hits = list(server.hits)
    assert rc == 2
    assert message in capsys.readouterr().err
    assert hits == []


def test_base_url_must_be_http() -> None:
    from loadtests.runner import normalize_base_url

    assert normalize_base_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"
    assert normalize_base_url("https://host/prefix/") == "https://host/prefix"
    for bad in ("ftp://127.0.0.1", "127.0.0.1:8000", "http://127.0.0.1:8000/?x=1"):
        with pytest.raises(ValueError):
            normalize_base_url(bad)
