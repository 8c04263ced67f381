"""Each role's container gets what the role needs: the settings module judges the environment
the manifests declare (Secrets replaced by stand-ins), as the process would at start-up."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ibutsu_deploy_tests.cases import (
    DUMMY_SECRETS,
    METRICS_PORT,
    deployable_sets,
    role_containers,
    root,
)
from ibutsu_deploy_tests.manifests import DEPLOY_README, Doc, containers, expand, resolve_env
from ibutsu_server.settings import TLS_VARS, ConfigError, Role, load_settings

SET_NAMES = sorted(deployable_sets())
CASES = [(name, role) for name in SET_NAMES for role in Role]


def _mounted_files(container: Doc, values: dict[str, str], folder: Path) -> dict[str, str]:
    """``values`` with each TLS file variable pointed at a stand-in file in ``folder``, once
    the manifest is shown to mount the path it names (the settings check files exist)."""
    mounts = [m["mountPath"].rstrip("/") + "/" for m in container.get("volumeMounts", [])]
    for name in TLS_VARS:
        path = values.get(name, "")
        if not path:
            continue
        assert any(path.startswith(mount) for mount in mounts), f"{name}: {path} is not mounted"
        stand_in = folder / Path(path).name
        stand_in.write_text("stand-in\n")
        values = {**values, name: str(stand_in)}
    return values


@pytest.mark.parametrize(("name", "role"), CASES, ids=[f"{n}-{r.value}" for n, r in CASES])
def test_role_settings_load(name: str, role: Role, tmp_path: Path) -> None:
    workload, container = role_containers(deployable_sets()[name])[role]
    environment = resolve_env(container, DUMMY_SECRETS)
    # A $(VAR) naming nothing defined above it reaches the process verbatim.
    assert environment.unresolved == [], f"not expanded: {environment.unresolved}"
    values = _mounted_files(container, environment.values, tmp_path)
    try:
        settings = load_settings(role, values)
    except ConfigError as error:
        pytest.fail(f"{name}: the {role.value} would refuse to start:\n{error}")

    # Real services, never the embedded SQLite and filesystem broker; the Redis password
    # from its Secret in every URL of the list (one per sentinel).
    assert not settings.embedded
    kind = name.rsplit("/", 1)[-1].removeprefix("openshift-")
    scheme = {"sentinel": "sentinel", "tls": "rediss"}.get(kind, "redis")
    for url in settings.broker_url.split(";"):
        assert url.startswith(f"{scheme}://:dummyredispassword@")
    assert settings.result_backend == settings.broker_url
    if scheme == "sentinel":
        assert settings.redis.sentinel_master
        # Optional in the template (the sentinels may have no password of their own).
        assert settings.redis.sentinel_password in ("dummy-sentinel-password", "")
    if scheme == "rediss":
        assert settings.redis.tls_ca_file is not None
        assert settings.redis.tls_cert_file is not None
    if role is Role.FLOWER:
        assert settings.database is None
        assert not any(v.startswith("POSTGRESQL_") for v in environment.values)
        assert settings.flower_basic_auth == "admin:dummy-flower-password"
        # Flower takes every FLOWER_* variable for one of its options.
        assert {v for v in environment.values if v.startswith("FLOWER_")} == {"FLOWER_BASIC_AUTH"}
        return
    assert settings.database is not None
    assert settings.database.host == environment.values["POSTGRESQL_HOST"]
    assert settings.database.password == "dummy-database-password"
    assert settings.metrics is not None
    assert settings.metrics.port == METRICS_PORT
    assert settings.metrics.basic_auth == "prometheus:dummy-metrics-password"
    if role is Role.WORKER:
        grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert settings.soft_shutdown_seconds < grace
        assert environment.values["PROMETHEUS_MULTIPROC_DIR"].startswith("/tmp/")


def _required_in_readme(role: Role) -> set[str]:
    """Variables the README's Configuration table gives no default for this role."""
    text = (root() / "README.md").read_text(encoding="utf-8")
    required: set[str] = set()
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        roles = {r.strip() for r in cells[1].split(",")}
        if (role.value in roles or "all" in roles) and cells[2].startswith("—"):
            required.update(re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[0]))
    return required


@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.value)
def test_check_fails_without_a_required_variable(role: Role) -> None:
    """Each variable the README says the role requires is in the manifest, and leaving it
    out makes the settings refuse: the check above can fail."""
    required = _required_in_readme(role)
    assert "CELERY_BROKER_URL" in required
    _, container = role_containers(deployable_sets()["kubernetes/base"])[role]
    values = resolve_env(container, DUMMY_SECRETS).values
    assert required <= set(values), required - set(values)
    for name in sorted(required):
        without = {k: v for k, v in values.items() if k != name}
        with pytest.raises(ConfigError, match=name):
            load_settings(role, without)


def test_secret_keys_are_the_documented_ones() -> None:
    """The Secrets and keys the manifests reference are exactly those deploy/README.md lists
    (and the tests' stand-ins cover)."""
    documented = set(
        re.findall(
            r"^\| `([a-z0-9-]+)` \| `([a-z0-9-]+)` \|",
            (root() / DEPLOY_README).read_text(encoding="utf-8"),
            re.MULTILINE,
        )
    )
    referenced = {
        (var["valueFrom"]["secretKeyRef"]["name"], var["valueFrom"]["secretKeyRef"]["key"])
        for documents in deployable_sets().values()
        for doc in documents
        for container in containers(doc)
        for var in container.get("env", [])
        if "secretKeyRef" in var.get("valueFrom", {})
    }
    monitor_keys = {
        (ref["name"], ref["key"])
        for documents in deployable_sets().values()
        for doc in documents
        if doc["kind"] == "ServiceMonitor"
        for endpoint in doc["spec"]["endpoints"]
        for ref in endpoint["basicAuth"].values()
    }
    assert referenced | monitor_keys == documented
    assert documented == set(DUMMY_SECRETS)


def test_expansion_follows_the_kubelet() -> None:
    assert expand("a$(X)b$(Y)$$(X)", {"X": "1"}) == ("a1b$(Y)$(X)", ["Y"])
