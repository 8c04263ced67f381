"""Records as rows (``importing.rows``): names cut, test ids hashed, the uploader's values over
the report's, and ``run``/``project`` in metadata made the row's own; no database."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import pytest

from ibutsu_worker.importing.records import ArtifactRecord, ResultRecord, RunRecord
from ibutsu_worker.importing.rows import (
    MAX_NAME,
    MAX_TEST_ID_BYTES,
    RESULT_COLUMNS,
    OpenRun,
    RowMapper,
    artifact_row,
    cut_name,
    result_line,
    stored_test_id,
)

PROJECT = uuid.UUID("7f3c4e1a-0000-4000-8000-000000000001")
UPLOADED = datetime(2026, 6, 1, 12, 0)
STARTED = datetime(2026, 1, 2, 3, 4, 5)


class Names:
    """The import's project names, counting how often they were asked for."""

    def __init__(self, *names: str) -> None:
        self.names = frozenset(names)
        self.calls = 0

    def __call__(self) -> frozenset[str]:
        self.calls += 1
        return self.names


def mapper(names: Names | None = None, source: str | None = None, **metadata: Any) -> RowMapper:
    return RowMapper(PROJECT, source, metadata, UPLOADED, names or Names(str(PROJECT), "acme"))


def open_run(**fields: Any) -> OpenRun:
    run_id = uuid.uuid4()
    values: dict[str, Any] = {
        "id": run_id,
        "id_text": str(run_id),
        "keeps_ids": False,
        "start_time": STARTED,
        "env": "stage",
        "component": "billing",
        "source": "jenkins",
        "collected": None,
    }
    return OpenRun(**(values | fields))


# --- names and ids ---------------------------------------------------------------------------------


def test_long_test_ids_are_cut_with_a_hash_that_keeps_them_apart() -> None:
    short = "test_" + "x" * 100
    assert stored_test_id(short) == short
    long_a, long_b = "é" * 2000 + "a", "é" * 2000 + "b"
    stored_a, stored_b = stored_test_id(long_a), stored_test_id(long_b)
    assert stored_a != stored_b
    assert len(stored_a.encode()) <= MAX_TEST_ID_BYTES
    assert stored_a.startswith("é" * 100) and "…" in stored_a


def test_a_test_id_of_exactly_the_limit_is_kept() -> None:
    exact = "x" * MAX_TEST_ID_BYTES
    assert stored_test_id(exact) == exact
    assert stored_test_id(exact + "x") != exact + "x"


@pytest.mark.parametrize(
    ("name", "stored"),
    [
        (None, None),
        ("", ""),
        ("n" * MAX_NAME, "n" * MAX_NAME),
        ("n" * (MAX_NAME + 1), "n" * (MAX_NAME - 1) + "…"),
    ],
)
def test_names_are_cut_to_fit_their_index(name: str | None, stored: str | None) -> None:
    assert cut_name(name) == stored


# --- the run --------------------------------------------------------------------------------------


def test_a_run_takes_the_uploaders_values_over_the_reports() -> None:
    record = RunRecord(
        start_time=STARTED,
        duration=2.5,
        env="report-env",
        component="report-component",
        source="report-source",
        metadata={"env": "metadata-env", "team": "report", "jenkins": {"build": 7}},
        collected=9,
    )
    run, row = mapper(source="ci", team="uploader", component="c" * 300).run(record)
    assert row["data"] == {
        "env": "metadata-env",
        "team": "uploader",
        "jenkins": {"build": 7},
        "component": "c" * 300,
    }
    assert (run.env, run.source) == ("metadata-env", "ci")
    assert run.component == "c" * (MAX_NAME - 1) + "…"
    assert (row["env"], row["component"], row["source"]) == (run.env, run.component, "ci")
    assert row["project_id"] == PROJECT and row["duration"] == 2.5
    assert row["start_time"] == run.start_time == STARTED
    assert row["summary"] == {"collected": 9} and run.collected == 9


def test_a_run_without_an_id_gets_a_fresh_one_and_one_with_an_id_keeps_it() -> None:
    fresh, row = mapper().run(RunRecord())
    assert not fresh.keeps_ids and row["id"] == fresh.id and fresh.id_text == str(fresh.id)
    another, _row = mapper().run(RunRecord())
    assert another.id != fresh.id
    kept_id = uuid.uuid4()
    kept, row = mapper().run(RunRecord(id=kept_id))
    assert kept.keeps_ids and kept.id == row["id"] == kept_id


def test_a_run_without_a_start_time_starts_when_it_was_uploaded() -> None:
    run, row = mapper().run(RunRecord(source="report"))
    assert run.start_time == row["start_time"] == UPLOADED
    assert "summary" not in row  # no collected count: the summary comes from the results
    assert run.source == "report"


def test_a_run_source_falls_back_to_its_metadata() -> None:
    run, _row = mapper().run(RunRecord(metadata={"source": "from-metadata", "env": 3}))
    assert run.source == "from-metadata"
    assert run.env is None  # a value that is not text is not a name


def test_a_runs_metadata_names_no_other_project() -> None:
    names = Names(str(PROJECT), "acme")
    _run, row = mapper(names).run(RunRecord(metadata={"project": "victim", "run": "r"}))
    assert row["data"] == {"reported_project": "victim", "run": "r"}
    _run, row = mapper(names, project="acme").run(RunRecord(metadata={"project": "victim"}))
    assert row["data"] == {"project": "acme"}  # the uploader's, and the import's own
    assert names.calls == 2


def test_the_project_is_looked_up_only_when_metadata_names_one() -> None:
    names = Names()
    rows = mapper(names, team="t")
    run, _row = rows.run(RunRecord(metadata={"env": "e"}))
    rows.result(ResultRecord(test_id="t", result="passed", metadata={"k": 1}), run)
    assert names.calls == 0


# --- results --------------------------------------------------------------------------------------


def test_a_result_belongs_to_its_run_and_the_import() -> None:
    run = open_run()
    elsewhere = str(uuid.uuid4())
    record = ResultRecord(
        test_id="t",
        result="failed",
        metadata={"run": elsewhere, "project": "victim", "node": "n"},
    )
    row = mapper().result(record, run)
    assert row["data"] == {
        "run": run.id_text,
        "reported_run": elsewhere,
        "reported_project": "victim",
        "node": "n",
    }
    assert (row["id"], row["run_id"], row["project_id"]) == (record.id, run.id, PROJECT)
    assert set(row) == set(RESULT_COLUMNS)


@pytest.mark.parametrize("named", [str(PROJECT), "acme"])
def test_a_result_naming_its_own_run_and_project_keeps_them(named: str) -> None:
    run = open_run()
    record = ResultRecord(test_id="t", result="passed", metadata={"run": run.id_text})
    row = mapper(project=named).result(record, run)
    assert row["data"] == {"run": run.id_text, "project": named}


def test_a_result_lacking_values_takes_the_runs() -> None:
    run = open_run()
    row = mapper().result(ResultRecord(test_id="t", result="passed"), run)
    assert (row["start_time"], row["env"], row["component"], row["source"]) == (
        STARTED,
        "stage",
        "billing",
        "jenkins",
    )
    own = ResultRecord(
        test_id="t",
        result="passed",
        start_time=UPLOADED,
        env="e" * 300,
        component="c",
        source="suite",
    )
    row = mapper().result(own, run)
    assert (row["start_time"], row["env"], row["component"], row["source"]) == (
        UPLOADED,
        "e" * (MAX_NAME - 1) + "…",
        "c",
        "suite",
    )
    # The uploader's source wins over a suite's.
    assert mapper(source="ci").result(own, run)["source"] == "ci"


def test_a_result_takes_the_uploaders_metadata_and_a_storable_test_id() -> None:
    record = ResultRecord(test_id="é" * 2000, result="skipped", metadata={"team": "report"})
    row = mapper(team="uploader").result(record, open_run())
    assert row["data"]["team"] == "uploader"
    assert row["test_id"] == stored_test_id(record.test_id) != record.test_id


def test_a_result_line_is_its_copy_text() -> None:
    run = open_run()
    record = ResultRecord(test_id="tab\there", result="passed", params={"p": 1})
    line = result_line(mapper().result(record, run))
    fields = line.removesuffix("\n").split("\t")
    assert line.endswith("\n") and len(fields) == len(RESULT_COLUMNS)
    values = dict(zip(RESULT_COLUMNS, fields, strict=True))
    assert values["test_id"] == "tab\\there"
    assert values["run_id"] == run.id.hex and values["params"] == '{"p":1}'
    assert values["duration"] == "\\N"


# --- later run metadata and artifacts -------------------------------------------------------------


def test_later_metadata_adds_only_new_keys_owned() -> None:
    added = mapper().added_metadata(
        {"env": "kept"}, {"env": "later", "late": 1, "project": "victim"}
    )
    assert added == {"late": 1, "reported_project": "victim"}


def test_an_artifact_belongs_to_its_result_or_else_to_the_run() -> None:
    run = open_run()
    result_id = uuid.uuid4()
    of_result = artifact_row(ArtifactRecord("trace.log", b"x", result_id, "text/x"), run, UPLOADED)
    assert (of_result["result_id"], of_result["run_id"]) == (result_id, None)
    assert of_result["data"] == {"contentType": "text/x", "resultId": str(result_id)}
    of_run = artifact_row(ArtifactRecord("session.log", b"x"), run, UPLOADED)
    assert (of_run["result_id"], of_run["run_id"]) == (None, run.id)
    assert of_run["data"] == {"contentType": "text/plain", "runId": run.id_text}
    assert of_run["content"] is None and of_run["upload_date"] == UPLOADED
    assert of_run["filename"] == "session.log" and of_run["id"] != of_result["id"]
