"""The README demo: serve the trained tiny p-MoD checkpoint on CPU and ask it about an image.

    python -m pmod_serve.entrypoints.demo [--port 8000] [--routing-map pmod-demo-routing-map.png]

Starts `pmod-serve --demo` (the checkpoint `pmod_train` trained on coloured shapes), waits for
`/health`, asks questions about one picture through the official `openai` client, prints the
answers and the KV-cache savings from `/metrics`, stops the server, and draws the routing map of
the first question (which visual tokens each p-MoD layer kept, from the plain-PyTorch reference).
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

from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from pmod_serve import envs

# A picture in the training distribution (pmod_train.shapes) and four questions the trained model
# answers right (it answers ~64% of held-out questions right: benchmarks/results/accuracy.json).
DEMO_QUESTIONS = (
    ("What shape is the blue object?", "triangle"),
    ("How many objects are there?", "three"),
    ("Where is the blue triangle?", "top right"),
    ("What color is the circle?", "red"),
)


def demo_image() -> Image.Image:
    """A red circle (top left), a blue triangle (top right) and a yellow square (bottom right)."""
    from pmod_train.shapes import ShapeObject, draw_scene

    return draw_scene((
        ShapeObject("circle", "red", 0, (54.0, 58.0), 70.0),
        ShapeObject("triangle", "blue", 1, (165.0, 52.0), 72.0),
        ShapeObject("square", "yellow", 3, (170.0, 166.0), 64.0),
    ), (48, 50, 46))


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


def draw_routing_map(image: Image.Image, question: str, out: str) -> str:
    import torch

    from pmod_reference.model import PmodReference
    from pmod_train import routing_map
    from pmod_train.paths import PMOD_CHECKPOINT

    torch.set_num_threads(1)
    reference = PmodReference(PMOD_CHECKPOINT)
    routing = routing_map.compute(reference, image, question)
    routing_map.draw(reference, image, routing, out)
    counts = ", ".join(f"{layer}:{len(kept)}" for layer, kept in sorted(routing.kept.items()))
    return f"{out} (layer:kept of {routing.grid ** 2} visual tokens {counts})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--routing-map", default="pmod-demo-routing-map.png", help="PNG to write ('' for none)")
    args = parser.parse_args(argv)
    base_url = f"http://127.0.0.1:{args.port}"

    print(f"[demo] starting pmod-serve --demo on {base_url} (CPU; first start takes a minute or two)")
    server = subprocess.Popen(
        [sys.executable, "-m", "pmod_serve.entrypoints.server", "--demo", "--port", str(args.port)],
        stdout=subprocess.DEVNULL if not envs.PMOD_DEMO_VERBOSE else None,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    image = demo_image()
    try:
        wait_healthy(base_url, server)
        print("[demo] the picture: a red circle (top left), a blue triangle (top right), a yellow square "
              "(bottom right); a tiny p-MoD-LLaVA trained on such pictures (pmod_train) answers:")
        for question, expected in DEMO_QUESTIONS:
            answer, usage = ask(base_url, "pmod-tiny", image, question)
            verdict = "correct" if answer.strip().lower().rstrip(".") == expected else f"WRONG, expected {expected!r}"
            print(f"[demo]   Q: {question}  A: {answer.strip()!r} ({verdict})")
        metrics = pmod_metrics(base_url)
        print(f"[demo] usage of the last request: {usage['prompt_tokens']} prompt tokens, "
              f"{usage['completion_tokens']} completion")
        visual = metrics.get("pmod_visual_tokens_total", 0.0)
        saved = metrics.get("pmod_kv_slots_saved_total", 0.0)
        ratios = [v for k, v in metrics.items() if k == "pmod_request_kv_savings_ratio_sum"]
        count = metrics.get("pmod_request_kv_savings_ratio_count", 0.0)
        print(f"[demo] visual tokens prefilled: {visual:.0f}; KV slots never written (skipped visual "
              f"tokens, summed over layers): {saved:.0f}")
        if count:
            print(f"[demo] KV cache blocks per request: {ratios[0] / count:.1%} fewer than dense LLaVA (CPU block "
                  "size 128: a ~110-token request fits one block per layer either way; the slots above are what "
                  "scales with image size)")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    if args.routing_map:
        print(f"[demo] routing map of {DEMO_QUESTIONS[0][0]!r}: {draw_routing_map(image, DEMO_QUESTIONS[0][0], args.routing_map)}")


if __name__ == "__main__":
    main()
