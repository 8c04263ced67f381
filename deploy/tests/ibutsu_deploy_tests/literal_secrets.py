"""Finding credentials written into manifests instead of referenced from Secrets.

A manifest may carry a password only as a reference: an env var from a ``secretKeyRef``, or
``$(VAR)`` of such a variable inside another value (the kubelet expands it, so the password
stays in the Secret). Everything else that holds a password is reported.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from ibutsu_deploy_tests.manifests import Doc, containers, strings

#: Variable names whose value is a credential (the brief's list: PASSWORD, SECRET, AUTH, TOKEN).
SENSITIVE_NAME = re.compile(r"PASSWORD|SECRET|AUTH|TOKEN", re.IGNORECASE)
#: scheme://user:password@ with a non-empty password.
URL_WITH_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^:@/\s]*:(?P<password>[^@\s]+)@")
_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
#: Prometheus configuration keys that hold a credential inline (their *_file twins do not).
PROMETHEUS_INLINE_CREDENTIALS = frozenset({"password", "bearer_token", "credentials"})


def _secret_reference(text: str, from_secrets: set[str] | None) -> bool:
    """Whether ``text`` is exactly one ``$(VAR)``, VAR coming from a Secret (any VAR when
    ``from_secrets`` is None: outside a container nothing says where VAR comes from)."""
    match = _REFERENCE.fullmatch(text)
    if match is None:
        return False
    return from_secrets is None or match.group(1) in from_secrets


def env_problems(container: Doc, where: str) -> list[str]:
    """Credentials in ``container``'s env that do not come from a Secret defined before them."""
    problems: list[str] = []
    from_secrets: set[str] = set()
    for variable in container.get("env", []):
        name = variable["name"]
        label = f"{where}: container {container.get('name')} env {name}"
        source = variable.get("valueFrom")
        if source is not None:
            if "secretKeyRef" in source:
                from_secrets.add(name)
            elif SENSITIVE_NAME.search(name):
                problems.append(f"{label}: a credential must come from a Secret")
            continue
        value = str(variable.get("value", ""))
        urls = list(URL_WITH_PASSWORD.finditer(value))
        for match in urls:
            if not _secret_reference(match.group("password"), from_secrets):
                problems.append(f"{label}: the URL's password is not $(VAR) of a Secret above")
        if SENSITIVE_NAME.search(name) and not urls:
            # user:password takes its password from a Secret; anything else is the secret whole.
            secret_part = value.split(":", 1)[1] if ":" in value else value
            if not _secret_reference(secret_part, from_secrets):
                problems.append(f"{label}: a literal value; use a secretKeyRef or $(VAR) of one")
    return problems


def manifest_problems(documents: Iterable[Doc], where: str) -> list[str]:
    """Every literal credential in Kubernetes or OpenShift objects: Secrets with data, env
    values, and URLs with a password anywhere (annotations, args, routes...)."""
    problems: list[str] = []
    for doc in documents:
        kind = doc.get("kind")
        name = (doc.get("metadata") or {}).get("name")
        if kind == "Secret" and (doc.get("data") or doc.get("stringData")):
            problems.append(f"{where}: Secret {name} carries data; create Secrets out of band")
        if kind == "Template":
            problems.extend(template_parameter_problems(doc, where))
        for container in containers(doc):
            problems.extend(env_problems(container, f"{where}: {kind} {name}"))
        for path, text in strings(doc):
            for match in URL_WITH_PASSWORD.finditer(text):
                if not _secret_reference(match.group("password"), None):
                    problems.append(f"{where}: {kind} {name} {path}: a URL with a password")
    return problems


def template_parameter_problems(template: Doc, where: str) -> list[str]:
    """Template parameters that carry a credential: ``oc process`` would write its value into
    the objects (upstream's REDIS_PASSWORD parameter does exactly that)."""
    return [
        f"{where}: parameter {parameter['name']} carries a credential; reference a Secret"
        for parameter in template.get("parameters", [])
        if SENSITIVE_NAME.search(parameter["name"])
    ]


def prometheus_problems(config: Mapping[str, Any], where: str) -> list[str]:
    """Inline credentials in a Prometheus configuration (password, bearer_token...)."""
    problems: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in PROMETHEUS_INLINE_CREDENTIALS and value:
                    problems.append(f"{where}: {path}.{key} is inline; use {key}_file")
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for index, item in enumerate(node):
                walk(item, f"{path}[{index}]")

    walk(config, "")
    for path, text in strings(config):
        if URL_WITH_PASSWORD.search(text):
            problems.append(f"{where}: {path}: a URL with a password")
    return problems
