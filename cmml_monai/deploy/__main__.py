"""``python -m cmml_monai.deploy``: the PACS pipeline without any SDK.

Two commands::

    python -m cmml_monai.deploy STUDY_DIR --bundle DIR --out DIR [--case-id ID] [--each-study] [--rules FILE]
    python -m cmml_monai.deploy listen --bundle DIR --out DIR --port 11112 --allow MRI1 [--pacs HOST:PORT:AET]

The first turns a DICOM study folder (or DICOMDIR) into ``<out>/<case>.sr.dcm`` (a DICOM Comprehensive SR)
and ``<out>/<case>.json``; the second is a DICOM Storage SCP that does the same for each study it receives
and sends the SR to the PACS. Cases are named by ``--case-id`` or by a keyed hash of the StudyInstanceUID
(key: ``--key`` or the ``CMML_PSEUDONYM_KEY`` environment variable). Bad input prints one ``error:`` line
and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from cmml_monai.data.errors import DataError
from cmml_monai.deploy.listener import DEFAULT_STABLE_AGE
from cmml_monai.deploy.pipeline import KEY_ENV, StudyPipeline, load_rules, set_log_levels
from cmml_monai.deploy.study import ClinicalSource

__all__ = ["main", "study_parser", "listen_parser"]

_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bundle", required=True, help="folder holding models/model.pt and models/network.json (or that models folder)"
    )
    parser.add_argument("--out", required=True, help="where the SR (.sr.dcm) and JSON files go")
    parser.add_argument("--rules", help="JSON file of series rules (see docs/pacs.md); default: the built-in rules")
    parser.add_argument("--clinical-csv", help="clinical values from this table (default: the DICOM header)")
    parser.add_argument("--id-column", default="case_id", help="the table's id column (default case_id)")
    parser.add_argument("--key-attribute", help="DICOM keyword whose value keys the table row (default: the case id)")
    parser.add_argument("--key", help=f"pseudonym key (default: the {KEY_ENV} environment variable)")
    parser.add_argument("--device", default="cpu", help="where the network runs (default cpu)")
    parser.add_argument(
        "--irregular",
        choices=["refuse", "resample"],
        default="refuse",
        help="a series whose slices are not evenly spaced: refuse it (default) or resample it "
        "to an even gap (said in the log)",
    )
    parser.add_argument("--verbose", action="store_true", help="log the series selection of each case")
    parser.add_argument(
        "--explain",
        action="store_true",
        help="also write the case page (PNG) and its DICOM Secondary Capture, referenced from the SR "
        "and sent with it (see docs/explain.md)",
    )


def study_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m cmml_monai.deploy STUDY_DIR ...``."""
    p = argparse.ArgumentParser(
        prog="python -m cmml_monai.deploy",
        description="A DICOM study folder -> DICOM SR + JSON (research use only). "
        "'python -m cmml_monai.deploy listen -h': the DICOM listener.",
    )
    p.add_argument("study", help="DICOM study folder (searched recursively) or DICOMDIR")
    _common(p)
    p.add_argument("--case-id", help="name of the case in outputs and logs (default: the pseudonym)")
    p.add_argument("--each-study", action="store_true", help="process each study of the folder (default: one)")
    return p


def listen_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m cmml_monai.deploy listen ...``."""
    p = argparse.ArgumentParser(
        prog="python -m cmml_monai.deploy listen",
        description="DICOM Storage SCP: each received study -> SR (+ JSON), sent to the PACS",
    )
    _common(p)
    p.add_argument("--port", type=int, default=11112, help="port to listen on (default 11112)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)",
    )
    p.add_argument("--ae-title", default="CMML", help="this node's AE title; the called AE title must equal it")
    p.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="AET",
        help="a calling AE title that may send (repeat it); see --allow-file",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="an address or network (10.0.0.0/24) senders may connect from (repeat it; default any)",
    )
    p.add_argument("--allow-file", help='JSON allowlist: {"calling_ae_titles": [...], "hosts": [...]}')
    p.add_argument("--allow-any", action="store_true", help="accept any calling AE title (a closed test network only)")
    p.add_argument(
        "--stable-age",
        type=float,
        default=DEFAULT_STABLE_AGE,
        help=f"seconds a study must be quiet before it is processed (default {DEFAULT_STABLE_AGE:g})",
    )
    p.add_argument("--pacs", help="HOST:PORT:AET to send each SR to (default: keep them in OUT/outbox)")
    p.add_argument(
        "--retry-interval",
        type=float,
        default=30.0,
        help="seconds between delivery attempts while the PACS is down (default 30)",
    )
    p.add_argument("--tls-cert", help="TLS for receiving: this node's certificate (PEM); with --tls-key")
    p.add_argument("--tls-key", help="TLS for receiving: this node's private key (PEM)")
    p.add_argument("--tls-ca", help="TLS for receiving: senders must show a certificate signed by this CA")
    p.add_argument("--pacs-tls", action="store_true", help="TLS for sending to the PACS")
    p.add_argument(
        "--pacs-ca", help="TLS for sending: the CA the PACS certificate is checked against (default the system's)"
    )
    p.add_argument("--pacs-cert", help="TLS for sending: this node's certificate, when the PACS asks for one")
    p.add_argument("--pacs-key", help="TLS for sending: the key of --pacs-cert")
    return p


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_log_levels(verbose)


def _pipeline(args: argparse.Namespace) -> StudyPipeline:
    clinical = ClinicalSource(csv=args.clinical_csv, id_column=args.id_column, key_attribute=args.key_attribute)
    return StudyPipeline(
        args.bundle,
        args.out,
        load_rules(args.rules),
        clinical,
        key=args.key,
        device=args.device,
        irregular=args.irregular,
        explain=args.explain,
    )


def _listener(args: argparse.Namespace) -> Any:
    from cmml_monai.deploy.access import client_tls, load_access, server_tls
    from cmml_monai.deploy.listener import Listener, PacsNode

    try:
        pacs = PacsNode.parse(args.pacs) if args.pacs else None
    except ValueError as e:
        raise DataError(f"--pacs: {e}") from e
    access = load_access(args.allow_file, args.allow, args.allow_host)
    if access.open and not args.allow_any:
        raise DataError(
            "listen: say who may send: --allow AET (repeat it) or --allow-file FILE; "
            "--allow-any only on a closed test network"
        )
    if bool(args.tls_cert) != bool(args.tls_key):
        raise DataError("listen: TLS needs both --tls-cert and --tls-key")
    tls = server_tls(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None
    pacs_tls = (
        client_tls(args.pacs_ca, args.pacs_cert, args.pacs_key)
        if args.pacs_tls or args.pacs_ca or args.pacs_cert
        else None
    )
    try:
        return Listener(
            _pipeline(args),
            pacs,
            ae_title=args.ae_title,
            host=args.host,
            port=args.port,
            access=access,
            stable_age=args.stable_age,
            retry_interval=args.retry_interval,
            tls=tls,
            pacs_tls=pacs_tls,
        )
    except ValueError as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"listen: {e}") from e


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns the exit status (2: bad input, one ``error:`` line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    listen = bool(argv) and argv[0] == "listen"
    args = (listen_parser() if listen else study_parser()).parse_args(argv[1:] if listen else argv)
    _setup_logging(args.verbose)
    try:
        if listen:
            node = _listener(args)
            try:
                node.start(block=True)
            except OSError as e:  # the port is taken or the address is not this machine's
                raise DataError(f"listen: cannot listen on {args.host}:{args.port} ({e.strerror or e})") from e
            return 0
        if args.case_id is not None and not _CASE_ID.match(args.case_id):
            raise DataError(
                f"--case-id {args.case_id!r}: use 1-64 letters, digits, '.', '_' or '-' (it names the output files)"
            )
        out_existed = os.path.exists(args.out)
        pipeline = _pipeline(args)
        try:
            for sr_path, json_path in pipeline.run(args.study, args.case_id, args.each_study):
                print(f"{sr_path}\n{json_path}")
                if sr_path in pipeline.captures:
                    print(pipeline.captures[sr_path])
        except DataError:
            if not out_existed and os.path.isdir(args.out) and not os.listdir(args.out):
                os.rmdir(args.out)  # the folder this run made, empty: leave nothing behind
            raise
        return 0
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
