"""The Kubernetes objects: schemas, kustomize's own build, pod security, probes, selectors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from ibutsu_deploy_tests.cases import (
    FLOWER_PORT,
    METRICS_PORT,
    deployable_sets,
    role_containers,
    root,
    workloads,
)
from ibutsu_deploy_tests.manifests import (
    Doc,
    UnsupportedKustomization,
    build_with_kustomize,
    containers,
    kustomization_dirs,
    kustomize_command,
    object_id,
    pod_spec,
    render_kustomization,
    split_image,
    strategic_merge,
)
from ibutsu_deploy_tests.schemas import schema_problems
from ibutsu_server.settings import Role

SET_NAMES = sorted(deployable_sets())
KUSTOMIZATIONS = [folder.relative_to(root()) for folder in kustomization_dirs(root())]


def _by_id(documents: list[Doc]) -> dict[tuple[str, str, str], Doc]:
    return {object_id(doc): doc for doc in documents}


def test_there_is_an_overlay() -> None:
    assert len(KUSTOMIZATIONS) >= 2, KUSTOMIZATIONS


@pytest.mark.parametrize("name", SET_NAMES)
def test_every_object_validates(name: str) -> None:
    problems = [p for doc in deployable_sets()[name] for p in schema_problems(doc)]
    assert problems == []


def test_validation_catches_a_misspelt_field() -> None:
    documents = copy.deepcopy(deployable_sets()["kubernetes/base"])
    worker = _by_id(documents)[("Deployment", "", "ibutsu-worker")]
    probe = containers(worker)[0]["livenessProbe"]["httpGet"]
    probe["paht"] = probe.pop("path")
    monitor = _by_id(documents)[("ServiceMonitor", "", "ibutsu-tasks")]
    monitor["spec"]["endpoints"][0]["basicauth"] = monitor["spec"]["endpoints"][0].pop("basicAuth")
    unknown = {"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "x"}}
    assert schema_problems(worker)
    assert schema_problems(monitor)
    assert schema_problems(unknown)


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=str)
def test_kustomize_builds_what_the_tests_check(folder: Path) -> None:
    """kustomize's build equals render_kustomization's, so what the other tests validate is
    what `kubectl apply -k` sends."""
    command = kustomize_command()
    if command is None:
        pytest.fail("neither kustomize nor kubectl found on PATH: apt-get install -y kubectl")
    built = _by_id(build_with_kustomize(command, root() / folder))
    rendered = _by_id(render_kustomization(root() / folder))
    assert sorted(built) == sorted(rendered)
    for key, doc in rendered.items():
        assert built[key] == doc, key


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("commonLabels: {a: b}\nresources: []\n")
    with pytest.raises(UnsupportedKustomization, match="commonLabels"):
        render_kustomization(tmp_path)


def test_strategic_merge_orders_lists_as_kustomize() -> None:
    base = {"env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}], "x": {"y": 1}}
    patch = {"env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}], "x": {"z": 2}}
    assert strategic_merge(base, patch) == {
        "env": [
            {"name": "B", "value": "3"},
            {"name": "C", "value": "4"},
            {"name": "A", "value": "1"},
        ],
        "x": {"y": 1, "z": 2},
    }


def test_image_names_split_around_registry_ports() -> None:
    assert split_image("registry:5000/ibutsu/ibutsu-worker") == (
        "registry:5000/ibutsu/ibutsu-worker",
        None,
        None,
    )
    assert split_image("ibutsu-worker:1.0@sha256:ab") == ("ibutsu-worker", "1.0", "sha256:ab")


def test_base_holds_the_documented_objects() -> None:
    assert sorted(_by_id(deployable_sets()["kubernetes/base"])) == [
        ("Deployment", "", "ibutsu-scheduler"),
        ("Deployment", "", "ibutsu-worker"),
        ("PodDisruptionBudget", "", "ibutsu-scheduler"),
        ("PodDisruptionBudget", "", "ibutsu-worker"),
        ("PrometheusRule", "", "ibutsu-tasks"),
        ("Service", "", "ibutsu-flower"),
        ("Service", "", "ibutsu-scheduler-metrics"),
        ("Service", "", "ibutsu-worker-metrics"),
        ("ServiceAccount", "", "ibutsu-tasks"),
        ("ServiceMonitor", "", "ibutsu-tasks"),
    ]


def test_example_overlay_changes_what_it_says() -> None:
    documents = _by_id(deployable_sets()["kubernetes/overlays/example"])
    worker = documents[("Deployment", "ibutsu", "ibutsu-worker")]
    assert worker["spec"]["replicas"] == 3
    images = {
        c["name"]: c["image"] for w in workloads(list(documents.values())) for c in containers(w)
    }
    assert images == {
        "ibutsu-worker": "registry.example.com/ibutsu/ibutsu-worker:1.0.0",
        "ibutsu-scheduler": "registry.example.com/ibutsu/ibutsu-scheduler:1.0.0",
        "ibutsu-flower": "registry.example.com/ibutsu/ibutsu-flower:1.0.0",
    }


@pytest.mark.parametrize("name", SET_NAMES)
def test_pods_run_restricted(name: str) -> None:
    """Pod Security "restricted", plus a read-only root filesystem with /tmp an emptyDir, no
    API token, no service links, and the image's own command."""
    for workload in workloads(deployable_sets()[name]):
        spec = pod_spec(workload)
        where = f"{name} {workload['metadata']['name']}"
        pod_security = spec.get("securityContext", {})
        assert pod_security.get("runAsNonRoot") is True, where
        assert pod_security.get("runAsUser") != 0, where
        assert pod_security.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        assert spec.get("automountServiceAccountToken") is False, where
        assert spec.get("enableServiceLinks") is False, where
        assert spec.get("serviceAccountName") == "ibutsu-tasks", where
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), where
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in containers(workload):
            label = f"{where} {container['name']}"
            security = container.get("securityContext", {})
            assert security.get("allowPrivilegeEscalation") is False, label
            assert security.get("readOnlyRootFilesystem") is True, label
            assert security.get("capabilities", {}).get("drop") == ["ALL"], label
            assert not security.get("capabilities", {}).get("add"), label
            assert not security.get("privileged"), label
            assert "command" not in container and "args" not in container, label
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "emptyDir" in volumes[mounts["/tmp"]], label
            for kind in ("requests", "limits"):
                assert set(container.get("resources", {}).get(kind, {})) >= {"cpu", "memory"}, (
                    label,
                    kind,
                )


def _probe(container: Doc, kind: str) -> tuple[str, Any]:
    get = container[kind]["httpGet"]
    return get["path"], get["port"]


@pytest.mark.parametrize("name", SET_NAMES)
def test_probes_and_ports(name: str) -> None:
    roles = role_containers(deployable_sets()[name])
    assert set(roles) == set(Role)
    for role in (Role.WORKER, Role.SCHEDULER):
        container = roles[role][1]
        assert container["ports"] == [
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}
        ]
        assert _probe(container, "livenessProbe") == ("/healthz", "metrics")
        assert _probe(container, "startupProbe") == ("/healthz", "metrics")
        assert _probe(container, "readinessProbe") == ("/readyz", "metrics")
    flower = roles[Role.FLOWER][1]
    assert flower["ports"] == [{"name": "flower", "containerPort": FLOWER_PORT, "protocol": "TCP"}]
    assert _probe(flower, "livenessProbe") == ("/healthcheck", "flower")
    assert _probe(flower, "readinessProbe") == ("/healthcheck", "flower")
    # Flower sits in the scheduler's pod, as the architecture document deploys them.
    assert roles[Role.FLOWER][0] is roles[Role.SCHEDULER][0]


@pytest.mark.parametrize("name", SET_NAMES)
def test_replicas(name: str) -> None:
    roles = role_containers(deployable_sets()[name])
    # RedBeat: a standby takes the lease within about 25 s when the leader goes.
    assert roles[Role.SCHEDULER][0]["spec"]["replicas"] == 2
    assert roles[Role.WORKER][0]["spec"]["replicas"] >= 1


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("name", SET_NAMES)
def test_services_pdbs_and_monitor_select_the_pods(name: str) -> None:
    documents = deployable_sets()[name]
    pods = [
        (w["spec"]["template"]["metadata"]["labels"], containers(w)) for w in workloads(documents)
    ]
    services = [doc for doc in documents if doc["kind"] == "Service"]
    for service in services:
        selected = [cs for labels, cs in pods if _matches(service["spec"]["selector"], labels)]
        assert selected, service["metadata"]["name"]
        port_names = {p["name"] for cs in selected for c in cs for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, (service["metadata"]["name"], port)
    for budget in (doc for doc in documents if doc["kind"] == "PodDisruptionBudget"):
        selector = budget["spec"]["selector"]["matchLabels"]
        assert sum(_matches(selector, labels) for labels, _ in pods) == 1, budget
        assert budget["spec"] == {"maxUnavailable": 1, "selector": budget["spec"]["selector"]}

    (monitor,) = (doc for doc in documents if doc["kind"] == "ServiceMonitor")
    scraped = [
        s
        for s in services
        if _matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert sorted(s["metadata"]["name"] for s in scraped) == [
        "ibutsu-scheduler-metrics",
        "ibutsu-worker-metrics",
    ]
    # One job for both roles, "celery": celery-exporter's dashboards pick a single job (from
    # celery_worker_up, the scheduler's) and read the workers' series under it; its rules
    # select job=~".*celery.*", its older dashboard job=~"celery|celery-exporter".
    jobs = {s["metadata"]["labels"].get(monitor["spec"]["jobLabel"]) for s in scraped}
    assert jobs == {"celery"}
    for service in scraped:
        # Every pod scraped, ready or not (a worker waiting out a broker outage included).
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["publishNotReadyAddresses"] is True
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    assert endpoint["basicAuth"] == {
        "username": {"name": "ibutsu-metrics-auth", "key": "username"},
        "password": {"name": "ibutsu-metrics-auth", "key": "password"},
    }
