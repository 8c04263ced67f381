"""pytest-ibutsu archives for tests, written the way pytest-ibutsu's archiver writes them."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import tarfile
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from ibutsu_worker.importing.archive import MAX_DOCUMENT_BYTES
from ibutsu_worker.importing.tar_reader import MAX_EXTENDED_HEADER

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


# --- hostile archives: each with the limits it runs under and the reason it is refused ---


def blocks(members: Iterable[Member]) -> bytes:
    """Raw tar blocks for ``members``, with no end-of-archive marker, for archives built by hand."""
    out = b""
    for info, content in members:
        out += info.tobuf(format=tarfile.USTAR_FORMAT)
        out += content + b"\0" * (-len(content) % tarfile.BLOCKSIZE)
    return out


def pax_chain(archive: Sample) -> bytes:
    """A valid run, then extended headers that each announce another, thousands deep."""
    record = b"19 comment=abcdefg\n"
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = len(record)
    chain = blocks([(header, record)]) * 3000
    tail = blocks([file(f"{archive.run_id}/late.log", b"x")]) + b"\0" * 2 * tarfile.BLOCKSIZE
    return gzip.compress(blocks(archive.members()) + chain + tail)


def with_pax(member: Member, comment: str) -> Member:
    member[0].pax_headers = {"comment": comment}
    return member


def with_result(archive: Sample, **changes: Any) -> bytes:
    archive.results[-1].update(changes)
    return archive.archive()


def with_byte(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + bytes([value]) + data[offset + 1 :]


def bad_checksum(archive: Sample) -> bytes:
    """Inflates cleanly; only the CRC-32 in the gzip trailer tells."""
    data = archive.archive()
    return with_byte(data, -8, data[-8] ^ 0xFF)


def gnu_sparse(archive: Sample) -> bytes:
    """An old GNU sparse member: its holes would never pass the counted inflater."""
    info = tarfile.TarInfo(f"{archive.run_id}/holes.bin")
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = 0
    return gzip.compress(
        blocks(archive.members()) + info.tobuf(format=tarfile.GNU_FORMAT) + bytes(1024)
    )


def pax_sparse(archive: Sample) -> bytes:
    """A PAX 1.0 sparse member announcing 1.2 GB of holes in a few bytes."""
    info, content = file(f"{archive.run_id}/holes.bin", b"1\n0\n512\n" + bytes(503) + b"x" * 512)
    info.pax_headers = {
        "GNU.sparse.major": "1",
        "GNU.sparse.minor": "0",
        "GNU.sparse.name": f"{archive.run_id}/holes.bin",
        "GNU.sparse.realsize": "1200000000",
    }
    return archive.archive([(info, content)])


def global_pax(archive: Sample) -> bytes:
    """A global PAX header, which tarfile keeps for every member after it."""
    out = io.BytesIO()
    with tarfile.open(
        fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT, pax_headers={"comment": "x" * 100}
    ) as tar:
        for info, content in archive.members():
            tar.addfile(info, io.BytesIO(content) if info.isreg() else None)
    return out.getvalue()


def big_result_json(archive: Sample) -> bytes:
    """A result.json of nothing but padding, bigger than any real one."""
    result_id = str(uuid.uuid4())
    padding = b"{" + b" " * (MAX_DOCUMENT_BYTES + 1) + b"}"
    return archive.archive([file(f"{archive.run_id}/{result_id}/result.json", padding)])


def values_flood(archive: Sample, count: int = 1_000_000) -> bytes:
    """A result.json under the size limit holding ``count`` empty objects (each costs 64 bytes
    of memory once parsed, for 3 bytes of JSON)."""
    result = archive.results[-1]
    result["metadata"]["flood"] = [{}] * count
    document = json.dumps(result, separators=(",", ":")).encode()
    folder = f"{archive.run_id}/{result['id']}"
    archive.results.pop()
    return archive.archive([file(f"{folder}/result.json", document)])


def long_name(archive: Sample) -> bytes:
    """A member whose name alone is 50 kB, to make the import's message huge."""
    return archive.archive([file(f"{archive.run_id}/../{'a' * 50_000}", b"x")])


Build = Callable[[Sample], bytes]
HOSTILE: list[tuple[str, Build, dict[str, int], str]] = [
    (
        "dot-dot",
        lambda a: a.archive([file(f"{a.run_id}/../escape.txt", b"x")]),
        {},
        "'..' would leave the archive",
    ),
    ("absolute", lambda a: a.archive([file("/etc/cron.d/evil", b"x")]), {}, "absolute paths"),
    (
        "symlink",
        lambda a: a.archive([special(f"{a.run_id}/link", tarfile.SYMTYPE, "/etc/passwd")]),
        {},
        "symbolic link",
    ),
    (
        "hard-link",
        lambda a: a.archive([special(f"{a.run_id}/hard", tarfile.LNKTYPE, f"{a.run_id}/run.json")]),
        {},
        "hard link",
    ),
    ("fifo", lambda a: a.archive([special(f"{a.run_id}/pipe", tarfile.FIFOTYPE)]), {}, "FIFO"),
    (
        "device",
        lambda a: a.archive([special(f"{a.run_id}/tty", tarfile.CHRTYPE)]),
        {},
        "character device",
    ),
    (
        "too-many-members",
        lambda a: a.archive(),
        {"max_archive_members": 6},
        "more than 6 members (IBUTSU_IMPORT_MAX_ARCHIVE_MEMBERS)",
    ),
    (
        # 5 MB of zeros packs into a few kB: counted as inflated, not as the headers claim.
        "too-many-bytes",
        lambda a: a.archive([file(f"{a.run_id}/zeros.bin", bytes(5_000_000))]),
        {"max_archive_bytes": 100_000, "max_artifact_bytes": 10_000_000},
        "more than 100000 bytes (IBUTSU_IMPORT_MAX_ARCHIVE_BYTES)",
    ),
    (
        "artifact-too-big",
        lambda a: a.archive([file(f"{a.run_id}/big.log", bytes(3000))]),
        {"max_artifact_bytes": 2000},
        "of 3000 bytes is over the limit of 2000 bytes per file (IBUTSU_IMPORT_MAX_ARTIFACT_BYTES)",
    ),
    (
        "too-many-results",
        lambda a: a.archive(),
        {"max_results": 3},
        "the limit is 3 per import (IBUTSU_IMPORT_MAX_RESULTS)",
    ),
    (
        "huge-extended-header",
        lambda a: a.archive(
            [with_pax(file(f"{a.run_id}/x.log", b"x"), "y" * (MAX_EXTENDED_HEADER + 1))]
        ),
        {"max_archive_bytes": 10_000_000},
        "an extended tar header of",
    ),
    ("extended-header-chain", pax_chain, {}, "chains too many extended tar headers"),
    (
        # Past the 10-byte gzip header: a final deflate block of the reserved type 3.
        "corrupt-deflate",
        lambda a: with_byte(a.archive(), 10, 0b111),
        {},
        "the gzip data is damaged (Error -3 while decompressing data: invalid block type)",
    ),
    (
        "bad-checksum",
        bad_checksum,
        {},
        "the gzip data is damaged (Error -3 while decompressing data: incorrect data check)",
    ),
    ("truncated-gzip", lambda a: a.archive()[:-200], {}, "the gzip data ends early"),
    ("not-a-tar", lambda a: gzip.compress(b"just text " * 200), {}, "not a readable tar.gz"),
    (
        "no-run-json",
        lambda a: pack(m for m in a.members() if not m[0].name.endswith("run.json")),
        {},
        "there is no <run-uuid>/run.json",
    ),
    (
        "bad-json",
        lambda a: a.archive([file(f"{a.run_id}/{uuid.uuid4()}/result.json", b"{nope")]),
        {},
        "not valid UTF-8 JSON",
    ),
    (
        "two-run-folders",
        lambda a: a.archive([file(f"{uuid.uuid4()}/run.json", b"{}")]),
        {},
        "a second run folder",
    ),
    (
        "top-folder-not-a-uuid",
        lambda a: pack([file("results/run.json", b"{}")]),
        {},
        "top folder must be named after its run's UUID",
    ),
    (
        "result-in-another-run",
        lambda a: with_result(a, run_id=str(uuid.uuid4())),
        {},
        ": run_id is ",
    ),
    (
        "result-id-not-its-folder",
        lambda a: a.archive(
            [file(f"{a.run_id}/{uuid.uuid4()}/result.json", json.dumps(a.results[0]).encode())]
        ),
        {},
        ": id is ",
    ),
    ("unknown-outcome", lambda a: with_result(a, result="meh"), {}, "result is 'meh'"),
    ("nan", lambda a: with_result(a, duration=float("nan")), {}, "not a finite number"),
    (
        "huge-duration",
        lambda a: with_result(a, duration=1.7e308),
        {},
        "duration must be a number of seconds from 0 to a year, not 1.7e+308",
    ),
    (
        "negative-duration",
        lambda a: with_result(a, duration=-1),
        {},
        "duration must be a number of seconds from 0 to a year, not -1",
    ),
    (
        "far-future",
        lambda a: with_result(a, start_time="9999-12-31T00:00:00"),
        {},
        "start_time '9999-12-31T00:00:00' is not a date from 1970 to a day from now",
    ),
    (
        "before-1970",
        lambda a: with_result(a, start_time="1969-12-31T23:59:59"),
        {},
        "is not a date from 1970 to a day from now",
    ),
    (
        "json-values-flood",
        values_flood,
        {"max_artifact_bytes": 10_000_000, "max_archive_bytes": 10_000_000},
        "JSON documents hold at most",
    ),
    ("nul", lambda a: with_result(a, test_id="a\x00b"), {}, "NUL character"),
    ("bad-date", lambda a: with_result(a, start_time="yesterday"), {}, "not an ISO 8601 date"),
    ("gnu-sparse", gnu_sparse, {}, "it is a sparse file"),
    ("pax-sparse", pax_sparse, {}, "it is a sparse file"),
    ("global-pax-header", global_pax, {}, "it is a global extended header"),
    (
        "huge-result-json",
        big_result_json,
        {"max_artifact_bytes": 10_000_000},
        "JSON documents are at most",
    ),
    ("lone-surrogate", lambda a: with_result(a, test_id="a\ud800b"), {}, "a lone surrogate"),
    ("long-member-name", long_name, {}, "'..' would leave the archive"),
    (
        "orphan-artifact",
        lambda a: a.archive([file(f"{a.run_id}/{uuid.uuid4()}/screenshot.png", b"png")]),
        {},
        "has no result.json",
    ),
]
