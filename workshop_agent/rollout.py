"""A node's side of a rollout: the restart requests an operator's rollout writes for it.

A request (``records.RestartRequest`` at ``/pairs/{pair}/commands/restart/{node}``) is
written by an operator or a registry, whose etcd roles allow it, on a short lease: one
never taken up lapses. This node takes up a request once, and only while the pair is
still in the term the request was judged in (the leader key's epoch) and every version
it names is installed here; it never restarts a copy while it is the active node. It
answers with an event naming the request: ``rollout_restart`` with each service's
outcome, or ``rollout_restart_refused`` with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from hapair.shared import keys
from hapair.shared.log import EventLog
from hapair.shared.mirror import Mirror
from hapair.shared.records import RecordError, RestartRequest, decode
from hapair.shared.topology import Pair
from hapair.workshop_agent.supervisor import Supervisor


def refusal(
    request: RestartRequest,
    me: str,
    leader_epoch: int | None,
    term: int | None,
    installed: Callable[[str, str], bool],
) -> str | None:
    """Why this node does not take ``request`` up, or None: it does."""
    if request.node != me:
        return f"the request is for {request.node}, not {me}"
    if leader_epoch != request.epoch:
        now = "no active node" if leader_epoch is None else f"epoch {leader_epoch}"
        return f"stale: judged at epoch {request.epoch}, the pair is at {now}"
    if term is not None and request.restart:
        return f"{me} is the active node: its copies are restarted once it is a standby"
    missing = [f"{s} {v}" for s, v in sorted(request.versions.items()) if not installed(s, v)]
    if missing:
        return "not installed on " + me + ": " + ", ".join(missing)
    return None


class RestartRequests:
    """``step()`` (from the agent's loop) takes up a new request for this node."""

    def __init__(
        self,
        me: str,
        pairs: Mirror,
        supervisor: Supervisor,
        log: EventLog,
        *,
        pair: Callable[[], Pair | None],
        term: Callable[[], int | None],
        event: Callable[..., None],
        spawn: Callable[[Coroutine[Any, Any, None], str], None],
    ) -> None:
        self.me = me
        self.pairs = pairs
        self.supervisor = supervisor
        self.log = log
        self._pair = pair
        self._term = term
        self._event = event
        self._spawn = spawn
        self._seen: set[tuple[str, int]] = set()
        self._busy = False

    def step(self) -> None:
        pair = self._pair()
        if pair is None or self._busy:
            return
        kv = self.pairs.items.get(keys.restart(pair.name, self.me))
        if kv is None or (kv.key, kv.mod_revision) in self._seen:
            return
        self._seen = {(kv.key, kv.mod_revision)}
        try:
            request = decode(RestartRequest, kv.value, kv.key)
        except RecordError as err:
            self.log.warning("ignoring invalid restart request", problem="; ".join(err.problems))
            return
        leader = self.pairs.items.get(keys.leader(pair.name))
        why = refusal(
            request,
            self.me,
            leader.create_revision if leader is not None else None,
            self._term(),
            lambda s, v: self.supervisor.installed_dir(s, v) is not None,
        )
        details = {"request": request.id, "rollout": request.rollout}
        if why is not None:
            self.log.warning("restart request refused", reason=why, **details)
            self._event("rollout_restart_refused", why, **details)
            return
        self._busy = True
        self._spawn(self._carry_out(request), "rollout-restart")

    async def _carry_out(self, request: RestartRequest) -> None:
        details = {"request": request.id, "rollout": request.rollout}
        try:
            self.supervisor.pin(request.versions)
            self.log.info(
                "restart request taken up",
                versions=request.versions,
                restart=request.restart,
                **details,
            )
            outcomes = await self.supervisor.restart_copies(request.restart)
        finally:
            self._busy = False
        failed = {name: why for name, why in outcomes.items() if why is not None}
        reason = "; ".join(f"{n}: {w}" for n, w in failed.items()) or "every copy up"
        self._event(
            "rollout_restart",
            reason,
            ok=not failed,
            outcomes={n: w or "up" for n, w in outcomes.items()},
            versions=request.versions,
            **details,
        )
