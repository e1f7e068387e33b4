"""Soak: mixed valid traffic with random client aborts for a bounded time. Afterwards no block is
held, no request is stuck, nothing but the induced aborts failed, and memory is stable. Against
`pmod-serve` and against plain `vllm serve <checkpoint>` (no flag)."""

from __future__ import annotations

import asyncio
import os
import random
import time

import httpx
import psutil
import pytest
from conftest import make_image
from test_aborts import wait_idle

from pmod_serve.entrypoints.demo import data_url

pytestmark = pytest.mark.engine  # starts its own engines or servers

# CI soaks 40 s per server (hundreds of requests); a longer soak: PMOD_SOAK_SECONDS=900 pytest tests/test_soak.py
SOAK_SECONDS = float(os.environ.get("PMOD_SOAK_SECONDS", "40"))
CONCURRENCY = 4


def tree_rss(pid: int) -> int:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


async def traffic(server, seconds: float, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    images = [data_url(make_image(w, h, s)) for s, (w, h) in enumerate([(336, 336), (500, 300), (300, 600)])]
    counts = {"ok": 0, "aborted": 0, "failed": 0}
    deadline = time.monotonic() + seconds

    async def one(client: httpx.AsyncClient) -> None:
        content = [{"type": "text", "text": rng.choice(["Describe.", "What colors?", "Hi"])}]
        if rng.random() < 0.7:
            content.insert(0, {"type": "image_url", "image_url": {"url": rng.choice(images)}})
        body = {"model": server.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": rng.randint(1, 24), "temperature": rng.choice([0, 0.7]), "stream": rng.random() < 0.5}
        abort_after = rng.random() * 1.5 if rng.random() < 0.3 else None
        try:
            request = client.post(f"{server.base_url}/v1/chat/completions", json=body)
            response = await (asyncio.wait_for(request, abort_after) if abort_after else request)
            counts["ok" if response.status_code == 200 else "failed"] += 1
        except asyncio.TimeoutError:
            counts["aborted"] += 1

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            await one(client)

    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
    return counts


def test_soak_with_random_aborts(server):  # conftest's `server`: pmod-serve, then plain vllm serve
    asyncio.run(traffic(server, 10, seed=1))  # warm-up: caches, allocator pools
    assert wait_idle(server)["pmod_kv_blocks_in_use"] == 0
    rss_before = tree_rss(server.process.pid)
    counts = asyncio.run(traffic(server, SOAK_SECONDS, seed=2))
    state = wait_idle(server, timeout=120)
    rss_after = tree_rss(server.process.pid)
    print(f"\n[soak] {SOAK_SECONDS:.0f}s: {counts}; server RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")
    assert counts["failed"] == 0 and counts["ok"] > 10 and counts["aborted"] > 0, counts
    assert state == {"pmod_kv_blocks_in_use": 0, "vllm:kv_cache_usage_perc": 0,
                     "vllm:num_requests_running": 0, "vllm:num_requests_waiting": 0}
    assert rss_after < rss_before * 1.15 + 64 * 2**20
