"""Reading a .tar.gz safely, member by member, as its chunks arrive.

The archive is never whole in memory: it is gunzipped as tarfile asks for bytes, and every
byte inflated (headers, padding and skipped data included) counts against the archive limit,
so no header's declared size is taken on trust. Links, devices, sparse files, global headers,
oversized extended headers and paths leaving the archive are refused as each header is read,
before tarfile acts on it. Knows nothing of Ibutsu's layout or of the database.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, Self

from ibutsu_server.settings import ImportLimits
from ibutsu_worker.importing.errors import ReportError, quoted

# tarfile reads an extended (pax or GNU long name) header whole; real ones hold a path and a
# few fields, so anything bigger is an attempt to make the worker allocate.
MAX_EXTENDED_HEADER = 64 * 1024
READ_CHUNK = 1024 * 1024

_GZIP_WBITS = 16 + zlib.MAX_WBITS
_EXTENDED_TYPES = {tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK}
_ALLOWED_TYPES = {tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, *_EXTENDED_TYPES}
_REFUSED_KINDS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
    tarfile.XGLTYPE: "a global extended header",
    tarfile.SOLARIS_XHDTYPE: "a Solaris extended header",
}
# PAX keys that make tarfile write holes the inflater never sees.
_SPARSE_PAX_KEYS = ("GNU.sparse.",)


class _Inflater(io.RawIOBase):
    """The tar stream, gunzipped on demand from the chunks; counts every byte it produces."""

    def __init__(self, chunks: Iterator[bytes], limits: ImportLimits) -> None:
        super().__init__()
        self._chunks = chunks
        self._zlib = zlib.decompressobj(_GZIP_WBITS)
        self._input = b""
        self._limits = limits
        self.total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if not len(view):
            return 0
        while True:
            try:
                # max_length bounds what one call can inflate, however well the input packs.
                data = self._zlib.decompress(self._input, len(view))
            except zlib.error as exc:
                raise ReportError(f"corrupt archive: the gzip data is damaged ({exc})") from None
            self._input = self._zlib.unconsumed_tail
            if data:
                self.total += len(data)
                if self.total > self._limits.max_archive_bytes:
                    raise ReportError(self._limits.refusal("max_archive_bytes"))
                view[: len(data)] = data
                return len(data)
            if self._zlib.eof:
                # As with tarfile's own "r|gz", anything after the first gzip member is ignored.
                return 0
            chunk = next(self._chunks, None)
            if chunk is None:
                raise ReportError("corrupt archive: the gzip data ends early (a cut-off upload?)")
            self._input = chunk

    def drain(self) -> None:
        """Inflate to the end of the gzip data, so its checksum and length are verified."""
        sink = bytearray(READ_CHUNK)
        while self.readinto(sink):
            pass


class _CheckedInfo(tarfile.TarInfo):
    """Refuses what an Ibutsu archive never holds as each header is decoded."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        info = super().frombuf(buf, encoding, errors)
        if info.type not in _ALLOWED_TYPES:
            kind = _REFUSED_KINDS.get(info.type, f"of tar type {info.type!r}")
            raise ReportError(
                f"refused {quoted(info.name)}: it is {kind}; an Ibutsu archive holds only "
                "files and folders"
            )
        if info.type in _EXTENDED_TYPES and info.size > MAX_EXTENDED_HEADER:
            raise ReportError(
                f"refused {quoted(info.name)}: an extended tar header of {info.size} bytes "
                f"(at most {MAX_EXTENDED_HEADER})"
            )
        return info

    def _apply_pax_info(self, pax_headers: dict[str, str], encoding: str, errors: str) -> None:
        if any(key.startswith(_SPARSE_PAX_KEYS) for key in pax_headers):
            raise ReportError(
                f"refused {quoted(self.name)}: it is a sparse file; an Ibutsu archive holds "
                "only plain files and folders"
            )
        super()._apply_pax_info(pax_headers, encoding, errors)  # type: ignore[misc]


@dataclass(frozen=True)
class Member:
    """One checked member: its path parts inside the archive, and its content (files)."""

    name: str
    parts: tuple[str, ...]
    is_dir: bool
    size: int
    stream: IO[bytes] | None


def unpacked_size(chunks: Iterator[bytes], limits: ImportLimits) -> int:
    """How many bytes the archive unpacks to, found by reading it as :func:`members` does but
    keeping nothing: what :func:`members` would refuse at the tar level (links, paths, sizes,
    IBUTSU_IMPORT_MAX_ARCHIVE_BYTES, damaged data) is refused here, before anything else."""
    stream = _Inflater(chunks, limits)
    for _ in _read(stream, limits):
        pass  # tarfile skips each member's content, unpacked and counted
    return stream.total


def members(chunks: Iterator[bytes], limits: ImportLimits) -> Iterator[Member]:
    """The archive's members in order; ``stream`` must be read before asking for the next.

    Raises ReportError for anything unsafe or over a limit, naming the limit's variable."""
    return _read(_Inflater(chunks, limits), limits)


def _read(stream: _Inflater, limits: ImportLimits) -> Iterator[Member]:
    count = 0
    try:
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_CheckedInfo) as tar:
            while (info := tar.next()) is not None:
                # tarfile keeps every member it has read (in an attribute typeshed leaves out);
                # this reader never looks back, so memory stays flat.
                tar.members.clear()  # type: ignore[attr-defined]
                count += 1
                if count > limits.max_archive_members:
                    raise ReportError(limits.refusal("max_archive_members"))
                yield _checked(tar, info, limits)
        stream.drain()
    except tarfile.TarError as exc:
        raise ReportError(f"corrupt archive: not a readable tar.gz ({exc})") from None
    except RecursionError:
        # tarfile follows each extended header into the next header by recursion.
        raise ReportError("refused: the archive chains too many extended tar headers") from None


def _checked(tar: tarfile.TarFile, info: tarfile.TarInfo, limits: ImportLimits) -> Member:
    name = info.name
    if name.startswith("/"):
        raise ReportError(f"refused {quoted(name)}: absolute paths are not allowed in an archive")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise ReportError(f"refused {quoted(name)}: '..' would leave the archive")
    if info.isdir():
        return Member(name, parts, True, 0, None)
    if info.size > limits.max_artifact_bytes:
        raise ReportError(
            limits.refusal("max_artifact_bytes", f"{quoted(name)} of {info.size} bytes")
        )
    return Member(name, parts, False, info.size, tar.extractfile(info))
