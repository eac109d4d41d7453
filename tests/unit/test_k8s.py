"""Kubernetes manifests (deploy/k8s): every card overlay, the load generator and the optional
components render with Kustomize, every object validates offline against the Kubernetes
schemas of a pinned version (kubernetes-validate; CRDs against structural schemas of their
own), and the rendered objects agree with the server and with docker-compose.yml: the same
tuned settings per card (one file, deploy/k8s/overlays/<card>/server.env), gRPC probes on the
server's port, a grace period above the server's drain, GPUs only where a card has one, and
autoscaling on a metric the server exposes.

Rendering needs `kubectl kustomize` (or a `kustomize` binary); without one the rendering
tests are skipped with the reason, as tests/unit/test_deploy.py does for Compose.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from loadgen.cli import build_parser
from server.cli import ENV_PREFIX, parse_settings
from server.config import Settings
from tests.unit.test_deploy import (
    GPU_PROFILES,
    TUNED,
    exposed_metric_names,
    render,
    require_compose,
    server_env,
)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
CARDS = (*GPU_PROFILES, "cpu")
# The oldest Kubernetes the manifests are for: native gRPC probes (GA 1.27) and the preStop
# `sleep` action (beta, on by default, from 1.30) are in it.
K8S_VERSION = "1.32"
SPEECH_SERVICE = "asr.v1.Speech"
GPU = "nvidia.com/gpu"

Objects = list[dict[str, Any]]

# Structural checks of the custom resources (kubernetes-validate has only built-in kinds):
# the fields their controllers need, with the right types.
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "keda.sh/v1alpha1/ScaledObject": {
        "type": "object",
        "required": ["metadata", "spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {"name": {"type": "string"}, "kind": {"type": "string"}},
                    },
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "pollingInterval": {"type": "integer"},
                    "cooldownPeriod": {"type": "integer"},
                    "advanced": {"type": "object"},
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["type", "metadata"],
                            "properties": {
                                "type": {"type": "string"},
                                "metadata": {
                                    "type": "object",
                                    "additionalProperties": {"type": "string"},
                                },
                            },
                        },
                    },
                },
                "additionalProperties": False,
            }
        },
    },
    "monitoring.coreos.com/v1/ServiceMonitor": {
        "type": "object",
        "required": ["metadata", "spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "properties": {
                    "selector": {
                        "type": "object",
                        "properties": {"matchLabels": {"type": "object"}},
                    },
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port"],
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "interval": {"type": "string", "pattern": r"^\d+[smh]$"},
                            },
                        },
                    },
                },
                "additionalProperties": False,
            }
        },
    },
}


# ----- rendering -------------------------------------------------------------------------------


@cache
def kustomize_command() -> tuple[str, ...] | None:
    if shutil.which("kubectl"):
        done = subprocess.run(["kubectl", "kustomize", "--help"], capture_output=True, timeout=60)
        if done.returncode == 0:
            return ("kubectl", "kustomize")
    if found := shutil.which("kustomize"):
        return (found, "build")
    return None


@cache
def build(path: Path) -> tuple[dict[str, Any], ...]:
    command = kustomize_command()
    if command is None:
        pytest.skip(
            "no Kustomize (kubectl kustomize, kustomize build): install kubectl to render "
            "deploy/k8s"
        )
    done = subprocess.run([*command, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kustomize {path}: {done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def overlay(card: str) -> Objects:
    return list(build(K8S / "overlays" / card))


def one(objects: Objects, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"{kind} {name}: {len(found)} objects"
    return found[0]


def server_container(objects: Objects) -> dict[str, Any]:
    pod = one(objects, "Deployment", "whisper-grpc")["spec"]["template"]["spec"]
    [container] = [c for c in pod["containers"] if c["name"] == "server"]
    return container


def container_env(objects: Objects, container: dict[str, Any]) -> dict[str, str]:
    """The environment the container gets: its envFrom ConfigMaps in order (a later one wins
    on a shared key), then its env."""
    maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def settings_of(objects: Objects) -> Settings:
    env = container_env(objects, server_container(objects))
    return parse_settings([], {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)})


def read_env_file(path: Path) -> dict[str, str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def user_kustomization(tmp: Path, card: str, namespace: str, components: list[str]) -> Objects:
    """What README's runbook has a platform engineer write: a kustomization over a card
    overlay, with its namespace, the optional components and the KEDA namespace replacement."""
    rel = os.path.relpath(K8S, tmp)
    text = f"""
namespace: {namespace}
resources: [{rel}/overlays/{card}]
components: [{", ".join(f"{rel}/components/{c}" for c in components)}]
replacements:
  - source: {{kind: Deployment, name: whisper-grpc, fieldPath: metadata.namespace}}
    targets:
      - select: {{kind: ScaledObject, name: whisper-grpc}}
        fieldPaths: [spec.triggers.0.metadata.query]
        options: {{delimiter: '"', index: 1}}
"""
    (tmp / "kustomization.yaml").write_text(text)
    return list(build(tmp))


@pytest.fixture(scope="module")
def everything(tmp_path_factory: pytest.TempPathFactory) -> Objects:
    """Every object any documented kustomization renders."""
    objects = [o for card in CARDS for o in overlay(card)]
    objects += build(K8S / "loadgen")
    tmp = tmp_path_factory.mktemp("user")
    objects += user_kustomization(tmp, "a100", "asr-a100", ["keda", "monitoring", "envoy"])
    return objects


# ----- schemas -------------------------------------------------------------------------------


def validate(obj: dict[str, Any]) -> None:
    crd = CRD_SCHEMAS.get(f"{obj['apiVersion']}/{obj['kind']}")
    if crd is not None:
        jsonschema.validate(obj, crd)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_every_rendered_object_is_valid_for_the_pinned_kubernetes(everything: Objects) -> None:
    kinds = set()
    for obj in everything:
        try:
            validate(obj)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as err:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {err.message}")
        kinds.add(obj["kind"])
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds
    assert {"ScaledObject", "ServiceMonitor", "PersistentVolumeClaim"} <= kinds


def test_validation_rejects_what_kubernetes_would() -> None:
    # The checks above must be able to fail: an unknown field, a wrong type, a bad CRD.
    deployment = one(overlay("t4"), "Deployment")
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(typo)
    wrong = json.loads(json.dumps(deployment))
    wrong["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(wrong)
    scaled = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {}}
    scaled["spec"] = {"scaleTargetRef": {"name": "x"}, "triggers": [{"type": "prometheus"}]}
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)


# ----- the server per card ---------------------------------------------------------------------


@pytest.mark.parametrize("card", CARDS)
def test_overlay_carries_the_tuned_settings_of_its_card(card: str) -> None:
    objects = overlay(card)
    settings = settings_of(objects)
    dtype, batch, wait_ms, queue = TUNED[card]
    assert (settings.dtype, settings.max_batch_size, settings.max_wait_ms) == (
        dtype,
        batch,
        wait_ms,
    )
    assert settings.max_queue_size == queue
    assert settings.device == ("cpu" if card == "cpu" else "cuda")
    assert settings.model == ("tiny.en" if card == "cpu" else "base")
    # Exactly the card's file, which docker-compose.yml reads too.
    card_map = one(
        objects, "ConfigMap", server_container(objects)["envFrom"][-1]["configMapRef"]["name"]
    )
    assert card_map["data"] == read_env_file(K8S / "overlays" / card / "server.env")
    known = {f"{ENV_PREFIX}{f.name.upper()}" for f in dataclasses.fields(Settings)}
    env = container_env(objects, server_container(objects))
    assert set(env) <= known, f"unknown settings {set(env) - known}"
    # Clients rebalance over new replicas: connections have an age.
    assert settings.max_connection_age_s > 0
    assert settings.max_connection_age_grace_s >= settings.max_stream_s


@pytest.fixture(scope="module")
def compose_services() -> dict[str, dict[str, Any]]:
    require_compose()
    return render()


@pytest.mark.parametrize("card", CARDS)
def test_overlay_environment_equals_compose_for_the_same_card(
    compose_services: dict[str, dict[str, Any]], card: str
) -> None:
    compose_env = server_env(compose_services[f"server-{card}"])
    k8s_env = container_env(overlay(card), server_container(overlay(card)))
    # Compose passes the TLS and token files through from .env, empty when unset (a cluster
    # mounts Secrets instead): an empty value is no setting.
    tuned = {k: v for k, v in compose_env.items() if v != ""}
    assert k8s_env == {**tuned, **_k8s_only(k8s_env)}
    assert parse_settings([], compose_env) == settings_of(overlay(card)).replace(
        max_connection_age_s=0.0, max_connection_age_grace_s=3600.0
    )


def _k8s_only(env: dict[str, str]) -> dict[str, str]:
    """Settings only a cluster needs: one host has no connection balancer to spread over."""
    return {k: v for k, v in env.items() if k.startswith(f"{ENV_PREFIX}MAX_CONNECTION_AGE")}


@pytest.mark.parametrize("card", GPU_PROFILES)
def test_gpu_overlay_takes_one_gpu_tolerates_its_taint_and_picks_the_card(card: str) -> None:
    objects = overlay(card)
    container = server_container(objects)
    assert container["resources"]["limits"][GPU] == 1
    assert GPU not in container["resources"].get("requests", {})
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    expressions = {
        e["key"]: e["values"] for t in terms["nodeSelectorTerms"] for e in t["matchExpressions"]
    }
    products = expressions["nvidia.com/gpu.product"]  # GPU Feature Discovery's label
    assert products and all(card.upper() in p.upper() for p in products)
    assert expressions["karpenter.k8s.aws/instance-gpu-name"] == [card]
    assert container["image"].split(":")[0] == compose_image("x-gpu-image")


def test_cpu_overlay_takes_no_gpu_and_runs_the_cpu_image() -> None:
    objects = overlay("cpu")
    container = server_container(objects)
    assert GPU not in json.dumps(objects)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert "tolerations" not in pod and "affinity" not in pod
    assert container["image"].split(":")[0] == compose_image("x-cpu-image")


def compose_image(anchor: str) -> str:
    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return str(raw[anchor]["image"]).split(":")[0]


@pytest.mark.parametrize("card", CARDS)
def test_probes_ports_and_grace_agree_with_the_server(card: str) -> None:
    objects = overlay(card)
    settings = settings_of(objects)
    container = server_container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings.port, "metrics": settings.metrics_port}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        assert probe["grpc"] == {"port": settings.port, "service": SPEECH_SERVICE}, kind
    # Model load and warm-up may take minutes: the startup probe allows 15.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    # A draining pod reports NOT_SERVING for up to grace_s: liveness must not kill it.
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > settings.grace_s
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + settings.grace_s
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", "/opt/whisper-grpc/hf"} <= mounts  # HF_HOME of the images


@pytest.mark.parametrize("card", CARDS)
def test_services_and_budget_select_the_server_pods(card: str) -> None:
    objects = overlay(card)
    deployment = one(objects, "Deployment", "whisper-grpc")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container_ports = {p["name"] for p in server_container(objects)["ports"]}
    balanced, headless = (
        one(objects, "Service", "whisper-grpc"),
        one(objects, "Service", "whisper-grpc-headless"),
    )
    assert headless["spec"]["clusterIP"] == "None"
    assert "clusterIP" not in balanced["spec"]
    for service in (balanced, headless):
        assert service["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    budget = one(objects, "PodDisruptionBudget")
    assert (
        budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    )


# ----- autoscaling -----------------------------------------------------------------------------


@pytest.mark.parametrize("card", CARDS)
def test_hpa_scales_on_queued_work_of_one_full_batch_per_replica(card: str) -> None:
    objects = overlay(card)
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "whisper-grpc",
    }
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] in exposed_metric_names()
    target = metric["pods"]["target"]
    assert target["type"] == "AverageValue"
    assert int(target["averageValue"]) == settings_of(objects).max_batch_size
    assert hpa["spec"]["minReplicas"] >= 1
    # Scale-in lets a pod drain: one at a time, after a calm spell.
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_prometheus_adapter_serves_the_metric_the_hpa_reads() -> None:
    values = yaml.safe_load((K8S / "autoscaling" / "prometheus-adapter-values.yaml").read_text())
    [rule] = values["rules"]["custom"]
    hpa = one(list(build(K8S / "base")), "HorizontalPodAutoscaler")
    wanted = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert rule["name"]["as"] == wanted
    [series] = re.findall(r"^(\w+)\{", rule["seriesQuery"])
    assert series in exposed_metric_names() and re.fullmatch(rule["name"]["matches"], series)
    # Per pod, in its namespace: what a Pods metric is looked up by.
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]


def test_keda_replaces_the_hpa_with_a_query_of_this_namespace(tmp_path: Path) -> None:
    objects = user_kustomization(tmp_path, "t4", "asr-t4", ["keda"])
    assert not [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    scaled = one(objects, "ScaledObject")
    assert (
        scaled["spec"]["scaleTargetRef"]["name"] == one(objects, "Deployment")["metadata"]["name"]
    )
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    assert 'namespace="asr-t4"' in query
    assert set(re.findall(r"\basr_\w+", query)) <= exposed_metric_names()
    assert int(trigger["metadata"]["threshold"]) == TUNED["t4"][1]
    assert {o["metadata"].get("namespace") for o in objects} == {"asr-t4"}


def test_monitoring_scrapes_the_metrics_port_and_ships_the_dashboard(tmp_path: Path) -> None:
    objects = user_kustomization(tmp_path, "l4", "asr-l4", ["monitoring"])
    monitor = one(objects, "ServiceMonitor")
    selected = [
        s
        for s in objects
        if s["kind"] == "Service"
        and monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    ports = {p["name"] for s in selected for p in s["spec"]["ports"]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert "metrics" in ports
    dashboard = one(objects, "ConfigMap", "whisper-grpc-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = (ROOT / "deploy" / "grafana" / "dashboards" / "whisper-grpc.json").read_text()
    assert dashboard["data"]["whisper-grpc.json"] == shipped


# ----- Envoy -----------------------------------------------------------------------------------


def test_envoy_in_the_cluster_balances_calls_over_the_headless_service(tmp_path: Path) -> None:
    objects = user_kustomization(tmp_path, "a100", "asr-a100", ["envoy"])
    config_map = one(objects, "ConfigMap", _envoy_config_name(objects))
    config = yaml.safe_load(config_map["data"]["envoy.yaml"])
    compose = yaml.safe_load((ROOT / "deploy" / "envoy" / "envoy.yaml").read_text())
    endpoint = config["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]
    address = endpoint["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    headless = one(objects, "Service", "whisper-grpc-headless")
    assert address == {"address": "whisper-grpc-headless", "port_value": 50051}
    assert headless["spec"]["ports"][0]["port"] == address["port_value"]
    # Everything but the endpoints is docker-compose.yml's Envoy.
    compose_endpoint = compose["static_resources"]["clusters"][0]["load_assignment"]
    compose_endpoint["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
        "address"
    ] = "whisper-grpc-headless"
    assert config == compose
    envoy = one(objects, "Deployment", "whisper-grpc-envoy")
    [container] = envoy["spec"]["template"]["spec"]["containers"]
    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert container["image"] == raw["services"]["envoy"]["image"]
    [volume] = [v for v in envoy["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    service = one(objects, "Service", "whisper-grpc-envoy")
    labels = envoy["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    # The server Services must not pick Envoy's pods up.
    server_selector = one(objects, "Service", "whisper-grpc")["spec"]["selector"]
    assert not server_selector.items() <= labels.items()


def _envoy_config_name(objects: Objects) -> str:
    [name] = [
        o["metadata"]["name"]
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("whisper-grpc-envoy")
    ]
    return name


# ----- the load generator ----------------------------------------------------------------------


def shell_args(container: dict[str, Any], env: dict[str, str]) -> list[str]:
    """The `python -m loadgen ...` words of a `sh -c` command, with $VARS filled in."""
    assert container["command"][:2] == ["sh", "-c"]
    script = container["command"][2]
    first = script.split(";")[0]
    filled = re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], first)
    words = shlex.split(filled)
    words = words[1:] if words[0] == "exec" else words
    assert words[:3] == ["python", "-m", "loadgen"], words
    return words[3:]


def test_in_cluster_load_generator_is_a_master_and_its_workers() -> None:
    objects = list(build(K8S / "loadgen"))
    master_dep = one(objects, "Deployment", "loadgen-master")
    worker_dep = one(objects, "Deployment", "loadgen-worker")
    [master] = master_dep["spec"]["template"]["spec"]["containers"]
    [worker] = worker_dep["spec"]["template"]["spec"]["containers"]
    parser = build_parser()
    m_args = parser.parse_args(shell_args(master, container_env(objects, master)))
    w_args = parser.parse_args(shell_args(worker, container_env(objects, worker)))
    assert m_args.master and w_args.worker
    assert m_args.expect_workers == worker_dep["spec"]["replicas"]
    assert m_args.dataset == w_args.dataset  # the master checks they agree
    assert m_args.label and str(m_args.out) == f"/runs/{m_args.label}"
    # The target is the server's Service of the card overlays, in the same namespace.
    host, port = m_args.target.split(":")
    served = one(overlay("t4"), "Service", host)
    assert int(port) in {p["port"] for p in served["spec"]["ports"]}
    # Workers reach the master through its Service, on the port it binds.
    service = one(objects, "Service", w_args.master_host)
    assert [p["port"] for p in service["spec"]["ports"]] == [m_args.master_bind_port]
    assert w_args.master_port == m_args.master_bind_port
    assert service["spec"]["publishNotReadyAddresses"] is True  # Ready only when done
    assert (
        service["spec"]["selector"].items()
        <= master_dep["spec"]["template"]["metadata"]["labels"].items()
    )
    # The data set each pod fetched into its volume is the one the run reads.
    for deployment, args in ((master_dep, m_args), (worker_dep, w_args)):
        [fetch] = deployment["spec"]["template"]["spec"]["initContainers"]
        fetch_args = parser.parse_args(shell_args(fetch, container_env(objects, fetch)))
        assert args.dataset == f"librispeech:{fetch_args.splits[0]}"
        cache = container_env(objects, fetch)["WHISPER_GRPC_LOADGEN_CACHE_DIR"]
        mounted = {m["mountPath"] for m in fetch["volumeMounts"]}
        assert cache in mounted
    # Results land on the claim that `kubectl cp` copies from.
    runs = {m["name"]: m["mountPath"] for m in master["volumeMounts"]}["runs"]
    assert str(m_args.out).startswith(runs)
    claim = one(objects, "PersistentVolumeClaim")
    volumes = master_dep["spec"]["template"]["spec"]["volumes"]
    [runs_volume] = [v for v in volumes if v["name"] == "runs"]
    assert runs_volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_every_container_runs_as_non_root_on_a_read_only_root(everything: Objects) -> None:
    for obj in everything:
        if obj["kind"] != "Deployment":
            continue
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"], obj["metadata"]["name"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            security = container["securityContext"]
            name = f"{obj['metadata']['name']}/{container['name']}"
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
