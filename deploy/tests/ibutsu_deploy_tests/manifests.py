"""Reading the deploy manifests as a cluster would receive them.

Overlays are built by kustomize where it is installed (``kustomize build`` or ``kubectl
kustomize``). So that they are checked on machines without it too, ``render_kustomization``
builds the few kustomization features these manifests use, and refuses any other; a test
compares both wherever kustomize exists. ``process_template`` does what ``oc process`` does
with the template's parameters, and ``resolve_env`` what the kubelet does with a container's
``env`` (Secret references and ``$(VAR)`` expansion).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Doc = dict[str, Any]

BASE = Path("deploy/kubernetes/base")
OVERLAYS = Path("deploy/kubernetes/overlays")
BASE_PROMETHEUS_RULE = BASE / "prometheusrule.yaml"
OPENSHIFT_TEMPLATE = Path("deploy/openshift/ibutsu-tasks-template.yaml")
PROMETHEUS_CONFIG = Path("deploy/prometheus/prometheus.yml")
PROMETHEUS_TARGETS = Path("deploy/prometheus/targets")
DEPLOY_README = Path("deploy/README.md")
ALERT_RULES = Path("images/monitoring/alerts.yml")

#: Kinds whose pod template holds containers, and where it sits.
WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"})


def repo_root() -> Path:
    """The repository root (or the Pants sandbox's): the nearest folder holding deploy/kubernetes
    at or above the current directory."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / BASE).is_dir():
            return folder
    raise FileNotFoundError(f"no {BASE} at or above {here}")


def load_documents(path: Path) -> list[Doc]:
    """Every non-empty YAML document of ``path``, each of which must be a mapping."""
    with path.open(encoding="utf-8") as stream:
        documents = [doc for doc in yaml.safe_load_all(stream) if doc is not None]
    for doc in documents:
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: a document is a {type(doc).__name__}, not a mapping")
    return documents


def kustomization_dirs(root: Path) -> list[Path]:
    """The base, then every overlay (a folder of deploy/kubernetes/overlays with a
    kustomization.yaml)."""
    overlays = sorted(path.parent for path in (root / OVERLAYS).glob("*/kustomization.yaml"))
    return [root / BASE, *overlays]


def object_id(doc: Doc) -> tuple[str, str, str]:
    """(kind, namespace, name): how kustomize and the API server tell objects apart."""
    metadata = doc.get("metadata") or {}
    return (str(doc.get("kind")), str(metadata.get("namespace", "")), str(metadata.get("name")))


def containers(doc: Doc) -> list[Doc]:
    """The containers of a workload's pod template (none for other kinds)."""
    if doc.get("kind") not in WORKLOAD_KINDS:
        return []
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def pod_spec(doc: Doc) -> Doc:
    """The pod template's spec of a workload."""
    spec: Doc = doc["spec"]["template"]["spec"]
    return spec


# --- kustomize ------------------------------------------------------------------------------

#: The kustomization fields render_kustomization implements; any other is refused, never ignored.
SUPPORTED_KUSTOMIZATION = frozenset(
    {"apiVersion", "kind", "resources", "namespace", "images", "replicas", "patches"}
)

#: Strategic merge keys of the lists our patches touch (Kubernetes' patchMergeKey), by field
#: name; a list with no key here, or whose items lack it, is replaced, as Kubernetes does.
MERGE_KEYS: Mapping[str, tuple[str, ...]] = {
    "containers": ("name",),
    "initContainers": ("name",),
    "env": ("name",),
    "volumes": ("name",),
    "volumeMounts": ("mountPath",),
    "ports": ("containerPort", "port"),
}


class UnsupportedKustomization(Exception):
    """The kustomization uses something render_kustomization does not implement."""


def kustomize_command() -> list[str] | None:
    """The command that builds a kustomization folder, when kustomize is installed."""
    if executable := shutil.which("kustomize"):
        return [executable, "build"]
    if executable := shutil.which("kubectl"):
        return [executable, "kustomize"]
    return None


def build_with_kustomize(command: list[str], folder: Path) -> list[Doc]:
    """What kustomize makes of ``folder``."""
    result = subprocess.run(
        [*command, str(folder)], capture_output=True, text=True, check=False, timeout=120
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} {folder} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def render_kustomization(folder: Path) -> list[Doc]:
    """Build ``folder``'s kustomization with the subset of kustomize these manifests use:
    resources (files and folders), strategic-merge patches by path, namespace, images, replicas.
    """
    spec = load_documents(folder / "kustomization.yaml")[0]
    unknown = set(spec) - SUPPORTED_KUSTOMIZATION
    if unknown:
        raise UnsupportedKustomization(
            f"{folder}: {', '.join(sorted(unknown))} not implemented by render_kustomization"
        )
    documents: list[Doc] = []
    for entry in spec.get("resources", []):
        path = folder / entry
        documents.extend(render_kustomization(path) if path.is_dir() else load_documents(path))
    for entry in spec.get("patches", []):
        if set(entry) != {"path"}:
            raise UnsupportedKustomization(f"{folder}: only patches with a path are implemented")
        for patch in load_documents(folder / entry["path"]):
            _apply_patch(documents, patch, folder / entry["path"])
    if "namespace" in spec:
        for doc in documents:
            doc.setdefault("metadata", {})["namespace"] = spec["namespace"]
    for image in spec.get("images", []):
        _set_image(documents, image)
    for replicas in spec.get("replicas", []):
        _set_replicas(documents, replicas, folder)
    return documents


def _apply_patch(documents: list[Doc], patch: Doc, source: Path) -> None:
    name = patch.get("metadata", {}).get("name")
    matches = [
        i
        for i, doc in enumerate(documents)
        if doc.get("kind") == patch.get("kind") and doc.get("metadata", {}).get("name") == name
    ]
    if len(matches) != 1:
        raise UnsupportedKustomization(f"{source}: patches {len(matches)} objects, not one")
    documents[matches[0]] = strategic_merge(documents[matches[0]], patch)


def strategic_merge(base: Any, patch: Any) -> Any:
    """``patch`` merged into ``base`` as a strategic merge patch does for plain fields: maps
    merge, null deletes, lists with a merge key merge item by item, other lists are replaced.
    Patch directives ($patch, $setElementOrder...) are refused."""
    if not (isinstance(base, dict) and isinstance(patch, dict)):
        return copy.deepcopy(patch)
    merged = copy.deepcopy(base)
    for key, value in patch.items():
        if key.startswith("$"):
            raise UnsupportedKustomization(f"patch directive {key} not implemented")
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, list) and isinstance(merged.get(key), list):
            merged[key] = _merge_list(key, merged[key], value)
        elif key in merged:
            merged[key] = strategic_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _merge_list(field_name: str, base: list[Any], patch: list[Any]) -> list[Any]:
    items = [*base, *patch]
    keys = [
        key
        for key in MERGE_KEYS.get(field_name, ())
        if all(isinstance(item, dict) and key in item for item in items)
    ]
    if not keys:
        return copy.deepcopy(patch)
    key = keys[0]
    # As kustomize orders them: the patch's items first, in the patch's order, then the base's
    # other items. (So a patched env var moves above the variables its $(VAR) may name: the
    # tests' check of unresolved references catches that.)
    originals = {item[key]: item for item in base}
    patched = [
        strategic_merge(originals[item[key]], item)
        if item[key] in originals
        else copy.deepcopy(item)
        for item in patch
    ]
    in_patch = {item[key] for item in patch}
    return [*patched, *(copy.deepcopy(item) for item in base if item[key] not in in_patch)]


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of an image reference; a registry's port is not a tag."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
    return name, tag, digest or None


def _set_image(documents: list[Doc], entry: Doc) -> None:
    for doc in documents:
        for container in containers(doc):
            name, tag, digest = split_image(container["image"])
            if name != entry["name"]:
                continue
            new_name = entry.get("newName", name)
            if "digest" in entry:
                container["image"] = f"{new_name}@{entry['digest']}"
            elif "newTag" in entry:
                container["image"] = f"{new_name}:{entry['newTag']}"
            else:
                suffix = f"@{digest}" if digest else f":{tag}" if tag else ""
                container["image"] = f"{new_name}{suffix}"


def _set_replicas(documents: list[Doc], entry: Doc, folder: Path) -> None:
    targets = [
        doc
        for doc in documents
        if doc.get("kind") in WORKLOAD_KINDS and doc["metadata"]["name"] == entry["name"]
    ]
    if not targets:
        raise UnsupportedKustomization(f"{folder}: replicas for unknown {entry['name']}")
    for doc in targets:
        doc["spec"]["replicas"] = int(entry["count"])


# --- OpenShift templates ----------------------------------------------------------------------

_PARAMETER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_WHOLE_JSON_PARAMETER = re.compile(r"\$\{\{([A-Za-z_][A-Za-z0-9_]*)\}\}")


def process_template(template: Doc, values: Mapping[str, str]) -> list[Doc]:
    """The template's objects with its parameters substituted, as ``oc process`` gives them:
    ``${NAME}`` inside strings, ``${{NAME}}`` (a whole field) as a JSON value. A required
    parameter without a value, a value for no parameter, or a reference to no parameter is an
    error (oc would leave the last one in place, silently)."""
    parameters: dict[str, str] = {}
    for parameter in template.get("parameters", []):
        name = parameter["name"]
        if "generate" in parameter and name not in values:
            raise ValueError(f"parameter {name}: generated values are not implemented")
        if name in values:
            parameters[name] = values[name]
        elif "value" in parameter:
            parameters[name] = str(parameter["value"])
        elif parameter.get("required"):
            raise ValueError(f"parameter {name} is required")
        else:
            parameters[name] = ""
    unknown = set(values) - set(parameters)
    if unknown:
        raise ValueError(f"values for no parameter: {', '.join(sorted(unknown))}")
    return [_substitute(copy.deepcopy(obj), parameters) for obj in template.get("objects", [])]


def _substitute(node: Any, parameters: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        return {key: _substitute(value, parameters) for key, value in node.items()}
    if isinstance(node, list):
        return [_substitute(item, parameters) for item in node]
    if not isinstance(node, str):
        return node
    whole = _WHOLE_JSON_PARAMETER.fullmatch(node)
    if whole:
        return json.loads(parameters[_known(whole.group(1), parameters)])

    def replace(match: re.Match[str]) -> str:
        return parameters[_known(match.group(1), parameters)]

    return _PARAMETER.sub(replace, node)


def _known(name: str, parameters: Mapping[str, str]) -> str:
    if name not in parameters:
        raise ValueError(f"${{{name}}} names no parameter of the template")
    return name


# --- container environment --------------------------------------------------------------------

_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(value: str, defined: Mapping[str, str]) -> tuple[str, list[str]]:
    """Kubernetes' expansion of ``$(VAR)`` in an env value: a variable defined earlier is
    replaced, ``$$`` stands for ``$``, anything else stays as written. Returns the value and the
    names referenced but not defined (left verbatim in the value, as the kubelet leaves them)."""
    out: list[str] = []
    missing: list[str] = []
    position = 0
    while position < len(value):
        if value.startswith("$$", position):
            out.append("$")
            position += 2
            continue
        match = _REFERENCE.match(value, position)
        if match:
            name = match.group(1)
            if name in defined:
                out.append(defined[name])
            else:
                out.append(match.group(0))
                missing.append(name)
            position = match.end()
            continue
        out.append(value[position])
        position += 1
    return "".join(out), missing


@dataclass
class Environment:
    """A container's environment as the process sees it, given values for the Secrets."""

    values: dict[str, str] = field(default_factory=dict)
    from_secrets: set[str] = field(default_factory=set)
    #: "NAME: $(VAR)" for each reference to a variable not defined before it.
    unresolved: list[str] = field(default_factory=list)


def resolve_env(container: Doc, secrets: Mapping[tuple[str, str], str]) -> Environment:
    """The environment the kubelet gives ``container``: ``secrets`` maps (Secret name, key) to
    a value; an optional reference is left unset (a Secret that does not exist). A reference
    to a Secret key missing from ``secrets`` raises KeyError; sources these manifests do not
    use (envFrom, ConfigMaps, fields) raise ValueError."""
    if container.get("envFrom"):
        raise ValueError(f"{container['name']}: envFrom is not used here; extend resolve_env")
    environment = Environment()
    for variable in container.get("env", []):
        name = variable["name"]
        source = variable.get("valueFrom")
        if source is None:
            value, missing = expand(str(variable.get("value", "")), environment.values)
            environment.values[name] = value
            environment.unresolved.extend(f"{name}: $({ref})" for ref in missing)
            continue
        reference = source.get("secretKeyRef")
        if reference is None or len(source) != 1:
            raise ValueError(f"{container['name']} {name}: only secretKeyRef is resolved here")
        if reference.get("optional"):
            continue  # its Secret may not exist: the variable is then unset, as here
        key = (reference["name"], reference["key"])
        if key not in secrets:
            raise KeyError(f"{container['name']} {name}: Secret {key[0]} key {key[1]}")
        environment.values[name] = secrets[key]
        environment.from_secrets.add(name)
    return environment


def strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(path, text) of every string in a parsed YAML tree, keys included."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}.{key}", str(key)
            yield from strings(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from strings(item, f"{path}[{index}]")
    elif isinstance(node, str):
        yield path, node
