"""The benchmark tooling's cheap parts: the dense twin, the `vllm bench serve` command lines, ratios.

The benchmarks themselves (benchmarks/host_overhead.py, benchmarks/e2e_serve.py) are not tests;
this only checks what would otherwise fail on a GPU machine after minutes of staging."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks import e2e_serve
from benchmarks.models import write_dense_twin


def test_dense_twin_routes_nothing_and_keeps_every_weight(tiny_next: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    from pmod_serve.config import PmodSchedule

    twin = write_dense_twin(tiny_next, tmp_path / "dense")
    config = json.loads((twin / "config.json").read_text())
    assert PmodSchedule.from_config(config).retention_ratio == {}
    assert PmodSchedule.from_config(json.loads((tiny_next / "config.json").read_text())).retention_ratio

    def names(directory: Path) -> set[str]:
        out = set()
        for shard in directory.glob("*.safetensors"):
            with safe_open(str(shard), "pt") as f:
                out |= set(f.keys())
        return out

    original, dense = names(tiny_next), names(twin)
    assert not any(".decoder_layer." in n or ".router." in n for n in dense)
    assert dense == {n.replace(".decoder_layer.", ".") for n in original if ".router." not in n}
    assert (twin / "tokenizer.model").exists()
    assert write_dense_twin(tiny_next, tmp_path / "dense") == twin  # reused


def _e2e_args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    args = e2e_serve.parse_args(["--out", str(tmp_path), "--tokenizer", str(tmp_path / "tok"), *extra])
    args.out = tmp_path
    return args


def test_bench_serve_commands_parse_with_vllms_own_parser(tmp_path: Path) -> None:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = _e2e_args(tmp_path)
    for run, (dataset, concurrency, count_flag, seed) in e2e_serve.RUNS.items():
        cmd = e2e_serve.bench_command(args, run, "http://127.0.0.1:1", "pmod", tmp_path, "pmod")
        assert cmd[3:5] == ["bench", "serve"]
        parsed = parser.parse_args(cmd[5:])
        assert parsed.dataset_name == dataset and parsed.max_concurrency == concurrency
        assert parsed.num_prompts == getattr(args, count_flag) and parsed.seed == seed
        assert parsed.ignore_eos and parsed.random_input_len == 60 and parsed.random_output_len == 128
        assert parsed.backend == "openai-chat" and parsed.save_result
        if dataset == "random-mm":
            assert parsed.random_mm_bucket_config == {(672, 672, 1): 1.0}
            assert parsed.random_mm_base_items_per_request == 1
            assert parsed.random_mm_limit_mm_per_prompt == {"image": 1, "video": 0}
    assert _e2e_args(tmp_path, "--quick").c256_prompts < e2e_serve.DEFAULT_COUNTS["c256_prompts"]
    assert e2e_serve.DEFAULT_COUNTS["c256_prompts"] >= 256


def test_server_commands(tmp_path: Path) -> None:
    args = _e2e_args(tmp_path)
    pmod = e2e_serve.server_command("pmod", args, Path("/m/pmod"), "pmod", 8000)
    base = e2e_serve.server_command("baseline", args, Path("/m/llava"), "baseline", 8001)
    assert "/m/pmod" in pmod and pmod[pmod.index("--load-format") + 1] == "dummy"
    assert base[3:5] == ["serve", "/m/llava"] and base[base.index("--load-format") + 1] == "dummy"
    assert Path(base[base.index("--chat-template") + 1]).is_file()
    dense = e2e_serve.server_command("baseline", _e2e_args(tmp_path, "--baseline", "pmod-dense"), Path("/d"), "b", 1)
    assert "--chat-template" not in dense and "serve" not in dense


def test_ratios_and_merge(tmp_path: Path) -> None:
    def report(engine: str, scale: float) -> dict:
        runs = {"image_c1": {"median_ttft_ms": 100 * scale, "median_tpot_ms": 10 * scale, "peak_kv_cache_usage": 0.1 * scale},
                "image_c32": {"median_tpot_ms": 20 * scale, "request_throughput": 5 / scale},
                "image_c256": {"request_throughput": 8 / scale},
                "text_c1": {"median_e2el_ms": 1000 * scale}}
        other = "baseline" if engine == "pmod" else "pmod"
        return {"gpu": "H100", "vllm_version": "0.26.0", "command": f"cmd {engine}", engine: {"runs": runs},
                other: {"skipped": "not in --engines"}}

    (tmp_path / "p.json").write_text(json.dumps(report("pmod", 0.5)))
    (tmp_path / "b.json").write_text(json.dumps(report("baseline", 1.0)))
    merged = e2e_serve.merge([tmp_path / "p.json", tmp_path / "b.json"], tmp_path / "out" / "e2e_serve.json")
    r = merged["ratios"]
    assert r["ttft_c1"] == r["tpot_c1"] == r["tpot_c32"] == r["text_only_c1"] == 0.5
    assert r["throughput_c256"] == 2.0 and r["kv_per_request"] == 0.5
    assert merged["command"] == "cmd pmod ; cmd baseline"
    assert json.loads((tmp_path / "out" / "e2e_serve.json").read_text())["ratios"] == r
