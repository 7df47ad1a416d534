"""Atomic writes: a reader never sees a half-written split, schema, mask, table, plot or checkpoint file.

Every writer goes through a temporary file in the destination's folder (same filesystem, so the final
``os.replace`` is atomic) that is removed when the writer fails: an interrupted run leaves either the
old file or the new one, never a truncated one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

__all__ = ["atomic_path", "atomic_open", "atomic_write_text", "atomic_write_json", "remove_stale_temporaries"]

logger = logging.getLogger(__name__)

_PROCESS_START = time.time()  # when this package was imported: temporaries older than that are not ours
_OUR_TEMP = re.compile(r"^\.tmp-[0-9a-f]{12}-.+")  # atomic_path's names
_IGNITE_TEMP = re.compile(r"^(tmp[a-z0-9_]{8}|checkpoint_final\.pt\.tmp)$")  # DiskSaver(atomic), final link


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside ``path`` for a writer that takes a file name (``savefig``, ``torch.save``,
    ``shutil.copyfile``); it replaces ``path`` when the block ends without an exception, else it is removed.

    The temporary name keeps ``path``'s extension (``savefig`` picks the format from it) and is not
    created in advance, so the writer creates it with the usual permissions (umask), unlike ``mkstemp``'s 0600.

    Example::

        >>> with atomic_path("outputs/sweep.png") as tmp:  # doctest: +SKIP
        ...     fig.savefig(tmp)
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex[:12]}-{os.path.basename(path)}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """``open(path, mode, **kwargs)`` for writing, through a temporary file renamed over ``path`` on success.

    Example::

        >>> with atomic_open("outputs/sweep.csv", newline="", encoding="utf-8") as f:  # doctest: +SKIP
        ...     csv.writer(f).writerows(rows)
    """
    if not any(m in mode for m in "wx"):
        raise ValueError(f"atomic_open writes a new file: mode must contain 'w' or 'x', got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically.

    Example::

        >>> atomic_write_text("outputs/comparison.md", "| method |\\n")  # doctest: +SKIP
    """
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int = 1) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file in the same folder, then rename.

    Example::

        >>> atomic_write_json("outputs/example.json", {"a": 1})  # doctest: +SKIP
    """
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent, ensure_ascii=False)
        f.write("\n")


def remove_stale_temporaries(folder: str | os.PathLike, checkpoint_dirs: list | tuple = ()) -> list[str]:
    """Delete the temporary files that a killed run left in ``folder`` (a run's ``output_dir``), so a rerun
    ends with only complete files.

    A writer removes its temporary file when it fails, but not when the process is killed (SIGKILL, power
    loss) mid-write. Removed: ``atomic_path``'s ``.tmp-<12 hex>-<name>`` anywhere under ``folder``, and in
    ``checkpoint_dirs`` Ignite's atomic checkpoint temporaries (``tmpXXXXXXXX``) and
    ``checkpoint_final.pt.tmp``; only files last modified before this process started, and only on
    rank 0 (``RANK``), so a file another process of this run is writing now stays.

    Returns:
        The removed paths.
    """
    if int(os.environ.get("RANK", "0") or 0) != 0 or not os.path.isdir(folder):
        return []
    checkpoint_dirs = {os.path.abspath(d) for d in checkpoint_dirs}
    removed = []
    for root, _, names in os.walk(folder):
        in_checkpoints = os.path.abspath(root) in checkpoint_dirs
        for name in names:
            if not (_OUR_TEMP.match(name) or (in_checkpoints and _IGNITE_TEMP.match(name))):
                continue
            path = os.path.join(root, name)
            try:
                if os.lstat(path).st_mtime < _PROCESS_START:
                    os.remove(path)
                    removed.append(path)
            except FileNotFoundError:
                pass
    if removed:
        logger.info("removed %d temporary file(s) of an interrupted run: %s", len(removed), ", ".join(removed))
    return removed
