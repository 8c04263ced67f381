"""The error raised for bad input: its message is what the uploader reads on the import."""


class ReportError(Exception):
    """The report cannot be imported; the message says why, for the person who uploaded it."""

    #: The detected format ('junit', 'archive'), once known; for the imports metric.
    format = "unknown"
