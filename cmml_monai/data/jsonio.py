"""Atomic JSON writes: a reader never sees a half-written split, schema or mask file."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

__all__ = ["atomic_write_json"]


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int = 1) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file in the same folder, then rename.

    Example::

        >>> atomic_write_json("outputs/example.json", {"a": 1})  # doctest: +SKIP
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
