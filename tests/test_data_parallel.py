"""`--data-parallel-size 2`: two engine cores, each with its own block pool, and the p-MoD KV
series of each under its own `engine` label, as vLLM labels its own series."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from conftest import VENV_BIN, ServerProcess, make_image

from benchmarks.e2e_serve import (
    BLOCK_SERIES,
    MetricsPoller,
    cache_config_of,
    histogram_quantiles,
    kv_metrics_agree,
    kv_metrics_agreement,
    scrape,
    series_per_engine,
)
from pmod_serve.entrypoints.demo import data_url

pytestmark = pytest.mark.engine

SERIES = (*BLOCK_SERIES, "pmod_visual_tokens_total")


def test_each_data_parallel_engine_reports_its_own_pool(tiny_next, tmp_path, monkeypatch) -> None:
    # One CPU core per engine core (vLLM's CPU workers bind OpenMP threads per rank).
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    server = ServerProcess(
        [str(VENV_BIN / "pmod-serve"), str(tiny_next), "--served-model-name", "pmod-dp", "--max-model-len", "4096",
         "--dtype", "float32", "--data-parallel-size", "2"],
        model="pmod-dp", log_path=tmp_path / "pmod-serve-dp2.log",
    )
    try:
        server.wait_ready()
        base = server.base_url

        def chat(seed: int) -> None:
            body = {"model": "pmod-dp", "max_tokens": 320, "ignore_eos": True, "temperature": 0.0,
                    "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": data_url(make_image(336, 336, seed))}},
                        {"type": "text", "text": "What is in the picture?"}]}]}
            response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300)
            assert response.status_code == 200, response.text

        before = scrape(base, timeout=30)
        clients = [threading.Thread(target=chat, args=(seed,)) for seed in range(4)]
        for client in clients:
            client.start()
        samples = []
        # e2e_serve's own poller beside this test's sampling: its savings come from both engines' gauges.
        with MetricsPoller(base, 0.1) as poller:
            while any(client.is_alive() for client in clients):
                samples.append(series_per_engine(httpx.get(f"{base}/metrics", timeout=30).text, SERIES))
                time.sleep(0.1)
        for client in clients:
            client.join()

        metrics = httpx.get(f"{base}/metrics", timeout=30).text
        blocks_total = int(cache_config_of(metrics)["num_gpu_blocks"])
        # vLLM's load balancer spreads the four requests over both engines: each engine's
        # series follows its own pool (a shared label, or one engine's series, fails this).
        report = kv_metrics_agreement(samples, blocks_total)
        assert kv_metrics_agree(report, num_engines=2), report
        final = series_per_engine(metrics, SERIES)
        assert set(final) == {"0", "1"}
        assert all(final[engine]["pmod_visual_tokens_total"] > 0 for engine in ("0", "1")), final
        # The benchmark's savings: while the image requests ran, and over the four finished ones
        # (each engine's histogram summed), strictly between nothing saved and everything saved.
        assert poller.kv_savings and all(0.0 < saving < 1.0 for saving in poller.kv_savings), poller.kv_savings
        request_savings = histogram_quantiles(before, scrape(base, timeout=30), "pmod_request_kv_savings_ratio")
        assert request_savings["count"] == 4 and 0.0 < request_savings["p10"] <= request_savings["p90"] < 1.0, request_savings

        # Idle: every block of both pools is back.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(
                final[e].get(name) for e in final for name in ("pmod_kv_blocks_in_use", "vllm:kv_cache_usage_perc")):
            time.sleep(0.5)
            final = series_per_engine(httpx.get(f"{base}/metrics", timeout=30).text, SERIES)
        assert all(final[e]["pmod_kv_blocks_in_use"] == 0 and final[e]["vllm:kv_cache_usage_perc"] == 0
                   for e in final), final
    finally:
        server.stop()
