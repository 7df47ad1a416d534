"""Who may send to the DICOM listener, and TLS for both directions.

An :class:`Access` is the allowlist: the calling AE titles that may associate (and optionally the host
addresses they may come from) and this node's own AE title, which the called AE title must equal. Others
are rejected with the standard A-ASSOCIATE-RJ reasons (calling AE title not recognised, 0x03; called AE
title not recognised, 0x07); a host not on the list is disconnected before any DICOM is read. TLS contexts
are the standard library's :class:`ssl.SSLContext` (pynetdicom takes them as they are).

A JSON allowlist file::

    {"calling_ae_titles": ["MRI1", "ORTHANC"], "hosts": ["10.0.0.5", "10.0.0.6"]}
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from cmml_monai.data.errors import DataError

__all__ = ["Access", "load_access", "server_tls", "client_tls"]

_AET = re.compile(r"^[\x20-\x7e]{1,16}$")


@dataclass(frozen=True)
class Access:
    """The allowlist of the listener.

    Args:
        calling_ae_titles: AE titles that may associate; empty: anyone (only for a closed test network).
        hosts: addresses they may connect from (IPv4/IPv6 addresses or networks such as ``10.0.0.0/24``);
            empty: any address.

    Raises:
        ValueError: a bad AE title or address (named).

    Example:
        >>> Access(("MRI1",), ("10.0.0.0/24",)).host_allowed("10.0.0.7")
        True
    """

    calling_ae_titles: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for t in self.calling_ae_titles:
            if not isinstance(t, str) or not _AET.match(t) or not t.strip():
                raise ValueError(f"allowed AE title must be 1-16 printable characters, got {t!r}")
        for h in self.hosts:
            try:
                ipaddress.ip_network(str(h), strict=False)
            except ValueError as e:
                raise ValueError(f"allowed host must be an IP address or network, got {h!r}") from e

    @property
    def open(self) -> bool:
        """True when any calling AE title is accepted."""
        return not self.calling_ae_titles

    def host_allowed(self, address: str) -> bool:
        """Whether a connection from ``address`` may go on."""
        if not self.hosts:
            return True
        try:
            ip = ipaddress.ip_address(str(address).split("%")[0])
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(h, strict=False) for h in self.hosts)

    def __str__(self) -> str:
        who = ", ".join(self.calling_ae_titles) if self.calling_ae_titles else "ANY calling AE title"
        return who + (f" from {', '.join(self.hosts)}" if self.hosts else "")


def load_access(path: str | None = None, ae_titles: Sequence[str] = (), hosts: Sequence[str] = ()) -> Access:
    """An :class:`Access` from a JSON file (``calling_ae_titles``, ``hosts``) and/or lists given directly
    (added to the file's).

    Raises:
        DataError: the file cannot be read or holds a bad entry (the message names the file).

    Example:
        >>> load_access(ae_titles=["MRI1"]).calling_ae_titles
        ('MRI1',)
    """
    titles, addresses = list(ae_titles), list(hosts)
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            unknown = sorted(set(data) - {"calling_ae_titles", "hosts"})
            if unknown:
                raise ValueError(f"unknown keys {unknown}; use calling_ae_titles, hosts")
            titles += list(data.get("calling_ae_titles", []))
            addresses += list(data.get("hosts", []))
        except (OSError, json.JSONDecodeError, ValueError, TypeError, AttributeError) as e:
            raise DataError(f"allowlist {path}: {e}") from e
    try:
        return Access(tuple(dict.fromkeys(titles)), tuple(dict.fromkeys(addresses)))
    except ValueError as e:
        raise DataError(f"allowlist{' ' + path if path else ''}: {e}") from e


def _files(**paths: str | None) -> None:
    for name, p in paths.items():
        if p is not None and not os.path.isfile(p):
            raise DataError(f"TLS {name} {p} does not exist")


def server_tls(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """TLS for the listener: its certificate and key; with ``ca``, senders must show a certificate signed
    by it (mutual TLS).

    Raises:
        DataError: a file is missing or not a certificate/key (named).

    Example:
        >>> ctx = server_tls("node.crt", "node.key", ca="senders-ca.crt")  # doctest: +SKIP
    """
    _files(certificate=cert, key=key, CA=ca)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise DataError(f"TLS certificate {cert} / key {key}: {e.reason or e}") from e
    ctx.verify_mode = ssl.CERT_REQUIRED if ca else ssl.CERT_NONE
    return ctx


def client_tls(ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """TLS for sending to the PACS: the PACS certificate checked against ``ca`` (default: the system's
    authorities), and this node's certificate/key when the PACS asks for one.

    Raises:
        DataError: a file is missing or not a certificate/key (named).

    Example:
        >>> ctx = client_tls(ca="pacs-ca.crt")  # doctest: +SKIP
    """
    _files(CA=ca, certificate=cert, key=key)
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if cert:
            ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise DataError(f"TLS client certificate or CA: {e.reason or e}") from e
    return ctx
