"""Two sides (e.g. p-MoD vs a plain vLLM LLaVA-NeXT baseline), each one or more reports, side by side.

Writes `compare.md` (a markdown table per concurrency level) and, when matplotlib is installed,
`latency_vs_concurrency.png`, `throughput_vs_concurrency.png` and `kv_savings_over_time.png`.
Without matplotlib the plots are skipped with a message; the markdown is still written.
Needs neither vLLM nor the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loadtests.report import runs_of, validate_report

MATPLOTLIB_PIN = "matplotlib==3.11.2"
# Workload settings that must match for a fair comparison.
WORKLOAD_KEYS = (
    "dataset",
    "requests",
    "seed",
    "input_len",
    "output_len",
    "range_ratio",
    "ignore_eos",
    "images_per_request",
    "image_sizes",
    "image_dir",
    "image_format",
    "stream",
    "request_rate",
    "burstiness",
)


def load_side(paths: list[str | Path]) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
    """The reports of one side and their runs by concurrency (a later file wins a tie)."""
    reports, runs = [], {}
    for path in paths:
        report = json.loads(Path(path).read_text())
        problems = validate_report(report)
        if problems:
            raise ValueError(f"{path} is not a loadtests report: " + "; ".join(problems[:5]))
        reports.append(report)
        for run in runs_of(report):
            runs[concurrency_of(run)] = run
    return reports, dict(sorted(runs.items()))


def concurrency_of(run: dict[str, Any]) -> int:
    """The run's concurrency limit; for an unlimited run, the most requests it had in flight."""
    return int(run["concurrency"] or run["requests"].get("max_in_flight") or 0)


def _num(value: Any, digits: int) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def _delta(a: Any, b: Any) -> str:
    if a is None or b is None or b == 0:
        return ""
    return f"{(a - b) / abs(b) * 100:+.1f}%"


def _get(run: dict[str, Any] | None, path: str) -> Any:
    value: Any = run
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _server_mean(run: dict[str, Any] | None, histogram: str, scale: float = 1000.0) -> float | None:
    entry = _get(run, "server_metrics.histograms")
    entry = entry.get(histogram) if isinstance(entry, dict) else None
    mean = entry.get("mean") if entry else None
    return None if mean is None else mean * scale


# (row label, how to read it, decimals)
ROWS: list[tuple[str, Any, int]] = [
    *[(f"TTFT {p} (ms)", f"ttft_ms.{p}", 1) for p in ("p50", "p90", "p99")],
    *[(f"TPOT {p} (ms)", f"tpot_ms.{p}", 2) for p in ("p50", "p90", "p99")],
    *[(f"E2E latency {p} (ms)", f"e2e_ms.{p}", 1) for p in ("p50", "p90", "p99")],
    ("Throughput (req/s)", "throughput_rps", 3),
    ("Output tokens/s", "output_tokens_per_s", 1),
    ("Mean prompt tokens (server)", "tokens.input_mean", 1),
    ("Mean output tokens", "tokens.output_mean", 1),
    ("Completed requests", "requests.completed", 0),
    ("Errors", "errors.count", 0),
    ("Cancelled at time limit", "requests.cancelled", 0),
    ("KV savings ratio (mean, sampled)", "kv_savings_ratio", 3),
    ("Per-request KV savings (mean)", "kv_savings.request_mean", 3),
    ("vLLM KV cache usage (mean, sampled)", "server_metrics.sampled.kv_cache_usage.mean", 3),
    ("Requests waiting (mean, sampled)", "server_metrics.sampled.num_requests_waiting.mean", 2),
    (
        "Server TTFT mean (ms, vLLM histogram)",
        lambda r: _server_mean(r, "vllm:time_to_first_token_seconds"),
        1,
    ),
    (
        "Server queue time mean (ms, vLLM histogram)",
        lambda r: _server_mean(r, "vllm:request_queue_time_seconds"),
        1,
    ),
    ("Preemptions", "server_metrics.counters.vllm:num_preemptions_total", 0),
]


def _value(run: dict[str, Any] | None, how: Any) -> Any:
    return how(run) if callable(how) else _get(run, how)


def markdown(labels: tuple[str, str], sides: tuple[tuple[list, dict], tuple[list, dict]]) -> str:
    (reports_a, runs_a), (reports_b, runs_b) = sides
    a, b = labels
    lines = [f"# Load test: {a} vs {b}", ""]
    for label, reports in ((a, reports_a), (b, reports_b)):
        first = reports[0]
        lines.append(
            f"- **{label}**: model `{first['target']['model']}` at `{first['target']['base_url']}`, "
            f"{len(reports)} report(s), created {first.get('created', '?')}"
        )
    cfg_a = reports_a[0].get("config", {})
    others = [r.get("config", {}) for r in [*reports_a[1:], *reports_b]]
    differing = [k for k in WORKLOAD_KEYS if any(cfg.get(k) != cfg_a.get(k) for cfg in others)]
    lines.append(
        f"- Workload: {cfg_a.get('dataset')}, {cfg_a.get('requests')} requests, seed {cfg_a.get('seed')}, "
        f"input ~{cfg_a.get('input_len')} text tokens, output {cfg_a.get('output_len')} tokens, "
        f"images/request {cfg_a.get('images_per_request')}, "
        f"sizes {cfg_a.get('image_sizes') or cfg_a.get('image_dir')}, "
        f"stream {cfg_a.get('stream')}"
    )
    if differing:
        lines.append(
            f"- **Warning: the workloads differ in {', '.join(differing)}**; "
            "the comparison is not like for like."
        )
    lines.append("")
    lines.append(f"The last column is {a} relative to {b} (negative latency = {a} faster).")
    for level in sorted(set(runs_a) | set(runs_b)):
        run_a, run_b = runs_a.get(level), runs_b.get(level)
        lines += [
            "",
            f"## Concurrency {level}",
            "",
            f"| Metric | {a} | {b} | {a} vs {b} |",
            "|---|---:|---:|---:|",
        ]
        for name, how, digits in ROWS:
            va, vb = _value(run_a, how), _value(run_b, how)
            if va is None and vb is None:
                continue
            lines.append(f"| {name} | {_num(va, digits)} | {_num(vb, digits)} | {_delta(va, vb)} |")
        for label, run in ((a, run_a), (b, run_b)):
            if run and run["errors"]["count"]:
                lines.append(f"\n{label} errors by status: {run['errors']['by_status']}")
    return "\n".join(lines) + "\n"


def plots(
    labels: tuple[str, str], sides: tuple[tuple[list, dict], tuple[list, dict]], out_dir: Path
) -> list[Path]:
    """The PNG plots; raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = ("tab:blue", "tab:orange")
    styles = {"p50": "-", "p90": "--", "p99": ":"}
    written = []

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, key, title in zip(
        axes, ("ttft_ms", "tpot_ms", "e2e_ms"), ("TTFT", "TPOT", "End-to-end latency"), strict=True
    ):
        for (label, (_, runs)), colour in zip(zip(labels, sides, strict=True), colours, strict=True):
            xs = list(runs)
            for pct, style in styles.items():
                ys = [runs[x][key][pct] for x in xs]
                if all(y is None for y in ys):
                    continue
                ax.plot(
                    xs,
                    [float("nan") if y is None else y for y in ys],
                    style,
                    marker="o",
                    color=colour,
                    label=f"{label} {pct}",
                )
        ax.set_title(f"{title} percentiles vs concurrency")
        ax.set_xlabel("concurrency")
        ax.set_ylabel("ms")
        _log_x_if_wide(ax, sides)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, out_dir / "latency_vs_concurrency.png"))
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, title in zip(
        axes, ("throughput_rps", "output_tokens_per_s"), ("Requests/s", "Output tokens/s"), strict=True
    ):
        for (label, (_, runs)), colour in zip(zip(labels, sides, strict=True), colours, strict=True):
            ax.plot(list(runs), [r[key] for r in runs.values()], marker="o", color=colour, label=label)
        ax.set_title(f"{title} vs concurrency")
        ax.set_xlabel("concurrency")
        _log_x_if_wide(ax, sides)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out_dir / "throughput_vs_concurrency.png"))
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for (label, (_, runs)), colour in zip(zip(labels, sides, strict=True), colours, strict=True):
        levels = list(runs)
        for i, level in enumerate(levels):
            points = runs[level].get("timeseries") or []
            alpha = 0.35 + 0.65 * (i + 1) / len(levels)
            # Idle samples (empty cache: the gauge reads 0) are gaps, not "no savings".
            savings = [
                (p["t"], float("nan") if p.get("busy") is False else p["kv_savings_ratio"])
                for p in points
                if p.get("kv_savings_ratio") is not None
            ]
            if savings:
                axes[0].plot(
                    *zip(*savings, strict=True), color=colour, alpha=alpha, label=f"{label} c={level}"
                )
            usage = [(p["t"], p["kv_cache_usage"]) for p in points if p.get("kv_cache_usage") is not None]
            if usage:
                axes[1].plot(*zip(*usage, strict=True), color=colour, alpha=alpha, label=f"{label} c={level}")
        if not any(
            p.get("kv_savings_ratio") is not None for r in runs.values() for p in r.get("timeseries") or []
        ):
            axes[0].plot([], [], color=colour, label=f"{label}: no p-MoD metrics")
    axes[0].set_title("p-MoD KV savings ratio over time (pmod_kv_cache_savings_ratio; gaps: idle)")
    axes[1].set_title("vLLM KV cache usage over time (vllm:kv_cache_usage_perc)")
    for ax in axes:
        ax.set_xlabel("seconds since the run started")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, out_dir / "kv_savings_over_time.png"))
    plt.close(fig)
    return written


def _log_x_if_wide(ax: Any, sides: tuple) -> None:
    levels = [x for _, runs in sides for x in runs if x > 0]
    if levels and max(levels) / min(levels) >= 8:
        ax.set_xscale("log", base=2)


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def compare(
    paths_a: list[str | Path],
    paths_b: list[str | Path],
    out_dir: str | Path,
    labels: tuple[str, str] | None = None,
    make_plots: bool = True,
) -> dict[str, Any]:
    """Write the comparison; returns {"markdown": path, "plots": [paths], "plots_skipped": reason|None}."""
    side_a, side_b = load_side(paths_a), load_side(paths_b)
    if labels is None:
        labels = (side_a[0][0].get("label") or "A", side_b[0][0].get("label") or "B")
        if labels[0] == labels[1]:
            labels = (f"{labels[0]} (A)", f"{labels[1]} (B)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path = out / "compare.md"
    md_path.write_text(markdown(labels, (side_a, side_b)))
    result: dict[str, Any] = {"markdown": md_path, "plots": [], "plots_skipped": None}
    if not make_plots:
        result["plots_skipped"] = "--no-plots"
        return result
    try:
        result["plots"] = plots(labels, (side_a, side_b), out)
    except ImportError:
        result["plots_skipped"] = (
            f"matplotlib is not installed: PNG plots skipped (install {MATPLOTLIB_PIN}); "
            f"the markdown table was written to {md_path}"
        )
    return result
