"""What the resolver asks a registry's event stream for: the endpoint answers of the
services it follows, and nothing else of the site (roles, nodes, the audit trail, the
other services: a registry would send every stream all of that on every change).

The stream it gets then carries those services only: one more followed needs another
stream, one no longer followed needs none.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

MAX_SERVICES = 100
"""The most services a registry takes in one stream's filter."""
SERVICE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}(\.db)?$"
"""What may have an endpoint: a service's name, or a pair's database (``PAIR.db``).
The site's rule (``shared.topology.ENDPOINT_NAME_PATTERN``), repeated here so that the
client library does not load the site's models; a registry refuses a filter naming
anything else."""
_SERVICE = re.compile(SERVICE_NAME_PATTERN)


@dataclass(frozen=True, slots=True)
class StreamAsk:
    """What one event stream asks a registry for, and so which services it carries."""

    services: frozenset[str] | None = None
    """The services whose endpoint answers it carries; None: every service's."""
    filtered: bool = True
    """False: asked of a registry that takes no filter (older than filters): all."""

    @classmethod
    def endpoints_of(cls, followed: Iterable[str]) -> StreamAsk:
        """The endpoint answers of the services ``followed``. A name no registry could
        carry is left out (it has no endpoint anywhere); beyond what a registry takes
        by name, or with no name left, every service's."""
        names = frozenset(s for s in followed if _SERVICE.fullmatch(s))
        return cls(names if 0 < len(names) <= MAX_SERVICES else None)

    @classmethod
    def everything(cls) -> StreamAsk:
        return cls(None, filtered=False)

    def params(self) -> dict[str, str]:
        """The stream's query parameters."""
        if not self.filtered:
            return {}
        if self.services is None:
            return {"kinds": "endpoint"}
        return {"kinds": "endpoint", "services": ",".join(sorted(self.services))}

    def carries(self, service: str) -> bool:
        return self.services is None or service in self.services

    def lacks(self, followed: Iterable[str]) -> bool:
        """Whether a service ``followed`` is one this stream does not carry and another
        could: a stream that asks for it too is needed."""
        return any(not self.carries(s) and _SERVICE.fullmatch(s) for s in followed)
