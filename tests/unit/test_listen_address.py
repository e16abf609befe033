"""``HOST:PORT`` as every daemon reads it (``shared.network.listen_address``): the
registry's ``--listen``, the proxy's, the comm server's and ``--metrics-listen``."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hapair.registry.settings import RegistrySettings
from hapair.shared.client.proxy import parser as proxy_parser
from hapair.shared.network import listen_address


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:8700", ("127.0.0.1", 8700)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("reg-1.plant.example:65535", ("reg-1.plant.example", 65535)),
        ("[::1]:8700", ("::1", 8700)),
        ("[fd00:0::1]:502", ("fd00::1", 502)),
        (":8700", ("0.0.0.0", 8700)),  # no host: every IPv4 address
        (" 10.0.0.5:80 ", ("10.0.0.5", 80)),
    ],
)
def test_what_is_read(text: str, address: tuple[str, int]) -> None:
    assert listen_address(text) == address


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("nowhere", "no port"),
        ("127.0.0.1:", "the port must be a number"),
        ("127.0.0.1:http", "the port must be a number"),
        ("127.0.0.1:0", "the port must be from 1 to 65535"),
        ("127.0.0.1:65536", "the port must be from 1 to 65535"),
        ("::1:8700", "an IPv6 address goes in brackets"),
        ("fd00::1:x", "an IPv6 address goes in brackets: [fd00::1]:PORT"),
        ("[::1:8700", "an IPv6 address goes in brackets, then the port: [::1]:8700"),
        ("[10.0.0.1]:80", "'10.0.0.1' in brackets is no IPv6 address"),
        ("a host:80", "'a host' is no host name or address"),
    ],
)
def test_what_is_refused_says_why(text: str, why: str) -> None:
    with pytest.raises(ValueError) as refused:
        listen_address(text)
    assert str(refused.value) == f"expected HOST:PORT, got {text!r}: {why}"


def test_the_registry_reads_its_listen_setting_with_it() -> None:
    settings = RegistrySettings(etcd="http://127.0.0.1:2379", listen="[::1]:8701")
    assert (settings.host, settings.port) == ("::1", 8701)
    assert (RegistrySettings(etcd="http://127.0.0.1:2379", listen=":8702").host) == "0.0.0.0"
    with pytest.raises(ValidationError, match="the port must be from 1 to 65535"):
        RegistrySettings(etcd="http://127.0.0.1:2379", listen="127.0.0.1:0")


def test_the_proxy_reads_its_listen_option_with_it(capsys: pytest.CaptureFixture[str]) -> None:
    args = proxy_parser().parse_args(["--service", "s", "--listen", "[::1]:8080"])
    assert args.listen == ("::1", 8080)
    with pytest.raises(SystemExit):
        proxy_parser().parse_args(["--service", "s", "--listen", "::1:8080"])
    assert "expected HOST:PORT, got '::1:8080': an IPv6 address goes in brackets" in (
        capsys.readouterr().err
    )
