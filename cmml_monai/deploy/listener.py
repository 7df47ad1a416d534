"""A DICOM node for the PACS pipeline: receive a study by C-STORE, run the model when the association is
released, send the SR by C-STORE to the PACS (pynetdicom).

Files: ``<out_dir>/incoming/<association>/`` holds what an association sent until its studies are processed
(then it is removed); ``<out_dir>/<case>.sr.dcm`` and ``<case>.json`` are the results; ``<out_dir>/outbox/``
holds each SR until the PACS has stored it. An unreachable PACS is retried (``retries`` times,
``retry_delay`` seconds apart, one log line each); what is still not stored stays in the outbox and is sent
again after the next study and at the next start. Logs name a case by its pseudonym and the sender by its AE
title, never by a patient attribute.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from cmml_monai.data.errors import DataError
from cmml_monai.deploy.pipeline import StudyPipeline
from cmml_monai.deploy.study import scan_studies

__all__ = ["PacsError", "PacsNode", "send_sr", "Listener", "OUTBOX", "INCOMING"]

logger = logging.getLogger(__name__)

OUTBOX = "outbox"
INCOMING = "incoming"
_AET = re.compile(r"^[\x20-\x7e]{1,16}$")


class PacsError(DataError):
    """The PACS could not be reached, refused the association or did not store the SR (one line)."""


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


def send_sr(path: str, pacs: PacsNode, calling_ae_title: str = "CMML", timeout: float = 10.0) -> None:
    """C-STORE one SR file to ``pacs``.

    Raises:
        PacsError: unreachable, association rejected or aborted, or a failure status (one line).

    Example:
        >>> send_sr("results/3f2a9c01d4e5b6a7.sr.dcm", PacsNode.parse("127.0.0.1:11112:PACS"))  # doctest: +SKIP
    """
    import pydicom
    from pynetdicom import AE

    ds = pydicom.dcmread(path)
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(pacs.host, int(pacs.port), ae_title=pacs.ae_title)
    if assoc.is_rejected:
        raise PacsError(f"PACS {pacs} rejected the association (check that it knows AE title {calling_ae_title!r})")
    if not assoc.is_established:
        raise PacsError(f"PACS {pacs} is unreachable (no association: connection refused, timed out or aborted)")
    try:
        status = assoc.send_c_store(ds)
    finally:
        if assoc.is_established:
            assoc.release()
    code = None if status is None or "Status" not in status else int(status.Status)
    if code is None:
        raise PacsError(f"PACS {pacs} did not answer the C-STORE (connection lost)")
    if code != 0x0000:
        raise PacsError(f"PACS {pacs} did not store the SR (C-STORE status 0x{code:04X})")


class Listener:
    """Storage SCP that runs :class:`~cmml_monai.deploy.pipeline.StudyPipeline` on each received study.

    Args:
        pipeline: the loaded model and output folder.
        pacs: where SRs go (None: kept in the outbox only).
        ae_title: this node's AE title.
        host, port: where it listens (port 0 picks a free port; see :attr:`port` after :meth:`start`).
        retries: attempts per SR and flush.
        retry_delay: seconds between attempts.
        keep_incoming: keep the received files after processing (they carry PHI: off by default).

    Example:
        >>> node = Listener(StudyPipeline("bundle", "results"), PacsNode.parse("pacs:104:PACS"), port=11112)
        >>> node.start()  # doctest: +SKIP
    """

    def __init__(
        self,
        pipeline: StudyPipeline,
        pacs: PacsNode | None,
        ae_title: str = "CMML",
        host: str = "127.0.0.1",
        port: int = 11112,
        retries: int = 3,
        retry_delay: float = 5.0,
        keep_incoming: bool = False,
    ) -> None:
        if not _AET.match(ae_title):
            raise ValueError(f"AE title must be 1-16 printable characters, got {ae_title!r}")
        if int(retries) < 1:
            raise ValueError(f"retries must be >= 1, got {retries!r}")
        self.pipeline = pipeline
        self.pacs = pacs
        self.ae_title = ae_title
        self.host = host
        self.port = int(port)
        self.retries = int(retries)
        self.retry_delay = float(retry_delay)
        self.keep_incoming = bool(keep_incoming)
        self.out_dir = pipeline.out_dir
        self.outbox = os.path.join(self.out_dir, OUTBOX)
        self.incoming = os.path.join(self.out_dir, INCOMING)
        self._folders: dict[Any, str] = {}
        self._lock = threading.Lock()
        self._jobs: queue.Queue[str | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._server: Any = None
        #: results of the processed studies, in order: ``(sr_path, json_path)``; errors as ``("error", message)``
        self.results: list[tuple[str, str]] = []
        self.processed = threading.Event()

    # -- receiving -------------------------------------------------------------------------------------
    def _on_store(self, event: Any) -> int:
        with self._lock:
            folder = self._folders.get(event.assoc)
            if folder is None:
                folder = self._folders[event.assoc] = os.path.join(self.incoming, uuid.uuid4().hex[:12])
                os.makedirs(folder)
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            # named by the SOP Instance UID only: no patient attribute reaches a file name
            name = re.sub(r"[^0-9.]", "_", str(ds.get("SOPInstanceUID", uuid.uuid4().hex)))
            ds.save_as(os.path.join(folder, name + ".dcm"), enforce_file_format=True)
        except (OSError, ValueError, AttributeError) as e:
            # the sender is told (Out of Resources) and may retry; the message names no patient attribute
            logger.error("an instance from %s could not be stored: %s", event.assoc.requestor.ae_title,
                         type(e).__name__)
            return 0xA700
        return 0x0000

    def _on_released(self, event: Any) -> None:
        with self._lock:
            folder = self._folders.pop(event.assoc, None)
        if folder is not None:
            n = len(os.listdir(folder))
            logger.info("received %d instance(s) from %s; processing when the queue reaches them", n,
                        event.assoc.requestor.ae_title)
            self._jobs.put(folder)

    def _on_aborted(self, event: Any) -> None:
        with self._lock:
            folder = self._folders.pop(event.assoc, None)
        if folder is not None:
            # an incomplete study would give a result from part of the images: drop it, the sender resends
            logger.warning("association from %s aborted: its %d instance(s) are discarded, not processed",
                           event.assoc.requestor.ae_title, len(os.listdir(folder)))
            shutil.rmtree(folder, ignore_errors=True)

    # -- processing and sending ------------------------------------------------------------------------
    def _process(self, folder: str) -> None:
        # each study on its own: one bad series must not cost the other studies of the association
        os.makedirs(self.outbox, exist_ok=True)
        try:
            studies = scan_studies(folder)
        except DataError as e:
            logger.error("received files were not processed: %s", e)
            self.results.append(("error", str(e)))
            studies = []
        try:
            for study in studies:
                name = self.pipeline.case_id_for(study)
                try:
                    sr_path, json_path = self.pipeline.run_study(study, name)
                except DataError as e:
                    logger.error("%s: not processed: %s", name, e)
                    self.results.append(("error", str(e)))
                    continue
                shutil.copyfile(sr_path, os.path.join(self.outbox, os.path.basename(sr_path)))
                sc_path = self.pipeline.captures.get(sr_path)  # issue 32: the case page's SC goes with its SR
                if sc_path is not None:
                    shutil.copyfile(sc_path, os.path.join(self.outbox, os.path.basename(sc_path)))
                self.results.append((sr_path, json_path))
        finally:
            if not self.keep_incoming:
                shutil.rmtree(folder, ignore_errors=True)
        self.flush_outbox()

    def flush_outbox(self) -> int:
        """Send every SR of the outbox to the PACS; each stored one leaves the outbox. Returns how many are
        still waiting."""
        if not os.path.isdir(self.outbox):
            return 0
        pending = sorted(f for f in os.listdir(self.outbox) if f.endswith(".dcm"))
        if self.pacs is None:
            return len(pending)
        left = 0
        for name in pending:
            path = os.path.join(self.outbox, name)
            for attempt in range(1, self.retries + 1):
                try:
                    send_sr(path, self.pacs, self.ae_title)
                except PacsError as e:
                    last = attempt == self.retries
                    logger.warning("SR %s not stored (attempt %d/%d): %s; %s", name, attempt, self.retries, e,
                                   f"kept in {self.outbox}, sent again after the next study or at restart" if last
                                   else f"retrying in {self.retry_delay:g} s")
                    if not last:
                        time.sleep(self.retry_delay)
                    continue
                os.remove(path)
                logger.info("SR %s stored at PACS %s", name, self.pacs)
                break
            else:
                left += 1
        return left

    def _work(self) -> None:
        while True:
            folder = self._jobs.get()
            if folder is None:
                return
            try:
                self._process(folder)
            except Exception:  # keep listening: one bad study must not stop the node
                logger.exception("processing a received study failed")
                self.results.append(("error", "unexpected failure (see the log)"))
            finally:
                self.processed.set()

    # -- life cycle -------------------------------------------------------------------------------------
    def start(self, block: bool = False) -> None:
        """Listen (in the background, or until interrupted with ``block``); first send what the outbox holds."""
        from pynetdicom import AE, StoragePresentationContexts, VerificationPresentationContexts, evt

        for name in (OUTBOX, INCOMING):
            os.makedirs(os.path.join(self.out_dir, name), exist_ok=True)
        self._worker = threading.Thread(target=self._work, name="cmml-pipeline", daemon=True)
        self._worker.start()
        waiting = self.flush_outbox()
        if waiting:
            logger.warning("%d SR(s) wait in %s for the PACS", waiting, self.outbox)
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = list(StoragePresentationContexts) + list(VerificationPresentationContexts)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_RELEASED, self._on_released),
                    (evt.EVT_ABORTED, self._on_aborted)]
        if block:
            self._log_listening()
            try:
                ae.start_server((self.host, self.port), block=True, evt_handlers=handlers)
            finally:
                self.stop()
            return
        self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        self.port = int(self._server.server_address[1])
        self._log_listening()

    def _log_listening(self) -> None:
        logger.info("listening as %s on %s:%d; SRs go to %s", self.ae_title, self.host, self.port,
                    self.pacs if self.pacs is not None else f"{self.outbox} only")

    def stop(self) -> None:
        """Stop listening and let the queued studies finish."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join()
            self._worker = None
