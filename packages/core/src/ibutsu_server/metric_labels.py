"""Label values as danihodovic/celery-exporter writes them, for the worker's and the
scheduler's series alike, so that its dashboards and alert rules read ours unchanged."""

from __future__ import annotations

from celery.utils.nodenames import nodesplit

UNKNOWN = "unknown"


def hostname_label(nodename: object) -> str:
    """The host of a Celery node name ("celery@pod-7f9c" -> "pod-7f9c", "gen42@api" ->
    "api"), as celery-exporter's ``hostname`` label: one value per host, not per process."""
    if not isinstance(nodename, str) or not nodename:
        return UNKNOWN
    return str(nodesplit(nodename)[1]) or UNKNOWN
