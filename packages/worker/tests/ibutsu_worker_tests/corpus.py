"""The corpus of real JUnit reports (testdata/junit-jenkins), and the expected count for
each file."""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree

# In the test's sandbox at its repository path (a files target, see BUILD).
CORPUS = Path("testdata/junit-jenkins")
# The run summary of the bundled sample report (ibutsu_worker/samples/sample-junit.xml).
SAMPLE_SUMMARY = {
    "tests": 8,
    "passes": 4,
    "failures": 1,
    "errors": 1,
    "skips": 1,
    "xfailures": 1,
    "xpasses": 0,
    "pass_percent": 50,
    "collected": 8,
    "not_run": 0,
}
# Not JUnit reports: refused with a clear error (testdata/README.md).
REFUSED = {"testXxe-xxe.xml", "testXxe-oob.xml", "junitResult.xml"}


def corpus_files() -> list[Path]:
    """Every report of the corpus, sorted by name."""
    files = sorted(CORPUS.glob("*.xml"))
    assert files, f"no corpus at {CORPUS}"
    return files


def expected_count(path: Path) -> int:
    """The README's oracle: every <testcase> at any depth, plus one per suite that reports
    an <error>/<failure> with no test case."""
    root = ElementTree.parse(path).getroot()
    count = sum(1 for _ in root.iter("testcase"))
    for suite in root.iter("testsuite"):
        has_error = any(child.tag in ("error", "failure") for child in suite)
        if has_error and next(suite.iter("testcase"), None) is None:
            count += 1
    return count
