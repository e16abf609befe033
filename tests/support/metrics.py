"""Reading a daemon's metrics as Prometheus would."""

from __future__ import annotations

import ssl
import urllib.request


def scrape(url: str, context: ssl.SSLContext | None) -> str:
    with urllib.request.urlopen(url, timeout=2, context=context) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(answer.read().decode())


Sample = tuple[str, frozenset[tuple[str, str]]]


def samples(text: str) -> dict[Sample, float]:
    """{(name, labels): value} of an exposition (labels without quotes in values)."""
    out: dict[Sample, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        name, _, labels = series.partition("{")
        pairs = (p.split("=", 1) for p in labels.rstrip("}").split(",") if p)
        out[name, frozenset((k, v.strip('"')) for k, v in pairs)] = float(value)
    return out


def value(found: dict[Sample, float], name: str, **labels: str) -> float | None:
    """The one sample of ``name`` whose labels include ``labels``."""
    matches = [v for (n, ls), v in found.items() if n == name and set(labels.items()) <= ls]
    assert len(matches) <= 1, f"{name} {labels}: {len(matches)} samples"
    return matches[0] if matches else None
