"""No manifest carries a credential: Secrets are referenced, never written down."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ibutsu_deploy_tests.cases import deployable_sets, root
from ibutsu_deploy_tests.literal_secrets import manifest_problems, prometheus_problems
from ibutsu_deploy_tests.manifests import PROMETHEUS_CONFIG, Doc, load_documents


def _files() -> list[Path]:
    deploy = root() / "deploy"
    return sorted(
        path
        for pattern in ("kubernetes/**/*.yaml", "openshift/*.yaml")
        for path in deploy.glob(pattern)
    )


def test_there_are_files_to_check() -> None:
    names = {path.name for path in _files()}
    assert {"worker.yaml", "scheduler.yaml", "ibutsu-tasks-template.yaml"} <= names


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(root())))
def test_no_literal_secret_in_file(path: Path) -> None:
    assert manifest_problems(load_documents(path), str(path.relative_to(root()))) == []


@pytest.mark.parametrize("name", sorted(deployable_sets()))
def test_no_literal_secret_once_rendered(name: str) -> None:
    assert manifest_problems(deployable_sets()[name], name) == []


def test_prometheus_reads_its_password_from_a_file() -> None:
    config = yaml.safe_load((root() / PROMETHEUS_CONFIG).read_text(encoding="utf-8"))
    assert prometheus_problems(config, str(PROMETHEUS_CONFIG)) == []
    for job in config["scrape_configs"]:
        assert "password_file" in job["basic_auth"], job["job_name"]


def _pod(*env: Doc) -> Doc:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {"template": {"spec": {"containers": [{"name": "c", "env": list(env)}]}}},
    }


_FROM_SECRET = {"valueFrom": {"secretKeyRef": {"name": "redis", "key": "database-password"}}}


@pytest.mark.parametrize(
    "env",
    [
        [{"name": "POSTGRESQL_PASSWORD", "value": "hunter2hunter2"}],
        [{"name": "FLOWER_BASIC_AUTH", "value": "admin:hunter2hunter2"}],
        [{"name": "CELERY_BROKER_URL", "value": "redis://:hunter2@redis:6379/0"}],
        # A reference, but to a variable that is not from a Secret.
        [
            {"name": "REDIS_PASSWORD", "value": "hunter2"},
            {"name": "CELERY_BROKER_URL", "value": "redis://:$(REDIS_PASSWORD)@redis/0"},
        ],
        # A reference to a Secret's variable defined only below it: the kubelet leaves it as is.
        [
            {"name": "CELERY_BROKER_URL", "value": "redis://:$(REDIS_PASSWORD)@redis/0"},
            {"name": "REDIS_PASSWORD", **_FROM_SECRET},
        ],
        [{"name": "API_TOKEN", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}],
    ],
    ids=["password", "basic-auth", "url", "not-a-secret", "defined-below", "configmap"],
)
def test_literal_credentials_are_found(env: list[Doc]) -> None:
    assert manifest_problems([_pod(*env)], "example")


def test_references_pass() -> None:
    env: list[Doc] = [
        {"name": "REDIS_PASSWORD", **_FROM_SECRET},
        {"name": "CELERY_BROKER_URL", "value": "redis://:$(REDIS_PASSWORD)@redis:6379/0"},
        {"name": "FLOWER_BASIC_AUTH", "value": "admin:$(REDIS_PASSWORD)"},
        {"name": "IBUTSU_REDIS_KEY_PREFIX", "value": "ibutsu:"},
    ]
    assert manifest_problems([_pod(*env)], "example") == []


def test_secret_objects_and_credential_parameters_are_found() -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "redis"}}
    template = {
        "apiVersion": "template.openshift.io/v1",
        "kind": "Template",
        "metadata": {"name": "t"},
        "objects": [],
        "parameters": [{"name": "REDIS_PASSWORD", "generate": "expression"}],
    }
    route = {"kind": "Route", "metadata": {"name": "r"}, "spec": {"host": "https://u:p@h/"}}
    assert manifest_problems([{**secret, "stringData": {"database-password": "x"}}], "e")
    assert manifest_problems([template], "e")
    assert manifest_problems([route], "e")
    assert manifest_problems([secret], "e") == []
    assert prometheus_problems({"scrape_configs": [{"basic_auth": {"password": "x"}}]}, "e")
