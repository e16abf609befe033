"""The registry's memory: the site as etcd has it, and every lookup answer pre-encoded.

A :class:`~shared.mirror.Mirror` of the whole ``/hapair/v1`` prefix feeds a
:class:`~shared.view.SiteView`. After each batch of changes the view is rebuilt once
(only changed keys are parsed again), every lookup answer is compared with the one
cached, and only answers that changed are encoded again, woken in long-polls and sent
to the event streams that take them (``stream_filter.py``). A lookup is then a dict
read and a bytes copy.

A watch can stall without an error (its etcd member frozen, or cut from its quorum while
still accepting connections), and etcd sends nothing on a quiet watch that aetcd passes
on. So the registry writes a heartbeat key every second and must see it come back
through its own watch within ``fresh_within_s``; when it does not, the registry says it
is stale (lookups carry ``X-Hapair-Stale``, ``/healthz`` answers 503, event streams are
told, and end if it lasts ``stale_streams_s``) and resumes its watch on another member
until a heartbeat comes back.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import itertools
import json
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from hapair.registry.stream_filter import SNAPSHOTS, STALE, StreamFilter, Streams
from hapair.shared import keys
from hapair.shared.log import EventLog
from hapair.shared.mirror import Mirror
from hapair.shared.store import Change, Store, StoreError
from hapair.shared.view import RECENT_EVENTS, Lookup, SiteView

STREAM_BACKLOG = 1024
"""Messages a slow event-stream client may have queued before it is cut off."""
HEARTBEAT_S = 1.0
"""How often the registry checks that its watch is current."""
FRESH_WITHIN_S = 3.0
"""A heartbeat not seen back through the watch within this bound makes the registry stale."""
HEARTBEAT_TTL_S = 10
"""The heartbeat key's lease: gone soon after its registry."""
STALE_STREAMS_S = 5.0
"""How long a registry out of touch with etcd keeps its event streams open, told that
its view is not current, before it ends them."""


def encode(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    epoch: int | None
    lookup: Lookup
    data: dict[str, Any]

    @classmethod
    def of(cls, lookup: Lookup, revision: int = 0) -> Answer:
        """A 503 says as of which revision there is no endpoint (a client then knows
        it from a lagging registry's 503, older than the endpoint it uses)."""
        data = {**lookup.body, "revision": revision} if lookup.status == 503 else dict(lookup.body)
        return cls(lookup.status, encode(data), lookup.epoch, lookup, data)


NOT_LOADED = Answer.of(Lookup(503, {"error": "the registry has not read the site from etcd yet"}))


EVENT_KINDS = 64
"""Distinct event kinds counted by name; more are counted as ``other``."""
_KIND = re.compile(r"[a-z][a-z_ ]{0,39}")


def sse(kind: str, data: Any, revision: int) -> bytes:
    return f"event: {kind}\nid: {revision}\ndata: {json.dumps(data)}\n\n".encode()


Send = Callable[[bytes, bytes], bool]
"""Writes a message (as is, and framed as an HTTP chunk) straight to a stream's socket,
or returns False when it cannot without waiting."""


def chunk(message: bytes) -> bytes:
    """``message`` as one chunk of a chunked HTTP body, framed once for every stream."""
    return b"%x\r\n%s\r\n" % (len(message), message)


class Subscriber:
    """One event stream's queue; ``None`` in the queue ends the stream.

    While nothing is queued or being written, the stream sets ``send``: a change then
    goes to its socket at once, from the publisher's loop over every stream, with no
    task to wake (what a fan-out to a thousand streams costs is their sockets' writes).
    The queue takes what cannot be sent so: the current state a new stream starts
    with, and news for a reader whose socket has not taken the previous message yet.
    """

    def __init__(self, backlog: int = STREAM_BACKLOG) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(backlog)
        self.lagged = False
        self.send: Send | None = None

    def offer(self, message: bytes | None, framed: bytes | None = None) -> None:
        if (
            message is not None
            and self.send is not None
            and self.queue.empty()
            and self.send(message, framed if framed is not None else chunk(message))
        ):
            return
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            # A client that cannot keep up is cut off rather than fed stale news; on
            # reconnecting it starts again from the current state.
            self.lagged = True
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)


COMPACT_EVERY = 4096
"""Long-polls between two sweeps of those woken already off the deadlines' heap."""


class Deadlines:
    """Wakes each long-poll at its deadline, from one timer for them all.

    A timer each costs more than the rest of a long-poll's wait (an event loop handle
    made, then cancelled when news wakes it first, as it does for hundreds at once).
    Here a deadline is a push on a heap; the one timer is set for the earliest, and a
    long-poll woken first is left on the heap until its deadline comes by.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._count = itertools.count()  # ties in time: no futures compared

    def add(self, deadline: float, woken: asyncio.Future[None]) -> None:
        count = next(self._count)
        if count % COMPACT_EVERY == COMPACT_EVERY - 1:
            # Those woken already, by news or by a client gone, leave the heap now and
            # then, rather than only at their deadline: it stays the size of the polls.
            self._heap = [entry for entry in self._heap if not entry[2].done()]
            heapq.heapify(self._heap)
        heapq.heappush(self._heap, (deadline, count, woken))
        if self._heap[0][2] is woken:
            self._arm()

    def __len__(self) -> int:
        """Deadlines held, of long-polls woken already too."""
        return len(self._heap)

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        if self._heap:
            self._timer = asyncio.get_running_loop().call_at(self._heap[0][0], self._due)

    def _due(self) -> None:
        now = asyncio.get_running_loop().time()
        while self._heap and self._heap[0][0] <= now:
            _wake(heapq.heappop(self._heap)[2])
        self._timer = None
        self._arm()


class SiteCache:
    def __init__(
        self,
        store: Store,
        heartbeat_s: float = HEARTBEAT_S,
        fresh_within_s: float = FRESH_WITHIN_S,
        stale_streams_s: float = STALE_STREAMS_S,
    ) -> None:
        self.store = store
        self.mirror = Mirror(store, keys.PREFIX + "/", on_change=self._changed)
        self.stale: str | None = None
        """Why the watch is not known to be current, while it is not."""
        self._heartbeat_key = keys.registry_heartbeat(
            store.identity or "registry", uuid.uuid4().hex[:12]
        )
        self._heartbeat_s = heartbeat_s
        self._fresh_within_s = fresh_within_s
        self._stale_streams_s = stale_streams_s
        self._stale_message: bytes | None = None
        """What the event streams were told when the registry lost touch with etcd,
        until they are told that it is back."""
        self._ending: asyncio.TimerHandle | None = None
        """Ends the event streams if the registry stays out of touch."""
        self._event_keys: list[tuple[int, str]] = []
        """The event keys the mirror keeps (:func:`keys.event_order`), in time order: the
        newest only."""
        self.view = SiteView()
        self.events_seen: Counter[str] = Counter()
        """New events by kind since this registry started (for its metrics)."""
        self.answers: dict[str, Answer] = {}
        self._roles: dict[str, dict[str, Any]] = {}
        self._nodes: dict[str, dict[str, Any]] = {}
        self._topology: dict[str, Any] | None = None
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        """Long-polls waiting for a service's answer to change."""
        self._deadlines = Deadlines()
        self._streams: Streams[Subscriber] = Streams()
        self._scheduled = False
        self._state: list[tuple[str, str | None, bytes]] | None = None
        """The current state's messages, each encoded once: (kind, service, message)."""
        self._snapshots: dict[StreamFilter | None, bytes] = {}
        """The state a stream starts with, per filter asked since the state changed."""
        self._site: tuple[SiteView, dict[str, Any]] | None = None
        self._log = EventLog("hapair.registry")

    @property
    def synced(self) -> bool:
        return self.mirror.synced.is_set() and self.stale is None

    @property
    def problem(self) -> str:
        """Why the registry may be showing the past (meaningful while not ``synced``)."""
        return self.stale or self.mirror.error or "not yet synced with etcd"

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.mirror.run())
            tasks.create_task(self._check_freshness())

    # ---- freshness ----------------------------------------------------------------

    async def _check_freshness(self) -> None:
        loop = asyncio.get_running_loop()
        lease = 0
        while True:
            began = loop.time()
            # A mirror that is not synced says so itself, and is reconnecting already.
            if self.mirror.synced.is_set():
                client = self.store.client
                try:
                    async with asyncio.timeout(self._fresh_within_s):
                        if not lease or await self.store.keepalive(lease) <= 0:
                            lease = await self.store.grant(HEARTBEAT_TTL_S)
                        revision = await self.store.put(self._heartbeat_key, b"", lease=lease)
                        await self.mirror.reached(revision)
                except TimeoutError:
                    self._late(f"own heartbeat not seen within {self._fresh_within_s:g} s", client)
                except StoreError as err:
                    self._late(f"cannot write a heartbeat: {err}", client)
                else:
                    if self.stale is not None:
                        self._log.info("etcd watch current again", member=self.store.member)
                        self.stale = None
                        self._changed(None)
            await asyncio.sleep(max(0.0, began + self._heartbeat_s - loop.time()))

    def _late(self, why: str, client: object) -> None:
        """The watch may be stalled: say so, and resume it on another member."""
        if self.stale is None:
            self._log.warning("etcd watch not current; reconnecting", error=why)
        self.stale = f"not in touch with etcd: {why}"
        self._lost_etcd()
        self.store.failover(why, client)  # unless a failed call moved on already
        self.mirror.restart(self.stale)

    def site(self) -> dict[str, Any]:
        """The site report of the current view, built once per view."""
        if self._site is None or self._site[0] is not self.view:
            self._site = (self.view, self.view.to_json())
        return dict(self._site[1])

    # ---- lookups ------------------------------------------------------------------

    def answer(self, service: str) -> Answer:
        cached = self.answers.get(service)
        if cached is not None:
            return cached
        if not self.view.revision:
            return NOT_LOADED
        # Names nobody declared are answered (404) without being remembered, so that
        # random lookups cannot grow the cache.
        return Answer.of(lookup(self.view, service))

    async def wait_for_epoch(self, service: str, after_epoch: int, wait_s: float) -> Answer:
        """The answer as soon as it carries an epoch above ``after_epoch``, or whatever it
        is when ``wait_s`` runs out. Unknown services answer at once, and so does a
        registry out of touch with etcd: it would wait for news it cannot get."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            answer = self.answer(service)
            if answer.status == 404 or (answer.epoch or 0) > after_epoch or not self.synced:
                return answer
            if loop.time() >= deadline:
                return answer
            woken: asyncio.Future[None] = loop.create_future()
            waiters = self._waiters.setdefault(service, set())
            waiters.add(woken)
            self._deadlines.add(deadline, woken)
            try:
                await woken
            finally:
                waiters.discard(woken)
                if not waiters and self._waiters.get(service) is waiters:
                    del self._waiters[service]

    def _wake_waiters(self, service: str | None = None) -> None:
        """Wake the long-polls of ``service`` (of every service when None)."""
        for name in [service] if service is not None else list(self._waiters):
            for woken in self._waiters.pop(name, ()):
                _wake(woken)

    # ---- event streams ------------------------------------------------------------

    @contextlib.contextmanager
    def subscribe(self, wanted: StreamFilter | None = None) -> Iterator[Subscriber]:
        """A stream that starts with the current state (topology, roles, nodes, endpoint
        answers), then carries every change; of those, what ``wanted`` takes (None:
        all). ``stale`` messages reach it whatever it wants."""
        sub = Subscriber(STREAM_BACKLOG + 2)
        state = self._current_state(wanted)
        if state:
            sub.offer(state)
        if self._stale_message is not None:
            sub.offer(self._stale_message)  # lost in the moment it took to open this one
        self._streams.add(sub, wanted)
        try:
            yield sub
        finally:
            self._streams.discard(sub)

    def _current_state(self, wanted: StreamFilter | None = None) -> bytes:
        """The messages a new stream starts with, as one write: encoded once per state
        and filter, so that a thousand streams opening at once (all sent here by another
        registry) cost one encoding, not a thousand."""
        snapshot = self._snapshots.get(wanted)
        if snapshot is None:
            if len(self._snapshots) >= SNAPSHOTS:
                self._snapshots.clear()  # any client may ask new ones: the memory stays bounded
            state = self._state_messages()
            snapshot = b"".join(
                message
                for kind, service, message in state
                if wanted is None or wanted.takes(kind, service)
            )
            self._snapshots[wanted] = snapshot
        return snapshot

    def _state_messages(self) -> list[tuple[str, str | None, bytes]]:
        if self._state is None:
            revision = self.view.revision
            state: list[tuple[str, str | None, Any]] = []
            if self._topology:
                state.append(("topology", None, self._topology))
            state += [("role", None, role) for role in self._roles.values()]
            state += [("node", None, node) for node in self._nodes.values()]
            state += [
                ("endpoint", service, _endpoint_data(service, answer))
                for service, answer in sorted(self.answers.items())
            ]
            self._state = [
                (kind, service, sse(kind, data, revision)) for kind, service, data in state
            ]
        return self._state

    def close_streams(self) -> None:
        for sub in list(self._streams):
            sub.offer(None)

    def _publish(self, kind: str, data: Any, revision: int, service: str | None = None) -> None:
        """News to the streams that take it: encoded only when one does."""
        streams = self._streams.taking(kind, service)
        if streams:
            self._send(streams, sse(kind, data, revision))

    def _send(self, streams: list[Subscriber], message: bytes) -> None:
        framed = chunk(message)
        for sub in streams:
            sub.offer(message, framed)
            if sub.lagged:
                self._streams.discard(sub)
                self._log.warning("event stream cut off: client too slow")

    # ---- rebuilding after changes -------------------------------------------------

    def _changed(self, change: Change | None) -> None:
        if change is None:
            self._keep_recent_events()
        elif change.kv.key.startswith(keys.REGISTRIES_PREFIX):
            return  # heartbeats: read by the freshness check, not part of the site
        elif change.kv.key.startswith(keys.EVENTS_PREFIX):
            self._event_changed(change)
        if change is None and not self.synced:
            self._lost_etcd()
        # Changes that arrive together (one watch response) cost one rebuild.
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._rebuild)

    # The audit trail is the bulk of the keys (months of events) and only the newest are
    # shown: the mirror keeps those alone, so that a rebuild walks the site's keys only.

    def _keep_recent_events(self) -> None:
        """After a (re)load: every event key is in the mirror; keep the newest."""
        items = self.mirror.items
        found = sorted(keys.event_order(k) for k in items if k.startswith(keys.EVENTS_PREFIX))
        for _, key in found[:-RECENT_EVENTS]:
            del items[key]
        self._event_keys = found[-RECENT_EVENTS:]

    def _event_changed(self, change: Change) -> None:
        key = keys.event_order(change.kv.key)
        at = bisect.bisect_left(self._event_keys, key)
        present = at < len(self._event_keys) and self._event_keys[at] == key
        if change.deleted:
            if present:
                del self._event_keys[at]
        elif not present:
            self._event_keys.insert(at, key)
            if len(self._event_keys) > RECENT_EVENTS:
                self.mirror.items.pop(self._event_keys.pop(0)[1], None)

    def _lost_etcd(self) -> None:
        """Out of touch with etcd, the registry can only show the past: its long-polls
        answer now, its event streams are told at once, and ended if it lasts (their
        clients then follow another registry). A short stall ends none: a thousand
        clients reconnecting at once are a load of their own."""
        revision = self.view.revision
        if self._stale_message is None:
            self._log.warning(
                "lost touch with etcd; telling event streams",
                streams=len(self._streams),
                error=self.problem,
            )
            data = {"stale": True, "error": self.problem, "revision": revision}
            self._stale_message = sse(STALE, data, revision)
            self._send(self._streams.taking(STALE), self._stale_message)
        if self._ending is None:
            loop = asyncio.get_running_loop()
            self._ending = loop.call_later(self._stale_streams_s, self._lost_for_long)
        self._wake_waiters()

    def _lost_for_long(self) -> None:
        self._ending = None
        if self._streams and not self.synced:
            self._log.warning(
                "out of touch with etcd for long; ending event streams",
                streams=len(self._streams),
                after_s=self._stale_streams_s,
                error=self.problem,
            )
            self.close_streams()

    def _in_touch_again(self) -> None:
        """After the rebuild that published what changed meanwhile: the view is current."""
        if self._ending is not None:
            self._ending.cancel()
            self._ending = None
        if self._stale_message is not None:
            self._stale_message = None
            revision = self.view.revision
            self._publish(STALE, {"stale": False, "revision": revision}, revision)

    def _rebuild(self) -> None:
        self._scheduled = False
        self._state = None  # a new revision at least
        self._snapshots.clear()
        old = self.view
        new = SiteView.from_kvs(self.mirror.items.values(), self.mirror.revision, previous=old)
        self.view = new
        rev = new.revision
        for p in set(new.problems) - set(old.problems):
            self._log.warning("ignoring invalid value", key=p.key, problem=p.problem)
        self._update_topology(new, rev)
        self._update_roles(new, rev)
        self._update_answers(new, rev)
        self._update_nodes(old, new, rev)
        if self.synced and (self._stale_message is not None or self._ending is not None):
            self._in_touch_again()
        # The first build after start only shows the past; streams get news.
        for key, event in new.events.items():
            if key not in old.events and old.revision:
                self._publish("event", event.model_dump(mode="json"), rev)
                self.events_seen[self._kind_label(event.kind)] += 1

    def _kind_label(self, kind: str) -> str:
        """An event's kind as a metric label. Anyone who may write events chooses it: a
        kind that does not look like one, or one beyond the first few dozen, is counted
        as ``other`` so that no writer can grow the label set."""
        known = kind in self.events_seen or len(self.events_seen) < EVENT_KINDS
        return kind if known and _KIND.fullmatch(kind) else "other"

    def _update_topology(self, view: SiteView, rev: int) -> None:
        data: dict[str, Any] | None = None
        if view.site is not None and view.topology is not None:
            data = {
                "site": view.site.site,
                "applied_by": view.topology.applied_by,
                "applied_at": view.topology.applied_at,
            }
        elif any(p.key == keys.TOPOLOGY for p in view.problems):
            data = {"site": None, "error": "the topology in etcd is invalid"}
        if data != self._topology:
            self._topology = data
            self._publish("topology", data or {"site": None}, rev)

    def _update_roles(self, view: SiteView, rev: int) -> None:
        pairs = {p.name for p in view.site.pairs()} if view.site is not None else set()
        pairs |= set(view.leaders) | set(view.paused)
        for name in sorted(pairs | set(self._roles)):
            leader = view.leaders.get(name)
            role = {
                "pair": name,
                "active": leader.node if leader else None,
                "epoch": leader.epoch if leader else None,
                "since": leader.since if leader else None,
                "paused": name in view.paused,
            }
            if name not in pairs:
                self._roles.pop(name, None)
            elif self._roles.get(name) != role:
                self._roles[name] = role
                self._publish("role", role, rev)

    def _update_answers(self, view: SiteView, rev: int) -> None:
        services = view.services()
        if unreadable_topology(view):
            services |= set(self.answers)  # still known, if not declared as far as we can see
        for service in services | set(self.answers):
            found = lookup(view, service)
            cached = self.answers.get(service)
            if cached is not None and cached.lookup == found:
                continue
            answer = Answer.of(found, rev)
            if service in services:
                self.answers[service] = answer
            else:
                self.answers.pop(service, None)
            self._publish("endpoint", _endpoint_data(service, answer), rev, service)
            self._wake_waiters(service)

    def _update_nodes(self, old: SiteView, new: SiteView, rev: int) -> None:
        names = {*old.statuses, *new.statuses, *old.drained, *new.drained}
        if new.site is not None:
            names |= {n.name for p in new.site.pairs() for n in p.nodes}
        for name in sorted(names):
            status, drained = new.statuses.get(name), new.drained.get(name)
            if (
                name in self._nodes
                and new.site is old.site
                and status is old.statuses.get(name)
                and drained is old.drained.get(name)
            ):
                continue  # the same decoded objects: nothing about this node changed
            pair = new.site.pair_of_node(name) if new.site is not None else None
            data = {
                "node": name,
                "pair": pair.name if pair else (status.pair if status else None),
                "up": status is not None,
                "role": status.role if status else "down",
                "healthy": status.healthy if status else None,
                "problems": list(status.problems) if status else [],
                "drained": drained is not None,
            }
            if self._nodes.get(name) != data:
                self._nodes[name] = data
                self._publish("node", data, rev)


def unreadable_topology(view: SiteView) -> bool:
    """A topology is stored but this version cannot read it (a newer one, mid-upgrade)."""
    return view.site is None and any(p.key == keys.TOPOLOGY for p in view.problems)


def lookup(view: SiteView, service: str) -> Lookup:
    """The view's answer, except that a registry which cannot read the topology cannot
    say that a service is not declared: 503, never 404, which clients take as final."""
    found = view.lookup(service)
    if found.status == 404 and unreadable_topology(view):
        return Lookup(
            503,
            {
                "error": f"no endpoint record for {service!r}, and the topology in etcd "
                "cannot be read by this registry (a newer version?): cannot tell whether "
                "it is declared"
            },
        )
    return found


def _wake(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)


def _endpoint_data(service: str, answer: Answer) -> dict[str, Any]:
    return {**answer.data, "service": service, "status": answer.status}
