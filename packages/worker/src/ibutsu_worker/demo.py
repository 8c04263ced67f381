"""The demo: a real ``celery worker`` process imports reports end to end and is stopped after."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ibutsu_server.settings import EMBEDDED_DIR_VAR, Settings

DEMO_PROJECT = "demo"


class DemoError(Exception):
    """The demo worker could not run; the message holds the end of its log."""


class DemoWorker:
    """A real ``celery -A ibutsu_server:worker_app worker`` for the demo, stopped gracefully."""

    def __init__(self, settings: Settings) -> None:
        embedded_dir = settings.embedded_dir
        self.log_path = (embedded_dir or Path("var")) / "demo-worker.log"
        self.env = {EMBEDDED_DIR_VAR: str(embedded_dir)} if embedded_dir else {}
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> DemoWorker:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log_file:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "ibutsu_server:worker_app",
                    "worker",
                    "--concurrency=1",
                    "--loglevel=INFO",
                    "--without-mingle",
                    "--without-gossip",
                    f"--hostname=demo-{os.getpid()}@%h",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env, "PYTHONPATH": os.pathsep.join(sys.path)},
            )
        return self

    def check_alive(self) -> None:
        """DemoError with the end of the worker's log if it has exited."""
        if self.process is not None and self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
            raise DemoError("the demo worker exited early:\n" + "\n".join(tail))

    def __exit__(self, *_exc: object) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
