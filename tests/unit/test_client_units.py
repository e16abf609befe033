"""The client library's pure parts: back-off, the event-stream parser, endpoint order,
registry URLs and the wire models."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from hapair.shared.client import Backoff, Endpoint
from hapair.shared.client.errors import DeadlineExceeded
from hapair.shared.client.interest import MAX_SERVICES, StreamAsk
from hapair.shared.client.models import EndpointAnswer
from hapair.shared.client.registries import parse_registries
from hapair.shared.client.sse import SseError, SseEvent, SseParser


def test_backoff_grows_to_its_cap_with_jitter_below_each_step() -> None:
    b = Backoff(initial_s=0.1, max_s=1.0, factor=2.0, jitter=0.5)
    delays = list(itertools.islice(b.delays(random.Random(7)), 12))
    bases = [0.1, 0.2, 0.4, 0.8] + [1.0] * 8
    for delay, base in zip(delays, bases, strict=True):
        assert base * 0.5 <= delay <= base
    assert len(set(delays)) == len(delays)  # jittered: no two alike
    # The same seed gives the same sequence; without jitter it is exact.
    assert delays == list(itertools.islice(b.delays(random.Random(7)), 12))
    exact = Backoff(initial_s=0.1, max_s=1.0, jitter=0.0).delays()
    assert list(itertools.islice(exact, 5)) == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0])


@given(
    initial=st.floats(0.001, 1.0),
    factor=st.floats(1.0, 4.0),
    jitter=st.floats(0.0, 0.99),
    seed=st.integers(0, 2**32),
)
def test_backoff_is_always_bounded(initial: float, factor: float, jitter: float, seed: int) -> None:
    b = Backoff(initial_s=initial, max_s=initial * 10, factor=factor, jitter=jitter)
    for delay in itertools.islice(b.delays(random.Random(seed)), 30):
        assert 0 < delay <= b.max_s


@pytest.mark.parametrize(
    "kwargs", [{"initial_s": 0}, {"initial_s": 3, "max_s": 2}, {"factor": 0.5}, {"jitter": 1.0}]
)
def test_backoff_refuses_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)


def test_sse_parser_handles_split_chunks_crlf_comments_and_multiline_data() -> None:
    stream = (
        b"retry: 1000\r\n\r\n: heartbeat\n\n"
        b'event: endpoint\nid: 7\ndata: {"a": 1}\n\n'
        b"data: line one\ndata: line two\n\n"
        b"event: role\ndata:no-space\n\n"
    )
    for size in (1, 2, 5, len(stream)):
        parser = SseParser()
        events: list[SseEvent] = []
        for i in range(0, len(stream), size):
            events += parser.feed(stream[i : i + size])
        assert events == [
            SseEvent("endpoint", '{"a": 1}', "7"),
            SseEvent("message", "line one\nline two"),
            SseEvent("role", "no-space"),
        ]
        assert parser.last_id == "7"


def test_sse_parser_refuses_endless_lines_and_bad_bytes() -> None:
    with pytest.raises(SseError, match="longer than"):
        SseParser(max_line=100).feed(b"data: " + b"x" * 200)
    with pytest.raises(SseError, match="UTF-8"):
        SseParser().feed(b"data: \xff\xfe\n")


def ep(
    epoch: int, host: str = "10.0.0.1", port: int = 80, node: str = "a", revision: int = 0
) -> Endpoint:
    return Endpoint("svc", "p", node, host, port, "http", epoch, revision)


def test_endpoint_order() -> None:
    assert ep(5).newer_than(None)
    assert ep(6).newer_than(ep(5)) and not ep(5).newer_than(ep(6))
    assert not ep(5).newer_than(ep(5))
    # Same term, republished elsewhere: the later publication is newer, never the other
    # way round.
    assert ep(5, port=81, revision=12).newer_than(ep(5, revision=11))
    assert not ep(5, revision=11).newer_than(ep(5, port=81, revision=12))
    assert ep(6, revision=2).newer_than(ep(5, revision=11))
    assert ep(5).marked(True) == ep(5) and ep(5).marked(True).stale
    assert Endpoint("s", "p", "n", "::1", 80, "http", 1).address == "[::1]:80"
    assert ep(5).url("https") == "https://10.0.0.1:80"


def test_registry_urls() -> None:
    assert parse_registries("http://r1:8700, r2:8700/,") == ["http://r1:8700", "http://r2:8700"]
    assert parse_registries(["https://r"]) == ["https://r"]
    for bad in ("", "ftp://r", "http://:80", "http://r:port"):
        with pytest.raises(ValueError):
            parse_registries(bad)


def test_wire_model_is_strict() -> None:
    good = {
        "service": "s",
        "pair": "p",
        "node": "n",
        "host": "h",
        "port": 80,
        "protocol": "http",
        "epoch": 3,
        "extra": "ignored",
    }
    assert EndpointAnswer.model_validate(good).endpoint() == Endpoint(
        "s", "p", "n", "h", 80, "http", 3
    )
    for field, value in [("port", "80"), ("port", 0), ("epoch", 0), ("epoch", True), ("host", "")]:
        with pytest.raises(ValidationError):
            EndpointAnswer.model_validate({**good, field: value})


def test_deadline_message_says_what_was_tried() -> None:
    err = DeadlineExceeded("svc", 2.0, ep(9), ConnectionRefusedError(111, "Connection refused"))
    assert str(err) == (
        "svc: not reached within 2 s: last tried a at 10.0.0.1:80 (epoch 9): "
        "ConnectionRefusedError: [Errno 111] Connection refused"
    )
    none = DeadlineExceeded("svc", 1.5, None, None, "pair p has no active node")
    assert (
        str(none) == "svc: not reached within 1.5 s: no endpoint known (pair p has no active node)"
    )


# ---- what a stream asks for ---------------------------------------------------------


def test_a_stream_asks_for_the_endpoints_of_the_services_followed_sorted() -> None:
    ask = StreamAsk.endpoints_of(["scada", "mes-api", "asm.db"])
    assert ask.params() == {"kinds": "endpoint", "services": "asm.db,mes-api,scada"}
    assert ask.carries("scada") and not ask.carries("worker")
    assert not ask.lacks(["scada", "mes-api"]) and not ask.lacks([])
    assert ask.lacks(["mes-api", "worker"])  # one more followed: a wider stream is needed


def test_a_name_that_no_registry_can_carry_is_not_asked_for_nor_waited_for() -> None:
    ask = StreamAsk.endpoints_of(["mes-api", "bad name!", "x" * 64])
    assert ask.params() == {"kinds": "endpoint", "services": "mes-api"}
    assert not ask.lacks(["mes-api", "bad name!"])  # no stream could carry it: no restart


def test_beyond_what_a_registry_takes_a_stream_asks_for_every_endpoint() -> None:
    ask = StreamAsk.endpoints_of(f"s{i}" for i in range(MAX_SERVICES + 1))
    assert ask.params() == {"kinds": "endpoint"}
    assert ask.carries("anything") and not ask.lacks(["anything"])
    assert StreamAsk.endpoints_of(f"s{i}" for i in range(MAX_SERVICES)).services is not None
    # Nothing it could ask for by name: every endpoint, never an empty filter.
    assert StreamAsk.endpoints_of(["bad name!"]).params() == {"kinds": "endpoint"}


def test_a_registry_that_takes_no_filter_is_asked_for_everything() -> None:
    ask = StreamAsk.everything()
    assert ask.params() == {} and ask.carries("scada") and not ask.lacks(["scada"])
