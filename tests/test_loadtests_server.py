"""Acceptance: `python -m loadtests` against the tiny p-MoD demo server on CPU.

Needs the session fixture `pmod_server` (tests/conftest.py): an object with `.base_url`
("http://127.0.0.1:PORT") and `.model` (the served model name) of a running
`pmod-serve --demo`. Without that fixture this test errors; it is never skipped.

A handful of small requests, bounded in time: the load test's own --time-limit, and a
subprocess timeout above it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from loadtests.report import SUMMARY_KEYS, validate_report

REPO = Path(__file__).resolve().parents[1]
REQUESTS = 6
OUTPUT_LEN = 24
TIME_LIMIT_S = 240
pytestmark = pytest.mark.timeout(2 * TIME_LIMIT_S + 120)


def test_loadtest_report_from_demo_server(pmod_server, tmp_path: Path) -> None:
    assert urlsplit(pmod_server.base_url).hostname == "127.0.0.1", "tests only ever target 127.0.0.1"
    out = tmp_path / "pmod.json"
    cmd = [
        sys.executable,
        "-m",
        "loadtests",
        "--base-url",
        pmod_server.base_url,
        "--model",
        pmod_server.model,
        "--label",
        "p-MoD demo",
        "--requests",
        str(REQUESTS),
        "--concurrency",
        "2",
        "--warmup",
        "1",
        "--seed",
        "0",
        "--input-len",
        "32",
        "--output-len",
        str(OUTPUT_LEN),
        "--ignore-eos",
        "--image-sizes",
        "336x336:1,672x448:1",
        "--images-per-request",
        "1",
        # Requests on CPU last a fraction of a second: sample /metrics often enough to see them.
        "--metrics-interval",
        "0.05",
        "--time-limit",
        str(TIME_LIMIT_S),
        "--ready-timeout",
        "120",
        "--no-progress",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=2 * TIME_LIMIT_S + 60)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    report = json.loads(out.read_text())
    assert validate_report(report) == []

    # shape and bounds
    assert report["target"]["model"] == pmod_server.model
    assert report["target"]["base_url"] == pmod_server.base_url.rstrip("/")
    assert report["warmup"]["completed"] == 1
    assert report["stopped_by"] == "requests"
    assert report["requests"]["completed"] == REQUESTS
    assert report["errors"] == {"count": 0, "by_status": {}, "examples": []}

    # client-side latencies and throughput
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        summary = report[key]
        assert set(SUMMARY_KEYS) <= set(summary), key
        assert summary["n"] > 0, key
        assert 0 < summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["max"], key
    assert report["ttft_ms"]["p50"] < report["e2e_ms"]["p50"]
    assert report["throughput_rps"] > 0 and report["output_tokens_per_s"] > 0
    assert report["tokens"]["output_total"] == REQUESTS * OUTPUT_LEN  # --ignore-eos
    assert report["tokens"]["output_count_source"] == {"usage": REQUESTS}
    assert report["images"]["total"] == REQUESTS

    # the server's own accounting agrees with the client's over the measured run
    server = report["server_metrics"]
    assert server["available"] and server["scrape_errors"] == 0
    counters = server["counters"]
    assert counters["vllm:generation_tokens_total"] == report["tokens"]["output_total"]
    assert counters["vllm:prompt_tokens_total"] == report["tokens"]["input_total"]
    assert sum(v for k, v in counters.items() if k.startswith("vllm:request_success_total")) == REQUESTS
    assert counters["pmod_visual_tokens_total"] > 0
    assert server["histograms"]["vllm:e2e_request_latency_seconds"]["count"] == REQUESTS

    # p-MoD KV savings: the sampled gauge while requests held KV, and the per-request histogram
    kv = report["kv_savings"]
    assert kv["available"] and kv["busy_samples"] >= 1, kv
    assert report["kv_savings_ratio"] is not None and 0 < report["kv_savings_ratio"] < 1
    assert kv["requests_observed"] == REQUESTS and 0 < kv["request_mean"] < 1
    assert any(p["kv_savings_ratio"] for p in report["timeseries"])

    # compare mode on the real report (against itself): the table is there, plots or a clear message
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtests",
            "compare",
            str(out),
            str(out),
            "--out-dir",
            str(tmp_path / "compare"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    markdown = (tmp_path / "compare" / "compare.md").read_text()
    assert "## Concurrency 2" in markdown and "| KV savings ratio (mean, sampled) |" in markdown
    assert (tmp_path / "compare" / "latency_vs_concurrency.png").exists() or "matplotlib" in proc.stderr
