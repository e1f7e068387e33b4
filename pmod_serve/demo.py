"""The README demo: serve the tiny p-MoD checkpoint on CPU and ask it about an image.

    python -m pmod_serve.demo [--port 8000]

Starts `pmod-serve --demo`, waits for `/health`, sends one image chat request through the
official `openai` client, prints the answer and the KV-cache savings from `/metrics`, and stops
the server.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families


def demo_image(width: int = 672, height: int = 672) -> Image.Image:
    """A synthetic picture: a sky gradient, a sun and a hill."""
    y, x = np.mgrid[0:height, 0:width]
    sky = np.stack([80 + 100 * y / height, 140 + 80 * y / height, 255 - 40 * y / height], -1)
    picture = sky.copy()
    picture[(x - 0.75 * width) ** 2 + (y - 0.25 * height) ** 2 < (0.1 * width) ** 2] = (255, 220, 40)
    picture[y > 0.65 * height + 0.1 * height * np.sin(x / width * 6)] = (60, 150, 60)
    return Image.fromarray(picture.clip(0, 255).astype(np.uint8))


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def wait_healthy(base_url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    """Wait until `base_url/health` answers 200; fail early if the server process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"the server did not become healthy within {timeout:.0f}s")


def pmod_metrics(base_url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("pmod_") and "le" not in sample.labels:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def ask(base_url: str, model: str, image: Image.Image, question: str) -> tuple[str, dict]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key=os.environ.get("VLLM_API_KEY", "EMPTY"))
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(image)}},
            {"type": "text", "text": question},
        ]}],
        max_tokens=32,
        temperature=0,
    )
    return response.choices[0].message.content, response.usage.model_dump()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    base_url = f"http://127.0.0.1:{args.port}"

    print(f"[demo] starting pmod-serve --demo on {base_url} (CPU; first start takes a minute or two)")
    server = subprocess.Popen(
        [sys.executable, "-m", "pmod_serve.server", "--demo", "--port", str(args.port)],
        stdout=subprocess.DEVNULL if not os.environ.get("PMOD_DEMO_VERBOSE") else None,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_healthy(base_url, server)
        question = "What is in this picture?"
        answer, usage = ask(base_url, "pmod-tiny", demo_image(), question)
        metrics = pmod_metrics(base_url)
        print(f"[demo] question: {question}")
        print(f"[demo] answer (a tiny random-weight model, so not meaningful text): {answer!r}")
        print(f"[demo] usage: {usage['prompt_tokens']} prompt tokens, {usage['completion_tokens']} completion")
        visual = metrics.get("pmod_visual_tokens_total", 0.0)
        saved = metrics.get("pmod_kv_slots_saved_total", 0.0)
        ratios = [v for k, v in metrics.items() if k == "pmod_request_kv_savings_ratio_sum"]
        count = metrics.get("pmod_request_kv_savings_ratio_count", 0.0)
        print(f"[demo] visual tokens prefilled: {visual:.0f}; KV slots never written (skipped visual "
              f"tokens, summed over layers): {saved:.0f}")
        if count:
            print(f"[demo] KV cache savings of the request: {ratios[0] / count:.1%} fewer blocks than dense LLaVA")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
