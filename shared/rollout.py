"""``hapair rollout`` and ``POST /v1/pairs/{pair}/rollout``: one orchestration for both.

:func:`prepare` judges the request (``rollout_plan.refusal``) and makes the plan;
:func:`begin` takes the pair's rollout key, on a lease this process keeps alive (a
second rollout of the pair is refused; one whose orchestrator died lapses), with the
``rollout_started`` event, in one transaction guarded by the leader's epoch and the
pause flag. :meth:`Rollout.run` then carries out the plan's steps, each by a request to
the agents (a restart request, ``records.RestartRequest``; a switchover, as ``hapair
switchover`` writes it) and by waiting for its outcome in etcd. Each step is printed
with its time and filed as an event (``rollout_step``); the end is ``rollout_done``,
``rollout_rolled_back`` or ``rollout_failed``.

A step that fails rolls back what the rollout changed: restarted copies go back to the
version they ran before (still on disk: every node keeps two), and after the switchover
the pair goes back to its old active with its old versions pinned; when it cannot, the
rollout says where the pair is left serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from hapair.shared import admin, keys, records
from hapair.shared.admin import AdminError
from hapair.shared.rollout_plan import (
    Plan,
    held,
    make_plan,
    not_installed,
    refusal,
    services_up,
)
from hapair.shared.store import Store, StoreError
from hapair.shared.txn import Compare, Op
from hapair.shared.view import SiteView
from hapair.shared.waits import cancelled

T = TypeVar("T")
POLL_S = 0.1
LOCK_TTL_S = 10.0
REQUEST_TTL_S = 60.0
"""A restart request not taken up within this lapses (its lease ends)."""
RESTART_WAIT_S = 120.0
SWITCH_WAIT_S = 60.0
EVENT_SKEW_S = 300.0
"""Agents stamp their events with their own clock: read theirs from this far back."""
DEFAULT_TIMEOUT_S = 1800.0
ROLLBACK_S = 300.0
END_S = 3.0
"""An interrupted rollout has this long to file its end and free its key."""
"""A rollback has this long of its own, even once the rollout's time is up."""


class StepFailed(Exception):
    """A step did not reach its outcome; the message says why."""


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    message: str
    rolled_back: bool = False


async def _sync_record(store: Store, pair: str) -> records.SyncState | None:
    kv = await store.get(keys.sync_standby(pair))
    if kv is None:
        return None
    try:
        return records.decode(records.SyncState, kv.value, kv.key)
    except records.RecordError:
        return None


async def prepare(store: Store, pair: str) -> Plan:
    """The plan for a rollout of ``pair`` now; :class:`AdminError` with the reason when
    it may not start."""
    view = await admin.load_view(store)
    found = admin.pair_of(view, pair)
    sync = await _sync_record(store, pair) if found.database is not None else None
    why = refusal(view, found, sync, time.time())
    if why is not None:
        raise AdminError(f"rollout refused: {why}")
    return make_plan(view, found, sync)


async def begin(store: Store, plan: Plan, by: str) -> Rollout:
    """Take the pair's rollout key for ``plan`` (refused if a rollout holds it, or the
    pair moved or was paused since it was judged) and file ``rollout_started``."""
    lock = records.RolloutLock(id=uuid.uuid4().hex[:12], by=by)
    lease = await store.grant(LOCK_TTL_S)
    event = records.Event(
        kind="rollout_started",
        pair=plan.pair,
        node=plan.active,
        epoch=plan.epoch,
        reason=f"rollout of pair {plan.pair} by {by}",
        details={"rollout": lock.id, "by": by, "steps": plan.steps(), "versions": plan.declared},
    )
    key = keys.rollout(plan.pair)
    result = await store.txn(
        [
            Compare.absent(key),
            Compare.created(keys.leader(plan.pair), plan.epoch),
            Compare.absent(keys.paused(plan.pair)),
        ],
        [Op.put(key, lock.encode(), lease=lease), admin.stamped(store, event)],
    )
    if not result.succeeded:
        await store.revoke(lease)
        kv = await store.get(key)
        if kv is not None:
            try:
                held = records.decode(records.RolloutLock, kv.value, kv.key)
                raise AdminError(
                    f"rollout refused: a rollout of pair {plan.pair} is under way "
                    f"(rollout {held.id} by {held.by})"
                )
            except records.RecordError:
                raise AdminError(
                    f"rollout refused: a rollout of pair {plan.pair} is under way"
                ) from None
        raise AdminError(
            f"rollout refused: pair {plan.pair} changed while the rollout was judged; "
            "nothing was changed, try again"
        )
    return Rollout(store, plan, by, lock.id, lease)


class Rollout:
    """One rollout under way: its key held, its steps to carry out (:meth:`run`)."""

    def __init__(self, store: Store, plan: Plan, by: str, rollout_id: str, lease: int) -> None:
        self.store = store
        self.plan = plan
        self.by = by
        self.id = rollout_id
        self.lease = lease
        self.epoch = plan.epoch
        self.say: Callable[[str], None] = lambda line: None
        self._deadline = 0.0
        self._step = 0
        self._steps = len(plan.steps())
        self._lost = asyncio.Event()

    # ---- the run ------------------------------------------------------------------

    async def run(
        self, say: Callable[[str], None], timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> Outcome:
        """Carry the plan out; the outcome (also filed as the last event)."""
        self.say = say
        self._deadline = time.monotonic() + timeout_s
        keeper = asyncio.create_task(self._keep_lock())
        try:
            outcome = await self._run()
        except StoreError as err:
            outcome = Outcome(False, f"etcd failed during the rollout: {err}")
        except asyncio.CancelledError:
            # Stopped from outside (Ctrl-C, a registry shutting down): said, and the key
            # freed, so that neither the events nor hapair top show it under way.
            stopped = Outcome(False, f"interrupted at step {self._step}: run it again")
            with contextlib.suppress(StoreError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._end(stopped)), END_S)
            raise
        finally:
            for bug in await cancelled(keeper):
                raise bug  # a bug: it takes etcd's errors in its stride
        await self._end(outcome)
        return outcome

    async def _end(self, outcome: Outcome) -> None:
        """File the rollout's last event and free its key."""
        kind = (
            "rollout_done"
            if outcome.ok
            else "rollout_rolled_back"
            if outcome.rolled_back
            else "rollout_failed"
        )
        with contextlib.suppress(StoreError):
            await self._event(kind, outcome.message)
        with contextlib.suppress(StoreError):
            await self.store.revoke(self.lease)  # the key goes with it

    async def _run(self) -> Outcome:
        p = self.plan
        if p.up_to_date:
            return Outcome(True, f"pair {p.pair}: every copy already runs the declared versions")
        await self._do(
            f"wait until every node of pair {p.pair} holds the declared versions", self._installed()
        )
        updated: list[str] = []
        for node in p.standbys:
            services = p.restart_on(node)
            if not services:
                continue
            what = f"restart {', '.join(services)} on standby {node}"
            try:
                await self._do(what, self._restart(node, p.declared, services))
            except StepFailed as err:
                back = await self._roll_back_copies([*updated, node])
                return Outcome(False, f"{what} failed: {err}; {back}", rolled_back=True)
            updated.append(node)
        try:
            await self._do(
                f"switch pair {p.pair} over from {p.active} to {p.target}",
                self._switch(p.active, p.target),
            )
        except StepFailed as err:
            back = await self._roll_back_copies(updated)
            return Outcome(
                False, f"switchover to {p.target} failed: {err}; {back}", rolled_back=True
            )
        try:
            await self._do(
                f"see {p.target}'s services up on the declared versions",
                self._up(p.target, p.declared, tuple(p.declared)),
            )
        except StepFailed as err:
            back = await self._switch_back(updated)
            return Outcome(
                False, f"the services on {p.target} failed: {err}; {back}", rolled_back=True
            )
        services = p.restart_on(p.active)
        if services:
            what = f"restart {', '.join(services)} on {p.active}, now a standby"
            try:
                await self._do(what, self._restart(p.active, p.declared, services))
            except StepFailed as err:
                back = await self._roll_back_copies([p.active])
                return Outcome(
                    False,
                    f"{what} failed: {err}; {back}; pair {p.pair} keeps serving the "
                    f"declared versions on {p.target}",
                    rolled_back=True,
                )
        return Outcome(
            True,
            f"pair {p.pair} runs the declared versions on every node, active {p.target}",
        )

    # ---- steps --------------------------------------------------------------------

    async def _do(self, what: str, action: Awaitable[None]) -> None:
        self._step += 1
        self._steps = max(self._steps, self._step)
        started = time.monotonic()
        self._print(f"step {self._step}: {what}...")
        await self._event("rollout_step", what, step=self._step)
        try:
            await action
        except StepFailed as err:
            self._print(f"step {self._step} failed after {time.monotonic() - started:.2f} s: {err}")
            raise
        self._print(f"step {self._step} done in {time.monotonic() - started:.2f} s")

    async def _installed(self) -> None:
        nodes = (self.plan.active, *self.plan.standbys)
        said: list[str] = []

        async def ready() -> bool | None:
            missing = not_installed(await self._view(), self.plan, nodes)
            if missing and missing != said:
                said[:] = missing
                self._print("  waiting: " + "; ".join(missing))
            return not missing or None

        await self._until(ready, "every node holding the declared versions", self._left())

    async def _restart(
        self, node: str, versions: Mapping[str, str], services: tuple[str, ...]
    ) -> None:
        """Ask ``node`` to run ``services`` on ``versions`` and see them up."""
        wanted = dict(versions)
        request = records.RestartRequest(
            rollout=self.id,
            node=node,
            epoch=self.epoch,
            versions=wanted,
            restart=list(services),
            by=self.by,
        )
        await self._request(request)
        answer = await self._answer(
            node, request.id, ("rollout_restart", "rollout_restart_refused")
        )
        if answer.kind == "rollout_restart_refused" or not answer.details.get("ok"):
            raise StepFailed(f"{node}: {answer.reason}")
        await self._until(
            lambda: self._node_up(node, wanted, services),
            f"{', '.join(services)} up on {node}",
            min(self._left(), RESTART_WAIT_S),
        )

    async def _request(self, request: records.RestartRequest) -> None:
        lease = await self.store.grant(REQUEST_TTL_S)
        result = await self.store.txn(
            [Compare.created(keys.leader(self.plan.pair), self.epoch)],
            [Op.put(keys.restart(self.plan.pair, request.node), request.encode(), lease=lease)],
        )
        if not result.succeeded:
            raise StepFailed(f"pair {self.plan.pair} left epoch {self.epoch} meanwhile")

    async def _switch(self, from_node: str, to: str) -> None:
        """A planned switchover to ``to``, as ``hapair switchover --to`` asks for it."""
        try:
            request = await admin.request_switchover(
                self.store, self.plan.pair, to, self.by, f"rollout {self.id}"
            )
        except AdminError as err:
            raise StepFailed(str(err)) from None
        since = time.time_ns()

        async def moved() -> int | None:
            kv = await self.store.get(keys.leader(self.plan.pair))
            if kv is not None and kv.create_revision != self.epoch:
                node = await self._leader()
                if node != to:
                    raise StepFailed(f"{node} took the pair, not {to}")
                return kv.create_revision
            refused = await self._events_of(from_node, since, request.id)
            for e in refused:
                if e.kind == "switchover_rejected":
                    raise StepFailed(f"rejected by {from_node}: {e.reason}")
            return None

        self.epoch = await self._until(moved, f"{to} active", min(self._left(), SWITCH_WAIT_S))

    async def _up(self, node: str, versions: Mapping[str, str], services: tuple[str, ...]) -> None:
        wanted = dict(versions)
        await self._until(
            lambda: self._node_up(node, wanted, services),
            f"the services up on {node}",
            min(self._left(), RESTART_WAIT_S),
        )

    async def _node_up(
        self, node: str, versions: dict[str, str], services: tuple[str, ...]
    ) -> bool | None:
        view = await self._view()
        status = view.statuses.get(node)
        up, why = services_up(status, versions, services)
        if why is not None:
            raise StepFailed(f"on {node}: {why}")
        return up or None

    # ---- rollback -----------------------------------------------------------------

    async def _roll_back_copies(self, nodes: list[str]) -> str:
        """Put the restarted copies on ``nodes`` back on the versions they ran before."""
        self._deadline = max(self._deadline, time.monotonic() + ROLLBACK_S)
        done, failed = [], []
        for node in nodes:
            back = self.plan.back_to(node, self.plan.restart_on(node))
            if not back:
                continue
            try:
                pins = self.plan.pins_back(node, held((await self._view()).statuses.get(node)))
                await self._do(
                    f"roll {', '.join(back)} on {node} back to {', '.join(back.values())}",
                    self._restart(node, {**pins, **back}, tuple(back)),
                )
                done.append(node)
            except (StepFailed, StoreError) as err:
                failed.append(f"{node} ({err})")
        said = f"rolled back on {', '.join(done)}" if done else "no copy had been restarted"
        if failed:
            said += f"; NOT rolled back on {', '.join(failed)}"
        return said

    async def _switch_back(self, updated: list[str]) -> str:
        """After a switchover whose new active failed: the old active, its old versions
        pinned, takes the pair back; then the restarted copies go back too."""
        self._deadline = max(self._deadline, time.monotonic() + ROLLBACK_S)
        p = self.plan
        old = p.back_to(p.active, tuple(p.declared))
        try:
            if old:
                await self._do(
                    f"pin {p.active} to its old versions", self._restart(p.active, old, ())
                )
            await self._do(
                f"switch pair {p.pair} back to {p.active}", self._switch(p.target, p.active)
            )
            await self._do(
                f"see {p.active}'s services up on their old versions",
                self._up(p.active, old, tuple(old)),
            )
        except (StepFailed, StoreError) as err:
            where = await self._leader()
            return f"the pair could not go back to {p.active} ({err}); it is left on {where}"
        back = await self._roll_back_copies(updated)
        return f"pair {p.pair} is back on {p.active} with its old versions; {back}"

    # ---- etcd ---------------------------------------------------------------------

    async def _leader(self) -> str:
        """The pair's active node now, as a sentence's subject."""
        kv = await self.store.get(keys.leader(self.plan.pair))
        if kv is None:
            return "no node"
        try:
            return records.decode(records.Leader, kv.value, kv.key).node
        except records.RecordError:
            return "a node whose leader record is unreadable"

    async def _view(self) -> SiteView:
        return await admin.load_view(self.store)

    async def _answer(self, node: str, request: str, kinds: tuple[str, ...]) -> records.Event:
        since = time.time_ns()

        async def found() -> records.Event | None:
            for e in await self._events_of(node, since, request):
                if e.kind in kinds:
                    return e
            return None

        return await self._until(found, f"{node}'s answer", min(self._left(), RESTART_WAIT_S))

    async def _events_of(self, writer: str, since_ns: int, request: str) -> list[records.Event]:
        start = keys.event(since_ns - int(EVENT_SKEW_S * 1e9), writer)
        kvs, _ = await self.store.get_range(start, keys.prefix_end(keys.events_of(writer)))
        out = []
        for kv in kvs:
            with contextlib.suppress(records.RecordError):
                e = records.decode(records.Event, kv.value, kv.key)
                if e.details.get("request") == request:
                    out.append(e)
        return out

    async def _event(self, kind: str, reason: str, **details: object) -> None:
        event = records.Event(
            kind=kind,
            pair=self.plan.pair,
            epoch=self.epoch,
            reason=reason,
            details={"rollout": self.id, "of": self._steps, **details},
        )
        await admin.emit_event(self.store, event)

    async def _until(self, check: Callable[[], Awaitable[T | None]], what: str, limit: float) -> T:
        deadline = time.monotonic() + max(limit, 0.0)
        while True:
            if self._lost.is_set():
                raise StepFailed("the rollout's key was lost (etcd unreachable for too long)")
            got = await check()
            if got is not None and got is not False:
                return got
            if time.monotonic() >= deadline:
                raise StepFailed(f"no {what} within {limit:.0f} s")
            await asyncio.sleep(POLL_S)

    def _left(self) -> float:
        return self._deadline - time.monotonic()

    async def _keep_lock(self) -> None:
        while True:
            await asyncio.sleep(LOCK_TTL_S / 4)
            try:
                if await self.store.keepalive(self.lease) <= 0:
                    self._lost.set()
                    return
            except StoreError:
                continue

    def _print(self, line: str) -> None:
        self.say(f"{time.strftime('%H:%M:%S')} {line}")
