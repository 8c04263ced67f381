"""The OpenShift template: its shape, its parameters, and the same pods as the kustomize base."""

from __future__ import annotations

import re

import pytest

from ibutsu_deploy_tests.cases import TEMPLATE_VALUES, deployable_sets, role_containers, root
from ibutsu_deploy_tests.manifests import (
    OPENSHIFT_TEMPLATE,
    Doc,
    load_documents,
    pod_spec,
    process_template,
    strings,
)
from ibutsu_deploy_tests.schemas import schema_problems
from ibutsu_server.settings import SENTINEL_VARS, TLS_VARS

#: Parameters upstream's ocp-templates (mpp/) use, which ours keeps with the same meaning.
UPSTREAM_PARAMETERS = {"APP_NAME", "NAMESPACE", "FLOWER_ROUTE"}


def _template() -> Doc:
    (template,) = load_documents(root() / OPENSHIFT_TEMPLATE)
    return template


def test_template_shape() -> None:
    assert schema_problems(_template()) == []


def test_parameters_are_upstreams_and_all_used() -> None:
    template = _template()
    names = {p["name"] for p in template["parameters"]}
    assert names >= UPSTREAM_PARAMETERS
    text = (root() / OPENSHIFT_TEMPLATE).read_text(encoding="utf-8")
    used = set(re.findall(r"\$\{\{?([A-Za-z_][A-Za-z0-9_]*)\}?\}", text))
    assert used == names


def test_required_parameters_are_enforced() -> None:
    with pytest.raises(ValueError, match="IMAGE_REGISTRY is required"):
        process_template(_template(), {})
    with pytest.raises(ValueError, match="no parameter"):
        process_template(_template(), {**TEMPLATE_VALUES, "REDIS_PASSWORD": "x"})


def test_parameters_reach_the_objects() -> None:
    objects = process_template(
        _template(),
        {**TEMPLATE_VALUES, "NAMESPACE": "acme", "WORKER_REPLICAS": "4", "IMAGE_TAG": "2.1"},
    )
    assert {obj["metadata"]["namespace"] for obj in objects} == {"acme"}
    deployments = {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == "Deployment"}
    assert deployments["ibutsu-worker"]["spec"]["replicas"] == 4
    images = {c["image"] for _, c in role_containers(objects).values()}
    assert images == {
        f"registry.example.com/ibutsu/ibutsu-{role}:2.1"
        for role in ("worker", "scheduler", "flower")
    }
    assert not [text for _, text in strings(objects) if "${" in text]


def test_no_fixed_uid() -> None:
    """OpenShift's restricted SCC gives each namespace its own UID range: a fixed runAsUser or
    runAsGroup would be refused (or need a privileged SCC)."""
    for _, text in strings(_template()):
        assert text not in {"runAsUser", "runAsGroup", "fsGroup"}


#: What the template may set differently from the kustomize base, per container: the image
#: and the hosts (upstream's postgresql.NAMESPACE.svc form), and the resources it parameterises.
_FREE_FIELDS = {"image", "resources"}
#: What the template has for its Redis parameters (Sentinel, TLS), which the kustomize base
#: leaves to its overlays: the variables, and Secret redis-tls mounted if it exists.
_REDIS_OPTIONS = (*SENTINEL_VARS, *TLS_VARS)
_REDIS_TLS_VOLUME = "redis-tls"


def _comparable(container: Doc) -> Doc:
    kept = {k: v for k, v in container.items() if k not in _FREE_FIELDS}
    kept["env"] = [
        {k: v for k, v in variable.items() if k != "value"}
        for variable in container["env"]
        if variable["name"] not in _REDIS_OPTIONS
    ]
    kept["volumeMounts"] = [
        m for m in container.get("volumeMounts", []) if m["name"] != _REDIS_TLS_VOLUME
    ]
    return kept


def _without_redis_tls(pod: Doc) -> Doc:
    kept = {k: v for k, v in pod.items() if k not in {"containers", "securityContext"}}
    kept["volumes"] = [v for v in pod.get("volumes", []) if v["name"] != _REDIS_TLS_VOLUME]
    return kept


def test_same_pods_as_the_kustomize_base() -> None:
    """Env names and sources (in order), probes, ports, security and mounts are the base's: a
    change to one deployment path that misses the other fails here."""
    base = role_containers(deployable_sets()["kubernetes/base"])
    template = role_containers(deployable_sets()["openshift"])
    assert set(base) == set(template)
    for role, (base_workload, base_container) in base.items():
        workload, container = template[role]
        assert _comparable(container) == _comparable(base_container), role
        base_pod, pod = pod_spec(base_workload), pod_spec(workload)
        assert _without_redis_tls(pod) == _without_redis_tls(base_pod), role
        base_security = {
            k: v
            for k, v in base_pod["securityContext"].items()
            if k not in {"runAsUser", "runAsGroup"}
        }
        assert pod["securityContext"] == base_security, role
