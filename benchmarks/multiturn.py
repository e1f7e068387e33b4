"""Multi-turn image chat (issue 17): time to first token per turn, p-MoD against vLLM's
LLaVA-NeXT, both with prefix caching on (vLLM's default for both).

    python -m benchmarks.multiturn --out DIR [--models .gpu/models] [--conversations 6] [--turns 3]
    python -m benchmarks.multiturn --out DIR --tiny --baseline pmod-dense    # CPU plumbing check

Each conversation has one image (its own seed) and a question after `FIRST_TURN_CONTEXT` in the
first user message; every later turn resends the whole conversation with a new question, as chat
clients do. The assistant turns resent are a fixed answer text of about `--answer-tokens` tokens
rather than the server's own answers: with dummy weights those are random pieces that
re-tokenize into several times as many tokens (a 3-turn conversation would outgrow the 4096-token
context), and a fixed text gives both engines the same prompts. Streaming chat completions; TTFT is the time from sending the request to the first content
chunk. Conversations run one after the other (concurrency 1), after one warm-up conversation, so
each TTFT is the server's own. For every request, /metrics deltas: vLLM's prefix-cache queries
and hits (tokens), prompt tokens, and p-MoD's visual tokens prefilled.

DIR/multiturn.json: {"gpu", "vllm_version", "command", "settings", "pmod", "baseline",
"ratios": {"ttft_turn1", "ttft_turn2", ...}} (median TTFT per turn, p-MoD / baseline, the two
servers one after the other on the same machine).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import httpx

from benchmarks.common import image_size, make_image
from benchmarks.e2e_serve import (
    REPO,
    _free_port,
    _kill_group,
    gpu_name,
    ratio,
    scrape,
    server_command,
    start_server,
    vllm_version,
    wait_gpu_memory_free,
)
from pmod_serve.entrypoints.demo import data_url

# The first message's text after the image (~40 tokens, a realistic first question). A p-MoD
# prefix hit past the image needs the KV block that holds the image's end complete in the shared
# prefix (README, Prefix caching); with a bare 7-token question that block would end in the first
# answer, whose re-tokenised text need not match the generated ids (it does not with dummy weights).
FIXED_ANSWER = ("The picture shows a few simple shapes in different colours on a plain background. "
                "There is a large shape near the centre and a few smaller ones around it, and the "
                "colours are bright and easy to tell apart.")
FIRST_TURN_CONTEXT = ("I am going to ask you several questions about this picture, one after the other. "
                      "Please look at every part of it carefully, and keep your answers short and precise.")
QUESTIONS = ("What is shown in this image?", "Describe the colours you see.", "What is in the top left corner?",
             "Is there any text in the picture?", "Summarise the picture in one sentence.")
COUNTERS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:prompt_tokens_total",
            "pmod_visual_tokens_total")


def _log(message: str) -> None:
    print(f"[multiturn {time.strftime('%H:%M:%S')}] {message}", flush=True)


def stream_chat(base_url: str, body: dict, timeout_s: float = 600) -> dict:
    """One streaming chat completion: TTFT, the answer, the server's token usage."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    answer, ttft, usage = [], None, None
    start = time.perf_counter()
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=timeout_s) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read().decode()[:500]}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            for choice in chunk.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    answer.append(content)
            usage = chunk.get("usage") or usage
    return {"ttft_s": ttft, "e2e_s": time.perf_counter() - start, "answer": "".join(answer), "usage": usage}


def run_conversation(base_url: str, model: str, seed: int, turns: int, image_size: tuple[int, int],
                     answer_tokens: int, preamble: str = FIRST_TURN_CONTEXT) -> list[dict]:
    """One conversation; per turn: TTFT, usage and the /metrics counter deltas of its request.
    `preamble`: text before the first question (a longer first turn)."""
    image = make_image(*image_size, seed)
    messages: list[dict] = []
    records = []
    for turn in range(turns):
        question = QUESTIONS[(seed + turn) % len(QUESTIONS)]
        if turn == 0 and preamble:
            question = f"{preamble} {question}"
        content: list[dict] = [{"type": "text", "text": question}]
        if turn == 0:
            content.insert(0, {"type": "image_url", "image_url": {"url": data_url(image)}})
        messages.append({"role": "user", "content": content})
        before = scrape(base_url)
        result = stream_chat(base_url, {"model": model, "messages": messages, "max_tokens": answer_tokens,
                                        "temperature": 0.0, "ignore_eos": True})
        after = scrape(base_url)
        result.pop("answer")
        # Dummy weights answer with random pieces that re-tokenize into several times as many
        # tokens; resend a fixed answer of about the same length instead (both engines alike).
        messages.append({"role": "assistant", "content": FIXED_ANSWER})
        result.update({"turn": turn + 1, "deltas": {name: after.get(name, 0.0) - before.get(name, 0.0)
                                                     for name in COUNTERS}})
        records.append(result)
    return records


def summarise(conversations: list[list[dict]], turns: int) -> dict:
    per_turn = {}
    for turn in range(turns):
        rows = [conversation[turn] for conversation in conversations]
        ttfts = [row["ttft_s"] * 1000 for row in rows if row["ttft_s"] is not None]
        deltas = {name: sum(row["deltas"][name] for row in rows) for name in COUNTERS}
        per_turn[f"turn{turn + 1}"] = {
            "median_ttft_ms": statistics.median(ttfts) if ttfts else None, "ttft_ms": ttfts,
            "prompt_tokens_median": statistics.median(row["usage"]["prompt_tokens"] for row in rows if row["usage"]),
            "prefix_cache_hit_tokens": deltas["vllm:prefix_cache_hits_total"],
            "prefix_cache_query_tokens": deltas["vllm:prefix_cache_queries_total"],
            "prefix_cache_hit_rate": (deltas["vllm:prefix_cache_hits_total"] / deltas["vllm:prefix_cache_queries_total"]
                                      if deltas["vllm:prefix_cache_queries_total"] else None),
            "visual_tokens_prefilled": deltas["pmod_visual_tokens_total"],
        }
    return per_turn


def run_server(engine: str, args, model_dir: Path) -> dict:
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = server_command(engine, args, model_dir, engine, port)
    log_path = args.out / f"server_{engine}.log"
    result: dict = {"server_command": shlex.join(cmd), "server_log": log_path.name}
    _log(f"{engine}: starting {shlex.join(cmd)}")
    wait_gpu_memory_free()
    start = time.monotonic()
    process = start_server(cmd, log_path, args.out)
    try:
        from pmod_serve.entrypoints.demo import wait_healthy

        wait_healthy(base_url, process, args.server_timeout_s)
        result["startup_s"] = time.monotonic() - start
        _log(f"{engine}: healthy after {result['startup_s']:.0f} s")
        run_conversation(base_url, engine, args.seed - 1, args.turns, args.image_size, args.answer_tokens)  # warm-up
        conversations = [run_conversation(base_url, engine, args.seed + i, args.turns, args.image_size,
                                          args.answer_tokens) for i in range(args.conversations)]
        result["conversations"] = conversations
        result["turns"] = summarise(conversations, args.turns)
        _log(f"{engine}: " + ", ".join(f"{name} {row['median_ttft_ms']:.1f} ms (hits {row['prefix_cache_hit_tokens']:.0f})"
                                       for name, row in result["turns"].items()))
    except Exception as exc:  # report what ran
        result["error"] = repr(exc)
        _log(f"{engine}: {exc!r}")
    finally:
        _kill_group(process, grace_s=args.stop_grace_s)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.multiturn", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", type=Path, default=REPO / ".gpu" / "models")
    parser.add_argument("--tiny", action="store_true", help="tiny-dimension model directories (CPU dry run)")
    parser.add_argument("--baseline", choices=("vllm", "pmod-dense", "none"), default="vllm")
    parser.add_argument("--engines", type=lambda s: tuple(s.split(",")), default=("pmod", "baseline"))
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--image-size", type=image_size, default=image_size("672x672"))
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=200)
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--server-args", default="")
    parser.add_argument("--pmod-args", default="")
    parser.add_argument("--baseline-args", default="")
    parser.add_argument("--server-timeout-s", type=float, default=420)
    parser.add_argument("--stop-grace-s", type=float, default=40)
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)

    from benchmarks.models import prepare, write_dense_twin

    dirs = prepare(args.models.resolve(), tiny=args.tiny)
    models = {"pmod": dirs["pmod"]}
    if args.baseline == "vllm":
        models["baseline"] = dirs["baseline"]
    elif args.baseline == "pmod-dense":
        models["baseline"] = write_dense_twin(dirs["pmod"], dirs["pmod"].parent / (dirs["pmod"].name + "-dense"))
    report = {"gpu": gpu_name(), "vllm_version": vllm_version(),
              "command": "python -m benchmarks.multiturn " + shlex.join(sys.argv[1:] if argv is None else argv),
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "settings": {"conversations": args.conversations, "turns": args.turns,
                           "image_size": "x".join(map(str, args.image_size)), "answer_tokens": args.answer_tokens,
                           "concurrency": 1, "baseline_kind": args.baseline, "load_format": args.load_format},
              "ratios": {}}
    for engine in ("pmod", "baseline"):
        if engine in args.engines and engine in models:
            report[engine] = run_server(engine, args, models[engine])
            (args.out / "multiturn.json").write_text(json.dumps(report, indent=1) + "\n")
    for turn in range(1, args.turns + 1):
        p = report.get("pmod", {}).get("turns", {}).get(f"turn{turn}", {}).get("median_ttft_ms")
        b = report.get("baseline", {}).get("turns", {}).get(f"turn{turn}", {}).get("median_ttft_ms")
        report["ratios"][f"ttft_turn{turn}"] = ratio(p, b)
    (args.out / "multiturn.json").write_text(json.dumps(report, indent=1) + "\n")
    _log(f"ratios: {report['ratios']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
