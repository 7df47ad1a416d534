"""Errors raised for bad user input: one clear line that names the file, column or case and the fix."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad input data (layout, column, label, file). The message is one line a user can act on.

    Command-line scripts catch it, print ``error: <message>`` to stderr and exit with status 2.
    """
