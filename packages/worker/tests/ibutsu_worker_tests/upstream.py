"""Upstream 3.1.1's own backend (ibutsu-server, tag v3.1.1), installed from its pinned
requirements into a cached virtualenv, and its roles (API, worker, beat) run as processes.

Where the source comes from, in order:

1. ``IBUTSU_UPSTREAM_SOURCE``: a checkout of https://github.com/ibutsu/ibutsu-server at tag
   ``v3.1.1`` (a folder holding ``backend/``), or a git repository (bare or not) that has the
   tag, from which ``backend/`` is taken;
2. a copy cached by an earlier run (``~/.cache/ibutsu-tasks/upstream-v3.1.1``);
3. a shallow ``git clone`` of the tag from GitHub.

None of them: one line saying what to set. The backend declares Python 3.14 but installs and
runs unchanged on 3.11 to 3.13 but for one line of 3.14-only syntax (``except A, B:`` in
``util/login.py``), which the cached copy gets in parentheses. The package itself is not
installed (its metadata asks for 3.14): its folder is on the path, as its images run it.
The virtualenv is keyed by the pinned requirements and the interpreter, so a second run costs
nothing; both live under ``~/.cache/ibutsu-tasks`` (``XDG_CACHE_HOME`` if set), never in the
repository.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

TAG = "v3.1.1"
VERSION = "3.1.1"
REPOSITORY = "https://github.com/ibutsu/ibutsu-server.git"
SOURCE_VARIABLE = "IBUTSU_UPSTREAM_SOURCE"
# Python 3.14's `except A, B:`; the same in parentheses runs on every version.
_BARE_EXCEPT = re.compile(r"^(\s*except )([\w.]+(?:, [\w.]+)+):", re.MULTILINE)


class UpstreamUnavailable(Exception):
    """Upstream's backend cannot be had; the message says why and what to set, in one line."""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ibutsu-tasks"


@dataclass(frozen=True)
class Upstream:
    """An installed upstream backend: its folder (the working directory of its roles) and the
    virtualenv's interpreter."""

    backend: Path
    python: Path

    def env(self, extra: Mapping[str, str]) -> dict[str, str]:
        """The environment of one of its roles: nothing of ours, its folder on the path."""
        keep = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
        env = {key: os.environ[key] for key in keep if key in os.environ}
        return {**env, "PYTHONPATH": str(self.backend), "PYTHONUNBUFFERED": "1", **extra}

    def command(self, *args: str) -> list[str]:
        """A console script of the virtualenv (``celery``, ``gunicorn``, ``alembic``)."""
        return [str(self.python.parent / args[0]), *args[1:]]


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload, no-any-return]


def _last_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = (done.stderr or done.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit status {done.returncode}"


def _from_git(repository: Path, target: Path) -> None:
    """``backend/`` of the tag, out of a git repository."""
    target.mkdir(parents=True)
    tar = target / "backend.tar"
    done = _run(
        ["git", "-C", str(repository), "archive", "--format=tar", f"--output={tar}", TAG,
         "backend"]
    )  # fmt: skip
    if done.returncode != 0:
        raise UpstreamUnavailable(
            f"{SOURCE_VARIABLE}={repository}: git cannot give tag {TAG}: {_last_line(done)}"
        )
    shutil.unpack_archive(tar, target, format="tar")
    tar.unlink()


def _fetched(target: Path) -> None:
    """A shallow clone of the tag from GitHub, its ``backend/`` kept."""
    with tempfile.TemporaryDirectory() as folder:
        clone = Path(folder) / "ibutsu-server"
        done = _run(
            ["git", "clone", "--quiet", "--depth=1", f"--branch={TAG}", REPOSITORY, str(clone)],
            timeout=600,
        )
        if done.returncode != 0:
            raise UpstreamUnavailable(
                f"upstream {VERSION}'s backend is needed: set {SOURCE_VARIABLE} to a checkout "
                f"or git repository of {REPOSITORY} (tag {TAG}); fetching it failed: "
                f"{_last_line(done)}"
            )
        target.mkdir(parents=True)
        shutil.copytree(clone / "backend", target / "backend")


def source() -> Path:
    """Upstream's ``backend/`` folder at the tag, patched to run on this interpreter, in the
    cache (see the module)."""
    cached = cache_root() / f"upstream-{TAG}"
    given = os.environ.get(SOURCE_VARIABLE)
    if not (cached / "backend" / ".ready").exists():
        if cached.exists():
            shutil.rmtree(cached)
        staging = cache_root() / f".upstream-{TAG}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        if given:
            path = Path(given)
            if (path / "backend" / "pyproject.toml").is_file():
                staging.mkdir(parents=True)
                shutil.copytree(path / "backend", staging / "backend")
            elif _run(["git", "-C", str(path), "rev-parse", "--git-dir"]).returncode == 0:
                _from_git(path, staging)
            else:
                raise UpstreamUnavailable(
                    f"{SOURCE_VARIABLE}={given} is neither a checkout of ibutsu-server "
                    "(with backend/pyproject.toml) nor a git repository"
                )
        else:
            _fetched(staging)
        backend = staging / "backend"
        version = re.search(r'^version = "([^"]+)"', (backend / "pyproject.toml").read_text(), re.M)
        if not version or version.group(1) != VERSION:
            found = version.group(1) if version else "no version"
            shutil.rmtree(staging, ignore_errors=True)
            raise UpstreamUnavailable(
                f"upstream's backend is {found}, not {VERSION}: check out tag {TAG}"
            )
        for path in (backend / "ibutsu_server").rglob("*.py"):
            text = path.read_text()
            patched = _BARE_EXCEPT.sub(r"\1(\2):", text)
            if patched != text:
                path.write_text(patched)
        (backend / ".ready").write_text(VERSION)
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(cached)
    return cached / "backend"


def _interpreter() -> str:
    """A Python 3.11-3.13 to build the virtualenv with: this one's base interpreter."""
    base = getattr(sys, "_base_executable", None)
    if base and Path(base).exists():
        return str(base)
    return shutil.which(f"python{sys.version_info[0]}.{sys.version_info[1]}") or sys.executable


def install() -> Upstream:
    """Upstream's backend and a virtualenv with its pinned requirements (cached; one run at
    a time makes them, others wait)."""
    cache_root().mkdir(parents=True, exist_ok=True)
    with (cache_root() / ".upstream.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _install()


def _install() -> Upstream:
    backend = source()
    pinned = (backend / "requirements-pinned.txt").read_bytes()
    interpreter = _interpreter()
    version = _run([interpreter, "-c", "import sys; print(sys.version)"]).stdout
    key = hashlib.sha256(pinned + version.encode()).hexdigest()[:12]
    venv = cache_root() / f"upstream-venv-{key}"
    python = venv / "bin" / "python"
    if (venv / ".ready").exists():
        return Upstream(backend, python)
    # Made where it stays (a virtualenv's scripts name its folder); ready once marked.
    shutil.rmtree(venv, ignore_errors=True)
    made = _run([interpreter, "-m", "venv", str(venv)])
    if made.returncode != 0:
        raise UpstreamUnavailable(
            f"cannot make a virtualenv with {interpreter}: {_last_line(made)}"
        )
    # A machine-wide pip.conf may pin versions (a constraint file): the pins here are upstream's.
    pip_env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = _run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "-r",
         str(backend / "requirements-pinned.txt")],
        env=pip_env, timeout=1800,
    )  # fmt: skip
    if done.returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)
        raise UpstreamUnavailable(
            f"upstream's pinned requirements did not install: {_last_line(done)}"
        )
    (venv / ".ready").write_text(key)
    return Upstream(backend, python)
