"""`python -m loadtests [run] ...` and `python -m loadtests compare ...`."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

EPILOG = """\
examples:
  python -m loadtests --base-url http://127.0.0.1:8000 --model pmod --requests 200 \\
      --concurrency 1,8,32 --output-len 128 --ignore-eos --json pmod.json
  python -m loadtests --base-url http://127.0.0.1:8001 --model llava-next --requests 200 \\
      --concurrency 1,8,32 --output-len 128 --ignore-eos --json baseline.json
  python -m loadtests compare pmod.json baseline.json --out-dir compare/

Every run is bounded: each phase stops after its requests or after --time-limit seconds,
whichever comes first (requests still in flight are then cancelled). Only --base-url is ever
contacted: POST /v1/chat/completions, GET /v1/models and GET /metrics; redirects are refused
and proxy variables ignored. OPENAI_API_KEY, if set, is sent as a bearer token.
"""


def _concurrency_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --concurrency {text!r}: expected N or N1,N2,...") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("--concurrency values must be >= 0 (0: no limit)")
    return values


def _rate(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("--request-rate must be positive or inf")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def run_parser() -> argparse.ArgumentParser:
    from loadtests import DEFAULT_IMAGE_SIZES

    p = argparse.ArgumentParser(
        prog="python -m loadtests",
        description="Image-chat load test of an OpenAI-compatible endpoint (p-MoD or any vLLM server); "
        "writes a JSON report. `python -m loadtests compare -h` for side-by-side reports.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("target")
    g.add_argument(
        "--base-url",
        required=True,
        help="server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is dropped)",
    )
    g.add_argument("--model", help="served model name (default: the first one GET /v1/models lists)")
    g.add_argument("--label", help="name of this side in reports and comparisons (default: the model)")
    g = p.add_argument_group("load")
    g.add_argument("--requests", type=int, default=100, help="requests per measured run (default 100)")
    g.add_argument(
        "--concurrency",
        type=_concurrency_list,
        default=[8],
        help="max requests in flight; a comma list runs one measured run per level "
        "(a sweep), e.g. 1,4,16; 0 = no limit (default 8)",
    )
    g.add_argument(
        "--request-rate",
        type=_rate,
        default=float("inf"),
        help="mean arrival rate in requests/s; inf sends as fast as concurrency allows (default)",
    )
    g.add_argument(
        "--burstiness",
        type=_positive_float,
        default=1.0,
        help="gamma shape of inter-arrival times with --request-rate: 1 = Poisson (default)",
    )
    g.add_argument(
        "--warmup", type=int, default=1, help="unmeasured warm-up requests before measuring (default 1)"
    )
    g.add_argument(
        "--seed", type=int, default=0, help="seed of prompts, images, lengths and arrivals (default 0)"
    )
    g.add_argument(
        "--time-limit",
        type=_positive_float,
        default=600.0,
        help="seconds; each phase (warm-up, every measured run) stops at this bound (default 600)",
    )
    g.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=None,
        help="seconds per request (default: --time-limit)",
    )
    g.add_argument(
        "--ready-timeout",
        type=_positive_float,
        default=60.0,
        help="seconds to wait for GET /v1/models to answer (default 60)",
    )
    g = p.add_argument_group("requests")
    g.add_argument(
        "--dataset",
        choices=("image-chat", "random-mm"),
        default="image-chat",
        help="image-chat: chat questions about images (default); random-mm: vLLM's "
        "RandomMultiModalDataset (random tokens and pixels; needs --tokenizer)",
    )
    g.add_argument(
        "--input-len", type=int, default=64, help="text tokens per prompt, approximately (default 64)"
    )
    g.add_argument("--output-len", type=int, default=128, help="max_completion_tokens (default 128)")
    g.add_argument(
        "--range-ratio",
        type=float,
        default=0.0,
        help="lengths are uniform in [len*(1-r), len*(1+r)] (default 0)",
    )
    g.add_argument(
        "--ignore-eos",
        action="store_true",
        help="ask the server for exactly --output-len tokens (vLLM extension; fair p-MoD vs baseline)",
    )
    g.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stream responses (default); --no-stream measures end-to-end latency only",
    )
    g.add_argument("--system-prompt", help="a system message for every request")
    g.add_argument("--extra-body", type=json.loads, help="JSON object merged into every request body")
    g.add_argument("--tokenizer", help="HF name or path; only for --dataset random-mm")
    g = p.add_argument_group("images")
    g.add_argument("--images-per-request", default="1", help="N or MIN-MAX (default 1)")
    g.add_argument(
        "--image-sizes",
        default=DEFAULT_IMAGE_SIZES,
        help=f"generated size mix WxH[:weight],... (default {DEFAULT_IMAGE_SIZES})",
    )
    g.add_argument("--image-dir", help="sample images from this folder instead of generating them")
    g.add_argument(
        "--image-format",
        choices=("jpeg", "png"),
        default="jpeg",
        help="encoding of generated images, sent as base64 data: URLs (default jpeg)",
    )
    g.add_argument(
        "--image-reuse",
        choices=("perturb", "exact"),
        default="perturb",
        help="folder images: paste a 16x16 noise patch per request so the server's caches see "
        "distinct images (default), or send the files as they are",
    )
    g = p.add_argument_group("output")
    g.add_argument("--json", dest="json_out", help="write the JSON report here")
    g.add_argument("--per-request", action="store_true", help="include one row per request in the report")
    g.add_argument(
        "--metrics",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sample the server's /metrics during runs (default on)",
    )
    g.add_argument(
        "--metrics-interval",
        type=_positive_float,
        default=1.0,
        help="seconds between /metrics samples (default 1)",
    )
    g.add_argument(
        "--goodput",
        nargs="+",
        metavar="KEY:MS",
        help="SLOs for goodput, as in vllm bench serve: ttft:MS tpot:MS e2el:MS",
    )
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    g.add_argument("--fail-on-errors", action="store_true", help="exit 1 if any request failed")
    return p


def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtests compare",
        description="Put two sides (e.g. p-MoD vs baseline) side by side: compare.md and PNG plots "
        "(latency percentiles vs concurrency, throughput, KV savings over time). A side "
        "is one report (possibly a --concurrency sweep) or several.",
    )
    p.add_argument("reports", nargs="*", help="two reports: A B (or use --a / --b)")
    p.add_argument("--a", nargs="+", default=[], help="side A reports (e.g. one per concurrency)")
    p.add_argument("--b", nargs="+", default=[], help="side B reports")
    p.add_argument("--labels", nargs=2, metavar=("A", "B"), help="side names (default: the reports' labels)")
    p.add_argument(
        "--out-dir", default="loadtest-compare", help="where to write (default ./loadtest-compare)"
    )
    p.add_argument("--no-plots", action="store_true", help="markdown only")
    return p


def main_run(argv: list[str]) -> int:
    args = run_parser().parse_args(argv)
    from loadtests.report import summary_text, validate_report
    from loadtests.runner import RunOptions, run
    from loadtests.workload import WorkloadSpec, parse_count_range

    try:
        goodput = None
        if args.goodput:
            from vllm.benchmarks.serve import check_goodput_args

            goodput = check_goodput_args(args)
        options = RunOptions(
            base_url=args.base_url,
            model=args.model,
            label=args.label,
            workload=WorkloadSpec(
                dataset=args.dataset,
                num_requests=args.requests,
                seed=args.seed,
                input_len=args.input_len,
                output_len=args.output_len,
                range_ratio=args.range_ratio,
                images_per_request=parse_count_range(args.images_per_request),
                image_sizes=args.image_sizes,
                image_dir=args.image_dir,
                image_format=args.image_format,
                image_reuse=args.image_reuse,
                system_prompt=args.system_prompt,
                tokenizer=args.tokenizer,
            ),
            concurrency=args.concurrency,
            request_rate=args.request_rate,
            burstiness=args.burstiness,
            stream=args.stream,
            ignore_eos=args.ignore_eos,
            extra_body=args.extra_body,
            warmup=args.warmup,
            time_limit_s=args.time_limit,
            request_timeout_s=args.request_timeout,
            ready_timeout_s=args.ready_timeout,
            metrics=args.metrics,
            metrics_interval_s=args.metrics_interval,
            goodput=goodput,
            per_request=args.per_request,
            progress=sys.stderr.isatty() if args.progress is None else args.progress,
        )
        if args.extra_body is not None and not isinstance(args.extra_body, dict):
            raise ValueError("--extra-body must be a JSON object")
        if args.input_len < 0 or args.output_len < 1:
            raise ValueError("--input-len must be >= 0 and --output-len >= 1")
        report = run(options)
    except (ValueError, RuntimeError, TimeoutError, OSError, argparse.ArgumentTypeError) as exc:
        print(f"loadtests: error: {exc}", file=sys.stderr)
        return 2
    problems = validate_report(report)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    print(summary_text(report))
    if args.json_out:
        print(f"report: {args.json_out}")
    else:
        print("(no --json given: the report was not saved)")
    if problems:
        print("loadtests: report problems: " + "; ".join(problems), file=sys.stderr)
        return 3
    if args.fail_on_errors and any(r["errors"]["count"] for r in report.get("sweep") or [report]):
        return 1
    return 0


def main_compare(argv: list[str]) -> int:
    parser = compare_parser()
    args = parser.parse_args(argv)
    from loadtests.compare import compare

    side_a, side_b = list(args.a), list(args.b)
    if args.reports:
        if len(args.reports) != 2 or side_a or side_b:
            parser.error("give exactly two reports (A B), or --a ... --b ...")
        side_a, side_b = [args.reports[0]], [args.reports[1]]
    if not side_a or not side_b:
        parser.error("two sides are needed: A B, or --a ... --b ...")
    try:
        result = compare(
            side_a,
            side_b,
            args.out_dir,
            labels=tuple(args.labels) if args.labels else None,
            make_plots=not args.no_plots,
        )
    except (ValueError, OSError) as exc:
        print(f"loadtests compare: error: {exc}", file=sys.stderr)
        return 2
    print(Path(result["markdown"]).read_text())
    print(f"markdown: {result['markdown']}")
    for path in result["plots"]:
        print(f"plot: {path}")
    if result["plots_skipped"]:
        print(f"loadtests compare: {result['plots_skipped']}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return main_compare(argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    return main_run(argv)
