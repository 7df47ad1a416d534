"""Received DICOM instances, collected by study across associations, on disk before they are acknowledged.

Layout under the inbox folder: one folder per study, named by a hash of its StudyInstanceUID (no patient
attribute in any name). An instance is written to a temporary name, flushed to disk (fsync) and renamed to
``<instance>.<association>.part`` before the C-STORE success is sent; when its association is released
normally each part is renamed to ``<instance>.dcm`` (the study's committed instances; a re-sent instance
replaces itself). An aborted association's parts are removed: the sender was told the transfer failed and
sends again. A study is *ready* once no association holding its instances is open and none has arrived for
``stable_age`` seconds (Orthanc's "StableAge"); :meth:`StudyInbox.take` then renames its folder to
``<study>.taken-<n>`` so instances arriving meanwhile start a new folder (a later version).

After a crash, :meth:`StudyInbox.recover` removes the parts and temporary files of associations that never
finished (partial transfers: the senders were not told they succeeded) and returns the taken folders
(complete, not yet processed); committed studies wait for their stable age again.

Example:
    >>> inbox = StudyInbox("out/incoming", stable_age=30)  # doctest: +SKIP
    >>> inbox.store("a1", ds); inbox.commit("a1"); inbox.ready()
"""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from cmml_monai.deploy.outbox import fsync_dir

__all__ = ["StudyInbox", "Recovered", "content_hash", "TAKEN"]

TAKEN = ".taken-"
_PART = ".part"
_TMP = ".tmp-"


def content_hash(folder: str) -> str:
    """SHA-256 over the committed instance files of a study folder (name and bytes, in name order): the
    same instances give the same hash, whatever association or order they came in.

    Example:
        >>> content_hash("out/incoming/3f2a9c01d4e5b6a7.taken-1")[:12]  # doctest: +SKIP
        '9b1d2c3e4f5a'
    """
    total = hashlib.sha256()
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".dcm")):
        h = hashlib.sha256()
        with open(os.path.join(folder, name), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        total.update(name.encode() + b"\0" + h.digest())
    return total.hexdigest()


@dataclass
class Recovered:
    """What :meth:`StudyInbox.recover` found after a restart.

    Args:
        taken: folders of complete studies not yet processed, ``(study key, folder)``.
        waiting: study keys with committed instances, waiting for their stable age again.
        partial_instances: parts of unfinished associations removed.
        partial_studies: study folders left empty by that and removed.
    """

    taken: list[tuple[str, str]] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    partial_instances: int = 0
    partial_studies: int = 0


class StudyInbox:
    """Instances by study, durable before acknowledgement; a study is ready once quiet for ``stable_age`` s.

    Args:
        folder: the inbox folder (made when missing).
        stable_age: seconds without a new instance (and no open association holding the study) before the
            study is ready.
        key: the pseudonym key hashing StudyInstanceUIDs into folder names (None: a plain SHA-256).

    Raises:
        ValueError: a negative ``stable_age``.
    """

    def __init__(self, folder: str, stable_age: float = 30.0, key: str | None = None) -> None:
        if float(stable_age) < 0:
            raise ValueError(f"stable_age must be >= 0 seconds, got {stable_age!r}")
        self.folder = os.fspath(folder)
        self.stable_age = float(stable_age)
        self.key = key
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}  # study key -> monotonic time of its last committed instance
        self._open: dict[str, dict[str, str]] = {}  # association -> {part path: study key}
        self._touching: dict[str, set[str]] = {}  # association -> the studies it is writing to
        self._taken = 0
        os.makedirs(self.folder, exist_ok=True)

    def study_key(self, study_uid: str) -> str:
        """The folder name of a study: a (keyed) hash of its StudyInstanceUID."""
        data = str(study_uid).encode()
        if self.key:
            return hmac.new(self.key.encode(), data, hashlib.sha256).hexdigest()[:16]
        return hashlib.sha256(data).hexdigest()[:16]

    def store(self, association: str, ds: Any) -> str:
        """Write one instance (a pydicom Dataset with ``file_meta``) durably as a part of ``association``;
        returns its path. Raises OSError when the disk refuses (the sender is then told to retry)."""
        key = self.study_key(ds.StudyInstanceUID)
        folder = os.path.join(self.folder, key)
        name = hashlib.sha256(str(ds.SOPInstanceUID).encode()).hexdigest()[:24]
        with self._lock:  # marked busy before the write: take() never moves a folder being written to
            os.makedirs(folder, exist_ok=True)
            self._open.setdefault(association, {})
            self._touching.setdefault(association, set()).add(key)
        final = os.path.join(folder, f"{name}.{association}{_PART}")
        tmp = os.path.join(folder, f"{_TMP}{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                ds.save_as(f, enforce_file_format=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        fsync_dir(folder)
        with self._lock:
            self._open[association][final] = key
            self._last[key] = time.monotonic()
        return final

    def commit(self, association: str) -> int:
        """The association was released: its parts become the studies' instances. Returns how many."""
        with self._lock:
            parts = self._open.pop(association, {})
            self._touching.pop(association, None)
            folders = set()
            for part, key in parts.items():
                if os.path.exists(part):
                    os.replace(part, part[: -len(f".{association}{_PART}")] + ".dcm")
                    folders.add(os.path.dirname(part))
                self._last[key] = time.monotonic()
        for folder in folders:
            fsync_dir(folder)
        return len(parts)

    def discard(self, association: str) -> int:
        """The association ended without a release: remove its parts. Returns how many."""
        with self._lock:
            parts = self._open.pop(association, {})
            touched = self._touching.pop(association, set())
            for part in parts:
                if os.path.exists(part):
                    os.remove(part)
            for key in touched:
                self._drop_if_empty(key)
        return len(parts)

    def _drop_if_empty(self, key: str) -> None:
        if any(key in keys for keys in self._touching.values()):
            return  # another association is writing into it
        folder = os.path.join(self.folder, key)
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
            self._last.pop(key, None)

    def open_associations(self) -> int:
        """How many associations have sent instances not yet committed."""
        with self._lock:
            return len(self._touching)

    def ready(self, now: float | None = None) -> list[str]:
        """Study keys quiet for ``stable_age`` seconds with no open association holding them."""
        now = time.monotonic() if now is None else now
        with self._lock:
            busy = set().union(*self._touching.values())
            return [
                k
                for k, t in self._last.items()
                if k not in busy and now - t >= self.stable_age and os.path.isdir(os.path.join(self.folder, k))
            ]

    def take(self, key: str) -> str | None:
        """Move a ready study out of the way of new arrivals; returns its folder (None: it has no
        committed instance)."""
        with self._lock:
            self._last.pop(key, None)
            folder = os.path.join(self.folder, key)
            if not os.path.isdir(folder) or not any(n.endswith(".dcm") for n in os.listdir(folder)):
                return None
            self._taken += 1
            taken = f"{folder}{TAKEN}{int(time.time() * 1000)}-{self._taken}"
            os.replace(folder, taken)
            fsync_dir(self.folder)
            return taken

    def recover(self) -> Recovered:
        """At start: remove what unfinished associations left, return the complete studies.

        Example:
            >>> StudyInbox("out/incoming").recover().partial_instances  # doctest: +SKIP
            30
        """
        out = Recovered()
        for name in sorted(os.listdir(self.folder)):
            folder = os.path.join(self.folder, name)
            if not os.path.isdir(folder):
                continue
            for f in os.listdir(folder):
                if f.endswith(_PART) or f.startswith(_TMP):
                    os.remove(os.path.join(folder, f))
                    out.partial_instances += int(f.endswith(_PART))
            if not any(f.endswith(".dcm") for f in os.listdir(folder)):
                shutil.rmtree(folder, ignore_errors=True)
                out.partial_studies += 1
            elif TAKEN in name:
                out.taken.append((name.split(TAKEN)[0], folder))
            else:
                with self._lock:
                    self._last[name] = time.monotonic()
                out.waiting.append(name)
        return out
