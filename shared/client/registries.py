"""The registries a client is given: their URLs parsed, the order to ask them in, and
their problems reported once each.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from hapair.shared.client.answers import Behind, Garbage, describe_problem
from hapair.shared.log import EventLog

log = EventLog("hapair.client")


def parse_registries(registries: str | Sequence[str]) -> list[str]:
    """``http://r1:8700,r2:8700`` -> ``["http://r1:8700", "http://r2:8700"]``."""
    items = registries.split(",") if isinstance(registries, str) else list(registries)
    urls: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        url = item if "//" in item else f"http://{item}"
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"bad registry URL {item!r}: expected http://HOST:PORT")
        try:
            parts.port  # noqa: B018 (validates the port)
        except ValueError:
            raise ValueError(f"bad registry URL {item!r}: port is not a number") from None
        urls.append(url.rstrip("/"))
    if not urls:
        raise ValueError("no registry URL given")
    return urls


def registry_ssl(
    ca: str | Path | None, cert: str | Path | None = None, key: str | Path | None = None
) -> ssl.SSLContext | None:
    """How to check ``https://`` registries: against ``ca`` (the site CA, say), showing
    ``cert`` (an operator's, for the admin routes) when given; None: the system's CAs.
    Raises ValueError naming the file that cannot be used."""
    if ca is None:
        if cert is not None:
            raise ValueError("a registry client certificate needs the registry's CA as well")
        return None
    # Imported here: the PKI's cryptography costs every client's import otherwise.
    from hapair.shared.pki import PkiError, TlsFiles

    try:
        return TlsFiles(
            Path(ca), Path(cert) if cert else None, Path(key) if key else None
        ).client_context()
    except PkiError as err:
        raise ValueError(f"registry TLS: {err}") from None


class Registries:
    """The registries a resolver asks, and in which order: the one to ask first moves on
    past one that fails (or to one found ahead of the one followed). A registry's new
    problem is warned once, and its recovery told."""

    def __init__(self, registries: str | Sequence[str]) -> None:
        self.urls = parse_registries(registries)
        self.first = 0  # index of the registry to ask first
        self.serving_since: float | None = None  # when the followed registry answered
        self._problems: dict[str, str] = {}

    def order(self, avoid: str | None = None) -> Iterator[str]:
        """Every registry, the first one first and ``avoid`` last."""
        first = self.first
        urls = [self.urls[(first + i) % len(self.urls)] for i in range(len(self.urls))]
        if avoid in urls:
            urls.remove(avoid)
            urls.append(avoid)
        yield from urls

    def answered(self, url: str) -> None:
        if self._problems.pop(url, None) is not None:
            log.info("registry answers again", registry=url)

    def serving(self, url: str) -> None:
        self.answered(url)
        if self.serving_since is None:
            self.serving_since = asyncio.get_running_loop().time()

    def failed(self, url: str, err: BaseException) -> str:
        """Move on from ``url``; warn once per new problem. Returns the problem."""
        problem = describe_problem(err)
        if self.urls[self.first] == url:
            self.first = (self.first + 1) % len(self.urls)
        if isinstance(err, Garbage):
            log.warning("ignoring a registry answer", registry=url, problem=problem)
        elif isinstance(err, Behind):
            log.warning("registry behind; asking another", registry=url, problem=problem)
        elif self._problems.get(url) != problem:
            log.warning("registry unavailable", registry=url, problem=problem)
        self._problems[url] = problem
        return problem
