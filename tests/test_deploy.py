"""Deployment artefacts: `make deploy-check` (deploy/check.py) under pytest.

Needs the tools from `deploy/install-tools.sh` (the pinned tool venv .cache/deploy-venv,
check.py's libraries in this interpreter, kustomize). Without them these tests FAIL with a message
saying so; they never skip. No network, Docker engine, cluster or GPU is used.

Besides running the whole check, every rule of check.py, and the maintained tools it runs, is
shown to *fail* on a deliberately broken copy of a manifest or file, so that none passes vacuously.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
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
    t = check.check_tools(rep)
    if rep.failures:
        pytest.fail(
            "deploy-check tools are missing or not at the pinned versions; run "
            "`deploy/install-tools.sh` (`make test` does this first):\n" + _failures(rep),
            pytrace=False,
        )
    return t


@pytest.fixture(scope="session")
def facts(tools):
    return check.serve_facts()


@pytest.fixture(scope="session")
def rendered(tools):
    rep = _quiet()
    out = check.render_all(ROOT, tools, rep)
    assert not rep.failures, _failures(rep)
    return out


@pytest.fixture(scope="session")
def dockerfile(tools):
    return check.parse_dockerfile(ROOT / "Dockerfile")


@pytest.fixture(scope="session")
def adapter_names(facts):
    return check.check_metrics(ROOT, facts, _quiet())


@pytest.fixture(scope="session")
def full_report(tools):
    """One complete `deploy/check.py` run over this checkout (tools section included)."""
    return check.run(ROOT)


def _overlay(objs: list, name: str) -> list:
    return next(r for r in objs if r.name == name).objects


def _obj(objs: list, kind: str) -> dict:
    return next(o for o in objs if o["kind"] == kind)


def _pod(objs: list) -> dict:
    return _obj(objs, "Deployment")["spec"]["template"]["spec"]


def _server(objs: list) -> dict:
    return _pod(objs)["containers"][0]


def _lws(objs: list, part: str = "leaderTemplate") -> dict:
    return _obj(objs, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"][part]


def _lws_leader(objs: list) -> dict:
    return _lws(objs)["spec"]["containers"][0]


def _set_flag(c: dict, flag: str, value: str) -> None:
    """Replace the value after `flag` in a container's args (the flag must be there)."""
    args = c["args"]
    args[args.index(flag) + 1] = value


def _set_env(c: dict, name: str, value: str) -> None:
    c["env"] = [e for e in c["env"] if e["name"] != name] + [{"name": name, "value": value}]


def _drop(items: list, **match) -> None:
    items[:] = [i for i in items if any(i.get(k) != v for k, v in match.items())]


# ---------------------------------------------------------------------------------------------
# the whole check
# ---------------------------------------------------------------------------------------------
def test_deploy_check_passes(full_report):
    rep = full_report
    assert not rep.failures, "make deploy-check fails:\n" + _failures(rep)
    sections = {s for s, _ in rep.passed}
    assert sections == set(check.SECTIONS), f"sections without any passing check: {set(check.SECTIONS) - sections}"


def test_checkov_ran_with_no_failure_and_every_skip_explained(full_report):
    note = next(n for n in full_report.notes if n.startswith("checkov "))
    assert " 0 failed" in note, note
    skipped = {m for s, m in full_report.passed if s == "policy" and " skipped for " in m}
    assert skipped, "no skipped checkov check reported"  # the image digest: see deploy/README.md


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
    check.check_tools(rep)
    assert "cannot run kustomize" in _failures(rep)


def test_missing_tool_venv_fails(monkeypatch, tmp_path):
    monkeypatch.setattr(check, "DEPLOY_VENV", tmp_path)
    rep = _quiet()
    check.check_tools(rep)
    assert "packages at the pinned versions: run deploy/install-tools.sh" in _failures(rep)


# ---------------------------------------------------------------------------------------------
# what check.py reads from the code
# ---------------------------------------------------------------------------------------------
def test_serve_facts_come_from_vllm_and_pmod_serve(facts):
    assert {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"} <= facts.routes
    assert "/healthz" not in facts.routes
    assert facts.default_port == 8000
    assert {"VLLM_USE_V2_MODEL_RUNNER", "VLLM_API_KEY", "VLLM_HOST_IP"} <= facts.env_vars
    assert facts.series["vllm:request_success_total"] == "counter" and "vllm:request_success" not in facts.series
    assert facts.series["vllm:time_to_first_token_seconds_bucket"] == "histogram"
    assert facts.series["vllm:num_requests_waiting"] == "gauge"
    assert facts.series["pmod_visual_tokens_total"] == "counter"
    assert facts.pmod_listed == set(check.load_metric_names(ROOT))


def test_pmod_serve_args_go_through_both_parsers():
    ns = check.parse_pmod_serve(["m", "--port", "8000", "-tp", "2", "--media-max-bytes", "10"])
    assert (ns.tensor_parallel_size, ns.pipeline_parallel_size, ns.port) == (2, 1, 8000)
    assert ns.shutdown_timeout == 30  # pmod-serve's default, not vLLM's 0
    with pytest.raises(check.ArgsError, match="--max-model-length"):
        check.parse_pmod_serve(["m", "--max-model-length", "4096"])
    with pytest.raises(check.ArgsError, match="--media-max-bytes"):
        check.parse_pmod_serve(["m", "--media-max-bytes", "lots"])


def test_lws_is_scanned_as_its_pod_templates(rendered):
    objs = check.as_scanned(_overlay(rendered, "multinode"))
    pods = [o for o in objs if o["kind"] == "Pod"]
    assert not [o for o in objs if o["kind"] == "LeaderWorkerSet"] and len(pods) == 2
    assert all("CKV_K8S_43" in o["metadata"]["annotations"]["checkov.io/skip1"] for o in pods)
    assert {o["metadata"]["labels"]["app.kubernetes.io/component"] for o in pods} == {"server", "ray-worker"}


# ---------------------------------------------------------------------------------------------
# k8s rules: each mutation of the rendered manifests must produce the expected failure
# ---------------------------------------------------------------------------------------------
def test_k8s_checks_pass_on_the_rendered_manifests(rendered, facts, adapter_names, dockerfile):
    rep = _quiet()
    check.check_k8s(ROOT, rendered, facts, adapter_names, dockerfile, rep)
    assert not rep.failures, _failures(rep)


NOT_PMOD_SERVE_ARGS = "args are not valid `pmod-serve` arguments"
PP_MSG = "no pipeline parallelism (p-MoD supports TP only"
API_KEY_MSG = "VLLM_API_KEY_FILE is a file of Secret pmod-serve-api-key"

K8S_MUTATIONS: dict[str, tuple[str, Callable[[list], object], str]] = {
    "service port": (
        "single-gpu",
        lambda o: _obj(o, "Service")["spec"]["ports"][0].update(port=8080),
        "Service port http == 8000",
    ),
    "unknown flag": (
        "single-gpu",
        lambda o: _server(o)["args"].extend(["--max-model-length", "4096"]),
        f"{NOT_PMOD_SERVE_ARGS}: unrecognized arguments: --max-model-length",
    ),
    "flag value vLLM's parser refuses": (
        "tp2",
        lambda o: _set_flag(_server(o), "--limit-mm-per-prompt", "{image: 1}"),
        f"{NOT_PMOD_SERVE_ARGS}: argument --limit-mm-per-prompt",
    ),
    "flag value pmod-serve's parser refuses": (
        "single-gpu",
        lambda o: _server(o)["args"].extend(["--media-max-bytes", "10MB"]),
        f"{NOT_PMOD_SERVE_ARGS}: argument --media-max-bytes",
    ),
    "stray positional argument": (
        "single-gpu",
        lambda o: _server(o)["args"].append("extra"),
        "no stray positional argument",
    ),
    "port flag": (
        "single-gpu",
        lambda o: _server(o)["args"].extend(["--port", "9000"]),
        "serves on port 8000",
    ),
    "grace period shorter than pmod-serve's drain": (
        "single-gpu",
        lambda o: _pod(o).update(terminationGracePeriodSeconds=30),
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
        "no --api-key in args",
    ),
    "literal api key in the pod spec": (
        "single-gpu",
        lambda o: _set_env(_server(o), "VLLM_API_KEY", "hunter2"),
        API_KEY_MSG,
    ),
    "api key from another secret": (
        "tp2",
        lambda o: next(v for v in _pod(o)["volumes"] if v["name"] == "api-key")["secret"].update(secretName="other"),
        API_KEY_MSG,
    ),
    "api key file outside the secret mount": (
        "multinode",
        lambda o: _set_env(_lws_leader(o), "VLLM_API_KEY_FILE", "/etc/api-key"),
        API_KEY_MSG,
    ),
    "api key not required": (
        "single-gpu",
        lambda o: _set_env(_server(o), "PMOD_REQUIRE_API_KEY", "0"),
        "PMOD_REQUIRE_API_KEY=1",
    ),
    "pod uid != Dockerfile USER": (
        "single-gpu",
        lambda o: _pod(o)["securityContext"].update(runAsUser=10002),
        "pod runAsUser:runAsGroup == the Dockerfile's USER 10001:0",
    ),
    "pod gid != Dockerfile USER": (
        "multinode",
        lambda o: _lws(o, "workerTemplate")["spec"]["securityContext"].update(runAsGroup=1000),
        "pod runAsUser:runAsGroup == the Dockerfile's USER 10001:0",
    ),
    "container uid != Dockerfile USER": (
        "tp2",
        lambda o: _server(o)["securityContext"].update(runAsUser=2000),
        "container runAsUser (if set) == 10001",
    ),
    "read-only root without a writable HOME": (
        "single-gpu",
        lambda o: _drop(_server(o)["volumeMounts"], mountPath="/home/pmod"),
        "root filesystem read-only, so /home/pmod",
    ),
    "read-only root without a writable /tmp": (
        "multinode",
        lambda o: _drop(_lws(o, "workerTemplate")["spec"]["containers"][0]["volumeMounts"], mountPath="/tmp"),
        "root filesystem read-only, so /tmp",
    ),
    "shm on disk": (
        "tp2",
        lambda o: next(v for v in _pod(o)["volumes"] if v["name"] == "dshm")["emptyDir"].pop("medium"),
        "/dev/shm is a memory-backed emptyDir",
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
    "container port": (
        "tp2",
        lambda o: _server(o)["ports"][0].update(containerPort=8080),
        "containerPort http == 8000",
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
    "hf home": (
        "single-gpu",
        lambda o: _set_env(_server(o), "HF_HOME", "/cache"),
        "HF_HOME == the Dockerfile's HF_HOME",
    ),
    "model cache not on the PVC": (
        "multinode",
        lambda o: next(v for v in _lws(o)["spec"]["volumes"] if v["name"] == "model-cache").update(
            persistentVolumeClaim={"claimName": "other"}
        ),
        "HF_HOME is mounted from a rendered PVC",
    ),
    "unsupported checkpoint": (
        "single-gpu",
        lambda o: _set_env(_server(o), "PMOD_MODEL", "llava-hf/llava-1.5-7b-hf"),
        "serves a supported checkpoint",
    ),
    "command override": (
        "single-gpu",
        lambda o: _server(o).update(command=["vllm", "serve"]),
        "uses the image entrypoint",
    ),
    "hpa metric": (
        "single-gpu",
        lambda o: _obj(o, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"].update(
            name="vllm:num_requests_waiting"
        ),
        "is a Pods metric produced by a prometheus-adapter rule",
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
    "service selects nothing": (
        "tp2",
        lambda o: _obj(o, "Service")["spec"]["selector"].update({"app.kubernetes.io/component": "api"}),
        "Service/pmod-serve selects the server pods",
    ),
    "service target port": (
        "single-gpu",
        lambda o: _obj(o, "Service")["spec"]["ports"][0].update(targetPort="metrics"),
        "Service targetPort 'metrics' resolves to containerPort 8000",
    ),
    "servicemonitor port": (
        "single-gpu",
        lambda o: _obj(o, "ServiceMonitor")["spec"]["endpoints"][0].update(port="web"),
        "ServiceMonitor port 'web' is a Service port",
    ),
    "servicemonitor path": (
        "tp2",
        lambda o: _obj(o, "ServiceMonitor")["spec"]["endpoints"][0].update(path="/prometheus"),
        "ServiceMonitor path /prometheus is a vLLM route",
    ),
    "no networkpolicy": (
        "single-gpu",
        lambda o: o.remove(_obj(o, "NetworkPolicy")),
        "a NetworkPolicy is rendered",
    ),
    "networkpolicy misses the workers": (
        "multinode",
        lambda o: _obj(o, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"].update(
            {"app.kubernetes.io/component": "server"}
        ),
        "NetworkPolicy/pmod-serve selects every pod of the workload",
    ),
    "networkpolicy closes the server port": (
        "tp2",
        lambda o: _obj(o, "NetworkPolicy")["spec"]["ingress"][1]["ports"][0].update(port=9000),
        "NetworkPolicy/pmod-serve admits the server port 8000",
    ),
    "networkpolicy splits a ray group": (
        "multinode",
        lambda o: _obj(o, "NetworkPolicy")["spec"]["ingress"].pop(0),
        "lets the pods of a Ray group reach each other",
    ),
    "lws without ray": (
        "multinode",
        lambda o: _lws_leader(o)["args"].pop(0),
        "LWS leader starts the Ray head",
    ),
    "lws without the ray backend": (
        "multinode",
        lambda o: _set_flag(_lws_leader(o), "--distributed-executor-backend", "mp"),
        "--distributed-executor-backend ray for a 2-pod group",
    ),
    "ray worker with serve flags": (
        "multinode",
        lambda o: _lws(o, "workerTemplate")["spec"]["containers"][0]["args"].append("--max-model-len"),
        "ray worker takes no serve flags",
    ),
    "single pod starts ray": (
        "single-gpu",
        lambda o: _server(o)["args"].insert(0, "ray-head"),
        "single-pod server does not start Ray",
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
        PP_MSG,
    ),
    "pipeline parallel short flag": ("tp2", lambda o: _server(o)["args"].extend(["-pp", "2"]), PP_MSG),
    "pipeline parallel flag=value": ("single-gpu", lambda o: _server(o)["args"].append("--pipeline-parallel-size=2"), PP_MSG),
    "lws tp below the group's gpus": (
        "multinode",
        lambda o: _set_flag(_lws_leader(o), "--tensor-parallel-size", "1"),
        "TP x PP == GPUs in the group (2)",
    ),
    "dashboard configmap drift": (
        "single-gpu",
        lambda o: _obj(o, "ConfigMap")["data"].update({"pmod-serve-dashboard.json": "{}"}),
        "dashboard ConfigMap content ==",
    ),
    "dashboard configmap without the sidecar label": (
        "tp2",
        lambda o: _obj(o, "ConfigMap")["metadata"]["labels"].pop("grafana_dashboard"),
        "grafana_dashboard=1 sidecar label",
    ),
    "pdb blocks drains": (
        "single-gpu",
        lambda o: _obj(o, "PodDisruptionBudget")["spec"].update(maxUnavailable=None, minAvailable=1),
        "does not block drains",
    ),
    "no namespace": (
        "single-gpu",
        lambda o: o.remove(_obj(o, "Namespace")),
        "exactly one Namespace rendered",
    ),
    "two workloads": (
        "tp2",
        lambda o: o.append(copy.deepcopy(_obj(o, "Deployment")) | {"metadata": {"name": "other", "namespace": "pmod-serve"}}),
        "one workload",
    ),
    "startup probe missing": (
        "single-gpu",
        lambda o: _server(o).pop("startupProbe"),
        "startupProbe present",
    ),
    "pdb selects nothing": (
        "tp2",
        lambda o: _obj(o, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].update(
            {"app.kubernetes.io/component": "api"}
        ),
        "PodDisruptionBudget selects the serving pods",
    ),
    "no dashboard configmap": (
        "single-gpu",
        lambda o: o.remove(_obj(o, "ConfigMap")),
        "Grafana dashboard ConfigMap rendered",
    ),
    "two images": (
        "tp2",
        lambda o: _server(o).update(image="registry.example.com/pmod-serve:other"),
        "all overlays use one image for registry.example.com/pmod-serve",
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


def test_pipeline_parallel_with_matching_gpu_count_is_still_caught(rendered, facts, adapter_names, dockerfile):
    """TP=1 x PP=2 on the 2-GPU group passes the GPU arithmetic; only the PP rule rejects it."""
    objs = copy.deepcopy(rendered)
    leader = _lws_leader(_overlay(objs, "multinode"))
    _set_flag(leader, "--tensor-parallel-size", "1")
    _set_flag(leader, "--pipeline-parallel-size", "2")
    rep = _quiet()
    check.check_k8s(ROOT, objs, facts, adapter_names, dockerfile, rep)
    fails = [m for _, m in rep.failures]
    assert len(fails) == 1 and PP_MSG in fails[0] and "--pipeline-parallel-size 2" in fails[0], _failures(rep)


def test_multinode_overlay_is_tensor_parallel_over_the_group(rendered):
    """The shipped LWS group runs TP over all its GPUs with PP 1 (p-MoD refuses PP > 1)."""
    objs = _overlay(rendered, "multinode")
    lwt = _obj(objs, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    gpus = sum(
        int(t["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) * n
        for t, n in ((lwt["leaderTemplate"], 1), (lwt["workerTemplate"], int(lwt["size"]) - 1))
    )
    leader = _lws_leader(objs)
    mode, argv = check.serve_argv(leader["args"], check._env(leader))
    ns = check.parse_pmod_serve(argv)
    assert mode == "ray-head" and not leader.get("command") and gpus >= 2
    assert ns.distributed_executor_backend == "ray"
    assert (ns.tensor_parallel_size, ns.pipeline_parallel_size) == (gpus, 1)


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--media-allow-host", "10.0.0.0/8"),
        ("--media-allowed-domain", "images.example.com"),
        ("--media-max-bytes", "1000000"),
        ("--media-timeout", "5"),
    ],
)
def test_pmod_serve_options_are_accepted_in_manifests(flag, value, rendered, facts, adapter_names, dockerfile):
    objs = copy.deepcopy(rendered)
    _server(_overlay(objs, "single-gpu"))["args"].extend([flag, value])
    rep = _quiet()
    check.check_k8s(ROOT, objs, facts, adapter_names, dockerfile, rep)
    assert not rep.failures, _failures(rep)


# ---------------------------------------------------------------------------------------------
# schema (kubernetes-validate, check-jsonschema) and policy (checkov): the tools catch breakage
# ---------------------------------------------------------------------------------------------
SCHEMA_MUTATIONS: dict[str, tuple[str, Callable[[list], object], str]] = {
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
        "'sise' was unexpected",
    ),
    "LWS pod template checked with the real PodTemplateSpec": (
        "multinode",
        lambda o: _lws(o, "workerTemplate")["spec"]["containers"][0].update(imagePulPolicy="Always"),
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
        "Couldn't find schema for kind Widget",
    ),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_MUTATIONS))
def test_schema_check_catches(case, rendered, tools):
    overlay, mutate, expected = SCHEMA_MUTATIONS[case]
    objs = copy.deepcopy(rendered)
    mutate(_overlay(objs, overlay))
    rep = _quiet()
    check.check_schema(ROOT, objs, tools, rep)
    assert expected in _failures(rep), f"expected a failure containing {expected!r}, got:\n{_failures(rep)}"


POLICY_MUTATIONS: list[tuple[str, Callable[[list], object], str]] = [
    # (overlay, mutation, expected failure): all applied at once, checkov runs once
    (
        "single-gpu",
        lambda o: _server(o)["securityContext"].update(readOnlyRootFilesystem=False),
        "checkov CKV_K8S_22 (Use read-only filesystem for containers where possible) failed for single-gpu: "
        "Deployment.pmod-serve.pmod-serve",
    ),
    (
        "single-gpu",
        lambda o: _obj(o, "Deployment")["metadata"]["annotations"].update({"checkov.io/skip1": "CKV_K8S_43"}),
        "checkov CKV_K8S_43 skipped for single-gpu: Deployment.pmod-serve.pmod-serve with a reason",
    ),
    # another overlay's NetworkPolicy (same namespace, same labels) must not count
    ("tp2", lambda o: o.remove(_obj(o, "NetworkPolicy")), "checkov CKV2_K8S_6"),
    (
        "multinode",
        lambda o: _lws(o, "workerTemplate")["spec"]["containers"][0]["securityContext"].update(
            allowPrivilegeEscalation=True
        ),
        "checkov CKV_K8S_20 (Containers should not run with allowPrivilegeEscalation) failed for multinode: "
        "Pod.pmod-serve.pmod-serve-workerTemplate",
    ),
]


def test_policy_check_catches(rendered, tools):
    objs = copy.deepcopy(rendered)
    for overlay, mutate, _ in POLICY_MUTATIONS:
        mutate(_overlay(objs, overlay))
    rep = _quiet()
    check.check_policy(objs, tools, rep)
    got = _failures(rep)
    missing = [expected for _, _, expected in POLICY_MUTATIONS if expected not in got]
    assert not missing, f"expected failures containing {missing}, got:\n{got}"
    assert "[policy] checkov CKV2_K8S_6" in got and "failed for tp2:" in got.split("CKV2_K8S_6")[1].splitlines()[0]


# ---------------------------------------------------------------------------------------------
# file-level mutations on a copy of the repository (Dockerfile, entrypoint, dashboard, ...)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def repo_copy(tmp_path, tools):
    """A copy of the files deploy-check reads (real directories: a symlink is not followed into
    Docker's build context; the trained checkpoints are left out)."""
    dst = tmp_path / "repo"
    dst.mkdir()
    shutil.copytree(ROOT / "deploy", dst / "deploy", ignore=shutil.ignore_patterns(".tools", "__pycache__"))
    for f in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / f, dst / f)
    for d in ("pmod_serve", "model_registry", "loadtests", "pmod_train"):
        shutil.copytree(ROOT / d, dst / d, ignore=shutil.ignore_patterns("__pycache__", "checkpoints"))
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


ENTRYPOINT_EXEC = 'exec pmod-serve "$model" --port "${PMOD_PORT}" "$@"'

FILE_MUTATIONS: dict[str, tuple[list[str], str, str, str, str]] = {
    # name: (sections, file, old, new, expected failure)
    "base image tag": (
        ["docker"],
        "Dockerfile",
        "FROM vllm/vllm-openai:v0.26.0",
        "FROM vllm/vllm-openai:v0.25.0",
        "FROM vllm/vllm-openai:v0.26.0",
    ),
    "pyproject pin": (["docker"], "pyproject.toml", '"vllm==0.26.0"', '"vllm>=0.26.0"', "pyproject pins vllm==0.26.0"),
    "healthcheck port": (
        ["docker"],
        "Dockerfile",
        "http://localhost:8000/health",
        "http://localhost:8001/health",
        "HEALTHCHECK targets port 8000",
    ),
    "healthcheck path": (
        ["docker"],
        "Dockerfile",
        "http://localhost:8000/health",
        "http://localhost:8000/healthz",
        "HEALTHCHECK path /healthz is a vLLM route",
    ),
    "expose": (["docker"], "Dockerfile", "EXPOSE 8000", "EXPOSE 8080", "EXPOSE 8000"),
    "transformers pin": (
        ["docker"],
        "Dockerfile",
        "ARG TRANSFORMERS_VERSION=5.16.0",
        "ARG TRANSFORMERS_VERSION=5.17.0",
        "ARG TRANSFORMERS_VERSION == 5.16.0",
    ),
    "low uid": (["docker"], "Dockerfile", "USER 10001:0", "USER 2000:0", "USER is a numeric uid >= 10000"),
    "user not created": (
        ["docker"],
        "Dockerfile",
        "--uid 10001 --gid 0",
        "--uid 10002 --gid 0",
        "USER 10001:0 is created with HOME /home/pmod",
    ),
    "model cache not owned by the user": (
        ["docker"],
        "Dockerfile",
        "chown 10001:0 /models",
        "chown 0:0 /models",
        "HF_HOME /models owned by 10001:0",
    ),
    "env var vLLM does not read": (
        ["docker"],
        "Dockerfile",
        "VLLM_NO_USAGE_STATS=1",
        "VLLM_NO_USAGE_STAT=1",
        "ENV VLLM_NO_USAGE_STAT is read by vLLM",
    ),
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
    "Dockerfile build no longer asserts pmod-serve": (
        ["docker"],
        "Dockerfile",
        " and shutil.which('pmod-serve')",
        "",
        "the build asserts vllm, transformers, the plugin entry point and the `pmod-serve` script",
    ),
    "entrypoint copied elsewhere": (
        ["docker"],
        "Dockerfile",
        'ENTRYPOINT ["/usr/local/bin/pmod-entrypoint"]',
        'ENTRYPOINT ["/usr/local/bin/entrypoint"]',
        "ENTRYPOINT is the copied deploy/docker-entrypoint.sh",
    ),
    "Dockerfile user vs pods": (
        ["k8s"],
        "Dockerfile",
        "USER 10001:0",
        "USER 10002:0",
        "pod runAsUser:runAsGroup == the Dockerfile's USER 10002:0",
    ),
    "Dockerfile HOME vs the pods' emptyDir": (
        ["k8s"],
        "Dockerfile",
        "HOME=/home/pmod",
        "HOME=/home/other",
        "root filesystem read-only, so /home/other",
    ),
    "no volume at HF_HOME": (["docker"], "Dockerfile", 'VOLUME ["/models"]', 'VOLUME ["/data"]', "VOLUME at HF_HOME"),
    "image selects the V2 runner": (
        ["docker"],
        "Dockerfile",
        "VLLM_USE_V2_MODEL_RUNNER=0",
        "VLLM_USE_V2_MODEL_RUNNER=1",
        "ENV VLLM_USE_V2_MODEL_RUNNER=0",
    ),
    "image default model": (
        ["docker"],
        "Dockerfile",
        "PMOD_MODEL=MCG-NJU/p-MoD-LLaVA-NeXT-7B",
        "PMOD_MODEL=MCG-NJU/p-MoD-LLaVA-v1.5-7B",
        "ENV PMOD_MODEL=MCG-NJU/p-MoD-LLaVA-NeXT-7B",
    ),
    "package installed with its dependencies": (
        ["docker"],
        "Dockerfile",
        "pip install --no-cache-dir --no-deps .",
        "pip install --no-cache-dir .",
        "installs the package with --no-deps",
    ),
    "COPY source missing": (
        ["docker"],
        "Dockerfile",
        "COPY model_registry ./model_registry",
        "COPY model_registri ./model_registry",
        "COPY source model_registri exists in the repo",
    ),
    "pyproject entry point": (
        ["docker"],
        "pyproject.toml",
        'pmod = "pmod_serve.plugin:register"',
        'pmod = "pmod_serve.plugin:setup"',
        "pyproject entry point [vllm.general_plugins] pmod = pmod_serve.plugin:register",
    ),
    "pyproject console script": (
        ["docker"],
        "pyproject.toml",
        'pmod-serve = "pmod_serve.entrypoints.server:main"',
        'pmod-server = "pmod_serve.entrypoints.server:main"',
        "pyproject console script pmod-serve",
    ),
    "entrypoint default model": (
        ["entrypoint"],
        "deploy/docker-entrypoint.sh",
        'readonly DEFAULT_MODEL="MCG-NJU/p-MoD-LLaVA-NeXT-7B"',
        'readonly DEFAULT_MODEL="MCG-NJU/p-MoD-LLaVA-v1.5-7B"',
        "entrypoint default model == Dockerfile PMOD_MODEL == contract default",
    ),
    "entrypoint supported checkpoints": (
        ["entrypoint"],
        "deploy/docker-entrypoint.sh",
        ' "MCG-NJU/p-MoD-LLaVA-v1.5-7B")',
        ")",
        "entrypoint lists the supported checkpoints",
    ),
    "entrypoint drops extra args": (
        ["entrypoint"],
        "deploy/docker-entrypoint.sh",
        ENTRYPOINT_EXEC,
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
        ENTRYPOINT_EXEC,
        'exec pmod-serve "$model" --port "${PMOD_PORT}" --api-key "${VLLM_API_KEY:-}" "$@"',
        "not argv",
    ),
    "entrypoint ignores the key file": (
        ["entrypoint"],
        "deploy/docker-entrypoint.sh",
        'if [[ -n "${VLLM_API_KEY_FILE:-}" ]]; then',
        'if [[ -n "${VLLM_API_KEY_FILE_UNUSED:-}" ]]; then',
        "VLLM_API_KEY_FILE (the mounted Secret) is read into VLLM_API_KEY",
    ),
    "entrypoint reverts to plain vllm serve": (
        ["entrypoint"],
        "deploy/docker-entrypoint.sh",
        ENTRYPOINT_EXEC,
        'exec vllm serve "$model" --port "${PMOD_PORT}" "$@"',
        "execs `pmod-serve $PMOD_MODEL --port 8000`",
    ),
    "entrypoint puts the checkpoint after the flags": (
        ["entrypoint"],
        "deploy/docker-entrypoint.sh",
        ENTRYPOINT_EXEC,
        'exec pmod-serve --port "${PMOD_PORT}" "$model" "$@"',
        "execs `pmod-serve $PMOD_MODEL --port 8000`",
    ),
    "entrypoint port": (
        ["entrypoint"],
        "deploy/docker-entrypoint.sh",
        "readonly PMOD_PORT=8000",
        "readonly PMOD_PORT=8080",
        "entrypoint serves on port 8000",
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
        "vllm:num_request_waiting is exported by vLLM 0.26.0 or listed in metric_names.txt: neither",
    ),
    "dashboard PromQL syntax": (
        ["metrics"],
        "deploy/grafana/pmod-serve-dashboard.json",
        "sum(vllm:num_requests_waiting{",
        "sum(vllm:num_requests_waiting{{",
        "PromQL does not parse",
    ),
    "dashboard rate of a gauge": (
        ["metrics"],
        "deploy/grafana/pmod-serve-dashboard.json",
        'sum(vllm:num_requests_running{namespace=~\\"$namespace\\", model_name=~\\"$model_name\\"})',
        'sum(rate(vllm:num_requests_running{namespace=~\\"$namespace\\", model_name=~\\"$model_name\\"}[5m]))',
        "gauge vllm:num_requests_running not rate()d",
    ),
    "dashboard counter without rate": (
        ["metrics"],
        "deploy/grafana/pmod-serve-dashboard.json",
        'sum(rate(vllm:prompt_tokens_total{namespace=~\\"$namespace\\", model_name=~\\"$model_name\\"}[$__rate_interval]))',
        'sum(vllm:prompt_tokens_total{namespace=~\\"$namespace\\", model_name=~\\"$model_name\\"})',
        "counter vllm:prompt_tokens_total used through rate()/increase()",
    ),
    "dashboard quantile without le": (
        ["metrics"],
        "deploy/grafana/pmod-serve-dashboard.json",
        "histogram_quantile(0.5, sum by (le) (rate(vllm:inter_token_latency_seconds_bucket",
        "histogram_quantile(0.5, sum by (pod) (rate(vllm:inter_token_latency_seconds_bucket",
        "used in histogram_quantile(... by (le) ...)",
    ),
    "dashboard undefined variable": (
        ["metrics"],
        "deploy/grafana/pmod-serve-dashboard.json",
        'num_requests_waiting{namespace=~\\"$namespace\\"',
        'num_requests_waiting{namespace=~\\"$nspace\\"',
        "variable $nspace is defined",
    ),
    "dashboard without its datasource variable": (
        ["metrics"],
        "deploy/grafana/pmod-serve-dashboard.json",
        '"query": "prometheus"',
        '"query": "loki"',
        "dashboard has one Prometheus datasource variable",
    ),
    "dashboard panel with a fixed datasource": (
        ["metrics"],
        "deploy/grafana/pmod-serve-dashboard.json",
        '"uid": "${datasource}"',
        '"uid": "prometheus-main"',
        "uses the datasource variable",
    ),
    "dashboard query without a metric": (
        ["metrics"],
        "deploy/grafana/pmod-serve-dashboard.json",
        'avg(pmod_kv_cache_savings_ratio{namespace=~\\"$namespace\\"})',
        "vector(1)",
        "query references a metric",
    ),
    "dashboard drops a pmod metric": (
        ["metrics"],
        "deploy/grafana/pmod-serve-dashboard.json",
        "rate(pmod_visual_tokens_total{",
        "rate(pmod_kv_slots_saved_total{",
        "dashboard shows pmod metric pmod_visual_tokens_total",
    ),
    "dashboard drops a contract vLLM metric": (
        ["metrics"],
        "deploy/grafana/pmod-serve-dashboard.json",
        "sum(vllm:num_requests_running{",
        "sum(vllm:num_requests_waiting{",
        "dashboard shows vllm:num_requests_running",
    ),
    "duplicate in metric_names.txt": (
        ["metrics"],
        "deploy/metric_names.txt",
        "pmod_kv_blocks_in_use\n",
        "pmod_kv_blocks_in_use\npmod_kv_blocks_in_use\n",
        "metric_names.txt has no duplicates",
    ),
    "adapter rule without the pod resource": (
        ["metrics"],
        "deploy/prometheus-adapter/values.yaml",
        "pod: {resource: pod}",
        "pod: {resource: pods}",
        "maps labels namespace/pod to resources",
    ),
    "adapter metricsQuery without GroupBy": (
        ["metrics"],
        "deploy/prometheus-adapter/values.yaml",
        "by (<<.GroupBy>>)",
        "by (pod)",
        "metricsQuery uses <<.LabelMatchers>>, <<.GroupBy>>",
    ),
    "adapter name.matches not a regex": (
        ["metrics"],
        "deploy/prometheus-adapter/values.yaml",
        '"^vllm:(num_requests_running)$"',
        '"^vllm:(num_requests_running$"',
        "name.matches is not a regex",
    ),
    "adapter name.matches misses its series": (
        ["metrics"],
        "deploy/prometheus-adapter/values.yaml",
        '"^vllm:(num_requests_running)$"',
        '"^vllm:(num_running)$"',
        "name.matches matches its series vllm:num_requests_running",
    ),
    "two adapter rules expose one name": (
        ["metrics"],
        "deploy/prometheus-adapter/values.yaml",
        '"^vllm:(num_requests_running)$"\n        as: "vllm_${1}"',
        '"^vllm:(num_requests_running)$"\n        as: "vllm_num_requests_waiting"',
        "adapter metric vllm_num_requests_waiting produced by exactly one rule",
    ),
    "metric dropped from metric_names.txt": (
        ["metrics"],
        "deploy/metric_names.txt",
        "\npmod_visual_tokens_total\n",
        "\n",
        "metric_names.txt lists exactly the metrics pmod-serve exports",
    ),
    "metric listed that pmod-serve does not export": (
        ["metrics"],
        "deploy/metric_names.txt",
        "pmod_kv_blocks_in_use\n",
        "pmod_kv_blocks_in_use\npmod_kv_blocks_free\n",
        "listed, not exported: ['pmod_kv_blocks_free']",
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
        "vllm:gpu_cache_usage_perc is exported by vLLM 0.26.0 or listed in metric_names.txt: neither",
    ),
    "docs quote another base image": (
        ["docs"],
        "deploy/SIZING.md",
        "# Sizing pmod-serve",
        "# Sizing pmod-serve (image vllm/vllm-openai:v0.25.0 )",
        "base image v0.25.0",
    ),
    "docs quote another transformers": (
        ["docs"],
        "deploy/README.md",
        "then `transformers==5.16.0`",
        "then `transformers==5.17.0`",
        "deploy/README.md: transformers==5.17.0 == 5.16.0",
    ),
    "docs quote another vllm": (
        ["docs"],
        "README.md",
        "either pulls vllm==0.26.0",
        "either pulls vllm==0.25.0",
        "README.md: vllm==0.25.0 == 0.26.0",
    ),
    "overlay not documented": (
        ["docs"],
        "deploy/README.md",
        "overlays/tp2",
        "overlays/tp-2",
        "deploy/README.md documents overlay tp2",
    ),
    "sizing arithmetic": (
        ["docs"],
        "deploy/SIZING.md",
        "= 524288 B = 512 KiB",
        "= 262144 B = 256 KiB",
        "SIZING.md states the dense KV size per token",
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
        PP_MSG,
    ),
    "overlay does not render": (
        ["render"],
        "deploy/k8s/overlays/tp2/kustomization.yaml",
        "../../base",
        "../../nope",
        "kustomize build deploy/k8s/overlays/tp2 failed",
    ),
    "checkov finding in a base manifest": (
        ["policy"],
        "deploy/k8s/base/deployment.yaml",
        "readOnlyRootFilesystem: true",
        "readOnlyRootFilesystem: false",
        "checkov CKV_K8S_22 (Use read-only filesystem for containers where possible) failed for single-gpu",
    ),
}


@pytest.mark.parametrize("case", sorted(FILE_MUTATIONS))
def test_file_check_catches(case, repo_copy, tools, full_report):
    sections, rel, old, new, expected = FILE_MUTATIONS[case]
    _edit(repo_copy, rel, old, new)
    got = _new_failures(repo_copy, sections, tools, full_report)
    assert expected in got, f"expected a new failure containing {expected!r}, got:\n{got or '(none)'}"


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


def test_rules_on_vllm_facts_fail_when_vllm_changes(facts, tools):
    """The rules that compare the artefacts with vLLM itself (its default port, the metrics the
    dashboard and HPA are built on) fail if vLLM stopped providing them."""
    changed = dataclasses.replace(
        facts,
        default_port=8080,
        series={k: v for k, v in facts.series.items() if k != "vllm:num_requests_waiting"},
    )
    rep = _quiet()
    check.check_docker(ROOT, tools, changed, rep)
    check.check_metrics(ROOT, changed, rep)
    got = _failures(rep)
    assert "vLLM's default --port is 8000" in got and "vLLM 0.26.0 exports vllm:num_requests_waiting" in got, got


# ---------------------------------------------------------------------------------------------
# helpers with their own semantics
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "expr,metrics",
    [
        (
            'histogram_quantile(0.9, sum by (le) (rate(vllm:e2e_request_latency_seconds_bucket{model_name=~"$m"}[$__rate_interval])))',
            ["vllm:e2e_request_latency_seconds_bucket"],
        ),
        ('sum(rate(a_total[5m])) / sum(rate(b_count{x="y"}[5m])) > 0.5 or on(pod) c', ["a_total", "b_count", "c"]),
        ("avg by (pod) (pmod_kv_cache_savings_ratio)", ["pmod_kv_cache_savings_ratio"]),
        ("max_over_time(deriv(x[5m])[1h:1m] offset 1d) + -(y @ 100)", ["x", "y"]),
    ],
)
def test_promql_selectors(expr, metrics):
    assert [s.name for s in check.promql_selectors(expr)] == metrics


@pytest.mark.parametrize(
    "expr,ok",
    [
        ("histogram_quantile(0.9, sum by (le) (rate(h_bucket[5m])))", True),
        ("histogram_quantile(0.9, sum by (pod, le) (rate(h_bucket[5m])))", True),
        ("histogram_quantile(0.9, rate(h_bucket[5m]))", True),
        ("histogram_quantile(0.9, sum by (pod) (rate(h_bucket[5m])))", False),
        ("histogram_quantile(0.9, sum(rate(h_bucket[5m])))", False),
        ("histogram_quantile(0.9, sum without (le) (rate(h_bucket[5m])))", False),
        ("sum by (le) (rate(h_bucket[5m]))", False),
    ],
)
def test_quantile_by_le(expr, ok):
    (sel,) = check.promql_selectors(expr)
    assert check._quantile_by_le(sel) is ok


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
    assert argv == ["pmod-serve", "MCG-NJU/p-MoD-LLaVA-v1.5-7B", "--port", "8000", "--media-max-bytes", "1000000"]
