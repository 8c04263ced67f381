"""pytest-ibutsu archives for tests, written the way pytest-ibutsu's archiver writes them."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
import uuid
from collections.abc import Iterable
from typing import Any

OUTCOMES = ("passed", "failed", "skipped", "error")
Member = tuple[tarfile.TarInfo, bytes]


def file(name: str, content: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    info.mode = 0o644
    return info, content


def special(name: str, kind: bytes, linkname: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o755
    return info, b""


def pack(members: Iterable[Member]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for info, content in members:
            tar.addfile(info, io.BytesIO(content) if info.isreg() else None)
    return out.getvalue()


@dataclasses.dataclass
class Sample:
    """What a pytest-ibutsu archive holds: one run, its results and their artifacts."""

    run: dict[str, Any]
    results: list[dict[str, Any]]
    run_artifacts: dict[str, bytes]
    result_artifacts: dict[str, dict[str, bytes]]

    @property
    def run_id(self) -> str:
        return str(self.run["id"])

    def members(self) -> list[Member]:
        """The members in pytest-ibutsu's order: the run, then each result and its artifacts."""
        run_id = self.run_id
        members = [special(run_id, tarfile.DIRTYPE)]
        members.append(file(f"{run_id}/run.json", json.dumps(self.run).encode()))
        members += [file(f"{run_id}/{name}", data) for name, data in self.run_artifacts.items()]
        for result in self.results:
            folder = f"{run_id}/{result['id']}"
            members.append(special(folder, tarfile.DIRTYPE))
            members.append(file(f"{folder}/result.json", json.dumps(result).encode()))
            artifacts = self.result_artifacts.get(result["id"], {})
            members += [file(f"{folder}/{name}", data) for name, data in artifacts.items()]
        return members

    def archive(self, extra: Iterable[Member] = ()) -> bytes:
        return pack([*self.members(), *extra])


def sample() -> Sample:
    run_id = str(uuid.uuid4())
    results: list[dict[str, Any]] = [
        {
            "id": str(uuid.uuid4()),
            "test_id": f"test_{outcome}",
            "result": outcome,
            "run_id": run_id,
            # Naive times are UTC; others carry their offset.
            "start_time": f"2026-01-02T03:0{n}:00" if n % 2 else f"2026-01-02T05:0{n}:00+02:00",
            "duration": 0.25 * (n + 1),
            "params": {"n": n},
            "metadata": {"node_id": f"tests/test_x.py::test_{outcome}", "run": run_id},
            "source": "local",
            "component": None,
            "env": None,
        }
        for n, outcome in enumerate(OUTCOMES)
    ]
    run = {
        "id": run_id,
        "component": "billing",
        "env": None,
        "source": "jenkins",
        "start_time": "2026-01-02T03:00:00",
        "duration": 2.5,
        "metadata": {"project": None, "jenkins": {"job_name": "nightly", "build_number": "7"}},
        "summary": {"tests": 4, "failures": 1, "errors": 1, "skips": 1},
    }
    failed = results[1]["id"]
    return Sample(
        run=run,
        results=results,
        run_artifacts={"session.log": b"collected 4 items\n"},
        result_artifacts={failed: {"traceback.log": b"AssertionError: 1 == 2\n"}},
    )
