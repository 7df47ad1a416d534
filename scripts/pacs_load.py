"""Bounded load test of the DICOM listener: N concurrent senders x M studies each, allowlist and TLS on.

Everything runs on 127.0.0.1: the listener is ``python -m cmml_monai.deploy listen`` in its own process
(its RSS sampled from /proc), the PACS and the senders are pynetdicom in this process. The studies are the
project's synthetic MEN DICOM (``make_synthetic("men", dicom=True)``: four MR series per study, no Type 2
study attributes); every ``--split-every``-th study of a sender goes one series per association, as
scanners and PACS forward. Printed (and written to ``--out`` as JSON): studies per minute from the first
instance sent to the last SR stored, latency from a study's last instance to its SR at the PACS (which
includes the stable age), the listener's RSS, and whether every study got exactly one SR.

Example::

    python scripts/pacs_load.py --bundle outputs/men_cmml --senders 4 --studies 5 --out load.json
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cert(folder: str, name: str) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 / localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    paths = os.path.join(folder, f"{name}.crt"), os.path.join(folder, f"{name}.key")
    with open(paths[0], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _studies(folder: str, n: int, shape: int) -> list[list[list[str]]]:
    """``n`` synthetic MEN DICOM studies: per study, its series, each a list of files."""
    from cmml_monai.data.synthetic import make_synthetic

    make_synthetic("men", folder, cases=max(n + n // 2 + 2, 12), seed=0, dicom=True, shape=(shape, shape, shape))
    out = []
    for case in sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))):
        case_dir = os.path.join(folder, case)
        series = [
            sorted(os.path.join(case_dir, s, f) for f in os.listdir(os.path.join(case_dir, s)))
            for s in sorted(os.listdir(case_dir))
            if os.path.isdir(os.path.join(case_dir, s))
        ]
        if series:
            out.append(series)
    return out[:n]


def _send(series: list[list[str]], port: int, calling: str, tls, one_per_association: bool) -> None:
    import pydicom
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage

    groups = series if one_per_association else [[f for s in series for f in s]]
    for files in groups:
        ae = AE(ae_title=calling)
        ae.add_requested_context(MRImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="CMML", tls_args=(tls, "localhost") if tls else None)
        if not assoc.is_established:
            raise RuntimeError(f"{calling}: no association with the listener")
        for f in files:
            status = assoc.send_c_store(pydicom.dcmread(f))
            if status is None or int(status.Status) != 0:
                raise RuntimeError(f"{calling}: C-STORE failed")
        assoc.release()


def run(args: argparse.Namespace) -> dict:
    import pydicom
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import ComprehensiveSRStorage

    from cmml_monai.deploy.access import client_tls, server_tls

    work = args.work or tempfile.mkdtemp(prefix="cmml-pacs-load-")
    n = args.senders * args.studies
    studies = _studies(os.path.join(work, "studies"), n, args.shape)
    if len(studies) < n:
        raise SystemExit(f"error: made {len(studies)} studies, {n} needed")
    uid = [str(pydicom.dcmread(s[0][0], stop_before_pixels=True).StudyInstanceUID) for s in studies]

    certs = os.path.join(work, "tls")
    os.makedirs(certs, exist_ok=True)
    node_cert, node_key = _cert(certs, "node")
    pacs_cert, pacs_key = _cert(certs, "pacs")
    stored: dict[str, list[tuple[float, str]]] = {}
    lock = threading.Lock()

    def on_store(event) -> int:
        ds = event.dataset
        with lock:
            stored.setdefault(str(ds.StudyInstanceUID), []).append((time.monotonic(), str(ds.SOPInstanceUID)))
        return 0x0000

    pacs_ae = AE(ae_title="PACS")
    pacs_ae.add_supported_context(ComprehensiveSRStorage)
    pacs_ae.require_calling_aet = ["CMML"]
    pacs = pacs_ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
        ssl_context=server_tls(pacs_cert, pacs_key) if args.tls else None,
    )
    port = _free_port()
    senders = [f"SENDER{i + 1}" for i in range(args.senders)]
    cmd = [
        sys.executable,
        "-m",
        "cmml_monai.deploy",
        "listen",
        "--bundle",
        args.bundle,
        "--out",
        os.path.join(work, "out"),
        "--port",
        str(port),
        "--stable-age",
        str(args.stable_age),
        "--retry-interval",
        "2",
        "--pacs",
        f"127.0.0.1:{pacs.server_address[1]}:PACS",
    ]
    cmd += [a for s in senders for a in ("--allow", s)]
    if args.tls:
        cmd += ["--tls-cert", node_cert, "--tls-key", node_key, "--pacs-tls", "--pacs-ca", pacs_cert]
    env = dict(os.environ, CMML_PSEUDONYM_KEY="load-test", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    log = open(os.path.join(work, "listener.log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    tls = client_tls(ca=node_cert) if args.tls else None
    rss: list[float] = []
    last_sent: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 180
        while "listening as" not in open(log.name).read():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"error: the listener did not start (see {log.name})")
            time.sleep(0.5)
        idle_rss = _rss_mb(proc.pid)
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.5):
                rss.append(_rss_mb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        errors: list[str] = []

        def sender(i: int) -> None:
            for k in range(args.studies):
                j = i * args.studies + k
                try:
                    _send(studies[j], port, senders[i], tls, one_per_association=(k % args.split_every == 0))
                    last_sent[uid[j]] = time.monotonic()
                except Exception as e:  # a failed send is counted, the load goes on
                    errors.append(f"{senders[i]} study {k}: {e}")

        t0 = time.monotonic()
        threads = [threading.Thread(target=sender, args=(i,)) for i in range(args.senders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        end = time.monotonic() + args.timeout
        while time.monotonic() < end and len(stored) < len(last_sent):
            time.sleep(0.2)
        time.sleep(max(2.0, args.stable_age))  # a duplicate SR would come within this
        stop.set()
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
        pacs.shutdown()
    latencies = [min(t for t, _ in stored[u]) - last_sent[u] for u in last_sent if u in stored]
    last_sr = max((t for v in stored.values() for t, _ in v), default=t0)
    result = {
        "senders": args.senders,
        "studies_per_sender": args.studies,
        "studies_sent": len(last_sent),
        "one_series_per_association": sum(1 for k in range(args.studies) if k % args.split_every == 0) * args.senders,
        "files_per_study": sum(len(s) for s in studies[0]),
        "tls": bool(args.tls),
        "allowlist": senders,
        "stable_age_s": args.stable_age,
        "send_errors": errors,
        "studies_with_sr": len(stored),
        "studies_with_exactly_one_sr": sum(1 for u in last_sent if len({s for _, s in stored.get(u, [])}) == 1),
        "sr_duplicates": sum(len(v) - 1 for v in stored.values()),
        "wall_s": round(last_sr - t0, 1),
        "studies_per_minute": round(60 * len(stored) / max(1e-9, last_sr - t0), 2),
        "latency_s_median": round(statistics.median(latencies), 2) if latencies else None,
        "latency_s_max": round(max(latencies), 2) if latencies else None,
        "rss_mb_idle": round(idle_rss, 0),
        "rss_mb_max": round(max(rss), 0) if rss else None,
        "rss_mb_end": round(rss[-1], 0) if rss else None,
        "cpus": os.cpu_count(),
        "work": work,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="a 3D MEN run folder (models/model.pt + network.json)")
    p.add_argument("--senders", type=int, default=4)
    p.add_argument("--studies", type=int, default=5, help="studies per sender")
    p.add_argument(
        "--split-every",
        type=int,
        default=2,
        help="every k-th study of a sender is sent one series per association (default 2)",
    )
    p.add_argument("--shape", type=int, default=16, help="voxels per side of the synthetic volumes")
    p.add_argument("--stable-age", type=float, default=3.0)
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the SRs after the last send")
    p.add_argument("--no-tls", dest="tls", action="store_false")
    p.add_argument("--work", help="working folder (default a new temporary one)")
    p.add_argument("--out", help="write the figures here as JSON")
    args = p.parse_args(argv)
    if args.senders < 1 or args.studies < 1 or args.split_every < 1 or args.senders * args.studies > 200:
        p.error("--senders, --studies, --split-every must be >= 1 and senders x studies <= 200 (bounded)")
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0 if result["studies_with_exactly_one_sr"] == result["studies_sent"] and not result["send_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
