"""The worker process's own machinery, apart from the work its tasks do: the Celery app and
its factory, the consumer and its liveness ticks, message leases, SIGTERM, the events and
metrics it publishes. The domain (importing, pruning, summaries, queries, submission) lives
beside this folder and never imports from it, except the metrics its tasks count."""
