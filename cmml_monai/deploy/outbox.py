"""A crash-safe outbox of DICOM files for the PACS, sent by C-STORE in the background (pynetdicom).

Any DICOM file put in the outbox (the SR of a study, or any other result object) is copied in under a
temporary name, flushed to disk and renamed, so the outbox never holds half a file under a real name. A
background thread sends what it holds at start, whenever something is put in, and every ``interval``
seconds while the PACS is down, so a down PACS never slows processing or startup. An entry that is not
readable DICOM is moved to ``quarantine/`` (one log line) and the others are still sent; an entry the
PACS refuses (a failure status, its SOP class not accepted) is moved to ``refused/`` with the status in
the log; a PACS that rejects the association or cannot be reached keeps everything waiting.

Example:
    >>> box = Outbox("results/outbox", PacsNode.parse("127.0.0.1:11112:PACS"), interval=30)  # doctest: +SKIP
    >>> box.start(); box.put("results/3f2a9c01d4e5b6a7.sr.dcm")
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import ssl
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from cmml_monai.data.errors import DataError

__all__ = [
    "PacsError",
    "PacsUnreachable",
    "PacsRefused",
    "PacsNode",
    "send_dicom",
    "fsync_dir",
    "Outbox",
    "QUARANTINE",
    "REFUSED",
]

logger = logging.getLogger(__name__)

QUARANTINE = "quarantine"
REFUSED = "refused"
_AET = re.compile(r"^[\x20-\x7e]{1,16}$")
_TMP = ".tmp-"


class PacsError(DataError):
    """The PACS could not be reached, refused the association or did not store the object (one line)."""


class PacsUnreachable(PacsError):
    """No association: connection refused, timed out or aborted (try again later)."""


class PacsRefused(PacsError):
    """The PACS answered and said no: association rejected, SOP class not accepted or a failure status.

    Args:
        message: the one line.
        status: the C-STORE status, or None when the association or the presentation context was refused.
        whole_association: True when the PACS refused the association (every object waits), False when it
            refused this object only.
    """

    def __init__(self, message: str, status: int | None = None, whole_association: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.whole_association = whole_association


@dataclass(frozen=True)
class PacsNode:
    """A DICOM application entity to send to.

    Args:
        host: host name or address.
        port: TCP port.
        ae_title: its AE title (1-16 printable characters).

    Raises:
        ValueError: a bad port or AE title.

    Example:
        >>> PacsNode.parse("pacs.example.org:104:ORTHANC")
        PacsNode(host='pacs.example.org', port=104, ae_title='ORTHANC')
    """

    host: str
    port: int
    ae_title: str

    def __post_init__(self) -> None:
        if not 0 < int(self.port) < 65536:
            raise ValueError(f"PACS port must be 1-65535, got {self.port!r}")
        if not _AET.match(self.ae_title) or not self.ae_title.strip():
            raise ValueError(f"AE title must be 1-16 printable characters, got {self.ae_title!r}")

    @classmethod
    def parse(cls, text: str) -> PacsNode:
        """``HOST:PORT:AET`` -> a node."""
        host, sep, rest = str(text).rpartition(":")
        host, sep2, port = host.rpartition(":")
        if not sep or not sep2 or not host:
            raise ValueError(f"PACS must be HOST:PORT:AET, got {text!r}")
        try:
            return cls(host, int(port), rest)
        except ValueError as e:
            raise ValueError(f"PACS must be HOST:PORT:AET, got {text!r} ({e})") from e

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def send_dicom(
    path: str,
    pacs: PacsNode,
    calling_ae_title: str = "CMML",
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """C-STORE one DICOM file to ``pacs`` (over TLS with ``ssl_context``).

    Raises:
        PacsUnreachable: no association (connection refused, timed out, aborted, TLS failed).
        PacsRefused: association rejected, the SOP class not accepted, or a failure status (named).
        pydicom.errors.InvalidDicomError, OSError: ``path`` is not a readable DICOM file.

    Example:
        >>> send_dicom("results/3f2a9c01d4e5b6a7.sr.dcm", PacsNode.parse("127.0.0.1:11112:PACS"))  # doctest: +SKIP
    """
    import pydicom
    from pynetdicom import AE

    ds = pydicom.dcmread(path)
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    tls = (ssl_context, pacs.host) if ssl_context is not None else None
    assoc = ae.associate(pacs.host, int(pacs.port), ae_title=pacs.ae_title, tls_args=tls)
    if assoc.is_rejected:
        raise PacsRefused(
            f"PACS {pacs} rejected the association (check that it knows AE title {calling_ae_title!r})",
            whole_association=True,
        )
    if not assoc.is_established and assoc.rejected_contexts:  # it answered, then no context was accepted
        raise PacsRefused(f"PACS {pacs} refused SOP class {ds.SOPClassUID.name} (presentation context not accepted)")
    if not assoc.is_established:
        raise PacsUnreachable(
            f"PACS {pacs} is unreachable (no association: connection refused, timed out, aborted or TLS failed)"
        )
    try:
        status = assoc.send_c_store(ds)
    finally:
        if assoc.is_established:
            assoc.release()
    code = None if status is None or "Status" not in status else int(status.Status)
    if code is None:
        raise PacsUnreachable(f"PACS {pacs} did not answer the C-STORE (connection lost)")
    # 0xB000, 0xB007, 0xB006: stored with a warning (coercion, elements discarded)
    if code != 0x0000 and (code >> 12) != 0xB:
        raise PacsRefused(f"PACS {pacs} refused to store it (C-STORE status 0x{code:04X})", status=code)


def fsync_dir(folder: str) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk; a no-op where folders cannot be
    opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Outbox:
    """A folder of DICOM files waiting for the PACS, and the background thread that sends them.

    Args:
        folder: the outbox folder (made when missing); ``quarantine/`` and ``refused/`` go inside it.
        pacs: where they go (None: they are only kept).
        ae_title: the calling AE title.
        interval: seconds between attempts while the PACS is down or refuses the association.
        timeout: network timeout of one attempt, seconds.
        ssl_context: TLS client context (None: plain TCP).

    Example:
        >>> box = Outbox("out/outbox", PacsNode.parse("127.0.0.1:11112:PACS"), interval=30)  # doctest: +SKIP
        >>> box.start(); box.put("out/c1.sr.dcm"); box.stop()
    """

    def __init__(
        self,
        folder: str,
        pacs: PacsNode | None,
        ae_title: str = "CMML",
        interval: float = 30.0,
        timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if float(interval) <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        self.folder = os.fspath(folder)
        self.pacs = pacs
        self.ae_title = ae_title
        self.interval = float(interval)
        self.timeout = float(timeout)
        self.ssl_context = ssl_context
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._send_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._down = False
        #: counts since start: stored, quarantined, refused
        self.counts = {"stored": 0, "quarantined": 0, "refused": 0}
        os.makedirs(self.folder, exist_ok=True)

    def pending(self) -> list[str]:
        """Names of the files waiting, oldest name first."""
        return sorted(
            n
            for n in os.listdir(self.folder)
            if n.endswith(".dcm") and not n.startswith(_TMP) and os.path.isfile(os.path.join(self.folder, n))
        )

    def put(self, path: str, name: str | None = None) -> str:
        """Copy ``path`` into the outbox as ``name`` (default its file name): temporary name, fsync, rename.
        Sending starts at once in the background. Returns the outbox path."""
        name = name or os.path.basename(path)
        if not name.endswith(".dcm"):
            raise ValueError(f"an outbox entry must end in .dcm, got {name!r}")
        dest = os.path.join(self.folder, name)
        tmp = os.path.join(self.folder, f"{_TMP}{uuid.uuid4().hex[:8]}-{name}")
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, dest)
        fsync_dir(self.folder)
        self._wake.set()
        return dest

    def clean_temporary(self) -> int:
        """Remove half-copied entries (a crash during :meth:`put`); returns how many."""
        stale = [n for n in os.listdir(self.folder) if n.startswith(_TMP)]
        for n in stale:
            os.remove(os.path.join(self.folder, n))
        return len(stale)

    def _move_aside(self, name: str, sub: str) -> str:
        target = os.path.join(self.folder, sub)
        os.makedirs(target, exist_ok=True)
        dest = os.path.join(target, name)
        os.replace(os.path.join(self.folder, name), dest)
        return dest

    def flush(self) -> int:
        """Send every waiting file now; returns how many still wait (the PACS down or refusing)."""
        from pydicom.errors import InvalidDicomError

        with self._send_lock:
            names = self.pending()
            if self.pacs is None:
                return len(names)
            for i, name in enumerate(names):
                path = os.path.join(self.folder, name)
                try:
                    send_dicom(path, self.pacs, self.ae_title, self.timeout, self.ssl_context)
                except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError, KeyError) as e:
                    if isinstance(e, PacsError):
                        if isinstance(e, PacsRefused) and not e.whole_association:
                            self._move_aside(name, REFUSED)
                            self.counts["refused"] += 1
                            logger.error(
                                "outbox entry %s refused: %s; moved to %s/%s (not sent again)",
                                name,
                                e,
                                self.folder,
                                REFUSED,
                            )
                            continue
                        self._report_down(e, len(names) - i)
                        return len(names) - i
                    # a damaged entry (cut short, not DICOM): set aside so the others still go
                    self._move_aside(name, QUARANTINE)
                    self.counts["quarantined"] += 1
                    logger.error(
                        "outbox entry %s is damaged (%s); moved to %s/%s, not sent",
                        name,
                        type(e).__name__,
                        self.folder,
                        QUARANTINE,
                    )
                    continue
                os.remove(path)
                self.counts["stored"] += 1
                if self._down:
                    logger.info("PACS %s reachable again", self.pacs)
                    self._down = False
                logger.info("%s stored at PACS %s", name, self.pacs)
            return 0

    def _report_down(self, error: PacsError, waiting: int) -> None:
        # one line when the PACS goes down, not one per attempt
        if not self._down:
            logger.warning(
                "%s; %d file(s) wait in %s, tried again every %g s", error, waiting, self.folder, self.interval
            )
        self._down = True

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before the flush: an entry put during it wakes the next round
            try:
                waiting = self.flush()
            except Exception:  # keep the thread: the next wake-up tries again
                logger.exception("sending the outbox failed")
                waiting = 1
            # wait for a new entry, or the interval when something is still waiting
            self._wake.wait(self.interval if waiting else None)

    def start(self) -> None:
        """Start the background sender (it first sends what the outbox holds)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="cmml-outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the background sender (an attempt under way finishes first)."""
        if self._thread is None:
            return
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self._thread = None

    def wake(self) -> None:
        """Try sending now (e.g. after the PACS is known to be back)."""
        self._wake.set()

    def describe(self) -> dict[str, Any]:
        """What waits and what was set aside, for a status line."""

        def count(sub: str) -> int:
            d = os.path.join(self.folder, sub)
            return len(os.listdir(d)) if os.path.isdir(d) else 0

        return {"waiting": len(self.pending()), QUARANTINE: count(QUARANTINE), REFUSED: count(REFUSED)}
