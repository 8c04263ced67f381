"""What the tests check: every deployable set of objects, rendered once, and the dummy values
that stand in for the Secrets."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from ibutsu_deploy_tests.manifests import (
    OPENSHIFT_TEMPLATE,
    Doc,
    containers,
    kustomization_dirs,
    load_documents,
    process_template,
    render_kustomization,
    repo_root,
)
from ibutsu_server.settings import Role

#: Values for the template's required parameters (the rest keep their defaults).
TEMPLATE_VALUES = {"IMAGE_REGISTRY": "registry.example.com/ibutsu"}
#: The template for Redis under Sentinel, and for Redis over TLS with a client certificate.
SENTINEL_VALUES = {
    "REDIS_URL": ";".join(
        f"sentinel://:$(REDIS_PASSWORD)@redis-sentinel-{n}.redis-sentinel:26379/0" for n in range(3)
    ),
    "REDIS_SENTINEL_MASTER": "mymaster",
}
TLS_VALUES = {
    "REDIS_URL": "rediss://:$(REDIS_PASSWORD)@redis:6380/0",
    **{
        f"REDIS_TLS_{name}_FILE": f"/etc/ibutsu/redis-tls/{file}"
        for name, file in (("CA", "ca.crt"), ("CERT", "tls.crt"), ("KEY", "tls.key"))
    },
}

#: Which role each container runs, by container name.
ROLE_BY_CONTAINER = {
    "ibutsu-worker": Role.WORKER,
    "ibutsu-scheduler": Role.SCHEDULER,
    "ibutsu-flower": Role.FLOWER,
}

#: The port of /metrics, /healthz and /readyz in the worker and scheduler containers.
METRICS_PORT = 9808
FLOWER_PORT = 5555

#: Stand-ins for every Secret key the manifests may reference, by (Secret, key): the keys
#: deploy/README.md documents. Shaped like real values (a 12+ character password where the
#: settings demand one), so that the settings judge the manifests, not these stand-ins.
DUMMY_SECRETS = {
    ("postgresql", "database-user"): "ibutsu",
    ("postgresql", "database-password"): "dummy-database-password",
    ("postgresql", "database-name"): "ibutsu",
    ("redis", "database-password"): "dummyredispassword",
    ("redis-sentinel", "password"): "dummy-sentinel-password",
    ("ibutsu-metrics-auth", "username"): "prometheus",
    ("ibutsu-metrics-auth", "password"): "dummy-metrics-password",
    ("ibutsu-flower-auth", "username"): "admin",
    ("ibutsu-flower-auth", "password"): "dummy-flower-password",
}


def root() -> Path:
    """The repository root the manifests are read from."""
    return repo_root()


@cache
def deployable_sets() -> dict[str, list[Doc]]:
    """Every set of objects a cluster would receive, by a name for test ids: the kustomize
    base and overlays (built by render_kustomization) and the processed OpenShift template.
    Shared between tests: copy before changing anything."""
    base = root()
    sets = {
        str(folder.relative_to(base / "deploy")): render_kustomization(folder)
        for folder in kustomization_dirs(base)
    }
    template = load_documents(base / OPENSHIFT_TEMPLATE)[0]
    sets["openshift"] = process_template(template, TEMPLATE_VALUES)
    sets["openshift-sentinel"] = process_template(template, {**TEMPLATE_VALUES, **SENTINEL_VALUES})
    sets["openshift-tls"] = process_template(template, {**TEMPLATE_VALUES, **TLS_VALUES})
    return sets


def workloads(documents: list[Doc]) -> list[Doc]:
    """The objects of ``documents`` that run containers."""
    return [doc for doc in documents if containers(doc)]


def role_containers(documents: list[Doc]) -> dict[Role, tuple[Doc, Doc]]:
    """(workload, container) of each role in ``documents``; a role's container appearing
    twice, or a container of no role, is an error."""
    found: dict[Role, tuple[Doc, Doc]] = {}
    for workload in workloads(documents):
        for container in containers(workload):
            role = ROLE_BY_CONTAINER.get(container["name"])
            if role is None:
                raise ValueError(f"container {container['name']} runs no known role")
            if role in found:
                raise ValueError(f"two containers run the {role.value}")
            found[role] = (workload, container)
    return found
