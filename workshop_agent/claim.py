"""This node claimed by one agent run alone, and the leader key of its previous run.

A run refuses to start next to another agent of its node, whatever that one's state
directory: the machine's lock of the node, and the node's live status in etcd. The
status it finds there of a run that is gone tells it which leader key it may take back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from hapair.shared import keys
from hapair.shared.agent_process import runs_here
from hapair.shared.clock import Clock
from hapair.shared.log import EventLog
from hapair.shared.mirror import Mirror
from hapair.shared.records import NodeStatus, RecordError, decode
from hapair.shared.store import Store, StoreError
from hapair.shared.topology import Pair
from hapair.workshop_agent.election import Election
from hapair.workshop_agent.node_lock import NodeLocked, lock_node, machine_lock, unlock

ETCD_RETRY_S = 0.5


class AgentError(Exception):
    """The agent cannot run at all (for example another agent holds this node)."""


def lock_state_dir(state_dir: Path, me: str) -> int:
    """The lock of this node in its state directory (its descriptor), held for the run."""
    try:
        return lock_node(state_dir, me, me)
    except NodeLocked as err:
        raise AgentError(str(err)) from None
    except OSError as err:
        raise AgentError(f"cannot lock node {me} in its state directory: {err}") from None


class NodeClaim:
    def __init__(self, store: Store, me: str, log: EventLog, clock: Clock) -> None:
        self.store = store
        self.me = me
        self.log = log
        self.clock = clock
        self.claimed_at = 0.0  # when this run took the node's machine lock
        self._machine_lock: tuple[int, Path] | None = None
        self._previous_run: tuple[int, NodeStatus] | None = None  # lease, status at start
        self._last_refused_reclaim: int | None = None  # for logging changes only

    async def claim(self) -> None:
        """Refuse to run next to another agent of this node, whatever its state directory:
        the machine's lock of this node, and the node's live status in etcd."""
        key = keys.b(keys.node_status(self.me))
        said = ""
        while True:
            try:
                got = await self.store.call(lambda: self.store.client.get_prefix(key))
                break
            except StoreError as err:
                if str(err) != said:
                    self.log.warning(f"waiting for etcd at {self.store.describe}: {err}")
                    said = str(err)
                await asyncio.sleep(ETCD_RETRY_S)
        try:
            machine = machine_lock(int(got.header.cluster_id), self.me)
        except NodeLocked as err:
            raise AgentError(str(err)) from None
        except OSError as err:
            raise AgentError(f"cannot lock node {self.me} on this machine: {err}") from None
        # The previous run of this agent held that lock until it died: a promise it gave
        # over the peer path ran out one lease TTL after, at the latest.
        self.claimed_at = self.clock()
        for kv in got.kvs:
            with contextlib.suppress(RecordError):
                status = decode(NodeStatus, bytes(kv.value), keys.node_status(self.me))
                if bytes(kv.key) != key or status.pid == os.getpid():
                    continue
                if runs_here(status).runs:
                    unlock(*machine)
                    raise AgentError(
                        f"another hapair-agent runs for node {self.me} (pid {status.pid}, "
                        "named by its live status in etcd)"
                    )
                self._previous_run = (int(kv.lease), status)
        self._machine_lock = machine

    def forgotten_promises_until(self, pair: Pair) -> float:
        """Until when a promise the previous run gave over the peer path may still bind
        (``-inf`` without a peer path: no promise was given)."""
        if pair.network is None:
            return -float("inf")
        return self.claimed_at + pair.failover.lease_ttl_s

    def release(self) -> None:
        if self._machine_lock is not None:
            unlock(*self._machine_lock)

    def previous_run_gone(self, lease: int) -> str | None:
        """Why the run of this node that holds ``lease`` may still be alive (None: gone)."""
        if self._previous_run is None or self._previous_run[0] != lease:
            return "its status was not in etcd when this agent started"
        verdict = runs_here(self._previous_run[1])
        return None if verdict.runs is False else verdict.why

    async def reclaim(
        self,
        election: Election,
        pairs: Mirror,
        pair: str,
        epoch: int,
        lease: int,
        event: Callable[..., None],
    ) -> None:
        """Take back the leader key of this node's previous run, once that run is gone."""
        alive = self.previous_run_gone(lease)
        if alive is not None:
            if self._last_refused_reclaim != epoch:
                self.log.error(
                    "not taking back the leader key of this node: the run that holds "
                    "it may be alive; waiting for its lease to lapse",
                    why=alive,
                    old_epoch=epoch,
                )
                self._last_refused_reclaim = epoch
            return
        self.log.warning(
            "taking back the leader key of this node's previous run",
            old_epoch=epoch,
            lease=f"{lease:x}",
        )
        revision = await election.reclaim(epoch, lease)
        if revision is not None:
            pairs.apply_local(keys.leader(pair), None, revision)
            event("reclaim", "agent restarted on the active node", old_epoch=epoch)
