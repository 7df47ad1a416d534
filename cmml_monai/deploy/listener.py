"""A DICOM node for the PACS pipeline: receive studies by C-STORE from invited peers, run the model on each
study once it has been quiet for ``stable_age`` seconds, send the SR to the PACS through a crash-safe
outbox (pynetdicom).

Who may send: the calling AE titles (and optionally host addresses) of :class:`~cmml_monai.deploy.access.Access`,
to this node's AE title only; others are rejected with the standard reason and one log line. The node
listens on 127.0.0.1 unless a host is given; TLS is optional for both directions.

Files under ``out_dir``: ``incoming/`` holds the received instances by study
(:class:`~cmml_monai.deploy.inbox.StudyInbox`: on disk before each C-STORE success, removed once the study
is processed); ``<case>.sr.dcm`` and ``<case>.json`` are the results (a study received again with other
content: ``<case>.v2.sr.dcm``, whose SR names the one it replaces; identical content is skipped);
``state/<study>.json`` records what each study gave; ``outbox/`` holds each DICOM result until the PACS has
stored it (:class:`~cmml_monai.deploy.outbox.Outbox`, retried in the background). Logs name a case by its
pseudonym and a peer by its AE title and address, never by a patient attribute.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socketserver
import ssl
import threading
import uuid
from typing import Any

from cmml_monai.data.errors import DataError
from cmml_monai.data.jsonio import atomic_write_json
from cmml_monai.deploy.access import Access
from cmml_monai.deploy.inbox import StudyInbox, content_hash
from cmml_monai.deploy.outbox import (
    Outbox,
    PacsError,
    PacsNode,
    PacsRefused,
    PacsUnreachable,
    send_dicom,
)
from cmml_monai.deploy.pipeline import StudyPipeline
from cmml_monai.deploy.report import StudyResult
from cmml_monai.deploy.study import load_study

__all__ = [
    "PacsError",
    "PacsUnreachable",
    "PacsRefused",
    "PacsNode",
    "send_sr",
    "Listener",
    "OUTBOX",
    "INCOMING",
    "STATE",
    "DEFAULT_STABLE_AGE",
]

logger = logging.getLogger(__name__)

OUTBOX = "outbox"
INCOMING = "incoming"
STATE = "state"
#: seconds a study must be quiet before it is processed (Orthanc's default StableAge is 60)
DEFAULT_STABLE_AGE = 30.0
_AET = re.compile(r"^[\x20-\x7e]{1,16}$")
#: seconds after a connection closed before its association, if neither released nor aborted, is discarded
_CLOSE_GRACE = 5.0
#: C-STORE statuses: out of resources (the sender may retry), cannot understand (no study UID)
_OUT_OF_RESOURCES, _CANNOT_UNDERSTAND = 0xA700, 0xC000


def send_sr(
    path: str,
    pacs: PacsNode,
    calling_ae_title: str = "CMML",
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """C-STORE one SR (any DICOM file) to ``pacs``: :func:`~cmml_monai.deploy.outbox.send_dicom`.

    Example:
        >>> send_sr("results/3f2a9c01d4e5b6a7.sr.dcm", PacsNode.parse("127.0.0.1:11112:PACS"))  # doctest: +SKIP
    """
    send_dicom(path, pacs, calling_ae_title, timeout, ssl_context)


def _server_class(access: Access, on_refused: Any) -> type:
    from pynetdicom.transport import ThreadedAssociationServer

    class _Server(ThreadedAssociationServer):
        """pynetdicom's server, refusing hosts not on the allowlist before any DICOM is read."""

        def verify_request(self, request: Any, client_address: Any) -> bool:
            host = client_address[0] if isinstance(client_address, tuple) else str(client_address)
            if access.host_allowed(host):
                return True
            on_refused(host)
            return False

        def shutdown(self) -> None:  # this server was made by make_server: the AE does not list it
            socketserver.BaseServer.shutdown(self)
            self.server_close()

    return _Server


class Listener:
    """Storage SCP that runs :class:`~cmml_monai.deploy.pipeline.StudyPipeline` on each complete study.

    Args:
        pipeline: the loaded model and output folder.
        pacs: where results go (None: kept in the outbox only).
        ae_title: this node's AE title; the called AE title must equal it.
        host, port: where it listens (port 0 picks a free port; see :attr:`port` after :meth:`start`).
        access: who may send (None: any calling AE title, logged as a warning).
        stable_age: seconds without a new instance before a study is processed.
        retry_interval: seconds between delivery attempts while the PACS is down.
        tls: server TLS context for receiving (None: plain TCP).
        pacs_tls: client TLS context for sending to the PACS (None: plain TCP).
        keep_incoming: keep the received files after processing (they carry PHI: off by default).

    Example:
        >>> node = Listener(StudyPipeline("bundle", "results"), PacsNode.parse("pacs:104:PACS"), port=11112,
        ...                 access=Access(("MRI1",)))
        >>> node.start()  # doctest: +SKIP
    """

    def __init__(
        self,
        pipeline: StudyPipeline,
        pacs: PacsNode | None,
        ae_title: str = "CMML",
        host: str = "127.0.0.1",
        port: int = 11112,
        access: Access | None = None,
        stable_age: float = DEFAULT_STABLE_AGE,
        retry_interval: float = 30.0,
        tls: ssl.SSLContext | None = None,
        pacs_tls: ssl.SSLContext | None = None,
        keep_incoming: bool = False,
    ) -> None:
        if not isinstance(ae_title, str) or not _AET.match(ae_title) or not ae_title.strip():
            raise ValueError(f"AE title must be 1-16 printable characters, got {ae_title!r}")
        self.pipeline = pipeline
        self.pacs = pacs
        self.ae_title = ae_title
        self.host = host
        self.port = int(port)
        self.access = access or Access()
        self.tls = tls
        self.keep_incoming = bool(keep_incoming)
        self.out_dir = pipeline.out_dir
        self.incoming = os.path.join(self.out_dir, INCOMING)
        self.state_dir = os.path.join(self.out_dir, STATE)
        self.inbox = StudyInbox(self.incoming, stable_age, key=pipeline.key)
        self.outbox = Outbox(os.path.join(self.out_dir, OUTBOX), pacs, ae_title, retry_interval, ssl_context=pacs_tls)
        self._assoc_ids: dict[Any, str] = {}
        self._lock = threading.Lock()
        self._jobs: list[tuple[str, str]] = []
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: Any = None
        #: processed studies in order: ``(sr_path, json_path)``; ``("error", message)``; ``("skipped", study key)``
        self.results: list[tuple[str, str]] = []
        #: set after each study is processed (or refused)
        self.processed = threading.Event()
        #: counts since start: received, rejected, partial_cleaned, resumed
        self.counts = {"received": 0, "rejected": 0, "partial_cleaned": 0, "resumed": 0}

    # -- who may send --------------------------------------------------------------------------------
    def _on_rejected(self, event: Any) -> None:
        calling = event.assoc.requestor.ae_title
        called = getattr(event.assoc.requestor.primitive, "called_ae_title", "?")
        if not self.access.open and calling not in self.access.calling_ae_titles:
            why = f"calling AE title {calling!r} is not on the allowlist"
        elif str(called).strip() != self.ae_title:
            why = f"called AE title {str(called).strip()!r} is not this node's {self.ae_title!r}"
        else:
            why = "too many associations"
        self.counts["rejected"] += 1
        logger.warning("association from %s rejected: %s", event.assoc.requestor.address, why)

    def _on_host_refused(self, host: str) -> None:
        self.counts["rejected"] += 1
        logger.warning("connection from %s refused: the address is not on the allowlist", host)

    # -- receiving -------------------------------------------------------------------------------------
    def _assoc_id(self, assoc: Any) -> str:
        with self._lock:
            return self._assoc_ids.setdefault(assoc, uuid.uuid4().hex[:12])

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        if not ds.get("StudyInstanceUID") or not ds.get("SOPInstanceUID"):
            logger.error(
                "an instance from %s has no StudyInstanceUID or SOPInstanceUID: refused", event.assoc.requestor.ae_title
            )
            return _CANNOT_UNDERSTAND
        try:
            self.inbox.store(self._assoc_id(event.assoc), ds)  # on disk (fsync) before the success below
        except (OSError, ValueError, AttributeError) as e:
            # the sender is told (Out of Resources) and may retry; the message names no patient attribute
            logger.error(
                "an instance from %s could not be stored: %s", event.assoc.requestor.ae_title, type(e).__name__
            )
            return _OUT_OF_RESOURCES
        return 0x0000

    def _on_released(self, event: Any) -> None:
        with self._lock:
            assoc = self._assoc_ids.pop(event.assoc, None)
        if assoc is not None:
            n = self.inbox.commit(assoc)
            self.counts["received"] += n
            logger.info(
                "received %d instance(s) from %s; a study is processed once quiet for %g s",
                n,
                event.assoc.requestor.ae_title,
                self.inbox.stable_age,
            )

    def _on_ended(self, event: Any) -> None:
        # aborted (a dropped connection is an A-P-ABORT too): the sender knows it failed and sends again
        with self._lock:
            assoc = self._assoc_ids.pop(event.assoc, None)
        if assoc is not None:
            n = self.inbox.discard(assoc)
            logger.warning(
                "association from %s ended without a release: its %d instance(s) are discarded, not processed",
                event.assoc.requestor.ae_title,
                n,
            )

    def _on_closed(self, event: Any) -> None:
        # the connection may close before the released/aborted event of its association has run (another
        # thread): only an association neither released nor aborted a while later is discarded here
        timer = threading.Timer(_CLOSE_GRACE, self._on_ended, args=(event,))
        timer.daemon = True
        timer.start()

    # -- processing ------------------------------------------------------------------------------------
    def _state_path(self, key: str) -> str:
        return os.path.join(self.state_dir, f"{key}.json")

    def _read_state(self, key: str) -> dict[str, Any] | None:
        import json

        try:
            with open(self._state_path(key), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _write_state(self, key: str, state: dict[str, Any]) -> None:
        os.makedirs(self.state_dir, exist_ok=True)
        atomic_write_json(self._state_path(key), state, indent=2)

    def _queue_results(self, key: str, state: dict[str, Any]) -> None:
        """Put a version's DICOM files into the outbox, then record that (a crash between is redone)."""
        for name in state["files"]:
            self.outbox.put(os.path.join(self.out_dir, name))
        state["queued"] = True
        self._write_state(key, state)

    def process_study(self, key: str, folder: str) -> StudyResult | None:
        """Process one complete study folder: skip it when identical to a version already processed,
        else write the next version's results and put them in the outbox. Returns the result (None:
        skipped).

        Raises:
            DataError: a bad study (the caller logs it).
        """
        import pydicom

        digest = content_hash(folder)
        state = self._read_state(key)
        if state is not None and digest in state["hashes"]:
            if not state.get("queued"):
                self._queue_results(key, state)
            logger.info("%s: received again, identical to version %d: skipped", state["case"], state["version"])
            return None
        study = load_study(folder)
        name = state["case"] if state else self.pipeline.case_id_for(study)
        version = state["version"] + 1 if state else 1
        previous = []
        if state is not None and os.path.isfile(os.path.join(self.out_dir, state["files"][0])):
            previous = [pydicom.dcmread(os.path.join(self.out_dir, state["files"][0]), stop_before_pixels=True)]
        result = self.pipeline.results_for(study, name, version, previous)
        new = {
            "case": name,
            "version": version,
            "hashes": [*(state or {}).get("hashes", []), digest],
            "files": [os.path.relpath(f, self.out_dir) for f in result.dicom_files],
            "queued": False,
        }
        self._write_state(key, new)
        self._queue_results(key, new)
        if version > 1:
            logger.info(
                "%s: received again with other content: version %d replaces version %d (%s)",
                name,
                version,
                version - 1,
                os.path.basename(result.sr_path),
            )
        return result

    def _process(self, key: str, folder: str) -> None:
        try:
            result = self.process_study(key, folder)
            if result is None:
                self.results.append(("skipped", key))
            else:
                self.results.append((result.sr_path, result.json_path))
        except DataError as e:
            # one bad study is one line; it never stops the node or another study
            logger.error("a study was not processed: %s", e)
            self.results.append(("error", str(e)))
        finally:
            if not self.keep_incoming:
                shutil.rmtree(folder, ignore_errors=True)

    def _schedule(self) -> None:
        # studies become ready by time passing: look every quarter of the stable age (0.1-1 s)
        period = min(1.0, max(0.1, self.inbox.stable_age / 4))
        while not self._stopping.wait(period):
            for key in self.inbox.ready():
                folder = self.inbox.take(key)
                if folder is not None:
                    self._enqueue(key, folder)

    def _enqueue(self, key: str, folder: str) -> None:
        with self._wake:
            self._jobs.append((key, folder))
            self._wake.notify()

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._jobs and not self._stopping.is_set():
                    self._wake.wait()
                if not self._jobs:
                    return
                key, folder = self._jobs.pop(0)
            try:
                self._process(key, folder)
            except Exception:  # keep listening: one bad study must not stop the node
                logger.exception("processing a received study failed")
                self.results.append(("error", "unexpected failure (see the log)"))
            finally:
                self.processed.set()

    def flush_outbox(self) -> int:
        """Send what the outbox holds now; returns how many still wait."""
        return self.outbox.flush()

    # -- life cycle -------------------------------------------------------------------------------------
    def _recover(self) -> None:
        found = self.inbox.recover()
        stale = self.outbox.clean_temporary()
        self.counts["partial_cleaned"] = found.partial_instances
        self.counts["resumed"] = len(found.taken) + len(found.waiting)
        if found.taken or found.waiting or found.partial_instances or stale:
            logger.warning(
                "restart: %d complete study(ies) resumed (%d to process now, %d after their stable "
                "age); %d partial instance(s) of unfinished associations removed (%d study folder(s)); "
                "%d half-written outbox file(s) removed",
                len(found.taken) + len(found.waiting),
                len(found.taken),
                len(found.waiting),
                found.partial_instances,
                found.partial_studies,
                stale,
            )
        for key, folder in found.taken:
            self._enqueue(key, folder)

    def start(self, block: bool = False) -> None:
        """Recover what a crash left, start the outbox sender and listen (in the background, or until
        interrupted with ``block``). Startup never waits for the PACS."""
        from pynetdicom import AE, StoragePresentationContexts, VerificationPresentationContexts, evt

        self._stopping.clear()
        self._recover()
        self.outbox.start()
        for target, name in ((self._work, "cmml-pipeline"), (self._schedule, "cmml-stable-age")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = list(StoragePresentationContexts) + list(VerificationPresentationContexts)
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.access.calling_ae_titles)
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        self._server = ae.make_server(
            (self.host, self.port),
            ssl_context=self.tls,
            evt_handlers=handlers,
            server_class=_server_class(self.access, self._on_host_refused),
        )
        self.port = int(self._server.server_address[1])
        self._log_listening()
        if block:
            try:
                self._server.serve_forever()
            except KeyboardInterrupt:
                pass
            finally:
                self.stop()
            return
        thread = threading.Thread(target=self._server.serve_forever, name="cmml-dicom-server", daemon=True)
        thread.start()

    def _log_listening(self) -> None:
        if self.access.open:
            logger.warning("no allowlist: ANY calling AE title may send studies (use --allow or --allow-file)")
        logger.info(
            "listening as %s on %s:%d (%s); accepting %s; a study is processed once quiet for %g s; results go to %s",
            self.ae_title,
            self.host,
            self.port,
            "TLS" if self.tls else "no TLS",
            self.access,
            self.inbox.stable_age,
            self.pacs if self.pacs is not None else f"{self.outbox.folder} only",
        )

    def stop(self) -> None:
        """Stop listening, finish the queued studies and stop the outbox sender; studies not yet quiet stay
        on disk and are resumed at the next start."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()
        for thread in self._threads:
            thread.join()
        self._threads = []
        self.outbox.stop()
