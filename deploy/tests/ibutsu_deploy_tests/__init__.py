"""Offline checks of the deploy manifests, and the generator of their PrometheusRule."""
