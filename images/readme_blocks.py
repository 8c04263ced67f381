"""Run the command blocks of the documentation, as written, in order, from the repository's root.

`python3 images/readme_blocks.py [--timeout SECONDS] [--list] [FILE.md ...]` (default: README.md,
deploy/README.md, images/README.md) takes every fenced block whose info string starts with
`sh`, `bash` or `shell`, and runs the blocks of each file one after the other in one bash (so
an `export` or a job started with `&` carries to the next block, as in a reader's terminal),
with `set -e -o pipefail` and standard input from /dev/null. It prints each block's status and
wall time, and stops at the first block that fails or outlasts the timeout, naming its
file:line (exit status 1). It starts nothing while a port the blocks serve on (a
`127.0.0.1:PORT` they name) is taken (exit status 2).

Words after the language in the info string say how a block is run:

- `cluster`, `registry`, `upstream`, `suite`: skipped and listed. A `cluster` block needs a
  Kubernetes or OpenShift cluster, a `registry` block a container registry, an `upstream`
  block upstream Ibutsu's source (GitHub), none of which this machine reaches; a `suite`
  block is the README's test command, which calls this runner.
- `cleanup`: undoes what earlier blocks of its file made (containers, a database). Run in
  its place like any block, and also, after a block of its file failed, before this runner
  exits: it must not rely on what earlier blocks exported.

Whatever happens, nothing the blocks started outlives the run: each file's bash and every
process of its process group are stopped, then the containers named by `--name` in the blocks
that ran and Pants' daemon if it was not running before.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FILES = ("README.md", "deploy/README.md", "images/README.md")
LANGUAGES = ("sh", "bash", "shell")
SKIPPED = {
    "cluster": "needs a Kubernetes or OpenShift cluster",
    "registry": "needs a container registry",
    "upstream": "needs upstream ibutsu-server's source (GitHub, tag v3.1.1)",
    "suite": "the README's test command: it calls this runner",
}
CLEANUP = "cleanup"
DEFAULT_TIMEOUT = 1800.0
# Seconds a file's processes get to stop on SIGTERM before they are killed.
STOP_GRACE = 15.0
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
CONTAINER_NAME = re.compile(r"--name[= ](?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)")
# Ports the blocks serve on and then ask for (`127.0.0.1:9808/readyz`); the machine's
# PostgreSQL and Redis are the services they use, not ports they need free.
LOCAL_PORT = re.compile(r"127\.0\.0\.1:(?P<port>\d{2,5})\b")
SERVICE_PORTS = {5432, 6379}


@dataclass(frozen=True)
class Block:
    """One fenced command block: where it starts, its info string's words, its text."""

    path: str
    line: int
    words: tuple[str, ...]
    text: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def skip_reason(self) -> str | None:
        for word in self.words:
            if word in SKIPPED:
                return f"{word}: {SKIPPED[word]}"
        return None

    @property
    def cleanup(self) -> bool:
        return CLEANUP in self.words


def blocks(path: str, markdown: str) -> list[Block]:
    """The command blocks of one Markdown file, in order; indented fences (in a list) count,
    their indentation removed."""
    found: list[Block] = []
    lines = markdown.splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        words = tuple(opening["info"].replace(",", " ").split())
        body: list[str] = []
        index += 1
        while index < len(lines):
            closing = FENCE.match(lines[index])
            if closing and closing["fence"].startswith(fence) and not closing["info"].strip():
                break
            line = lines[index]
            body.append(line[indent:] if line[:indent].strip() == "" else line)
            index += 1
        start = index - len(body)  # 1-based line of the opening fence
        if words and words[0] in LANGUAGES:
            found.append(Block(path, start, words[1:], "\n".join(body) + "\n"))
        index += 1
    return found


@dataclass
class Outcome:
    """What one block came to."""

    block: Block
    status: str  # ok, failed, timeout, skipped
    seconds: float = 0.0
    detail: str = ""


@dataclass
class FileRun:
    """The blocks of one file and what they came to."""

    path: str
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(outcome.seconds for outcome in self.outcomes)

    @property
    def failed(self) -> Outcome | None:
        return next((o for o in self.outcomes if o.status in ("failed", "timeout")), None)


def say(message: str) -> None:
    """One line of the runner's own, on standard output (the blocks' output goes there too)."""
    print(f"[readme] {message}", flush=True)


class Shell:
    """One bash for a file's blocks, in a process group of its own, reading each block with
    `source` and reporting its status on a pipe of its own."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0
        status_read, status_write = os.pipe()
        self.status = os.fdopen(status_read, "rb", buffering=0)
        self.process = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            start_new_session=True,
            pass_fds=(status_write,),
            text=True,
        )
        os.close(status_write)
        self.status_fd = status_write
        self._send("set -e -o pipefail")
        self.buffer = b""

    def _send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def run(self, block: Block, timeout: float) -> tuple[str, int | None]:
        """Run ``block``; ("ok", 0), ("failed", status) or ("timeout", None)."""
        self.count += 1
        script = self.folder / f"block-{self.count}.sh"
        script.write_text(block.text)
        self._send(f". {shlex.quote(str(script))} </dev/null; echo $? >&{self.status_fd}")
        deadline = time.monotonic() + timeout
        while True:
            if b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                status = int(line)
                return ("ok" if status == 0 else "failed", status)
            if self.process.poll() is not None:  # `set -e` ended the shell: the block failed
                return "failed", self.process.returncode
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout", None
            ready, _, _ = select.select([self.status], [], [], min(remaining, 0.2))
            if ready:
                chunk = self.status.read(64)
                self.buffer += chunk

    def stop(self) -> None:
        """End the bash and every process of its group: SIGTERM, then SIGKILL."""
        if self.process.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                self._send("exit 0")
        _stop_group(self.process.pid)
        try:
            self.process.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.status.close()


def _stop_group(pgid: int) -> None:
    """SIGTERM to a process group, SIGKILL to what is left of it after STOP_GRACE."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_GRACE
    while time.monotonic() < deadline:
        if not _group_alive(pgid):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # Zombies answer too: the group is alive only while one of its members is not one.
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _pantsd_pids() -> set[int]:
    """The live Pants daemons of this repository."""
    pids = set()
    for pid_file in REPO.glob(".pids/*/pantsd/pid"):
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            continue
        pids.add(pid)
    return pids


def _remove_containers(names: Sequence[str]) -> None:
    """Remove the containers the blocks named, if they are still there."""
    if not names or not _on_path("podman"):
        return
    env = {**os.environ, "CONTAINERS_CONF": str(REPO / "images" / "containers.conf")}
    for name in names:
        exists = subprocess.run(
            ["podman", "container", "exists", name], env=env, check=False
        ).returncode
        if exists == 0:
            say(f"removing container {name}")
            subprocess.run(
                ["podman", "rm", "-f", "-t", "5", name],
                env=env,
                check=False,
                stdout=subprocess.DEVNULL,
            )


def _on_path(program: str) -> bool:
    return any(
        (Path(folder) / program).exists() for folder in os.environ.get("PATH", "").split(":")
    )


def run_file(path: str, timeout: float, folder: Path, containers: list[str]) -> FileRun:
    """Run the blocks of one file in one bash; on a failure, its remaining cleanup blocks."""
    result = FileRun(path)
    found = blocks(path, (REPO / path).read_text())
    shell = Shell(folder)
    pending = list(found)
    try:
        while pending:
            block = pending.pop(0)
            reason = block.skip_reason
            if reason is not None:
                say(f"{block.where}: skipped ({reason})")
                result.outcomes.append(Outcome(block, "skipped", detail=reason))
                continue
            containers.extend(CONTAINER_NAME.findall(block.text))
            say(f"{block.where}: running")
            started = time.monotonic()
            status, code = shell.run(block, timeout)
            seconds = time.monotonic() - started
            detail = {"ok": "", "failed": f"exit status {code}", "timeout": f"over {timeout:.0f} s"}
            outcome = Outcome(block, status, seconds, detail[status])
            result.outcomes.append(outcome)
            say(f"{block.where}: {status} in {seconds:.1f} s {outcome.detail}".rstrip())
            if status != "ok":
                break
    finally:
        shell.stop()
    if result.failed is not None:
        _cleanup_after_failure(result, [b for b in pending if b.cleanup], timeout, folder)
    return result


def _cleanup_after_failure(
    result: FileRun, cleanups: list[Block], timeout: float, folder: Path
) -> None:
    """Run the file's cleanup blocks that a failure left unrun, each in a bash of its own."""
    for block in cleanups:
        say(f"{block.where}: running (cleanup after the failure)")
        shell = Shell(folder)
        started = time.monotonic()
        try:
            status, code = shell.run(block, timeout)
        finally:
            shell.stop()
        seconds = time.monotonic() - started
        result.outcomes.append(Outcome(block, f"cleanup {status}", seconds, f"exit status {code}"))
        say(f"{block.where}: cleanup {status} in {seconds:.1f} s")


def ports_in_use(found: Sequence[Block]) -> list[int]:
    """The ports the blocks that run will serve on that something already listens on (another
    run of the images' smoke test, say): they would reach it instead of what they start."""
    wanted = {
        int(match["port"])
        for block in found
        if block.skip_reason is None
        for match in LOCAL_PORT.finditer(block.text)
    } - SERVICE_PORTS
    busy = []
    for port in sorted(wanted):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                busy.append(port)
    return busy


def summary(runs: Sequence[FileRun]) -> Iterator[str]:
    """The closing table: every block's status and time, each file's total, the skipped."""
    yield "block                      status    seconds"
    for run in runs:
        for outcome in run.outcomes:
            seconds = "" if outcome.status == "skipped" else f"{outcome.seconds:7.1f}"
            yield f"{outcome.block.where:<26} {outcome.status:<9} {seconds}"
        ran = sum(o.status not in ("skipped",) for o in run.outcomes)
        skipped = sum(o.status == "skipped" for o in run.outcomes)
        yield f"{run.path}: {ran} ran, {skipped} skipped, {run.seconds:.1f} s"
    for run in runs:
        for outcome in run.outcomes:
            if outcome.status == "skipped":
                yield f"skipped {outcome.block.where}: {outcome.detail}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the blocks; 0 when every block that ran passed, 1 naming the first that did not."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "files",
        nargs="*",
        default=list(DEFAULT_FILES),
        help=f"Markdown files, relative to the repository (default: {' '.join(DEFAULT_FILES)})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"the longest a block may run (default: {DEFAULT_TIMEOUT:.0f})",
    )
    parser.add_argument(
        "--list", action="store_true", help="list the blocks and how each would run, run none"
    )
    args = parser.parse_args(argv)
    if args.list:
        for path in args.files:
            for block in blocks(path, (REPO / path).read_text()):
                how = block.skip_reason or ("cleanup" if block.cleanup else "run")
                print(f"{block.where}: {how}")
        return 0
    busy = ports_in_use([b for path in args.files for b in blocks(path, (REPO / path).read_text())])
    if busy:
        say(f"ports in use, which the blocks serve on: {', '.join(map(str, busy))}; stop what")
        say("listens there (`ss -ltnp`) and run again")
        return 2
    daemons_before = _pantsd_pids()
    containers: list[str] = []
    runs: list[FileRun] = []
    try:
        with tempfile.TemporaryDirectory(prefix="readme-blocks-") as folder:
            for path in args.files:
                run = run_file(path, args.timeout, Path(folder), containers)
                runs.append(run)
                if run.failed is not None:
                    break
    finally:
        _remove_containers(list(dict.fromkeys(containers)))
        for pid in _pantsd_pids() - daemons_before:
            say(f"stopping the Pants daemon the blocks started (pid {pid})")
            os.kill(pid, signal.SIGTERM)
    for line in summary(runs):
        say(line)
    failed = next((run.failed for run in runs if run.failed is not None), None)
    if failed is not None:
        say(f"FAILED {failed.block.where}: {failed.status}, {failed.detail}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
