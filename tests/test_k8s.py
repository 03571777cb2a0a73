"""deploy/k8s/: the Kubernetes manifests, parsed and cross-checked without a cluster.

Labels and selectors agree, ports and probes name the port the server listens on, pods run as
the image's non-root user with resources set, the headless Service selects the servers, the
container arguments are a real `featmap serve` command line and the ConfigMap holds only
settings the server knows.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml

from featmap.jobs.cli import build_parser
from featmap.service.server import FeatmapServer
from featmap.service.settings import ServerSettings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
GRPC_PORT = 50051
IMAGE_UID = 10001  # the Dockerfile's `featmap` user
HEADLESS = "featmap-headless"
SETTINGS_CONFIG = "featmap-config"
PIPELINES_CONFIG = "featmap-pipelines"
STORE_CLAIM = "featmap-pipeline-store"
EXAMPLE_PIPELINES = ROOT / "examples" / "pipelines"


def documents() -> list[dict[str, Any]]:
    """Every document of every manifest file."""
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                assert isinstance(document, dict), path
                found.append(document)
    return found


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    return documents()


def of_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    """The featmap container of a Deployment."""
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, deployment["metadata"]["name"]
    return dict(containers[0])


def serve_args(deployment: dict[str, Any]) -> argparse.Namespace:
    """The container's arguments as `featmap` parses them (the image's ENTRYPOINT)."""
    spec = container(deployment)
    assert "command" not in spec, "keep the image's ENTRYPOINT: featmap"
    try:
        return build_parser().parse_args(spec["args"])
    except SystemExit:
        pytest.fail(f"`featmap {' '.join(spec['args'])}` does not parse")


def named(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The one manifest of `kind` called `name`."""
    [found] = [m for m in of_kind(manifests, kind) if m["metadata"]["name"] == name]
    return found


def deployments(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = of_kind(manifests, "Deployment")
    assert found, "no Deployment in deploy/k8s"
    return found


def test_kinds_and_names(manifests: list[dict[str, Any]]) -> None:
    kinds = sorted((m["kind"], m["metadata"]["name"]) for m in manifests)
    assert kinds == [
        ("ConfigMap", "featmap-config"),
        ("ConfigMap", PIPELINES_CONFIG),
        ("Deployment", "featmap"),
        ("Deployment", "featmap-gpu"),
        ("PersistentVolumeClaim", STORE_CLAIM),
        ("Service", HEADLESS),
    ]
    for manifest in manifests:
        assert "namespace" not in manifest["metadata"], "the namespace comes from kubectl -n"


def test_selectors_match_pod_labels(manifests: list[dict[str, Any]]) -> None:
    [service] = of_kind(manifests, "Service")
    for deployment in deployments(manifests):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), deployment["metadata"]["name"]
        assert service["spec"]["selector"].items() <= labels.items(), "the Service selects it"
    variants = [d["spec"]["selector"]["matchLabels"] for d in deployments(manifests)]
    assert len({tuple(sorted(v.items())) for v in variants}) == len(variants), (
        "two Deployments must not claim each other's pods"
    )


def test_headless_service_for_client_side_balancing(manifests: list[dict[str, Any]]) -> None:
    [service] = of_kind(manifests, "Service")
    assert service["metadata"]["name"] == HEADLESS
    assert service["spec"]["clusterIP"] == "None"
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == GRPC_PORT
    for deployment in deployments(manifests):
        declared = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
        for port in ports.values():
            # a named targetPort must be a port the container declares, with the same number
            assert port["targetPort"] in declared, port
            assert declared[port["targetPort"]] == port["port"], port


def test_container_serves_featmap_on_the_declared_port(manifests: list[dict[str, Any]]) -> None:
    config = named(manifests, "ConfigMap", SETTINGS_CONFIG)
    for deployment in deployments(manifests):
        args = serve_args(deployment)
        assert args.command == "serve"
        assert (args.host, args.port) == ("0.0.0.0", GRPC_PORT)
        spec = container(deployment)
        ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
        assert ports["grpc"] == GRPC_PORT
        metrics_port = args.metrics_port or config["data"].get("FEATMAP_METRICS_PORT")
        assert ports["metrics"] == int(metrics_port)
        assert [ref["configMapRef"]["name"] for ref in spec["envFrom"]] == [SETTINGS_CONFIG]


def test_probes_are_native_grpc_on_the_container_port(manifests: list[dict[str, Any]]) -> None:
    for deployment in deployments(manifests):
        spec = container(deployment)
        assert {"readinessProbe", "livenessProbe"} <= spec.keys()
        for name in ("startupProbe", "readinessProbe", "livenessProbe"):
            if name in spec:
                probe = spec[name]
                assert probe["grpc"]["port"] == GRPC_PORT, name
                assert probe["grpc"].get("service", "") == "", "the whole server's health"
                assert not {"httpGet", "tcpSocket", "exec"} & probe.keys(), name


def test_pods_run_as_the_image_user_not_root(manifests: list[dict[str, Any]]) -> None:
    for deployment in deployments(manifests):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == IMAGE_UID
        spec = container(deployment)["securityContext"]
        assert spec["allowPrivilegeEscalation"] is False
        assert spec["capabilities"]["drop"] == ["ALL"]
        # The server drains for FEATMAP_SHUTDOWN_GRACE_S after SIGTERM; the pod waits longer.
        assert pod["terminationGracePeriodSeconds"] > 10


def test_resources_are_requested_and_limited(manifests: list[dict[str, Any]]) -> None:
    for deployment in deployments(manifests):
        resources = container(deployment)["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys()
        assert {"cpu", "memory"} <= resources["limits"].keys()


def test_gpu_variant(manifests: list[dict[str, Any]]) -> None:
    [gpu] = [d for d in deployments(manifests) if d["metadata"]["name"] == "featmap-gpu"]
    spec = container(gpu)
    assert spec["image"].endswith(":cuda"), "the Dockerfile's cuda target"
    assert spec["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["spec"]["template"]["spec"]["nodeSelector"]
    env = {e["name"]: e["value"] for e in spec["env"]}
    providers = ServerSettings.model_validate_json(
        f'{{"providers": {env["FEATMAP_PROVIDERS"]}}}'
    ).providers
    assert providers == ["CUDAExecutionProvider"]
    [cpu] = [d for d in deployments(manifests) if d["metadata"]["name"] == "featmap"]
    assert "nvidia.com/gpu" not in container(cpu)["resources"]["limits"]


def test_configmap_holds_server_settings(
    manifests: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = named(manifests, "ConfigMap", SETTINGS_CONFIG)["data"]
    assert all(isinstance(value, str) for value in data.values()), "ConfigMap values are strings"
    for key in data:
        assert key.startswith("FEATMAP_"), key
        assert key.removeprefix("FEATMAP_").lower() in ServerSettings.model_fields, key
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    settings = ServerSettings()  # the values parse as the server will parse them
    assert settings.log_format == "json"
    [cpu] = [d for d in deployments(manifests) if d["metadata"]["name"] == "featmap"]
    # onnxruntime would otherwise start one thread per core of the node, not of the pod
    assert settings.intra_op_threads == int(container(cpu)["resources"]["limits"]["cpu"])


def test_every_replica_mounts_the_spec_files_and_the_shared_store(
    manifests: list[dict[str, Any]],
) -> None:
    claim = named(manifests, "PersistentVolumeClaim", STORE_CLAIM)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "every pod mounts it at once"
    for deployment in deployments(manifests):
        args = serve_args(deployment)
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in container(deployment)["volumeMounts"]}
        specs = mounts[args.pipelines]
        assert specs.get("readOnly") is True
        assert volumes[specs["name"]]["configMap"]["name"] == PIPELINES_CONFIG
        store = mounts[args.pipeline_store]
        assert not store.get("readOnly")
        assert volumes[store["name"]]["persistentVolumeClaim"]["claimName"] == STORE_CLAIM
        # The image's user writes the claim's files through the group the volume is given.
        assert pod["securityContext"]["fsGroup"] == IMAGE_UID
        # Registering the folder happens before the port opens: a startup probe covers it.
        assert "startupProbe" in container(deployment)


def test_the_spec_configmap_is_the_example_folder_and_registers(
    manifests: list[dict[str, Any]], tmp_path: Path
) -> None:
    data = named(manifests, "ConfigMap", PIPELINES_CONFIG)["data"]
    examples = {p.name: p.read_text() for p in sorted(EXAMPLE_PIPELINES.iterdir())}
    assert data == examples, "deploy/k8s/configmap.yaml holds examples/pipelines' files"
    for key, text in data.items():
        (tmp_path / key).write_text(text)
    settings = ServerSettings(host="127.0.0.1", port=0, intra_op_threads=1, grpc_workers=2,
                              pipelines_dir=tmp_path)  # fmt: skip
    with FeatmapServer(settings) as server:
        registry = server.service.registry
        assert sorted(n for r in registry.list()[0] for n in registry.names(r.pipeline_id)) == [
            Path(key).stem for key in sorted(data)
        ]
