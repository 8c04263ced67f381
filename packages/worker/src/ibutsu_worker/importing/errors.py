"""The error raised for bad input: its message is what the uploader reads on the import."""

from __future__ import annotations

# Longest piece of the input (a member name, a value) quoted in a message.
MAX_QUOTED = 120


class ReportError(Exception):
    """The report cannot be imported; the message says why, for the person who uploaded it."""


def quoted(value: object) -> str:
    """``value`` quoted for a message, shortened so that no input can make a message long."""
    text = repr(value)
    return text if len(text) <= MAX_QUOTED else f"{text[: MAX_QUOTED - 5]}…{text[-4:]}"
