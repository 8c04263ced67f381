"""The documentation's block runner: what it extracts, how it runs, what it leaves behind."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
from readme_blocks import Block, blocks, main

DOC = """\
# Title

```sh
echo one
```

Prose.

```json
{"not": "a command"}
```

- a list:

  ```sh registry
  docker push somewhere
  ```

```bash cleanup
rm -f made
```

~~~
```sh
not a block: inside another fence
```
~~~
"""


def test_blocks_are_the_shell_fences_with_their_line_and_words() -> None:
    found = blocks("DOC.md", DOC)
    assert found == [
        Block("DOC.md", 3, (), "echo one\n"),
        Block("DOC.md", 15, ("registry",), "docker push somewhere\n"),
        Block("DOC.md", 19, ("cleanup",), "rm -f made\n"),
    ]
    assert found[1].skip_reason == "registry: needs a container registry"
    assert found[2].cleanup
    assert found[0].skip_reason is None


def _write(folder: Path, name: str, *bodies: str) -> str:
    path = folder / name
    path.write_text("\n".join(f"```{body}\n```\n" for body in bodies))
    return str(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_blocks_share_a_shell_and_leave_nothing_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pid_file = tmp_path / "pid"
    first = _write(
        tmp_path,
        "a.md",
        f"sh\nexport GREETING=hello\nsleep 600 & echo $! > {pid_file}",
        f"sh\necho $GREETING > {tmp_path / 'greeting'}",
        "sh cluster\nkubectl apply -k .",
    )
    second = _write(tmp_path, "b.md", f"sh\necho $GREETING > {tmp_path / 'fresh'}")
    assert main([first, second]) == 0
    assert (tmp_path / "greeting").read_text() == "hello\n"  # the export carried over
    assert (tmp_path / "fresh").read_text() == "\n"  # another file, another shell
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)  # the background job was stopped with its file's shell
    out = capsys.readouterr().out
    assert f"skipped {first}:10: cluster: needs a Kubernetes or OpenShift cluster" in out
    assert f"{first}: 2 ran, 1 skipped" in out


def test_the_first_failure_stops_the_run_naming_its_line_and_cleanups_still_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made = tmp_path / "made"
    first = _write(
        tmp_path,
        "a.md",
        f"sh\ntouch {made}",
        "sh\nfalse\necho never",
        f"sh cleanup\nrm {made}",
    )
    second = _write(tmp_path, "b.md", f"sh\ntouch {tmp_path / 'b-ran'}")
    assert main([first, second]) == 1
    assert not made.exists()  # the cleanup block ran after the failure
    assert not (tmp_path / "b-ran").exists()  # nothing after the failing file
    out = capsys.readouterr().out
    assert f"FAILED {first}:5: failed, exit status 1" in out
    assert "never" not in out


def test_a_block_over_the_timeout_is_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = _write(tmp_path, "a.md", "sh\nsleep 600")
    assert main([doc, "--timeout", "2"]) == 1
    assert f"FAILED {doc}:1: timeout, over 2 s" in capsys.readouterr().out


def test_nothing_runs_while_a_port_the_blocks_serve_on_is_taken(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        doc = _write(
            tmp_path,
            "a.md",
            f"sh\ntouch {tmp_path / 'ran'}\ncurl -s 127.0.0.1:{port}/healthz 127.0.0.1:6379",
            f"sh cluster\ncurl 127.0.0.1:{port + 1}",
        )
        assert main([doc]) == 2
    assert not (tmp_path / "ran").exists()
    assert f"ports in use, which the blocks serve on: {port};" in capsys.readouterr().out
