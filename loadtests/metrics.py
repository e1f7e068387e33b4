"""The server's Prometheus `/metrics`: scrape, parse, sample over time, and compute deltas.

Nothing here imports vLLM. The p-MoD series (see deploy/metric_names.txt) are

- gauges `pmod_kv_blocks_in_use`, `pmod_kv_blocks_dense_equivalent`, `pmod_kv_cache_savings_ratio`
  (one series per engine, labels `model_name` and `engine`; the ratio is 0 when idle),
- counters `pmod_kv_slots_saved_total`, `pmod_visual_tokens_total`,
- histogram `pmod_request_kv_savings_ratio` (one observation per finished request).

A plain vLLM server (the baseline) has none of them: everything p-MoD specific is then `None`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

SAVINGS_RATIO = "pmod_kv_cache_savings_ratio"
BLOCKS_IN_USE = "pmod_kv_blocks_in_use"
BLOCKS_DENSE = "pmod_kv_blocks_dense_equivalent"
REQUEST_SAVINGS = "pmod_request_kv_savings_ratio"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"

# Families whose deltas / values go into the report. Everything else (python_*, process_*,
# http_* from the API framework) is left out to keep reports small and comparable.
REPORTED_PREFIXES = ("vllm:", "pmod_")
# Labels that only say which engine / model a series belongs to: summed over in the report.
AGGREGATED_LABELS = frozenset({"model_name", "engine"})


@dataclass
class Snapshot:
    """One parsed scrape: sample name -> list of (labels, value), plus each family's type."""

    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)  # family name -> counter/gauge/histogram/...

    def values(self, name: str) -> list[tuple[dict[str, str], float]]:
        return self.samples.get(name, [])

    def has(self, name: str) -> bool:
        return name in self.samples

    def total(self, name: str) -> float | None:
        values = self.values(name)
        return sum(v for _, v in values) if values else None


def parse_metrics(text: str) -> Snapshot:
    """Parse a Prometheus text exposition with `prometheus_client.parser`."""
    snapshot = Snapshot()
    for family in text_string_to_metric_families(text):
        snapshot.types[family.name] = family.type
        for sample in family.samples:
            snapshot.samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return snapshot


def series_key(name: str, labels: dict[str, str]) -> str:
    """`name{a="x",b="y"}` without the per-engine labels; the key used for aggregation."""
    kept = sorted((k, v) for k, v in labels.items() if k not in AGGREGATED_LABELS)
    if not kept:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in kept) + "}"


def _aggregate(snapshot: Snapshot, name: str, drop: tuple[str, ...] = ()) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, value in snapshot.values(name):
        if any(label in labels for label in drop):
            continue
        key = series_key(name, labels)
        out[key] = out.get(key, 0.0) + value
    return out


def kv_savings_point(snapshot: Snapshot) -> dict[str, Any]:
    """The p-MoD KV state in one scrape.

    `kv_savings_ratio` is the value of the `pmod_kv_cache_savings_ratio` gauge; with several
    engines it is their average weighted by `pmod_kv_blocks_dense_equivalent` (which equals
    1 - sum(in_use) / sum(dense)). `busy` says whether the cache held anything (dense > 0), or,
    without the dense gauge, whether vLLM reported running requests.
    """
    ratios = snapshot.values(SAVINGS_RATIO)
    running = snapshot.total(RUNNING)
    point: dict[str, Any] = {
        "kv_savings_ratio": None,
        "kv_blocks_in_use": snapshot.total(BLOCKS_IN_USE),
        "kv_blocks_dense_equivalent": snapshot.total(BLOCKS_DENSE),
        "num_requests_running": running,
        "num_requests_waiting": snapshot.total(WAITING),
        "kv_cache_usage": _mean([v for _, v in snapshot.values(KV_USAGE)]),
        "busy": None,
    }
    if not ratios:
        point["busy"] = running > 0 if running is not None else None
        return point
    dense_by_labels = {tuple(sorted(labels.items())): v for labels, v in snapshot.values(BLOCKS_DENSE)}
    weights = [dense_by_labels.get(tuple(sorted(labels.items()))) for labels, _ in ratios]
    if all(w is not None for w in weights):
        total = sum(weights)  # type: ignore[arg-type]
        if total > 0:
            point["kv_savings_ratio"] = sum(r * w for (_, r), w in zip(ratios, weights, strict=True)) / total
            point["busy"] = True
        else:
            point["kv_savings_ratio"] = _mean([r for _, r in ratios])
            point["busy"] = False
    else:
        point["kv_savings_ratio"] = _mean([r for _, r in ratios])
        point["busy"] = running > 0 if running is not None else None
    return point


def summarize_kv_savings(
    points: list[dict[str, Any]], before: Snapshot | None, after: Snapshot | None
) -> dict[str, Any]:
    """`kv_savings_ratio` of the report and its details, from the sampled points of one run.

    The headline value (`mean`) is the mean of the gauge over the samples taken while the cache
    held requests: the gauge reads 0 when idle, which says nothing about savings. It is `None`
    when the server has no p-MoD metrics (a baseline), and also when no sample caught the cache
    in use (a run shorter than the sampling interval): `note` then says so, and `request_mean`
    (from the `pmod_request_kv_savings_ratio` histogram, which does not depend on sampling)
    still has the per-request savings.
    """
    values = [p["kv_savings_ratio"] for p in points if p.get("kv_savings_ratio") is not None]
    busy = [
        p["kv_savings_ratio"]
        for p in points
        if p.get("kv_savings_ratio") is not None and p.get("busy") is not False
    ]
    request_mean = None
    request_count = 0
    if before is not None and after is not None:
        hist = histogram_deltas(before, after, names=(REQUEST_SAVINGS,))
        entry = hist.get(REQUEST_SAVINGS)
        if entry:
            request_mean, request_count = entry["mean"], int(entry["count"])
    available = bool(values) or (after is not None and after.has(SAVINGS_RATIO))
    note = None
    if not available:
        note = f"the server exposes no {SAVINGS_RATIO} (not a p-MoD server?)"
    elif not busy:
        note = "no /metrics sample caught the KV cache in use: lower --metrics-interval"
    return {
        "available": available,
        "source": SAVINGS_RATIO,
        "mean": _mean(busy) if available and busy else None,
        "note": note,
        "samples": len(values),
        "busy_samples": len(busy),
        "mean_all_samples": _mean(values),
        "max": max(values) if values else None,
        "request_mean": request_mean,
        "requests_observed": request_count,
    }


def counter_deltas(
    before: Snapshot, after: Snapshot, prefixes: tuple[str, ...] = REPORTED_PREFIXES
) -> dict[str, float]:
    """after - before of every counter (`*_total` samples), summed over engines."""
    out: dict[str, float] = {}
    for family, kind in after.types.items():
        if kind != "counter" or not family.startswith(prefixes):
            continue
        name = family + "_total"
        a, b = _aggregate(after, name), _aggregate(before, name)
        for key, value in a.items():
            delta = value - b.get(key, 0.0)
            # A counter that went down was reset (server restart): its whole value is new.
            out[key] = value if delta < 0 else delta
    return dict(sorted(out.items()))


def histogram_deltas(
    before: Snapshot,
    after: Snapshot,
    prefixes: tuple[str, ...] = REPORTED_PREFIXES,
    names: tuple[str, ...] | None = None,
) -> dict[str, dict[str, float | None]]:
    """count / sum / mean of what every histogram observed between the two scrapes."""
    out: dict[str, dict[str, float | None]] = {}
    families = (
        names
        if names is not None
        else tuple(f for f, kind in after.types.items() if kind == "histogram" and f.startswith(prefixes))
    )
    for family in families:
        sums_a, sums_b = _by_labels(after, family + "_sum"), _by_labels(before, family + "_sum")
        if after.has(family + "_count"):
            counts_a, counts_b = _by_labels(after, family + "_count"), _by_labels(before, family + "_count")
        else:  # the +Inf bucket is the count
            counts_a, counts_b = _inf_bucket_counts(after, family), _inf_bucket_counts(before, family)
        for labels, count_after in counts_a.items():
            count = count_after - counts_b.get(labels, 0.0)
            total = sums_a.get(labels, 0.0) - sums_b.get(labels, 0.0)
            if count < 0:  # reset
                count, total = count_after, sums_a.get(labels, 0.0)
            out[family + labels] = {
                "count": count,
                "sum": total,
                "mean": total / count if count > 0 else None,
            }
    return dict(sorted(out.items()))


def _by_labels(snapshot: Snapshot, name: str) -> dict[str, float]:
    """Values of one sample name keyed by their label suffix (`""` or `{a="x"}`), engines summed."""
    return {key[len(name) :]: value for key, value in _aggregate(snapshot, name).items()}


def _inf_bucket_counts(snapshot: Snapshot, family: str) -> dict[str, float]:
    out: dict[str, float] = {}
    name = family + "_bucket"
    for labels, value in snapshot.values(name):
        if labels.get("le") not in ("+Inf", "inf"):
            continue
        key = series_key(name, {k: v for k, v in labels.items() if k != "le"})[len(name) :]
        out[key] = out.get(key, 0.0) + value
    return out


def gauge_values(snapshot: Snapshot, prefixes: tuple[str, ...] = REPORTED_PREFIXES) -> dict[str, float]:
    out: dict[str, float] = {}
    for family, kind in snapshot.types.items():
        if kind == "gauge" and family.startswith(prefixes) and not family.endswith("_created"):
            out.update(_aggregate(snapshot, family))
    return dict(sorted(out.items()))


def server_metrics_section(
    url: str,
    before: Snapshot | None,
    after: Snapshot | None,
    scrapes: int,
    scrape_errors: list[str],
    points: list[dict[str, Any]],
) -> dict[str, Any]:
    """The report's `server_metrics`: deltas of counters and histograms over the measured run."""
    section: dict[str, Any] = {
        "url": url,
        "available": before is not None and after is not None,
        "scrapes": scrapes,
        "scrape_errors": len(scrape_errors),
        "scrape_error_examples": scrape_errors[:3],
        "counters": {},
        "histograms": {},
        "gauges_before": {},
        "gauges_after": {},
        "sampled": {},
    }
    if before is None or after is None:
        return section
    section["counters"] = counter_deltas(before, after)
    section["histograms"] = histogram_deltas(before, after)
    section["gauges_before"] = gauge_values(before)
    section["gauges_after"] = gauge_values(after)
    for key in (
        "kv_blocks_in_use",
        "kv_blocks_dense_equivalent",
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage",
    ):
        values = [p[key] for p in points if p.get(key) is not None]
        if values:
            section["sampled"][key] = {"mean": _mean(values), "max": max(values), "samples": len(values)}
    return section


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else None
