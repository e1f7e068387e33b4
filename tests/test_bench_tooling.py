"""The benchmark tooling's cheap parts: the dense twin, the `vllm bench serve` command lines, ratios.

The benchmarks themselves (benchmarks/host_overhead.py, benchmarks/e2e_serve.py) are not tests;
this only checks what would otherwise fail on a GPU machine after minutes of staging."""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import pytest
from conftest import plugin_log_messages

from benchmarks import e2e_serve
from benchmarks.models import write_dense_twin


def test_dense_twin_routes_nothing_and_keeps_every_weight(tiny_next: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    from pmod_serve.pmod.schedule import PmodSchedule

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
        assert parsed.backend == "openai-chat" and parsed.save_result and parsed.save_detailed
        if dataset == "random-mm":
            assert parsed.random_mm_bucket_config == {(672, 672, 1): 1.0}
            assert parsed.random_mm_base_items_per_request == 1
            assert parsed.random_mm_limit_mm_per_prompt == {"image": 1, "video": 0}
    assert _e2e_args(tmp_path, "--quick").c256_prompts < e2e_serve.DEFAULT_COUNTS["c256_prompts"]
    assert e2e_serve.DEFAULT_COUNTS["c256_prompts"] >= 256
    assert e2e_serve.DEFAULT_COUNTS["c256_1024_prompts"] == 1024 and e2e_serve.RUNS["image_c256_1024"][1] == 256


def test_ttft_after_the_first_wave() -> None:
    # Concurrency 2: requests 0 and 1 start at once (the first wave); 2-4 start as others finish.
    # Detailed results list requests in completion order, with start times in seconds.
    data = {"start_times": [0.0, 5.0, 0.0, 3.0, 4.0], "ttfts": [0.9, 0.2, 1.5, 0.1, 0.3]}
    later = e2e_serve.ttft_after_first_wave(data, concurrency=2)
    # Later requests (starts 3, 4, 5 s): TTFTs 0.1, 0.3, 0.2 s; percentiles interpolate as numpy's.
    assert later == {"requests_after_first_wave": 3, "median_ttft_after_first_wave_ms": pytest.approx(200.0),
                     "p90_ttft_after_first_wave_ms": pytest.approx(280.0)}
    assert e2e_serve.ttft_after_first_wave({"ttfts": [0.1]}, concurrency=2) == {}  # not detailed
    assert e2e_serve.ttft_after_first_wave(data, concurrency=5) == {}  # no later request


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
        return {"gpu": "H100", "host": {"cpu_model": f"cpu of {engine}"}, "vllm_version": "0.26.0",
                "command": f"cmd {engine}", engine: {"runs": runs}, other: {"skipped": "not in --engines"}}

    (tmp_path / "p.json").write_text(json.dumps(report("pmod", 0.5)))
    (tmp_path / "b.json").write_text(json.dumps(report("baseline", 1.0)))
    merged = e2e_serve.merge([tmp_path / "p.json", tmp_path / "b.json"], tmp_path / "out" / "e2e_serve.json")
    r = merged["ratios"]
    assert r["ttft_c1"] == r["tpot_c1"] == r["tpot_c32"] == r["text_only_c1"] == 0.5
    assert r["throughput_c256"] == 2.0 and r["kv_per_request"] == 0.5
    assert merged["command"] == "cmd pmod ; cmd baseline"
    assert merged["hosts"] == [{"cpu_model": "cpu of pmod"}, {"cpu_model": "cpu of baseline"}]
    assert json.loads((tmp_path / "out" / "e2e_serve.json").read_text())["ratios"] == r


def test_host_info_names_the_cpu_and_times_its_host_work() -> None:
    host = e2e_serve.host_info()
    assert host["cpu_model"] and host["logical_cpus"] >= 1
    assert 0 < host["python_loop_ms"] < 10_000 and 0 < host["pil_bicubic_672_to_336_ms"] < 10_000


def test_kv_metrics_agreement_per_engine() -> None:
    from benchmarks.e2e_serve import BLOCK_SERIES, kv_metrics_agree, kv_metrics_agreement, series_per_engine

    text = "\n".join([
        '# HELP pmod_kv_blocks_in_use KV cache blocks held by running requests, summed over layers.',
        'pmod_kv_blocks_in_use{engine="0",model_name="m"} 100.0',
        'pmod_kv_blocks_in_use{engine="1",model_name="m"} 50.0',
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.1',
        'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.1',
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0',
        'vllm:num_requests_running{engine="1",model_name="m"} 1.0',
    ])
    sample = series_per_engine(text, BLOCK_SERIES)
    assert sample == {"0": {"pmod_kv_blocks_in_use": 100.0, "vllm:kv_cache_usage_perc": 0.1,
                            "vllm:num_requests_running": 3.0},
                      "1": {"pmod_kv_blocks_in_use": 50.0, "vllm:kv_cache_usage_perc": 0.1,
                            "vllm:num_requests_running": 1.0}}
    # cache_config_info's num_gpu_blocks is the sum over the engines: 1001 blocks each.
    report = kv_metrics_agreement([sample], 2002)
    # Engine 0: 100 blocks = 10% of 1000 usable; engine 1 reports half of what its pool holds.
    assert report["0"]["max_abs_diff_fraction_of_pool"] == 0.0
    assert abs(report["1"]["max_abs_diff_fraction_of_pool"] - 0.05) < 1e-12
    assert report["0"]["busy_samples"] == 1
    assert not kv_metrics_agree(report, num_engines=2)
    one_label = {"0": sample["0"]}
    assert kv_metrics_agree(kv_metrics_agreement([one_label], 1001), num_engines=1)
    assert not kv_metrics_agree(kv_metrics_agreement([one_label], 1001), num_engines=2)


def test_server_latency_means_from_vllms_histograms() -> None:
    # Two scrapes of vLLM's /metrics around a run: each histogram's mean over the run's requests.
    def scrape(ttft_sum, ttft_count, prefill_sum, prefill_count):
        return e2e_serve.summed_samples("\n".join([
            '# TYPE vllm:time_to_first_token_seconds histogram',
            f'vllm:time_to_first_token_seconds_bucket{{engine="0",le="0.1",model_name="m"}} {ttft_count}',
            f'vllm:time_to_first_token_seconds_sum{{engine="0",model_name="m"}} {ttft_sum}',
            f'vllm:time_to_first_token_seconds_count{{engine="0",model_name="m"}} {ttft_count}',
            f'vllm:request_prefill_time_seconds_sum{{engine="0",model_name="m"}} {prefill_sum}',
            f'vllm:request_prefill_time_seconds_count{{engine="0",model_name="m"}} {prefill_count}',
        ]))

    before, after = scrape(1.0, 10.0, 0.5, 10.0), scrape(1.6, 14.0, 0.7, 14.0)
    means = e2e_serve.server_latency_means_ms(before, after)
    assert means == pytest.approx({"ttft": 150.0, "prefill": 50.0})  # (1.6 - 1.0) s / 4, (0.7 - 0.5) s / 4
    assert e2e_serve.server_latency_means_ms(after, after) == {}


def test_request_savings_quantiles_from_the_plugins_histogram(tmp_path: Path) -> None:
    # The plugin's own histogram, written by the engine's writer and served by prometheus_client's
    # multiprocess collector (as the API server serves it), scraped before and after a "run".
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    from pmod_serve.v1.metrics.prometheus import KVMetricsWriter

    writer = KVMetricsWriter("m", 0, directory=str(tmp_path))
    writer.initialise()
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))

    def scrape():
        return e2e_serve.summed_samples(generate_latest(registry).decode())

    writer.observe_request(0.9)  # before the run: not one of its requests
    before = scrape()
    run = [0.0, 0.01] + [0.43] * 8  # two text-only requests, eight image requests
    for ratio in run:
        writer.observe_request(ratio)
    summary = e2e_serve.histogram_quantiles(before, scrape(), "pmod_request_kv_savings_ratio")
    # PromQL's interpolation: rank q * 10 inside its bucket, (0, 0.05] holds 2, (0.40, 0.45] holds 8.
    assert summary == pytest.approx({"count": 10, "mean": sum(run) / 10, "p10": 0.025,
                                     "p50": 0.40 + 0.05 * 3 / 8, "p90": 0.40 + 0.05 * 7 / 8})
    # A quantile in the last bucket, (0.95, +Inf], is its finite lower bound, as in PromQL.
    before = scrape()
    writer.observe_request(1.0)
    assert e2e_serve.histogram_quantiles(before, scrape(), "pmod_request_kv_savings_ratio")["p50"] == 0.95
    after = scrape()
    assert e2e_serve.histogram_quantiles(after, after, "pmod_request_kv_savings_ratio") == {}


def test_quality_policy_allows_only_near_tie_flips() -> None:
    from benchmarks.gpu_configs import compare_quality

    def run(tokens, tops):
        return {"prompts": [{"tokens": tokens, "top_logprobs": tops}]}

    base = run([1, 2, 3], [{"1": -0.1, "5": -2.5}, {"2": -0.70, "4": -0.75}, {"3": -0.2}])
    # Same tokens, log-probs within 0.3 nats.
    close = run([1, 2, 3], [{"1": -0.15, "5": -2.2}, {"2": -0.71, "4": -0.74}, {"3": -0.25}])
    result = compare_quality(base, close, tie_margin=0.1, max_logprob_error=0.5)
    assert result["passed"] and result["all_tokens_equal"] and result["greedy_agreement"] == 1.0
    assert abs(result["max_logprob_error_nats"] - 0.3) < 1e-9
    assert not compare_quality(base, close, tie_margin=0.1, max_logprob_error=0.25)["passed"]

    # A flip at position 1 where the base run nearly ties (0.05 nats): allowed; later positions
    # (different contexts) are not compared.
    near_tie = run([1, 4, 9], [{"1": -0.1, "5": -2.5}, {"4": -0.69, "2": -0.72}, {"9": -5.0}])
    result = compare_quality(base, near_tie, tie_margin=0.1, max_logprob_error=0.5)
    assert result["passed"] and abs(result["greedy_agreement"] - 1 / 3) < 1e-9
    assert abs(result["max_regret_nats"] - 0.05) < 1e-9

    # A flip to a token the base run ranks far lower, or outside its top-5: a violation.
    far = run([5, 2, 3], [{"5": -0.1, "1": -2.0}, {"2": -0.7}, {"3": -0.2}])
    assert not compare_quality(base, far, tie_margin=0.5, max_logprob_error=1.0)["passed"]
    outside = run([7, 2, 3], [{"7": -0.1}, {"2": -0.7}, {"3": -0.2}])
    assert compare_quality(base, outside, tie_margin=0.5, max_logprob_error=1.0)["max_regret_nats"] == float("inf")


def test_data_parallel_against_the_one_gpu_run_of_the_same_call(tmp_path: Path, monkeypatch) -> None:
    """gpu_configs' one_gpu section is dp2's reference; `--one-gpu` (an e2e_serve.json) replaces
    it. Both runs go through e2e_serve with one deadline that counts the server's start."""
    from benchmarks import gpu_configs

    calls = []

    def serve_c256(args, name, server_args=""):
        calls.append((name, server_args))
        rate = {"one_gpu": 10.0, "dp2": 16.0}[name]
        return 0, ["e2e_serve", name], {"runs": {"image_c256": {"request_throughput": rate, "completed": 256,
                                                                "failed": 0, "kv_metrics_per_engine": {}}}}

    monkeypatch.setattr(gpu_configs, "serve_c256", serve_c256)
    monkeypatch.setattr(gpu_configs, "prepare_models", lambda models, sections: None)
    monkeypatch.setattr(gpu_configs, "gpu_name", lambda: "test")
    gpu_configs.main(["--out", str(tmp_path / "a"), "--sections", "one_gpu,dp2"])
    assert calls == [("one_gpu", ""), ("dp2", "--data-parallel-size 2")]
    dp2 = json.loads((tmp_path / "a" / "dp2.json").read_text())
    assert dp2["one_gpu_requests_per_s"] == 10.0 and dp2["throughput_ratio_vs_one_gpu"] == pytest.approx(1.6)
    assert dp2["error"] is None

    e2e = tmp_path / "e2e_serve.json"
    e2e.write_text(json.dumps({"pmod": {"runs": {"image_c256": {"request_throughput": 8.0}}}}))
    gpu_configs.main(["--out", str(tmp_path / "b"), "--sections", "dp2", "--one-gpu", str(e2e)])
    assert json.loads((tmp_path / "b" / "dp2.json").read_text())["throughput_ratio_vs_one_gpu"] == pytest.approx(2.0)


def test_a_section_cut_off_by_a_time_limit_resumes_from_its_finished_runs(tmp_path: Path, monkeypatch) -> None:
    """`--resume` reuses the complete benchmarks.bench runs under --out (bench writes `total_s`
    last) and runs only the rest; the section's GPU is the one its runs had."""
    from benchmarks import gpu_configs

    quality = {"prompts": [{"tokens": [1, 2], "top_logprobs": [{"1": -0.1}, {"2": -0.2}]}]}

    def finished(gpu):
        return {"engine": "pmod", "gpu": gpu, "errors": {}, "quality": quality, "total_s": 60.0}

    out = tmp_path / "e"
    out.mkdir()
    for name in ("tiny_pmod_bf16", "tiny_pmod_fp8_kv", "tiny_pmod_fp8_weights"):
        (out / f"{name}.json").write_text(json.dumps({**finished("H200"), "returncode": 0}))
    # Killed before its end: no total_s, so it runs again.
    (out / "tiny_pmod_fp8_weights_w8a16.json").write_text(json.dumps({"engine": "pmod", "gpu": "H200"}))

    ran = []

    def run(cmd, log, timeout_s, env=None):
        path = Path(cmd[cmd.index("--out") + 1])
        ran.append((path.stem, (env or {}).get("VLLM_TEST_FORCE_FP8_MARLIN")))
        path.write_text(json.dumps(finished("H200")))
        return 0

    monkeypatch.setattr(gpu_configs, "_run", run)
    monkeypatch.setattr(gpu_configs, "gpu_name", lambda: "cpu")
    gpu_configs.main(["--out", str(out), "--sections", "tiny_quality", "--resume"])
    assert ran == [("tiny_pmod_fp8_weights_w8a16", "1")]
    section = json.loads((out / "tiny_quality.json").read_text())
    assert section["gpu"] == "H200"
    assert all(section[name]["quality"]["passed"] for name in ("fp8_kv", "fp8_weights", "fp8_weights_w8a16"))

    # Without --resume every run runs again.
    ran.clear()
    gpu_configs.main(["--out", str(out), "--sections", "tiny_quality"])
    assert [name for name, _ in ran] == ["tiny_pmod_bf16", "tiny_pmod_fp8_kv", "tiny_pmod_fp8_weights",
                                         "tiny_pmod_fp8_weights_w8a16"]


def test_gpu_configs_writes_the_model_directories_its_sections_need(tmp_path: Path, monkeypatch) -> None:
    """A device call may find an earlier call's ignored model directories gone: each call writes them."""
    import benchmarks.models
    from benchmarks import gpu_configs

    written = []
    monkeypatch.setattr(benchmarks.models, "prepare", lambda root, tiny=False: written.append(("full", root)))
    monkeypatch.setattr(benchmarks.models, "prepare_tiny_checkpoints", lambda root: written.append(("tiny", root)))
    gpu_configs.prepare_models(tmp_path, ("tiny_quality",))
    assert written == []
    gpu_configs.prepare_models(tmp_path, ("tp2", "tiny_tp"))
    assert written == [("full", tmp_path), ("tiny", tmp_path)]


def test_profiled_runs_are_left_out_of_the_ratios(tmp_path: Path) -> None:
    args = _e2e_args(tmp_path, "--profile-run", "image_c256")
    pmod = e2e_serve.server_command("pmod", args, Path("/m/pmod"), "pmod", 8000)
    config = json.loads(pmod[pmod.index("--profiler-config") + 1])
    assert config["profiler"] == "torch" and config["torch_profiler_dir"].endswith("trace_pmod")
    runs = {"image_c256": {"request_throughput": 4.0, "profiled": True}, "image_c32": {"request_throughput": 4.0}}
    ratios = e2e_serve.ratios({"runs": runs}, {"runs": {"image_c256": {"request_throughput": 2.0},
                                                        "image_c32": {"request_throughput": 2.0}}})
    assert ratios["throughput_c256"] is None and ratios["throughput_c32"] == 2.0


def _kineto_trace(path: Path) -> None:
    """A torch-profiler trace in kineto's chrome format (what vLLM's worker writes): two engine
    steps on one thread; the first launches two kernels and waits for the GPU in `aten::item`,
    the second launches one kernel after a 30 us host gap, its aten::add taking new memory from
    the driver; times in microseconds."""
    host, gpu = {"pid": 1, "tid": 7}, {"pid": 0, "tid": 7}

    def event(cat, name, ts, dur, where=host, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, **where, "args": args}

    events = [
        event("user_annotation", "execute_context_1(2990)_generation_3(3)", 0, 100),
        event("user_annotation", "gpu_model_runner: forward", 5, 90),
        event("cpu_op", "aten::mm", 10, 10),
        event("cuda_runtime", "cudaLaunchKernel", 12, 4, correlation=1),
        event("cpu_op", "aten::mm", 20, 10),
        event("cuda_runtime", "cudaLaunchKernel", 22, 4, correlation=2),
        event("cpu_op", "aten::item", 40, 50),
        event("cuda_runtime", "cudaStreamSynchronize", 45, 40),
        event("kernel", "nvjet_tst_gemm", 20, 30, gpu, correlation=1),
        event("kernel", "cutlass::device_kernel<flash::FlashAttnFwdSm90<...>>", 50, 35, gpu, correlation=2),
        event("user_annotation", "execute_context_0(0)_generation_4(4)", 120, 40),
        event("cpu_op", "aten::add", 125, 5),
        event("cuda_runtime", "cudaMalloc", 125, 1),
        event("cuda_runtime", "cudaLaunchKernel", 126, 3, correlation=3),
        event("kernel", "add", 130, 10, gpu, correlation=3),
    ]
    with gzip.open(path, "wt") as handle:
        json.dump({"traceEvents": events}, handle)


def test_trace_summary_of_a_kineto_trace(tmp_path: Path) -> None:
    from benchmarks.trace_summary import summarize_dir

    _kineto_trace(tmp_path / "rank-0.1.pt.trace.json.gz")
    (summary,) = summarize_dir(tmp_path).values()
    first, second = summary["per_step"]
    assert (first["kind"], first["kernels"], first["device_ms"], first["period_ms"]) == ("prefill", 2, 0.065, 0.12)
    assert (second["kind"], second["kernels"], second["device_ms"]) == ("decode", 1, 0.01)
    # FlashAttention-3's kernel is a CUTLASS kernel too: it counts as attention, not as a GEMM.
    assert first["kernel_ms_by_class"] == pytest.approx({"attention": 0.035, "gemm": 0.03, "other": 0.0})
    assert summary["decode_steps"]["median_other_kernel_ms"] == pytest.approx(0.01)
    # The window: 0 us (first step) to 160 us (the second step's end); kernels busy 65 + 10 us.
    assert summary["window_ms"] == pytest.approx(0.16) and summary["gpu_busy_ms"] == pytest.approx(0.075)
    # Idle 0-20 us (host in aten::mm), 85-130 us (between steps, then aten::add), 140-160 us.
    assert summary["gpu_idle_ms_by_host_operator"]["gpu_model_runner: forward > aten::mm"] == pytest.approx(0.02)
    idle = sum(summary["gpu_idle_ms_by_host_operator"].values())
    assert idle == pytest.approx(summary["window_ms"] - summary["gpu_busy_ms"])
    assert summary["host_waits_for_gpu"] == {
        "cudaStreamSynchronize in gpu_model_runner: forward > aten::item": {"count": 1, "total_ms": 0.04}}
    assert summary["runner_phases_ms"] == {"gpu_model_runner: forward": 0.09}
    assert summary["allocator_calls"] == {"cudaMalloc in aten::add": {"count": 1, "total_ms": 0.001}}
    # Per step and per kind of step: the prefill step's forward phase, none in the decode step.
    assert first["host_phases_ms"] == {"gpu_model_runner: forward": 0.09} and second["host_phases_ms"] == {}
    assert summary["prefill_steps"]["median_host_phase_ms"] == {"gpu_model_runner: forward": 0.09}
    assert summary["decode_steps"]["median_host_phase_ms"] == {}
    # What the steps are made of: operators (inclusive host time) and kernels, by name.
    assert summary["host_operators_ms"] == {"aten::item": 0.05, "aten::mm": 0.02, "aten::add": 0.005}
    assert summary["kernels_by_name"] == {"nvjet_tst_gemm": 1, "cutlass::device_kernel<flash::FlashAttnFwdSm90<...>>": 1,
                                          "add": 1}


def test_engine_step_counts_from_vllms_iteration_histogram() -> None:
    # vLLM observes vllm:iteration_tokens_total once per engine step: its _count is the steps.
    def scrape(steps, tokens, prompt, generated, preemptions, at_most=(0, 0, 0)):
        small, one_image, _ = at_most
        return e2e_serve.summed_samples("\n".join([
            f'vllm:iteration_tokens_total_bucket{{engine="0",le="512.0",model_name="m"}} {small}',
            f'vllm:iteration_tokens_total_bucket{{engine="0",le="2048.0",model_name="m"}} {small}',
            f'vllm:iteration_tokens_total_bucket{{engine="0",le="4096.0",model_name="m"}} {one_image}',
            f'vllm:iteration_tokens_total_bucket{{engine="0",le="8192.0",model_name="m"}} {steps}',
            'vllm:request_prefill_time_seconds_bucket{engine="0",le="1.0",model_name="m"} 7',
            f'vllm:iteration_tokens_total_count{{engine="0",model_name="m"}} {steps}',
            f'vllm:iteration_tokens_total_sum{{engine="0",model_name="m"}} {tokens}',
            f'vllm:prompt_tokens_total{{engine="0",model_name="m"}} {prompt}',
            f'vllm:generation_tokens_total{{engine="0",model_name="m"}} {generated}',
            f'vllm:num_preemptions_total{{engine="0",model_name="m"}} {preemptions}',
        ]))

    before = scrape(10, 5000, 4000, 1000, 1, (8, 10, 10))
    # 100 steps: 88 decoding (<= 512 tokens), 8 with one image (2049-4096), 4 with two (4097-8192).
    after = scrape(110, 5000 + 3000 * 10 + 128 * 100, 4000 + 30000, 1000 + 12800, 4, (96, 106, 110))
    assert 'vllm:request_prefill_time_seconds_bucket{le="1.0"}' not in after  # only the step histogram
    counts = e2e_serve.engine_step_counts(before, after, 8.5)
    assert counts["steps_by_tokens"] == {"1-512": 88, "513-2048": 0, "2049-4096": 8, "4097-8192": 4, ">8192": 0}
    line = e2e_serve._step_summary(counts)  # the run's log line
    assert "engine_steps 100.0" in line and "steps_by_tokens 1-512: 88 513-2048: 0 2049-4096: 8" in line
    assert counts["engine_steps"] == 100 and counts["preemptions"] == 3
    assert counts["prompt_tokens_per_step"] == 300 and counts["generation_tokens_per_step"] == 128
    assert counts["tokens_per_step"] == 428 and counts["wall_ms_per_step"] == pytest.approx(85.0)
    assert e2e_serve.engine_step_counts(after, after, 8.5) == {"preemptions": 0.0, "engine_steps": 0.0}


def test_allocator_reports_from_a_server_log(monkeypatch) -> None:
    from pmod_serve.v1.worker.gpu_worker import AllocatorWatch

    # The lines AllocatorWatch really logs (two reports), among other log lines.
    readings = iter([{"num_alloc_retries": 0, "num_device_alloc": 1, "num_device_free": 0},
                     {"num_alloc_retries": 0, "num_device_alloc": 4, "num_device_free": 0},
                     {"num_alloc_retries": 2, "num_device_alloc": 8, "num_device_free": 7}])
    clock = iter([10.0, 20.0, 30.0])
    monkeypatch.setattr("pmod_serve.v1.worker.gpu_worker.time.monotonic", lambda: next(clock))
    with plugin_log_messages() as messages:
        watch = AllocatorWatch(lambda: next(readings))
        for _ in range(3):
            watch.poll()
    reports = [f"(EngineCore pid=1) INFO [gpu_worker.py:50] {message}" for message in messages]
    log = "\n".join(["INFO starting", reports[0], "INFO Avg prompt throughput", reports[1]])
    assert e2e_serve.allocator_reports(log) == {"reports": 2, "alloc_retries": 2, "cuda_malloc": 7, "cuda_free": 7}
    assert e2e_serve.allocator_reports("no reports") == {"reports": 0, "alloc_retries": 0, "cuda_malloc": 0,
                                                         "cuda_free": 0}
