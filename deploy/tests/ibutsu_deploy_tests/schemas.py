"""Schema validation of every object the manifests hold.

Built-in kinds are checked by kubernetes-validate against Kubernetes' own OpenAPI schemas of
a pinned version, in strict mode (an unknown or misspelt field is an error). The custom and
OpenShift kinds it has no schema for (ServiceMonitor, PrometheusRule, Route, Template) are
checked against the shapes below: the fields of their CRDs that these manifests use, with
unknown fields refused, so a typo fails here rather than being dropped by the API server.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import kubernetes_validate

from ibutsu_deploy_tests.manifests import Doc

#: The Kubernetes version the manifests must validate against: OpenShift 4.18's.
KUBERNETES_VERSION = "1.31.0"

_STRING = {"type": "string"}
_NAME = {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
_STRING_MAP = {"type": "object", "additionalProperties": _STRING}
# The Prometheus Operator CRDs' pattern for durations (monitoringv1.Duration).
_DURATION = {
    "type": "string",
    "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
    "(([0-9]+)ms)?)$",
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": _NAME,
        "namespace": _NAME,
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
}
_SECRET_KEY = {
    "type": "object",
    "required": ["name", "key"],
    "additionalProperties": False,
    "properties": {"name": _NAME, "key": {"type": "string", "minLength": 1}},
}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "properties": {
        "matchLabels": _STRING_MAP,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "operator"],
                "additionalProperties": False,
                "properties": {
                    "key": _STRING,
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": _STRING},
                },
            },
        },
    },
}


def _object(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
    }


SERVICE_MONITOR = _object(
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    {
        "type": "object",
        "required": ["selector", "endpoints"],
        "additionalProperties": False,
        "properties": {
            "jobLabel": _STRING,
            "targetLabels": {"type": "array", "items": _STRING},
            "podTargetLabels": {"type": "array", "items": _STRING},
            "selector": _LABEL_SELECTOR,
            "namespaceSelector": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "any": {"type": "boolean"},
                    "matchNames": {"type": "array", "items": _STRING},
                },
            },
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["port"],
                    "additionalProperties": False,
                    "properties": {
                        "port": _STRING,
                        "path": {"type": "string", "pattern": "^/"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": _DURATION,
                        "scrapeTimeout": _DURATION,
                        "honorLabels": {"type": "boolean"},
                        "basicAuth": {
                            "type": "object",
                            "required": ["username", "password"],
                            "additionalProperties": False,
                            "properties": {"username": _SECRET_KEY, "password": _SECRET_KEY},
                        },
                    },
                },
            },
        },
    },
)

PROMETHEUS_RULE = _object(
    "monitoring.coreos.com/v1",
    "PrometheusRule",
    {
        "type": "object",
        "required": ["groups"],
        "additionalProperties": False,
        "properties": {
            "groups": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["name", "rules"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": _DURATION,
                        "rules": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["expr"],
                                "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                "additionalProperties": False,
                                "properties": {
                                    "alert": _STRING,
                                    "record": _STRING,
                                    "expr": {"type": ["string", "integer"]},
                                    "for": _DURATION,
                                    "keep_firing_for": _DURATION,
                                    "labels": _STRING_MAP,
                                    "annotations": _STRING_MAP,
                                },
                            },
                        },
                    },
                },
            }
        },
    },
)

ROUTE = _object(
    "route.openshift.io/v1",
    "Route",
    {
        "type": "object",
        "required": ["to"],
        "additionalProperties": False,
        "properties": {
            "host": _STRING,
            "path": _STRING,
            "port": {
                "type": "object",
                "required": ["targetPort"],
                "additionalProperties": False,
                "properties": {"targetPort": {"type": ["string", "integer"]}},
            },
            "to": {
                "type": "object",
                "required": ["kind", "name"],
                "additionalProperties": False,
                "properties": {"kind": {"const": "Service"}, "name": _NAME, "weight": {}},
            },
            "tls": {
                "type": "object",
                "required": ["termination"],
                "additionalProperties": False,
                "properties": {
                    "termination": {"enum": ["edge", "passthrough", "reencrypt"]},
                    "insecureEdgeTerminationPolicy": {"enum": ["Allow", "Disable", "Redirect"]},
                },
            },
        },
    },
)

TEMPLATE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "objects", "parameters"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "template.openshift.io/v1"},
        "kind": {"const": "Template"},
        "metadata": _METADATA,
        "message": _STRING,
        "labels": _STRING_MAP,
        "objects": {
            "type": "array",
            "minItems": 1,
            "items": {"type": "object", "required": ["apiVersion", "kind", "metadata"]},
        },
        "parameters": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "description"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "pattern": "^[A-Z][A-Z0-9_]*$"},
                    "displayName": _STRING,
                    "description": _STRING,
                    "value": _STRING,
                    "required": {"type": "boolean"},
                },
            },
        },
    },
}

CUSTOM_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
    ("route.openshift.io/v1", "Route"): ROUTE,
    ("template.openshift.io/v1", "Template"): TEMPLATE,
}


def schema_problems(doc: Doc) -> list[str]:
    """Why ``doc`` is not a valid object of its kind (empty when it is). A kind with no schema
    at all is a problem too: nothing is let through unchecked."""
    where = f"{doc.get('kind')} {(doc.get('metadata') or {}).get('name')}"
    custom = CUSTOM_SCHEMAS.get((str(doc.get("apiVersion")), str(doc.get("kind"))))
    if custom is not None:
        validator = jsonschema.Draft202012Validator(custom)
        return [
            f"{where}: {'.'.join(str(p) for p in error.absolute_path)}: {error.message}"
            for error in validator.iter_errors(doc)
        ]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(p) for p in error.path)
        return [f"{where}: {path}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [f"{where}: {error.message}"]
    return []
