"""What the registry answers, parsed at the boundary, and the endpoint clients use.

The wire models are strict: a registry that sends a port as a string, a negative epoch
or a body of the wrong shape has sent garbage, and the resolver ignores it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from pydantic import BaseModel, ConfigDict, Field

STALE_HEADER = "X-Hapair-Stale"
"""Set by a registry that has lost etcd on the answers it gives from memory."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a service answers now. ``(epoch, revision)`` orders endpoints: higher is
    newer. ``revision`` is the etcd revision that published it, the same on every
    registry: it orders the endpoints of one epoch (republished at another address).

    ``stale`` is True when no registry could confirm it lately: it is the last one
    known, kept because nothing better is known. It takes no part in comparisons.
    """

    service: str
    pair: str
    node: str
    host: str
    port: int
    protocol: str
    epoch: int
    revision: int = 0
    stale: bool = field(default=False, compare=False)

    @property
    def address(self) -> str:
        """``HOST:PORT``, with an IPv6 host in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def url(self, scheme: str | None = None) -> str:
        """``http://HOST:PORT`` (the scheme defaults to the endpoint's protocol)."""
        return f"{scheme or self.protocol}://{self.address}"

    def newer_than(self, other: Endpoint | None) -> bool:
        """A later epoch, or the same epoch published later (the active republished its
        endpoint after a topology change)."""
        return other is None or (self.epoch, self.revision) > (other.epoch, other.revision)

    def marked(self, stale: bool) -> Endpoint:
        return self if self.stale == stale else replace(self, stale=stale)

    def describe(self) -> str:
        return f"{self.node} at {self.address} (epoch {self.epoch})"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class EndpointAnswer(_Wire):
    """``200`` of ``GET /v1/endpoints/{service}``, and an ``endpoint`` event's data."""

    service: str = Field(min_length=1)
    pair: str = Field(min_length=1)
    node: str = Field(min_length=1)
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    protocol: str
    epoch: int = Field(ge=1)
    revision: int = Field(0, ge=0)
    """The etcd revision that published the endpoint (0 from a registry that does not
    say)."""
    stale: bool = False
    """The registry says that it may be behind etcd."""

    def endpoint(self) -> Endpoint:
        return Endpoint(
            self.service,
            self.pair,
            self.node,
            self.host,
            self.port,
            self.protocol,
            self.epoch,
            self.revision,
        )


class ErrorAnswer(_Wire):
    """``503`` or ``404``: why there is no endpoint; a 503 says as of which etcd
    revision."""

    error: str
    revision: int = Field(0, ge=0)
    stale: bool = False


class StreamedAnswer(_Wire):
    """The head of an ``endpoint`` event: which service, and the lookup status."""

    service: str = Field(min_length=1)
    status: int
