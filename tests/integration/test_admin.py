"""Operator operations against a real etcd: validation first, nothing written on refusal."""

from __future__ import annotations

import pytest

from hapair.shared import admin, keys, records
from hapair.shared.admin import AdminError
from hapair.shared.store import Store
from tests.support.site_records import FakeAgent, apply_site, site


async def events(store: Store) -> list[records.Event]:
    kvs, _ = await store.get_prefix(keys.EVENTS_PREFIX)
    kvs.sort(key=lambda kv: keys.event_order(kv.key))
    return [records.decode(records.Event, kv.value, kv.key) for kv in kvs]


async def everything(store: Store) -> dict[str, bytes]:
    kvs, _ = await store.get_prefix(keys.PREFIX + "/")
    return {kv.key: kv.value for kv in kvs}


async def pair_with_active(store: Store) -> tuple[FakeAgent, FakeAgent, FakeAgent]:
    await apply_site(store)
    a = await FakeAgent(store, "asm-a", "asm").up()
    b = await FakeAgent(store, "asm-b", "asm").up()
    c = await FakeAgent(store, "asm-c", "asm").up()
    await a.become_active()
    return a, b, c


async def test_apply_and_read_topology(store: Store) -> None:
    with pytest.raises(AdminError, match="no topology has been applied"):
        await admin.read_topology(store)
    doc = await admin.apply_topology(store, site(), by="alice@host")
    stored, parsed = await admin.read_topology(store)
    assert stored == doc and parsed == site()
    assert stored.applied_by == "alice@host"
    [event] = await events(store)
    assert event.kind == "topology_applied" and event.details["pairs"] == ["asm", "pnt"]


async def test_garbage_topology_is_refused_on_read(store: Store) -> None:
    await store.put(keys.TOPOLOGY, b'{"site": {"site": "x"}}')
    with pytest.raises(AdminError, match=r"invalid: site.workshops: Field required"):
        await admin.read_topology(store)


async def test_switchover_request_is_written_with_an_event(store: Store) -> None:
    a, _, _ = await pair_with_active(store)
    request = await admin.request_switchover(store, "asm", "asm-c", by="bob", reason="patching")
    kv = await store.get(keys.switchover("asm"))
    assert kv is not None
    assert records.decode(records.Switchover, kv.value, kv.key) == request
    assert (request.to, request.by, request.reason) == ("asm-c", "bob", "patching")
    [event] = await events(store)
    assert (event.kind, event.pair, event.node, event.epoch) == (
        "switchover_requested",
        "asm",
        "asm-a",
        a.epoch,
    )
    assert event.details == {"request": request.id, "to": "asm-c", "by": "bob"}


async def test_untargeted_switchover_needs_a_ready_standby(store: Store) -> None:
    _, b, c = await pair_with_active(store)
    await b.up(healthy=False)
    await c.crash()
    with pytest.raises(AdminError) as err:
        await admin.request_switchover(store, "asm", None, by="bob")
    assert str(err.value) == (
        "pair asm has no standby ready to take over "
        "(asm-b is not healthy (disk full); asm-c is down (no agent status))"
    )
    await b.up()
    assert (await admin.request_switchover(store, "asm", None, by="bob")).to is None


@pytest.mark.parametrize(
    ("pair", "to", "message"),
    [
        ("nope", None, "no pair named 'nope' in the topology (pairs: asm, pnt)"),
        ("pnt", None, "pair pnt has no active node to switch over from"),
        ("asm", "pnt-a", "cannot switch pair asm over to pnt-a: pnt-a is not a node of pair asm"),
        ("asm", "asm-a", "cannot switch pair asm over to asm-a: asm-a is already active"),
        ("asm", "asm-c", "cannot switch pair asm over to asm-c: asm-c is drained"),
        ("asm", "asm-b", "cannot switch pair asm over to asm-b: asm-b is down (no agent status)"),
    ],
)
async def test_switchover_refusals_change_nothing(
    store: Store, pair: str, to: str | None, message: str
) -> None:
    _, b, _ = await pair_with_active(store)
    await b.crash()
    await store.put(keys.drained("asm-c"), records.Drained(by="op").encode())
    before = await everything(store)
    with pytest.raises(AdminError) as err:
        await admin.request_switchover(store, pair, to, by="bob")
    assert str(err.value) == message
    assert await everything(store) == before


async def test_switchover_of_a_paused_pair_says_resume_first(store: Store) -> None:
    await pair_with_active(store)
    await admin.pause(store, "asm", by="op")
    with pytest.raises(AdminError, match=r"pair asm is paused; resume it first"):
        await admin.request_switchover(store, "asm", "asm-b", by="bob")


async def test_a_pending_request_blocks_another_until_it_is_stale(store: Store) -> None:
    await pair_with_active(store)
    first = await admin.request_switchover(store, "asm", "asm-b", by="bob")
    with pytest.raises(AdminError, match=f"already pending \\(request {first.id} by bob\\)"):
        await admin.request_switchover(store, "asm", "asm-c", by="eve")
    stale = first.model_copy(update={"at": first.at - admin.PENDING_STALE_S - 1})
    await store.put(keys.switchover("asm"), stale.encode())
    second = await admin.request_switchover(store, "asm", "asm-c", by="eve")
    assert second.id != first.id


async def test_no_topology_is_a_clear_refusal(store: Store) -> None:
    with pytest.raises(AdminError, match="no topology has been applied yet"):
        await admin.pause(store, "asm", by="op")
    await store.put(keys.TOPOLOGY, b"garbage")
    with pytest.raises(AdminError, match="the topology stored in etcd is invalid"):
        await admin.request_switchover(store, "asm", None, by="op")


async def test_pause_and_resume(store: Store) -> None:
    await apply_site(store)
    flag = await admin.pause(store, "asm", by="op", reason="maintenance window")
    kv = await store.get(keys.paused("asm"))
    assert kv is not None and records.decode(records.Paused, kv.value, kv.key) == flag
    with pytest.raises(AdminError, match=r"pair asm is already paused \(by op\)"):
        await admin.pause(store, "asm", by="other")
    assert await admin.resume(store, "asm", by="op2") == flag
    assert await store.get(keys.paused("asm")) is None
    with pytest.raises(AdminError, match="pair asm is not paused"):
        await admin.resume(store, "asm", by="op")
    with pytest.raises(AdminError, match="no pair named 'zz'"):
        await admin.pause(store, "zz", by="op")
    assert [(e.kind, e.pair, e.reason) for e in await events(store)] == [
        ("paused", "asm", "maintenance window"),
        ("resumed", "asm", ""),
    ]


async def test_drain_a_standby_writes_only_the_flag(store: Store) -> None:
    await pair_with_active(store)
    result = await admin.drain(store, "asm-b", by="op", reason="disk swap")
    assert (result.pair, result.switchover) == ("asm", None)
    assert await store.get(keys.drained("asm-b")) is not None
    assert await store.get(keys.switchover("asm")) is None
    with pytest.raises(AdminError, match=r"node asm-b is already drained \(by op\)"):
        await admin.drain(store, "asm-b", by="op")
    assert (await admin.undrain(store, "asm-b", by="op")).reason == "disk swap"
    assert await store.get(keys.drained("asm-b")) is None
    with pytest.raises(AdminError, match="node asm-b is not drained"):
        await admin.undrain(store, "asm-b", by="op")
    with pytest.raises(AdminError, match="no node named 'zz' in the topology"):
        await admin.drain(store, "zz", by="op")
    assert [e.kind for e in await events(store)] == ["drained", "undrained"]


async def test_drain_the_active_requests_a_switchover_away(store: Store) -> None:
    await pair_with_active(store)
    result = await admin.drain(store, "asm-a", by="op")
    assert result.switchover is not None and result.switchover.reason == "drain"
    kv = await store.get(keys.switchover("asm"))
    assert kv is not None
    assert records.decode(records.Switchover, kv.value, kv.key).id == result.switchover.id
    assert [e.kind for e in await events(store)] == ["drained", "switchover_requested"]


async def test_drain_the_active_with_nowhere_to_go_is_refused(store: Store) -> None:
    _, b, c = await pair_with_active(store)
    await b.crash()
    await c.crash()
    before = await everything(store)
    with pytest.raises(AdminError) as err:
        await admin.drain(store, "asm-a", by="op")
    assert str(err.value).startswith(
        "cannot drain asm-a: it is active in pair asm and cannot hand over: "
        "pair asm has no standby ready to take over"
    )
    assert await everything(store) == before


async def test_prune_events_deletes_only_old_ones(store: Store) -> None:
    """Of every writer's events, and of events in the earlier layout (STAMP-WRITER)
    that nodes not yet upgraded write, only the old ones go."""
    import time

    now = time.time_ns()
    old_ns, recent_ns = now - 3 * 86400 * 10**9, now - 3600 * 10**9
    old = [keys.event(old_ns, w) for w in ("asm-a", "operator", "zz")]
    old.append(f"{keys.EVENTS_PREFIX}{old_ns:020d}-asm-b")
    recent = [keys.event(recent_ns, w) for w in ("asm-a", "b", "operator")]
    recent.append(f"{keys.EVENTS_PREFIX}{recent_ns:020d}-asm-b")
    for key in old + recent:
        await store.put(key, records.Event(kind="election").encode())
    assert await admin.prune_events(store, older_than_s=86400) == len(old)
    remaining = [kv.key for kv in (await store.get_prefix(keys.EVENTS_PREFIX))[0]]
    assert sorted(remaining) == sorted(recent)
