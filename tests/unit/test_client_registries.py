"""The registry's stale header, as the client library names it."""

from __future__ import annotations

from hapair.shared.client.models import STALE_HEADER


def test_stale_header_name_is_the_registrys() -> None:
    from hapair.registry.routes import STALE_HEADER as registry_header

    assert registry_header == STALE_HEADER
