"""Prometheus metrics of what the KV cache really holds, from the scheduler to `/metrics`.

The numbers are read from the KV managers' block tables in the engine-core process
(`pmod_serve.v1.core.kv_accounting`), but `/metrics` is served by the API server process(es). They
travel the way vLLM's own metrics do with several API servers: as Prometheus multiprocess
files. The scheduler writes them with `prometheus_client`'s mmap storage; then

- with `PROMETHEUS_MULTIPROC_DIR` set (vLLM does this for `--api-server-count > 1`), the files go
  there and vLLM's own multiprocess collector serves them;
- otherwise they go to `PMOD_METRICS_DIR` (a temporary directory the plugin creates in the
  first process and its children inherit), and the plugin registers a collector for that
  directory in the API process's default registry.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time

from prometheus_client.mmap_dict import MmapedDict, mmap_key

from pmod_serve import envs

METRICS_DIR_ENV = "PMOD_METRICS_DIR"

BLOCKS_IN_USE = "pmod_kv_blocks_in_use"
BLOCKS_DENSE_EQUIVALENT = "pmod_kv_blocks_dense_equivalent"
SAVINGS_RATIO = "pmod_kv_cache_savings_ratio"
SLOTS_SAVED = "pmod_kv_slots_saved"  # counter, exposed as pmod_kv_slots_saved_total
VISUAL_TOKENS = "pmod_visual_tokens"  # counter, exposed as pmod_visual_tokens_total
REQUEST_SAVINGS = "pmod_request_kv_savings_ratio"  # histogram

HELP = {
    BLOCKS_IN_USE: "KV cache blocks held by running requests, summed over layers (a block shared "
                   "through prefix caching counts once).",
    BLOCKS_DENSE_EQUIVALENT: "KV cache blocks a dense LLaVA layout would hold for the same requests (a full "
                             "block of identical content counts once, as prefix caching shares it).",
    SAVINGS_RATIO: "1 - blocks_in_use / dense_equivalent (0 when idle).",
    SLOTS_SAVED: "KV token slots, summed over layers, that skipped visual tokens did not occupy.",
    VISUAL_TOKENS: "Visual tokens prefilled.",
    REQUEST_SAVINGS: "KV cache savings ratio of each finished request, at its largest allocation (blocks "
                     "it shares with other requests included).",
}
SAVINGS_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (float("inf"),)
LABEL_NAMES = ("model_name", "engine")
_writer_ids = itertools.count()


def metrics_dir() -> str:
    """Where the engine writes and the API server reads (see the module docstring)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or ensure_private_metrics_dir()


def ensure_private_metrics_dir() -> str:
    directory = envs.PMOD_METRICS_DIR
    if not directory:
        directory = tempfile.mkdtemp(prefix="pmod-metrics-")
        os.environ[METRICS_DIR_ENV] = directory
    return directory


def register_api_collector() -> None:
    """In an API server process: serve the engine's files from the default registry.

    Not needed (and not done) in multiprocess mode, where vLLM's collector reads them."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    from prometheus_client import REGISTRY
    from prometheus_client.multiprocess import MultiProcessCollector

    directory = ensure_private_metrics_dir()
    if not any(isinstance(c, MultiProcessCollector) for c in list(REGISTRY._collector_to_names)):
        MultiProcessCollector(REGISTRY, path=directory)


class KVMetricsWriter:
    """Writes the p-MoD series in the Prometheus multiprocess file format (engine core)."""

    def __init__(self, model_name: str, engine_index: int, directory: str | None = None) -> None:
        directory = directory or metrics_dir()
        # One set of files per writer: several engines may live in one process (tests).
        tag = f"pmod-{os.getpid()}-{next(_writer_ids)}"
        self._gauges = MmapedDict(os.path.join(directory, f"gauge_livemostrecent_{tag}.db"))
        self._counters = MmapedDict(os.path.join(directory, f"counter_{tag}.db"))
        self._histograms = MmapedDict(os.path.join(directory, f"histogram_{tag}.db"))
        self._labels = (model_name, str(engine_index))
        self._totals: dict[str, float] = {}
        self._buckets = [0] * len(SAVINGS_BUCKETS)
        self._sum = 0.0

    def _key(self, metric: str, sample: str, extra_names=(), extra_values=()) -> str:
        return mmap_key(metric, sample, LABEL_NAMES + tuple(extra_names), self._labels + tuple(extra_values),
                        HELP[metric])

    def set_usage(self, blocks_in_use: int, dense_equivalent: int) -> None:
        ratio = 1.0 - blocks_in_use / dense_equivalent if dense_equivalent else 0.0
        now = time.time()
        for metric, value in ((BLOCKS_IN_USE, blocks_in_use), (BLOCKS_DENSE_EQUIVALENT, dense_equivalent),
                              (SAVINGS_RATIO, ratio)):
            self._gauges.write_value(self._key(metric, metric), float(value), now)

    def add_prefill(self, visual_tokens: int, slots_saved: int) -> None:
        for metric, amount in ((VISUAL_TOKENS, visual_tokens), (SLOTS_SAVED, slots_saved)):
            self._totals[metric] = self._totals.get(metric, 0.0) + amount
            self._counters.write_value(self._key(metric, metric + "_total"), self._totals[metric], 0.0)

    def observe_request(self, savings_ratio: float) -> None:
        index = next(i for i, bound in enumerate(SAVINGS_BUCKETS) if savings_ratio <= bound)
        self._buckets[index] += 1
        self._sum += savings_ratio
        bound = SAVINGS_BUCKETS[index]
        le = "+Inf" if bound == float("inf") else repr(bound)
        key = self._key(REQUEST_SAVINGS, REQUEST_SAVINGS + "_bucket", ("le",), (le,))
        self._histograms.write_value(key, float(self._buckets[index]), 0.0)
        self._histograms.write_value(self._key(REQUEST_SAVINGS, REQUEST_SAVINGS + "_sum"), self._sum, 0.0)

    def initialise(self) -> None:
        """Publish every series at zero, so dashboards see them before the first request."""
        self.set_usage(0, 0)
        self.add_prefill(0, 0)
        for bound in SAVINGS_BUCKETS:
            le = "+Inf" if bound == float("inf") else repr(bound)
            key = self._key(REQUEST_SAVINGS, REQUEST_SAVINGS + "_bucket", ("le",), (le,))
            self._histograms.write_value(key, 0.0, 0.0)
        self._histograms.write_value(self._key(REQUEST_SAVINGS, REQUEST_SAVINGS + "_sum"), 0.0, 0.0)
