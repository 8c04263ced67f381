"""The import's spools (``importing.artifact_spool``): early results and artifacts come back as
they went in, contents charged slice by slice before they are stored; no database."""

from __future__ import annotations

import io
import uuid
from datetime import datetime

import pytest

from ibutsu_server.settings import ImportLimits
from ibutsu_worker.importing import artifact_spool
from ibutsu_worker.importing.artifact_spool import (
    ARTIFACT_ROW_BYTES,
    ArtifactSpool,
    EarlyResults,
)
from ibutsu_worker.importing.budget import Budget
from ibutsu_worker.importing.errors import ReportError
from ibutsu_worker.importing.records import ArtifactRecord, FileContent, ResultRecord


class Charges(Budget):
    """A roomy budget that keeps every charge, in order."""

    def __init__(self, upload_bytes: int = 10_000_000) -> None:
        super().__init__(ImportLimits(), upload_bytes)
        self.charges: list[tuple[int, int]] = []

    def charge(self, size: int, rows: int = 1) -> None:
        self.charges.append((size, rows))
        super().charge(size, rows)


def test_early_results_are_replayed_whole_and_in_order_then_gone() -> None:
    results = [
        ResultRecord(
            test_id=f"t{n}",
            result="failed",
            start_time=datetime(2026, 1, 2, 3, 4, n) if n else None,
            duration=0.5 * n,
            params={"p": "line\nbreak"},
            metadata={"n": n, "nested": {"é": [1, 2]}},
            source="s",
            component=None,
            env="e",
        )
        for n in range(3)
    ]
    with EarlyResults() as early:
        for result in results:
            early.add(result)
        assert list(early.replay()) == results
        assert list(early.replay()) == []


def test_artifacts_come_back_as_they_went_in_charged_slice_by_slice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(artifact_spool, "SLICE_BYTES", 4)
    result_id = uuid.uuid4()
    content = bytes(range(10))
    budget = Charges()
    with ArtifactSpool(budget) as spool:
        assert spool.empty
        spool.add(ArtifactRecord("small.log", b"abc"))
        spool.add(
            ArtifactRecord(
                "big.bin", FileContent(io.BytesIO(content), len(content)), result_id, "x/y"
            )
        )
        assert budget.charges == [
            (len("small.log") + ARTIFACT_ROW_BYTES, 1),
            (3, 0),
            (len("big.bin") + ARTIFACT_ROW_BYTES, 1),
            (4, 0),
            (4, 0),
            (2, 0),
        ]
        drained = []
        for record in spool.drain():
            assert isinstance(record.content, FileContent)
            drained.append(
                (record.filename, record.result_id, record.content_type, record.content.size)
            )
            assert record.content.file.read(record.content.size) in (b"abc", content)
        assert drained == [
            ("small.log", None, "text/plain", 3),
            ("big.bin", result_id, "x/y", len(content)),
        ]
        assert spool.empty


def test_a_cut_off_artifact_is_refused() -> None:
    budget = Charges()
    with ArtifactSpool(budget) as spool, pytest.raises(ReportError) as caught:
        spool.add(ArtifactRecord("cut.bin", FileContent(io.BytesIO(b"short"), 100)))
    assert "ended before its stated size" in str(caught.value)


def test_an_artifact_over_the_budget_is_refused_before_it_is_all_stored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(artifact_spool, "SLICE_BYTES", 1024)
    budget = Charges(upload_bytes=0)  # the floor only: 64 KiB
    size = 10 * 1024 * 1024
    with ArtifactSpool(budget) as spool, pytest.raises(ReportError):
        spool.add(ArtifactRecord("huge.bin", FileContent(io.BytesIO(bytes(size)), size)))
    assert budget.stored < 100 * 1024  # refused within a slice of the limit


def test_the_spool_is_full_only_when_no_artifact_waits_for_its_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(artifact_spool, "SPOOL_FLUSH_BYTES", 100)
    waiting = uuid.uuid4()
    with ArtifactSpool(Charges()) as spool:
        spool.add(ArtifactRecord("early.log", b"x" * 200, waiting, before_result=True))
        assert not spool.full  # big enough, but its result is still to come
        spool.arrived(waiting)
        assert spool.full
        for record in spool.drain():  # each content read before the next header
            assert isinstance(record.content, FileContent)
            assert record.content.file.read(record.content.size) == b"x" * 200
        assert not spool.full and spool.empty
