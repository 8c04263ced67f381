"""Turning uploaded reports into runs and results: format detection, parsers, storage."""
