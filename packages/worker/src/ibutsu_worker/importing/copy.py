"""PostgreSQL's COPY for bulk rows, fed from an iterator so nothing is formatted whole in
memory; and INSERT ... ON CONFLICT for the session's database."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ibutsu_server.db.models import Base

COPY_READ_SIZE = 256 * 1024
_JSON = json.JSONEncoder(separators=(",", ":"))


def _json_encoder() -> Callable[[Any], str]:
    """``_JSON.encode``, without building a new C encoder at every call as it does."""
    if c_make_encoder is None:
        return _JSON.encode
    encode = c_make_encoder(
        None, _JSON.default, encode_basestring_ascii, None, ":", ",", False, False, True
    )
    return lambda value: "".join(encode(value, 0))


_encode_json = _json_encoder()


def _copy_text(value: str) -> str:
    """``value`` escaped for COPY's text format (chained replaces beat str.translate here;
    most values need none, and four membership tests cost less than four replaces)."""
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return (
            value.replace("\\", "\\\\")
            .replace("\t", "\\t")
            .replace("\n", "\\n")
            .replace("\r", "\\r")
        )
    return value


def _copy_json(value: dict[str, Any] | list[Any]) -> str:
    return _copy_text(_encode_json(value)) if value else ("{}" if isinstance(value, dict) else "[]")


def _copy_uuid(value: uuid.UUID) -> str:
    # PostgreSQL reads a UUID without its hyphens, which str() takes a second format to add.
    return value.hex


def _copy_bytes(value: bytes) -> str:
    # bytea's hex input form; the backslash itself is escaped for COPY.
    return "\\\\x" + value.hex()


# By exact type: one dictionary look-up per field, where a chain of isinstance checks would
# cost several (this runs for every field of every result).
_FORMATTERS: dict[type, Callable[[Any], str]] = {
    str: _copy_text,
    type(None): lambda _value: "\\N",
    uuid.UUID: _copy_uuid,
    dict: _copy_json,
    list: _copy_json,
    datetime: datetime.isoformat,
    float: float.__repr__,
    int: int.__repr__,  # an IntEnum as its number
    bool: str,
    bytes: _copy_bytes,
}


def _subclass_formatter(value: Any) -> Callable[[Any], str]:
    # A subclass (an enum of str, say) is formatted as its base type.
    base = next((kind for kind in _FORMATTERS if isinstance(value, kind)), None)
    if base is None:
        raise TypeError(f"cannot COPY a {type(value).__name__}")
    return _FORMATTERS[base]


def _copy_field(value: Any) -> str:
    """One field in COPY's text format."""
    return (_FORMATTERS.get(type(value)) or _subclass_formatter(value))(value)


def copy_line(values: Iterable[Any]) -> str:
    """One row in COPY's text format, newline included."""
    formatter = _FORMATTERS.get  # inlined: this runs for every field of every result
    return "\t".join([(formatter(type(v)) or _subclass_formatter(v))(v) for v in values]) + "\n"


def copy_line_streaming(values: Sequence[Any], at: int, content: Iterable[bytes]) -> Iterator[str]:
    """One row in COPY's text format, in pieces: ``values`` but the bytea field at ``at``,
    which is ``content``'s slices, each sent as hex as it comes, so a large value is never
    whole in memory."""
    head = [_copy_field(value) for value in values[:at]]
    yield "\t".join([*head, "\\\\x"])
    for piece in content:
        yield piece.hex()
    yield "".join("\t" + _copy_field(value) for value in values[at + 1 :]) + "\n"


class _LineReader(io.TextIOBase):
    """A file that psycopg2's COPY reads, filled from an iterator of lines on demand."""

    def __init__(self, lines: Iterator[str]) -> None:
        super().__init__()
        self._lines = lines
        self._rest = ""
        #: What the lines' producer raised; psycopg2 only reports that reading failed.
        self.error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> str:
        parts, length = [self._rest], len(self._rest)
        while size is None or size < 0 or length < size:
            try:
                line = next(self._lines, None)
            except BaseException as exc:
                self.error = exc
                raise
            if line is None:
                break
            parts.append(line)
            length += len(line)
        text = "".join(parts)
        if size is None or size < 0:
            self._rest = ""
            return text
        self._rest = text[size:]
        return text[:size]


def copy_rows(session: Session, table: str, columns: Sequence[str], lines: Iterable[str]) -> None:
    """``COPY table (columns) FROM STDIN`` in the session's transaction, reading ``lines`` as
    the server asks for them. What the lines' producer raises (bad input) aborts the COPY and
    is raised again as it was; the caller's rollback removes the rows."""
    dbapi_connection: Any = session.connection().connection.dbapi_connection
    dbapi_error = session.get_bind().dialect.loaded_dbapi.Error
    source = _LineReader(iter(lines))
    statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
    with dbapi_connection.cursor() as cursor:
        try:
            cursor.copy_expert(statement, source, size=COPY_READ_SIZE)
        except Exception as exc:
            if source.error is not None:
                raise source.error from None
            if isinstance(exc, dbapi_error):
                # As SQLAlchemy raises it for any other statement, so it is classified alike
                # (a lost connection is retried, bad data is not).
                raise sa_exc.DBAPIError.instance(statement, None, exc, dbapi_error) from exc
            raise


def dialect_insert(session: Session, model: type[Base]) -> Any:
    """An INSERT with ON CONFLICT support for the session's database (PostgreSQL, SQLite)."""
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    return dialect.insert(model)
