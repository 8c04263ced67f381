"""Alert rules and scrape configuration: promtool accepts them, and every PrometheusRule holds
exactly the rules of images/monitoring/alerts.yml."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ibutsu_deploy_tests import alert_rules
from ibutsu_deploy_tests.cases import METRICS_PORT, deployable_sets, root
from ibutsu_deploy_tests.manifests import (
    ALERT_RULES,
    BASE_PROMETHEUS_RULE,
    OPENSHIFT_TEMPLATE,
    PROMETHEUS_CONFIG,
    PROMETHEUS_TARGETS,
    load_documents,
)

#: Where the smoke test publishes the containers' metrics ports on 127.0.0.1.
SMOKE_PORTS = {"worker": 9808, "scheduler": 9809}


@pytest.fixture(scope="module")
def promtool() -> str:
    """promtool, from Debian's prometheus package. Missing is a failure, not a skip: these
    checks must run wherever the tests run (./run-tests installs it)."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found on PATH: apt-get install -y --no-install-recommends prometheus"
        )
    return path


def _promtool(promtool: str, *args: str) -> None:
    result = subprocess.run(
        [promtool, *args], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_promtool_checks_the_rules(promtool: str) -> None:
    _promtool(promtool, "check", "rules", str(root() / ALERT_RULES))


def test_promtool_checks_the_config(promtool: str) -> None:
    # promtool also checks the rule files the configuration names.
    _promtool(promtool, "check", "config", str(root() / PROMETHEUS_CONFIG))


def test_promtool_finds_a_broken_rule(promtool: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("groups: [{name: g, rules: [{alert: A, expr: 'sum(('}]}]\n")
    with pytest.raises(AssertionError, match="promtool check rules"):
        _promtool(promtool, "check", "rules", str(broken))


def _alert_groups() -> list[Any]:
    groups: list[Any] = yaml.safe_load((root() / ALERT_RULES).read_text(encoding="utf-8"))["groups"]
    return groups


@pytest.mark.parametrize("name", sorted(deployable_sets()))
def test_prometheus_rule_is_alerts_yml(name: str, promtool: str, tmp_path: Path) -> None:
    (rule,) = (doc for doc in deployable_sets()[name] if doc["kind"] == "PrometheusRule")
    assert (
        rule["spec"]["groups"] == _alert_groups()
    ), f"{name}'s PrometheusRule differs from {ALERT_RULES}: run {alert_rules.COMMAND}"
    extracted = tmp_path / "rules.yml"
    extracted.write_text(yaml.safe_dump(rule["spec"]))
    _promtool(promtool, "check", "rules", str(extracted))


def test_generated_files_are_current() -> None:
    stale = [str(path.relative_to(root())) for path in alert_rules.stale(root())]
    assert stale == [], f"run {alert_rules.COMMAND}"


def test_generator_follows_the_rules(tmp_path: Path) -> None:
    """An edit to alerts.yml shows as stale, and regenerating takes it in."""
    for relative in (ALERT_RULES, BASE_PROMETHEUS_RULE, OPENSHIFT_TEMPLATE):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root() / relative, tmp_path / relative)
    # Another set of rules, whatever the real file holds today.
    edited = (
        "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: |\n          vector(1)\n"
    )
    (tmp_path / ALERT_RULES).write_text(edited)
    assert alert_rules.main(["--check", "--root", str(tmp_path)]) == 1
    assert alert_rules.main(["--root", str(tmp_path)]) == 0
    assert alert_rules.stale(tmp_path) == []
    expected = [{"name": "g", "rules": [{"alert": "A", "expr": "vector(1)\n"}]}]
    (rule,) = load_documents(tmp_path / BASE_PROMETHEUS_RULE)
    assert rule["spec"]["groups"] == expected
    (template,) = load_documents(tmp_path / OPENSHIFT_TEMPLATE)
    (generated,) = (o for o in template["objects"] if o["kind"] == "PrometheusRule")
    assert generated["spec"]["groups"] == expected


def test_scrape_config_is_job_celery_on_the_smoke_ports() -> None:
    config = yaml.safe_load((root() / PROMETHEUS_CONFIG).read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "celery"
    assert job["metrics_path"] == "/metrics"
    config_dir = (root() / PROMETHEUS_CONFIG).parent
    assert [(config_dir / f).resolve() for f in config["rule_files"]] == [
        (root() / ALERT_RULES).resolve()
    ]
    (sd,) = job["file_sd_configs"]
    files = sorted(path for pattern in sd["files"] for path in config_dir.glob(pattern))
    assert files == sorted((root() / PROMETHEUS_TARGETS).glob("*.json"))
    targets = {
        group["labels"]["component"]: group["targets"]
        for path in files
        for group in json.loads(path.read_text(encoding="utf-8"))
    }
    assert targets == {role: [f"127.0.0.1:{port}"] for role, port in SMOKE_PORTS.items()}
    # In a cluster both containers listen on the same port; only the smoke test remaps one.
    assert SMOKE_PORTS["worker"] == METRICS_PORT
