"""The registry's stale header, as the client library names it; the registry CA option."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from hapair.shared import pki
from hapair.shared.client.models import STALE_HEADER
from hapair.shared.client.registries import registry_ssl


def test_stale_header_name_is_the_registrys() -> None:
    from hapair.registry.routes import STALE_HEADER as registry_header

    assert registry_header == STALE_HEADER


def test_the_registry_ca_option_is_checked_when_given(tmp_path: Path) -> None:
    """No CA: the system's CAs check https:// registries; a CA that cannot be read, or
    a client certificate without a CA, is refused naming the file or the option."""
    assert registry_ssl(None) is None
    with pytest.raises(ValueError, match="needs the registry's CA"):
        registry_ssl(None, tmp_path / "alice.crt", tmp_path / "alice.key")
    with pytest.raises(ValueError, match=str(tmp_path / "nope.crt")):
        registry_ssl(tmp_path / "nope.crt")
    pki.init(tmp_path, "test")
    pki.issue(tmp_path, "operator", "alice")
    context = registry_ssl(tmp_path / pki.CA_CERT, tmp_path / "alice.crt", tmp_path / "alice.key")
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


def test_the_stream_filter_limits_are_the_registrys() -> None:
    from hapair.registry.stream_filter import MAX_SERVICES
    from hapair.shared.client import interest
    from hapair.shared.topology import ENDPOINT_NAME_PATTERN

    assert interest.MAX_SERVICES == MAX_SERVICES
    assert interest.SERVICE_NAME_PATTERN == ENDPOINT_NAME_PATTERN
