"""The metrics port: its options and the little HTTP it speaks."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from hapair.shared import metrics, pki


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    metrics.add_options(parser)
    return parser.parse_args(argv)


def test_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HAPAIR_METRICS_LISTEN", raising=False)
    assert metrics.from_args(_args()) is None


def test_https_files_are_read_when_given(tmp_path: Path) -> None:
    pki.init(tmp_path, "m")
    issued = pki.issue(tmp_path, "metrics", "a", ips=["127.0.0.1"])
    options = metrics.from_args(
        _args("--metrics-listen", "127.0.0.1:9100", "--metrics-cert", str(issued.cert),
              "--metrics-key", str(issued.key), "--metrics-ca", str(tmp_path / pki.CA_CERT))
    )  # fmt: skip
    assert options is not None and options.tls is not None and options.port == 9100


def test_a_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    ca, cert, key = (str(tmp_path / name) for name in ("ca", "nope.crt", "nope.key"))
    with pytest.raises(metrics.MetricsError, match=r"ca: cannot be read"):
        metrics.from_args(
            _args("--metrics-listen", "127.0.0.1:9100", "--metrics-cert", cert,
                  "--metrics-key", key, "--metrics-ca", ca)
        )  # fmt: skip


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", "200 OK"),
        (b"GET /metrics?name[]=x HTTP/1.0\r\n\r\n", "200 OK"),
        (b"GET / HTTP/1.1\r\n\r\n", "404 Not Found"),
        (b"POST /metrics HTTP/1.1\r\n\r\n", "405 Method Not Allowed"),
        (b"\x16\x03\x01 garbage\r\n\r\n", "400 Bad Request"),
        (b"GET /metrics\r\n\r\n", "400 Bad Request"),
    ],
)
def test_only_a_get_of_metrics_is_answered_with_them(head: bytes, status: str) -> None:
    answered, body = metrics._route(head, lambda: b"figures")
    assert answered == status
    assert (body == b"figures") == (status == "200 OK")
