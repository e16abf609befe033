"""Where the watchdog revokes its dead agent's lease: etcd's members and the TLS files,
as the agent gives them on the watchdog's command line.

Read and checked as the watchdog starts, so that a bad target is said at once, while
what speaks to etcd (``lease_revoke.py``: sockets, HTTP/2, later OpenSSL) is loaded only
at the agent's death. A named tuple, not a dataclass: ``dataclasses`` brings
``inspect`` and the parser's modules, a megabyte and a half the idle watchdog would
carry for nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit


class Target(NamedTuple):
    """Where and how to reach etcd: its members, and the TLS files (None: lab mode)."""

    endpoints: tuple[tuple[str, int], ...]
    secure: bool
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @classmethod
    def parse(
        cls, urls: str, ca: str | None = None, cert: str | None = None, key: str | None = None
    ) -> Target:
        """``https://h:p,...`` (with ``ca``) or ``http://h:p,...``/``h:p,...`` (lab)."""
        endpoints = []
        schemes = set()
        for item in (i.strip() for i in urls.split(",")):
            if not item:
                continue
            parsed = urlsplit(item if "//" in item else f"http://{item}")
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ValueError(f"bad etcd endpoint {item!r}")
            schemes.add(parsed.scheme)
            endpoints.append((parsed.hostname, parsed.port or 2379))
        if not endpoints or len(schemes) != 1:
            raise ValueError(f"bad etcd endpoints {urls!r}")
        secure = schemes == {"https"}
        if secure and not ca:
            raise ValueError("https:// etcd endpoints need the CA")
        ca_path, cert_path, key_path = (Path(p) if p else None for p in (ca, cert, key))
        return cls(tuple(endpoints), secure, ca_path, cert_path, key_path)
