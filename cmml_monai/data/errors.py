"""Errors raised for bad user input: one clear line that names the file, column or case and the fix."""

from __future__ import annotations

import os
import sys
from types import TracebackType

__all__ = ["DataError", "find_data_error", "install_data_error_hook"]


class DataError(ValueError):
    """Bad input data (layout, column, label, file). The message is one line a user can act on.

    Command-line scripts catch it, print ``error: <message>`` to stderr and exit with status 2; bundle
    runs (``python -m monai.bundle run``) print the same line through :func:`install_data_error_hook`.
    """


def find_data_error(exc: BaseException | None) -> DataError | None:
    """The first :class:`DataError` in ``exc``'s cause/context chain (MONAI wraps errors raised while
    instantiating config components), or None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, DataError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def install_data_error_hook() -> None:
    """Make an uncaught :class:`DataError` (however deeply wrapped) print one ``error: ...`` line, not a traceback.

    The bundle configs call it in ``initialize``. Other exceptions keep the normal traceback; set
    ``CMML_TRACEBACK=1`` to see the full traceback of a data error too. The process still exits non-zero.

    Example::

        >>> install_data_error_hook()  # doctest: +SKIP
    """
    previous = sys.excepthook
    if getattr(previous, "_cmml_data_error_hook", False):
        return

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        data_error = find_data_error(exc)
        if data_error is None or os.environ.get("CMML_TRACEBACK"):
            previous(exc_type, exc, tb)
            return
        print(f"error: {data_error}", file=sys.stderr)

    hook._cmml_data_error_hook = True  # type: ignore[attr-defined]
    sys.excepthook = hook
