"""What an event stream asks for (``GET /v1/events?kinds=...&services=...``): the query
parsed or refused naming what is wrong, which messages a filter takes, the streams a
message goes to, and the state a filtered stream starts with."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hapair.registry.cache import SiteCache
from hapair.registry.errors import BadRequest, validate
from hapair.registry.stream import StreamQuery
from hapair.registry.stream_filter import (
    KINDS,
    MAX_SERVICES,
    SERVICES_PATTERN,
    SNAPSHOTS,
    StreamFilter,
    Streams,
)
from hapair.shared.store import Store
from hapair.shared.topology import ENDPOINT_NAME_PATTERN
from tests.unit.test_view import endpoint, leader, status, topo

NO_ETCD = "http://127.0.0.1:1"


def parsed(**query: str) -> StreamFilter | None:
    return validate(StreamQuery, query, "query parameter").stream_filter()


# ---- the query ----------------------------------------------------------------------


def test_no_filter_or_every_kind_is_the_unfiltered_stream() -> None:
    assert parsed() is None
    assert parsed(heartbeat_s="5") is None
    assert parsed(kinds=",".join(KINDS)) is None
    assert parsed(kinds="event,node,endpoint,role,topology,role") is None


def test_kinds_and_services_make_a_filter() -> None:
    assert parsed(kinds="endpoint", services="scada,mes-api,asm.db") == StreamFilter(
        frozenset({"endpoint"}), frozenset({"mes-api", "scada", "asm.db"})
    )
    assert parsed(kinds="role,node") == StreamFilter(frozenset({"role", "node"}))
    # Services alone: every kind, and the endpoint answers of those services only.
    assert parsed(services="mes-api") == StreamFilter(frozenset(KINDS), frozenset({"mes-api"}))
    # As many names as a registry takes, each as long as a name can be.
    names = [f"{i:03d}" + "x" * 60 for i in range(MAX_SERVICES)]
    got = parsed(services=",".join(names))
    assert got is not None and got.services == frozenset(names)


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ({"kinds": "endpoint,roles"}, "kinds: unknown kind 'roles'"),
        ({"kinds": "stale"}, "kinds: unknown kind 'stale'"),
        ({"kinds": "Endpoint"}, "kinds: unknown kind 'Endpoint'"),
        ({"kinds": ""}, "kinds: an empty item"),
        ({"kinds": "endpoint,"}, "kinds: an empty item"),
        ({"services": "mes-api,,scada"}, "services: an empty item"),
        ({"services": ""}, "services: an empty item"),
        ({"services": "bad name!"}, "services: 'bad name!' is not a service name"),
        ({"services": "mes-api\n"}, "services: 'mes-api\\n' is not a service name"),
        ({"services": "asm.web"}, "services: 'asm.web' is not a service name"),
        ({"services": "x" * 64}, "is not a service name"),
        (
            {"services": ",".join(f"s{i}" for i in range(MAX_SERVICES + 1))},
            f"services: {MAX_SERVICES + 1} names, at most {MAX_SERVICES}",
        ),
        ({"kind": "endpoint"}, "kind: Extra inputs are not permitted"),
    ],
)
def test_a_bad_query_is_refused_naming_what_is_wrong(query: dict[str, str], problem: str) -> None:
    with pytest.raises(BadRequest) as refused:
        parsed(**query)
    assert str(refused.value).startswith("invalid query parameter: ")
    assert problem in str(refused.value), refused.value


def test_stale_is_said_to_be_always_sent() -> None:
    with pytest.raises(BadRequest, match="stale events are sent to every stream"):
        parsed(kinds="stale")


@settings(max_examples=40, deadline=None)
@given(text=st.from_regex(SERVICES_PATTERN, fullmatch=True))
def test_what_the_document_allows_is_taken(text: str) -> None:
    got = parsed(services=text)
    assert got is not None and got.services == frozenset(text.split(","))


@settings(max_examples=300, deadline=None)
@given(
    text=st.lists(
        st.one_of(st.from_regex(ENDPOINT_NAME_PATTERN, fullmatch=True), st.text(max_size=8)),
        min_size=1,
        max_size=4,
    ).map(",".join)
)
def test_what_the_document_refuses_is_refused(text: str) -> None:
    allowed = re.fullmatch(SERVICES_PATTERN, text) is not None
    try:
        parsed(services=text)
    except BadRequest:
        assert not allowed, text
    else:
        assert allowed, text


# ---- which messages a filter takes ---------------------------------------------------

ENDPOINTS_OF_MES = StreamFilter(frozenset({"endpoint"}), frozenset({"mes-api"}))


@pytest.mark.parametrize(
    ("stream_filter", "kind", "service", "takes"),
    [
        (ENDPOINTS_OF_MES, "endpoint", "mes-api", True),
        (ENDPOINTS_OF_MES, "endpoint", "scada", False),
        (ENDPOINTS_OF_MES, "role", None, False),
        (ENDPOINTS_OF_MES, "node", None, False),
        (ENDPOINTS_OF_MES, "event", None, False),
        (ENDPOINTS_OF_MES, "topology", None, False),
        (ENDPOINTS_OF_MES, "stale", None, True),
        (StreamFilter(frozenset({"endpoint"})), "endpoint", "scada", True),
        (StreamFilter(frozenset({"role"}), frozenset({"mes-api"})), "role", None, True),
        (StreamFilter(frozenset({"role"}), frozenset({"mes-api"})), "endpoint", "mes-api", False),
        (StreamFilter(frozenset(KINDS), frozenset({"mes-api"})), "node", None, True),
        (StreamFilter(frozenset(KINDS), frozenset({"mes-api"})), "endpoint", "scada", False),
        (StreamFilter(frozenset({"event"})), "stale", None, True),
    ],
)
def test_what_a_filter_takes(
    stream_filter: StreamFilter, kind: str, service: str | None, takes: bool
) -> None:
    assert stream_filter.takes(kind, service) is takes


SERVICES = ["mes-api", "scada", "worker", "asm.db"]
filters = st.one_of(
    st.none(),
    st.builds(
        StreamFilter,
        st.frozensets(st.sampled_from(KINDS), min_size=1),
        st.one_of(st.none(), st.frozensets(st.sampled_from(SERVICES), min_size=1)),
    ),
)
messages = st.one_of(
    st.tuples(st.sampled_from([k for k in KINDS if k != "endpoint"]), st.none()),
    st.tuples(st.just("endpoint"), st.sampled_from(SERVICES)),
    st.tuples(st.just("stale"), st.none()),
)


@settings(max_examples=300, deadline=None)
@given(
    subscribers=st.lists(filters, max_size=12),
    leaving=st.sets(st.integers(0, 11)),
    message=messages,
)
def test_a_message_goes_to_the_streams_whose_filter_takes_it(
    subscribers: list[StreamFilter | None], leaving: set[int], message: tuple[str, str | None]
) -> None:
    streams: Streams[int] = Streams()
    for i, stream_filter in enumerate(subscribers):
        streams.add(i, stream_filter)
    for i in leaving:
        streams.discard(i)
    kind, service = message
    staying = {i: f for i, f in enumerate(subscribers) if i not in leaving}
    expected = {i for i, f in staying.items() if f is None or f.takes(kind, service)}
    got = streams.taking(kind, service)
    assert sorted(got) == sorted(expected)  # each once
    assert len(streams) == len(staying) and set(streams) == set(staying)
    for i in list(staying):
        streams.discard(i)
    assert not streams._routes and not streams._filters  # nothing left of the streams gone


# ---- the state a stream starts with ------------------------------------------------


def cache_with_a_site() -> SiteCache:
    """A cache that read a site (asm active with mes-api, pnt without an active)."""
    cache = SiteCache(Store(NO_ETCD))
    kvs = [
        topo(),
        leader("asm", "asm-a", 42),
        status("asm-a", role="active"),
        status("asm-b"),
        endpoint("mes-api", "asm-a", 42),
    ]
    cache.mirror.items = {kv.key: kv for kv in kvs}
    cache.mirror.revision = max(kv.mod_revision for kv in kvs)
    cache._rebuild()
    return cache


def kinds_and_services(state: bytes) -> list[tuple[str, Any]]:
    found = []
    for block in state.decode().split("\n\n"):
        if not block:
            continue
        kind = re.search(r"^event: (\w+)$", block, re.M)
        service = re.search(r'"service": "([^"]+)"', block)
        assert kind is not None
        found.append((kind[1], service[1] if service else None))
    return found


def test_a_filtered_stream_starts_with_what_it_asked_for() -> None:
    cache = cache_with_a_site()
    everything = kinds_and_services(cache._current_state())
    assert {k for k, _ in everything} == {"topology", "role", "node", "endpoint"}
    assert ("endpoint", "scada") in everything and ("endpoint", "mes-api") in everything
    assert kinds_and_services(cache._current_state(ENDPOINTS_OF_MES)) == [("endpoint", "mes-api")]
    roles = kinds_and_services(cache._current_state(StreamFilter(frozenset({"role"}))))
    assert roles == [("role", None), ("role", None)]
    assert cache._current_state(StreamFilter(frozenset({"event"}))) == b""


def test_the_state_is_encoded_once_per_filter_and_state() -> None:
    cache = cache_with_a_site()
    first = cache._current_state(ENDPOINTS_OF_MES)
    same = StreamFilter(frozenset({"endpoint"}), frozenset({"mes-api"}))
    assert cache._current_state(same) is first
    assert cache._current_state() is cache._current_state(None)
    cache._rebuild()  # a new state
    assert cache._current_state(same) is not first
    assert cache._current_state(same) == first  # nothing changed meanwhile


def test_random_filters_do_not_grow_the_states_kept() -> None:
    cache = cache_with_a_site()
    for i in range(SNAPSHOTS * 3):
        cache._current_state(StreamFilter(frozenset({"endpoint"}), frozenset({f"s{i}"})))
        assert len(cache._snapshots) <= SNAPSHOTS
