"""Deployment artefacts: `make deploy-check` (deploy/check.py) under pytest.

Needs the tools from `deploy/install-tools.sh` (pinned Python tools, kustomize, the vLLM 0.26.0
source). Without them these tests FAIL with a message saying so; they never skip. No network,
Docker engine, cluster or GPU is used.

Besides running the whole check, every family of checks is shown to *fail* on a deliberately broken
copy of the artefacts, so that none of them passes vacuously.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_spec = importlib.util.spec_from_file_location("deploy_check", ROOT / "deploy" / "check.py")
check = importlib.util.module_from_spec(_spec)
sys.modules["deploy_check"] = check
_spec.loader.exec_module(check)


def _failures(rep) -> str:
    return "\n".join(f"[{s}] {m}" for s, m in rep.failures)


def _quiet():
    return check.Report(silent=True)


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tools():
    rep = _quiet()
    t = check.check_tools(ROOT, rep)
    if rep.failures:
        pytest.fail(
            "deploy-check tools are missing or not at the pinned versions; run "
            "`deploy/install-tools.sh` (CI does this before the tests):\n" + _failures(rep),
            pytrace=False,
        )
    return t


@pytest.fixture(scope="session")
def facts(tools):
    return check.load_vllm_facts(tools.vllm_src)


@pytest.fixture(scope="session")
def rendered(tools):
    rep = _quiet()
    out = check.render_all(ROOT, tools, rep)
    assert not rep.failures, _failures(rep)
    return out


@pytest.fixture(scope="session")
def dockerfile():
    return check.parse_dockerfile((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="session")
def adapter_names(facts):
    return check.check_metrics(ROOT, facts, _quiet())


def _overlay(objs: list, name: str) -> list:
    return next(r for r in objs if r.name == name).objects


def _obj(objs: list, kind: str) -> dict:
    return next(o for o in objs if o["kind"] == kind)


def _server(objs: list) -> dict:
    return _obj(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def _lws_leader(objs: list) -> dict:
    lwt = _obj(objs, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    return lwt["leaderTemplate"]["spec"]["containers"][0]


def _set_flag(c: dict, flag: str, value: str) -> None:
    """Replace the value after `flag` in a container's args (the flag must be there)."""
    args = c["args"]
    args[args.index(flag) + 1] = value


# ---------------------------------------------------------------------------------------------
# the whole check
# ---------------------------------------------------------------------------------------------
def test_tools_installed(tools):
    assert tools.kustomize and tools.hadolint and tools.shellcheck and tools.vllm_src


@pytest.fixture(scope="session")
def full_report(tools):
    """One complete `deploy/check.py` run over this checkout (tools section included)."""
    return check.run(ROOT)


def test_deploy_check_passes(full_report):
    rep = full_report
    assert not rep.failures, "make deploy-check fails:\n" + _failures(rep)
    sections = {s for s, _ in rep.passed}
    assert sections == set(check.SECTIONS), (
        f"sections without any passing check: {set(check.SECTIONS) - sections}"
    )


def test_summary_states_what_was_not_validated(capsys):
    rep = _quiet()
    rep.ok("docker", "x")
    check.print_summary(rep)
    out = capsys.readouterr().out
    assert "NOT validated" in out and "NOT built" in out and "Nothing is applied to a cluster" in out


# ---------------------------------------------------------------------------------------------
# tools: a missing tool is a failure, not a skip
# ---------------------------------------------------------------------------------------------
def test_missing_kustomize_fails(monkeypatch, tmp_path):
    monkeypatch.setenv("KUSTOMIZE", str(tmp_path / "no-such-kustomize"))
    rep = _quiet()
    check.check_tools(ROOT, rep)
    assert "cannot run kustomize" in _failures(rep)


def test_missing_vllm_source_fails(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_SRC", str(tmp_path))
    rep = _quiet()
    check.check_tools(ROOT, rep)
    assert "vLLM 0.26.0 source not found" in _failures(rep)


def test_vllm_facts_from_source(facts):
    assert {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"} <= set(facts.metrics)
    assert facts.metrics["vllm:time_to_first_token_seconds"] == "histogram"
    series = facts.series()
    assert "vllm:request_success_total" in series and "vllm:request_success" not in series
    assert {
        "--tensor-parallel-size",
        "--pipeline-parallel-size",
        "--distributed-executor-backend",
        "--max-model-len",
        "--api-key",
        "--port",
    } <= facts.flags
    assert "--max-model-length" not in facts.flags
    assert {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"} <= facts.routes
    assert facts.default_port == 8000
    assert facts.image_user == (2000, 0, "/home/vllm")
    assert "VLLM_USE_V2_MODEL_RUNNER" in facts.env_vars and "VLLM_API_KEY" in facts.env_vars


# ---------------------------------------------------------------------------------------------
# k8s semantics: each mutation of the rendered manifests must produce the expected failure
# ---------------------------------------------------------------------------------------------
def test_k8s_checks_pass_on_the_rendered_manifests(rendered, facts, adapter_names, dockerfile):
    rep = _quiet()
    check.check_k8s(ROOT, rendered, facts, adapter_names, dockerfile, rep)
    assert not rep.failures, _failures(rep)


def _set_env(c: dict, name: str, value: str) -> None:
    c["env"] = [e for e in c["env"] if e["name"] != name] + [{"name": name, "value": value}]


K8S_MUTATIONS: dict[str, tuple[str, Callable[[list], None], str]] = {
    "service port": (
        "single-gpu",
        lambda o: _obj(o, "Service")["spec"]["ports"][0].update(port=8080),
        "Service port http == 8000",
    ),
    "unknown vllm flag": (
        "single-gpu",
        lambda o: _server(o)["args"].extend(["--max-model-length", "4096"]),
        "`pmod-serve --max-model-length` is a `vllm serve` flag of vLLM 0.26.0 or a pmod-serve option",
    ),
    "grace period shorter than pmod-serve's drain": (
        "single-gpu",
        lambda o: _obj(o, "Deployment")["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=30),
        "terminationGracePeriodSeconds > preStop sleep + pmod-serve --shutdown-timeout",
    ),
    "shutdown timeout raised past the grace period": (
        "single-gpu",
        lambda o: _server(o)["args"].extend(["--shutdown-timeout", "300"]),
        "terminationGracePeriodSeconds > preStop sleep + pmod-serve --shutdown-timeout",
    ),
    "api key on the command line": (
        "single-gpu",
        lambda o: _server(o)["args"].extend(["--api-key", "x"]),
        "--api-key on the command line",
    ),
    "uid mismatch": (
        "single-gpu",
        lambda o: _obj(o, "Deployment")["spec"]["template"]["spec"]["securityContext"].update(runAsUser=1000),
        "pod runAsUser == Dockerfile USER uid (2000)",
    ),
    "capabilities": (
        "tp2",
        lambda o: _server(o)["securityContext"]["capabilities"].update(drop=[]),
        "capabilities drop ALL",
    ),
    "gpus vs tensor parallel": (
        "tp2",
        lambda o: (
            _server(o)["resources"]["limits"].update({"nvidia.com/gpu": 1}),
            _server(o)["resources"]["requests"].update({"nvidia.com/gpu": 1}),
        ),
        "TP x PP == nvidia.com/gpu of the pod",
    ),
    "gpu request != limit": (
        "single-gpu",
        lambda o: _server(o)["resources"]["requests"].update({"nvidia.com/gpu": 2}),
        "nvidia.com/gpu requests == limits",
    ),
    "probe path": (
        "single-gpu",
        lambda o: _server(o)["readinessProbe"]["httpGet"].update(path="/healthz"),
        "readinessProbe path /healthz is a route",
    ),
    "probe port": (
        "single-gpu",
        lambda o: _server(o)["livenessProbe"]["httpGet"].update(port=8001),
        "livenessProbe port resolves to 8000",
    ),
    "startup budget": (
        "single-gpu",
        lambda o: _server(o)["startupProbe"].update(failureThreshold=30),
        "startupProbe allows >= 20 min",
    ),
    "env typo": (
        "single-gpu",
        lambda o: _set_env(_server(o), "VLLM_USE_V2_MODEL_RUNER", "0"),
        "env VLLM_USE_V2_MODEL_RUNER is read by vLLM",
    ),
    "v2 runner": (
        "single-gpu",
        lambda o: _set_env(_server(o), "VLLM_USE_V2_MODEL_RUNNER", "1"),
        "VLLM_USE_V2_MODEL_RUNNER=0",
    ),
    "literal api key": (
        "single-gpu",
        lambda o: _set_env(_server(o), "VLLM_API_KEY", "hunter2"),
        "VLLM_API_KEY from Secret",
    ),
    "hf home": (
        "single-gpu",
        lambda o: _set_env(_server(o), "HF_HOME", "/cache"),
        "HF_HOME == Dockerfile HF_HOME",
    ),
    "hpa metric": (
        "single-gpu",
        lambda o: _obj(o, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"].update(
            name="vllm:num_requests_waiting"
        ),
        "is produced by a prometheus-adapter rule",
    ),
    "hpa target": (
        "multinode",
        lambda o: _obj(o, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"].update(
            kind="Deployment", apiVersion="apps/v1"
        ),
        "HPA scaleTargetRef Deployment/pmod-serve",
    ),
    "rwo cache with several replicas": (
        "single-gpu",
        lambda o: _obj(o, "PersistentVolumeClaim")["spec"].update(accessModes=["ReadWriteOnce"]),
        "access modes allow 4 pods",
    ),
    "namespace": (
        "multinode",
        lambda o: _obj(o, "LeaderWorkerSet")["metadata"].pop("namespace"),
        "all objects in namespace pmod-serve",
    ),
    "rendered secret": (
        "single-gpu",
        lambda o: o.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "k", "namespace": "pmod-serve"},
                "stringData": {"api-key": "x"},
            }
        ),
        "no Secret rendered",
    ),
    "service selects workers": (
        "multinode",
        lambda o: _obj(o, "Service")["spec"].update(selector={"app.kubernetes.io/name": "pmod-serve"}),
        "does not select Ray workers",
    ),
    "lws without ray": (
        "multinode",
        lambda o: _obj(o, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"][
            "containers"
        ][0]["args"].pop(0),
        "LWS leader starts the Ray head",
    ),
    "lws group gpus": (
        "multinode",
        lambda o: _obj(o, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"].update(size=3),
        "TP x PP == GPUs in the group (3)",
    ),
    # p-MoD refuses pipeline parallelism (pmod_serve/model_executor/models/config.py): every spelling is caught.
    "pipeline parallel across the lws group": (
        "multinode",
        lambda o: (
            _set_flag(_lws_leader(o), "--tensor-parallel-size", "1"),
            _set_flag(_lws_leader(o), "--pipeline-parallel-size", "2"),
        ),
        "no pipeline parallelism (p-MoD supports TP only",
    ),
    "pipeline parallel short flag": (
        "tp2",
        lambda o: _server(o)["args"].extend(["-pp", "2"]),
        "no pipeline parallelism (p-MoD supports TP only",
    ),
    "pipeline parallel flag=value": (
        "single-gpu",
        lambda o: _server(o)["args"].append("--pipeline-parallel-size=2"),
        "no pipeline parallelism (p-MoD supports TP only",
    ),
    "lws tp below the group's gpus": (
        "multinode",
        lambda o: _set_flag(_lws_leader(o), "--tensor-parallel-size", "1"),
        "TP x PP == GPUs in the group (2)",
    ),
    "dashboard configmap drift": (
        "single-gpu",
        lambda o: next(x for x in o if x["kind"] == "ConfigMap")["data"].update(
            {"pmod-serve-dashboard.json": "{}"}
        ),
        "dashboard ConfigMap content ==",
    ),
    "pdb blocks drains": (
        "single-gpu",
        lambda o: _obj(o, "PodDisruptionBudget")["spec"].update(maxUnavailable=None, minAvailable=1),
        "does not block drains",
    ),
}


@pytest.mark.parametrize("case", sorted(K8S_MUTATIONS))
def test_k8s_check_catches(case, rendered, facts, adapter_names, dockerfile):
    overlay, mutate, expected = K8S_MUTATIONS[case]
    objs = copy.deepcopy(rendered)
    mutate(_overlay(objs, overlay))
    rep = _quiet()
    check.check_k8s(ROOT, objs, facts, adapter_names, dockerfile, rep)
    assert expected in _failures(rep), f"expected a failure containing {expected!r}, got:\n{_failures(rep)}"


def test_multinode_overlay_is_tensor_parallel_over_the_group(rendered):
    """The shipped LWS group runs TP over all its GPUs with PP 1 (p-MoD refuses PP > 1)."""
    objs = _overlay(rendered, "multinode")
    lwt = _obj(objs, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    gpus = sum(
        int(t["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) * n
        for t, n in ((lwt["leaderTemplate"], 1), (lwt["workerTemplate"], int(lwt["size"]) - 1))
    )
    _, _, pairs = check.parse_vllm_args([str(a) for a in _lws_leader(objs)["args"]])
    fl = dict(pairs)
    assert gpus >= 2
    assert fl["--distributed-executor-backend"] == "ray"
    assert int(fl["--tensor-parallel-size"]) == gpus
    assert int(fl.get("--pipeline-parallel-size", "1")) == 1 and "-pp" not in fl


def test_pipeline_parallel_with_matching_gpu_count_is_still_caught(
    rendered, facts, adapter_names, dockerfile
):
    """TP=1 x PP=2 on the 2-GPU group passes the GPU arithmetic; only the PP check rejects it."""
    objs = copy.deepcopy(rendered)
    leader = _lws_leader(_overlay(objs, "multinode"))
    _set_flag(leader, "--tensor-parallel-size", "1")
    _set_flag(leader, "--pipeline-parallel-size", "2")
    rep = _quiet()
    check.check_k8s(ROOT, objs, facts, adapter_names, dockerfile, rep)
    fails = [m for _, m in rep.failures]
    assert (
        len(fails) == 1 and "no pipeline parallelism" in fails[0] and "--pipeline-parallel-size 2" in fails[0]
    ), _failures(rep)


# ---------------------------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------------------------
SCHEMA_MUTATIONS: dict[str, tuple[str, Callable[[list], None], str]] = {
    "typo in a Deployment field": (
        "single-gpu",
        lambda o: _server(o).update(readinesProbe=_server(o).pop("readinessProbe")),
        "'readinesProbe' was unexpected",
    ),
    "wrong type": (
        "tp2",
        lambda o: _server(o)["ports"][0].update(containerPort="8000"),
        "'8000' is not of type 'integer'",
    ),
    "LWS unknown field (hand-written schema)": (
        "multinode",
        lambda o: _obj(o, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"].update(sise=2),
        "hand-written CRD schema",
    ),
    "LWS pod template checked with the real PodTemplateSpec": (
        "multinode",
        lambda o: _obj(o, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"][
            "containers"
        ][0].update(imagePulPolicy="Always"),
        "'imagePulPolicy' was unexpected",
    ),
    "ServiceMonitor interval": (
        "single-gpu",
        lambda o: _obj(o, "ServiceMonitor")["spec"]["endpoints"][0].update(interval="15 s"),
        "does not match",
    ),
    "unknown kind": (
        "single-gpu",
        lambda o: o.append({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}),
        "no schema for example.com/v1 Widget",
    ),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_MUTATIONS))
def test_schema_check_catches(case, rendered):
    overlay, mutate, expected = SCHEMA_MUTATIONS[case]
    objs = copy.deepcopy(rendered)
    mutate(_overlay(objs, overlay))
    rep = _quiet()
    check.check_schema(ROOT, objs, rep)
    assert expected in _failures(rep), f"expected a failure containing {expected!r}, got:\n{_failures(rep)}"


# ---------------------------------------------------------------------------------------------
# file-level mutations on a copy of the repository (Dockerfile, entrypoint, dashboard, ...)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def repo_copy(tmp_path, tools):
    """A copy of the files deploy-check reads; the package dirs and deploy/.tools are symlinked."""
    dst = tmp_path / "repo"
    dst.mkdir()
    shutil.copytree(ROOT / "deploy", dst / "deploy", ignore=shutil.ignore_patterns(".tools", "__pycache__"))
    tools_dir = ROOT / "deploy" / ".tools"
    if tools_dir.exists():
        os.symlink(tools_dir, dst / "deploy" / ".tools")
    for f in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        if (ROOT / f).exists():
            shutil.copy2(ROOT / f, dst / f)
    for d in ("pmod_serve", "model_registry", "loadtests", "pmod_train"):
        if (ROOT / d).exists():
            os.symlink(ROOT / d, dst / d)
    return dst


def _edit(root: Path, rel: str, old: str, new: str) -> None:
    p = root / rel
    text = p.read_text()
    assert old in text, f"{rel}: {old!r} not found (test out of date?)"
    p.write_text(text.replace(old, new))


def _new_failures(root: Path, sections: list[str], tools, full_report) -> str:
    """Failures of `root` that the real tree does not have (so a known gap elsewhere cannot mask them)."""
    baseline = {m for _, m in full_report.failures}
    rep = check.run(root, sections, tools=tools)
    return "\n".join(f"[{s}] {m}" for s, m in rep.failures if m not in baseline)


FILE_MUTATIONS: dict[str, tuple[list[str], str, str, str, str]] = {
    # name: (sections, file, old, new, expected failure)
    "base image tag": (
        ["docker"],
        "Dockerfile",
        "FROM vllm/vllm-openai:v0.26.0",
        "FROM vllm/vllm-openai:v0.25.0",
        "FROM vllm/vllm-openai:v0.26.0",
    ),
    "healthcheck port": (
        ["docker"],
        "Dockerfile",
        "http://localhost:8000/health",
        "http://localhost:8001/health",
        "HEALTHCHECK targets port 8000",
    ),
    "transformers pin": (
        ["docker"],
        "Dockerfile",
        "ARG TRANSFORMERS_VERSION=5.16.0",
        "ARG TRANSFORMERS_VERSION=5.17.0",
        "transformers pinned to 5.16.0",
    ),
    "user": (["docker"], "Dockerfile", "USER 2000:0", "USER 1000:0", "is the base image's existing user"),
    "hadolint finding": (
        ["docker"],
        "Dockerfile",
        "COPY --chmod=0755",
        "RUN apt-get update && apt-get install -y jq\nCOPY --chmod=0755",
        "hadolint:",
    ),
    "dockerignore drops the package": (
        ["docker"],
        ".dockerignore",
        "!pmod_serve/\n",
        "!pmod_serve/\npmod_serve/plugin.py\n",
        "COPY source pmod_serve is not excluded by .dockerignore",
    ),
    "Dockerfile does not copy loadtests": (
        ["docker"],
        "Dockerfile",
        "COPY loadtests ./loadtests\n",
        "",
        "loadtests (needed by pyproject.toml's build) is COPYed into the image build",
    ),
    "dockerignore does not allow loadtests": (
        ["docker"],
        ".dockerignore",
        "!loadtests/\n",
        "",
        "COPY source loadtests is not excluded by .dockerignore",
    ),
    "entrypoint drops extra args": (
        ["entrypoint"],
        "deploy/docker-entrypoint.sh",
        'exec pmod-serve "$model" --port "${PMOD_PORT}" "$@"',
        'exec pmod-serve "$model" --port "${PMOD_PORT}"',
        "extra flags are passed through unchanged",
    ),
    "entrypoint forgets the V1 runner": (
        ["entrypoint"],
        "deploy/docker-entrypoint.sh",
        'export VLLM_USE_V2_MODEL_RUNNER="${VLLM_USE_V2_MODEL_RUNNER:-0}"',
        ":",
        "with the V1 runner",
    ),
    "entrypoint puts the key in argv": (
        ["entrypoint"],
        "deploy/docker-entrypoint.sh",
        'exec pmod-serve "$model" --port "${PMOD_PORT}" "$@"',
        'exec pmod-serve "$model" --port "${PMOD_PORT}" --api-key "${VLLM_API_KEY:-}" "$@"',
        "not argv",
    ),
    "entrypoint reverts to plain vllm serve": (
        ["entrypoint"],
        "deploy/docker-entrypoint.sh",
        'exec pmod-serve "$model" --port "${PMOD_PORT}" "$@"',
        'exec vllm serve "$model" --port "${PMOD_PORT}" "$@"',
        "execs `pmod-serve $PMOD_MODEL --port 8000`",
    ),
    "entrypoint puts the checkpoint after the flags": (
        ["entrypoint"],
        "deploy/docker-entrypoint.sh",
        'exec pmod-serve "$model" --port "${PMOD_PORT}" "$@"',
        'exec pmod-serve --port "${PMOD_PORT}" "$model" "$@"',
        "execs `pmod-serve $PMOD_MODEL --port 8000`",
    ),
    "Dockerfile build no longer asserts pmod-serve": (
        ["docker"],
        "Dockerfile",
        " and shutil.which('pmod-serve')",
        "",
        "checks the `pmod-serve` console script",
    ),
    "entrypoint shellcheck": (
        ["entrypoint"],
        "deploy/docker-entrypoint.sh",
        'local model="${PMOD_MODEL:-$DEFAULT_MODEL}"',
        "local model=${PMOD_MODEL:-$DEFAULT_MODEL}; ls $model",
        "shellcheck:",
    ),
    "dashboard metric typo": (
        ["metrics"],
        "deploy/grafana/pmod-serve-dashboard.json",
        "sum(vllm:num_requests_waiting{",
        "sum(vllm:num_request_waiting{",
        "metric vllm:num_request_waiting is neither",
    ),
    "dashboard rate of a gauge": (
        ["metrics"],
        "deploy/grafana/pmod-serve-dashboard.json",
        "sum(vllm:num_requests_running{",
        "sum(rate(vllm:num_requests_running{",
        "gauge vllm:num_requests_running not rate()d",
    ),
    "dashboard quantile without le": (
        ["metrics"],
        "deploy/grafana/pmod-serve-dashboard.json",
        "histogram_quantile(0.5, sum by (le) (rate(vllm:inter_token_latency_seconds_bucket",
        "histogram_quantile(0.5, sum by (pod) (rate(vllm:inter_token_latency_seconds_bucket",
        "used in histogram_quantile(... by (le) ...)",
    ),
    "metric dropped from metric_names.txt": (
        ["metrics"],
        "deploy/metric_names.txt",
        "\npmod_visual_tokens_total\n",
        "\n",
        "metric pmod_visual_tokens_total is neither",
    ),
    "bad metric name in metric_names.txt": (
        ["metrics"],
        "deploy/metric_names.txt",
        "pmod_kv_blocks_in_use\n",
        "pmod_kv_blocks_in_use\npmod:bad name\n",
        "is not a valid metric name",
    ),
    "adapter exposes a colon name": (
        ["metrics"],
        "deploy/prometheus-adapter/values.yaml",
        'as: "vllm_${1}"',
        'as: "vllm:${1}"',
        "a valid custom-metric name, no ':'",
    ),
    "adapter series unknown": (
        ["metrics"],
        "deploy/prometheus-adapter/values.yaml",
        "seriesQuery: 'vllm:kv_cache_usage_perc{",
        "seriesQuery: 'vllm:gpu_cache_usage_perc{",
        "metric vllm:gpu_cache_usage_perc is neither",
    ),
    "docs quote another base image": (
        ["docs"],
        "deploy/SIZING.md",
        "# Sizing pmod-serve",
        "# Sizing pmod-serve (image vllm/vllm-openai:v0.25.0 )",
        "base image v0.25.0",
    ),
    "duplicate yaml key": (
        ["yaml"],
        "deploy/k8s/base/service.yaml",
        "  type: ClusterIP\n",
        "  type: ClusterIP\n  type: NodePort\n",
        "key-duplicates",
    ),
    "overlay loses its namespace": (
        ["k8s"],
        "deploy/k8s/overlays/multinode/kustomization.yaml",
        "namespace: pmod-serve\n",
        "",
        "all objects in namespace pmod-serve",
    ),
    "overlay switches to pipeline parallelism": (
        ["k8s"],
        "deploy/k8s/overlays/multinode/leaderworkerset.yaml",
        '- --pipeline-parallel-size\n              - "1"',
        '- --pipeline-parallel-size\n              - "2"',
        "no pipeline parallelism (p-MoD supports TP only",
    ),
    "overlay does not render": (
        ["render"],
        "deploy/k8s/overlays/tp2/kustomization.yaml",
        "../../base",
        "../../nope",
        "kustomize build deploy/k8s/overlays/tp2 failed",
    ),
}


@pytest.mark.parametrize("case", sorted(FILE_MUTATIONS))
def test_file_check_catches(case, repo_copy, tools, full_report):
    sections, rel, old, new, expected = FILE_MUTATIONS[case]
    _edit(repo_copy, rel, old, new)
    got = _new_failures(repo_copy, sections, tools, full_report)
    assert expected in got, f"expected a new failure containing {expected!r}, got:\n{got or '(none)'}"


def test_pmod_serve_must_define_the_media_options(repo_copy, tools, full_report):
    """Manifests may use pmod-serve's --media-* options only while pmod_serve/entrypoints/server.py defines them."""
    (repo_copy / "pmod_serve").unlink()  # a real copy: never edit the symlinked source tree
    shutil.copytree(
        ROOT / "pmod_serve", repo_copy / "pmod_serve", ignore=shutil.ignore_patterns("__pycache__")
    )
    _edit(repo_copy, "pmod_serve/entrypoints/server.py", '"--media-timeout"', '"--media-fetch-timeout"')
    got = _new_failures(repo_copy, ["entrypoint"], tools, full_report)
    assert "pmod_serve/entrypoints/server.py defines the pmod-serve options" in got, got
    assert "--media-timeout" in (ROOT / "pmod_serve" / "entrypoints" / "server.py").read_text()


def test_new_package_directory_must_be_copied_into_the_image(repo_copy, tools, full_report):
    """A package directory that pyproject's discovery picks up (`pmod_serve*`) must be COPYed."""
    pkg = repo_copy / "pmod_serve_extra"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    got = _new_failures(repo_copy, ["docker"], tools, full_report)
    assert "pmod_serve_extra (needed by pyproject.toml's build) is COPYed into the image build" in got, got


def test_repo_copy_is_faithful(repo_copy, tools, full_report):
    """The mutation tests compare against the real tree: an unmodified copy adds no failure."""
    assert _new_failures(repo_copy, list(check.SECTIONS), tools, full_report) == ""


# ---------------------------------------------------------------------------------------------
# helpers with their own semantics
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path,patterns,excluded",
    [
        ("pmod_serve/plugin.py", ["*", "!pmod_serve/"], False),
        ("pmod_serve/__pycache__/x.pyc", ["*", "!pmod_serve/", "**/__pycache__"], True),
        ("deploy/check.py", ["*", "!deploy/docker-entrypoint.sh"], True),
        ("deploy/docker-entrypoint.sh", ["*", "!deploy/docker-entrypoint.sh"], False),
        ("README.md", ["*.md", "!README.md"], False),
        ("docs/x.md", ["*.md"], False),
        ("docs/x.md", ["**/*.md"], True),
    ],
)
def test_dockerignore_semantics(path, patterns, excluded):
    pats = []
    for p in patterns:
        neg = p.startswith("!")
        pats.append((neg, os.path.normpath(p[1:] if neg else p)))
    assert check.dockerignore_excludes(path, pats) is excluded


@pytest.mark.parametrize(
    "expr,metrics",
    [
        (
            'histogram_quantile(0.9, sum by (le) (rate(vllm:e2e_request_latency_seconds_bucket{model_name=~"$m"}[$__rate_interval])))',
            ["vllm:e2e_request_latency_seconds_bucket"],
        ),
        (
            'sum(rate(a_total[5m])) / sum(rate(b_count{x="y"}[5m])) > 0.5 or on(pod) c',
            ["a_total", "b_count", "c"],
        ),
        ("avg by (pod) (pmod_kv_cache_savings_ratio)", ["pmod_kv_cache_savings_ratio"]),
    ],
)
def test_promql_metric_extraction(expr, metrics):
    assert check.promql_metrics(expr) == metrics


def test_entrypoint_exact_command(tools):
    rc, argv, env, err = check.run_entrypoint(ROOT, ["--max-model-len", "4096"], {"PMOD_OFFLINE": "1"})
    assert rc == 0, err
    assert argv == ["pmod-serve", "MCG-NJU/p-MoD-LLaVA-NeXT-7B", "--port", "8000", "--max-model-len", "4096"]
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_USE_V2_MODEL_RUNNER"] == "0"


def test_entrypoint_ray_head_execs_pmod_serve(tools):
    """The multinode leader (`ray-head`) serves through pmod-serve too, checkpoint first."""
    rc, argv, env, err = check.run_entrypoint(
        ROOT,
        ["ray-head", "MCG-NJU/p-MoD-LLaVA-v1.5-7B", "--media-max-bytes", "1000000"],
        {"LWS_GROUP_SIZE": "2", "PMOD_STUB_RAY_NODES": "2"},
    )
    assert rc == 0, err
    assert argv == [
        "pmod-serve",
        "MCG-NJU/p-MoD-LLaVA-v1.5-7B",
        "--port",
        "8000",
        "--media-max-bytes",
        "1000000",
    ]


def test_multinode_leader_uses_the_pmod_serve_path(rendered):
    """The LWS leader goes through the entrypoint's `ray-head` mode (-> pmod-serve), no command override."""
    leader = _lws_leader(_overlay(rendered, "multinode"))
    assert not leader.get("command") and leader["args"][0] == "ray-head"


@pytest.mark.parametrize("flag", check.PMOD_SERVE_FLAGS)
def test_pmod_serve_options_are_accepted_in_manifests(flag, rendered, facts, adapter_names, dockerfile):
    objs = copy.deepcopy(rendered)
    _server(_overlay(objs, "single-gpu"))["args"].extend([flag, "1"])
    rep = _quiet()
    check.check_k8s(ROOT, objs, facts, adapter_names, dockerfile, rep)
    assert not rep.failures, _failures(rep)


def test_metric_names_file_format():
    lines = (ROOT / "deploy" / "metric_names.txt").read_text().splitlines()
    names = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    assert names and all(re.fullmatch(r"pmod_[a-z0-9_]+", n) for n in names)
    assert len(names) == len(set(names))


def test_dashboard_is_valid_json_with_datasource_variable():
    dash = json.loads((ROOT / "deploy" / "grafana" / "pmod-serve-dashboard.json").read_text())
    assert any(v["type"] == "datasource" for v in dash["templating"]["list"])
