"""What each kind of fault does to the site, how it is healed, and its recovery bound.

An :class:`Action` is one scheduled :class:`~chaos.schedule.Fault` being applied:
``inject`` finds its target (the node holding a role now, the etcd leader now) and
breaks it, ``hold`` waits while it lasts, ``heal`` undoes it. Processes are signalled by
PID, links are cut and blocked at the lab's switch, so a fault can never reach anything
outside the lab.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from hapair.shared.admin import AdminError, request_switchover
from hapair.shared.store import StoreError
from tests.chaos.schedule import ETCD_KINDS, Fault
from tests.chaos.testbed import DB_PAIR, ETCD, LEASE_TTL_S, OBSERVER, Testbed

# Seconds from the heal until every pair the fault touched is served again (leader key,
# active status, the service's own answer; for the database pair a new commit too).
# The worst case is a fault healed just before the old active's lease runs out: the
# lease expires up to TTL + 0.5 s (etcd's expiry tick) after the last keepalive, then a
# standby campaigns and starts its service. Restarting a crashed agent and a lost etcd
# quorum add their own start-up; a lost quorum also keeps the old leases alive for one
# more TTL once etcd is back (etcd resets TTLs when a leader takes over).
TAKEOVER_S = LEASE_TTL_S + 0.5 + 2.0
BOUNDS_S = {
    "crash": TAKEOVER_S + 1.5,
    "freeze": TAKEOVER_S,
    "service_kill": TAKEOVER_S,
    "link_down": TAKEOVER_S,
    "partition_pair": TAKEOVER_S,
    "partition_etcd": TAKEOVER_S,
    "etcd_then_peer": TAKEOVER_S,
    "etcd_member": TAKEOVER_S + 2.0,
    "etcd_member_cut": TAKEOVER_S + 2.0,
    "etcd_quorum": TAKEOVER_S + LEASE_TTL_S + 4.0,
    "loss": TAKEOVER_S,
    "delay": TAKEOVER_S,
    "switchover": TAKEOVER_S,
    "pg_crash": TAKEOVER_S + 6.0,
    "pg_crash_freeze": TAKEOVER_S + 6.0,
    "restart_promised": TAKEOVER_S + 1.5,
    "escape_freeze": TAKEOVER_S,
    "catchup_isolated": TAKEOVER_S + 6.0,
}
# A client of the database reconnects through the libpq host list, 2 s per dead host,
# and a promoted standby must be a primary before it commits.
DB_EXTRA_S = 6.0


def touched_pairs(fault: Fault, bed: Testbed) -> list[str]:
    """The pairs whose recovery a fault is measured on: etcd faults touch every pair."""
    kind = fault.base.kind if fault.base is not None else fault.kind
    if kind in ETCD_KINDS:
        return list(bed.pairs)
    return [fault.pair]


def bound_s(fault: Fault, bed: Testbed) -> float:
    extra = DB_EXTRA_S if DB_PAIR in touched_pairs(fault, bed) and bed.database else 0.0
    base = BOUNDS_S[fault.base.kind] if fault.base is not None else 0.0
    return max(BOUNDS_S[fault.kind], base) + extra


class Action:
    """One fault being applied; a kind overrides what it needs of the three steps."""

    def __init__(self, fault: Fault, bed: Testbed) -> None:
        self.fault = fault
        self.bed = bed
        self.lab = bed.lab
        self.missed = False  # set by inject() when there was nothing to break

    async def inject(self) -> str:
        """Break the target; say what was hit."""
        raise NotImplementedError

    async def hold(self) -> str:
        """Wait while the fault lasts; a note on what happened meanwhile."""
        await asyncio.sleep(self.fault.hold_s)
        return ""

    async def heal(self) -> None:
        return None


class NodeAction(Action):
    node = ""

    async def target(self) -> str:
        self.node = await self.bed.node_for(self.fault.pair, self.fault.target)
        return self.node


class Crash(NodeAction):
    async def inject(self) -> str:
        node = await self.target()
        count = await asyncio.to_thread(self.bed.crash, node)
        return f"{node} ({count} processes)"

    async def heal(self) -> None:
        self.bed.cluster.start(self.node)


class Freeze(NodeAction):
    async def inject(self) -> str:
        node = await self.target()
        self.bed.signal_agent(node, signal.SIGSTOP)
        return node

    async def heal(self) -> None:
        self.bed.signal_agent(self.node, signal.SIGCONT)


class ServiceKill(NodeAction):
    async def inject(self) -> str:
        node = await self.target()
        pid = await self.bed.service_pid(self.fault.pair, node)
        if pid is None:
            self.missed = True
            return f"{node} (no service running)"
        with contextlib.suppress(ProcessLookupError):
            self.bed.cluster.kill_service(pid)
        return f"{node} (service pid {pid})"

    async def hold(self) -> str:
        return ""


class PgCrash(NodeAction):
    killed: int | None = None

    async def inject(self) -> str:
        node = await self.target()
        pid = self.bed.postmaster_pid(self.fault.pair, node)
        if pid is None:
            self.missed = True
            return f"{node} (no postmaster running)"
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.killed = pid
        return f"{node} (postmaster pid {pid})"

    async def hold(self) -> str:
        return ""


class LinkDown(NodeAction):
    async def inject(self) -> str:
        node = await self.target()
        self.lab.cut(self.lab[node])
        return node

    async def heal(self) -> None:
        self.lab.restore(self.lab[self.node])


class PartitionPair(Action):
    async def inject(self) -> str:
        a, b = self.bed.pairs[self.fault.pair][:2]
        self.lab.partition(self.lab[a], self.lab[b])
        return f"{a} | {b}"

    async def heal(self) -> None:
        a, b = self.bed.pairs[self.fault.pair][:2]
        self.lab.heal(self.lab[a], self.lab[b])


class PartitionEtcd(NodeAction):
    async def inject(self) -> str:
        node = await self.target()
        for member in ETCD:
            self.lab.partition(self.lab[node], self.lab[member])
        return f"{node} | etcd"

    async def heal(self) -> None:
        for member in ETCD:
            self.lab.heal(self.lab[self.node], self.lab[member])


class EtcdThenPeer(PartitionEtcd):
    """Cut from etcd, then from the other nodes of its pair as well: an active kept on
    its peers' word must stop before a peer that no longer hears it may take over."""

    def peers(self) -> list[str]:
        return [n for n in self.bed.pairs[self.fault.pair] if n != self.node]

    async def hold(self) -> str:
        await asyncio.sleep(self.fault.at_s)
        for peer in self.peers():
            self.lab.partition(self.lab[self.node], self.lab[peer])
        await asyncio.sleep(max(0.0, self.fault.hold_s - self.fault.at_s))
        return f"then | {', '.join(self.peers())}"

    async def heal(self) -> None:
        await super().heal()
        for peer in self.peers():
            self.lab.heal(self.lab[self.node], self.lab[peer])


class Loss(NodeAction):
    async def inject(self) -> str:
        node = await self.target()
        self.lab.loss(self.lab[node], self.fault.percent)
        return node

    async def heal(self) -> None:
        self.lab.clear(self.lab[self.node])


class Delay(NodeAction):
    async def inject(self) -> str:
        node = await self.target()
        self.lab.delay(self.lab[node], self.fault.delay_ms)
        return node

    async def heal(self) -> None:
        self.lab.clear(self.lab[self.node])


class EtcdMember(Action):
    """Kill the leader or a follower; a quorum loss kills the leader and a follower."""

    killed: list[str]

    async def inject(self) -> str:
        members = self.bed.members
        leader = await asyncio.to_thread(members.leader) or members.names[0]
        followers = [n for n in members.names if n != leader]
        follower = followers[self.fault.pick % len(followers)]
        if self.fault.kind == "etcd_quorum":
            self.killed = [leader, follower]
        else:
            self.killed = [leader if self.fault.target == "leader" else follower]
        for name in self.killed:
            await asyncio.to_thread(members.kill, name)
        return f"{'+'.join(self.killed)} (leader {leader})"

    async def heal(self) -> None:
        for name in self.killed:
            self.bed.members.start_member(name)


class EtcdMemberCut(Action):
    """Cut the leader or a follower from the other two members at the switch. Every node
    still reaches it: it accepts connections and calls but can serve nothing that needs
    the quorum, so a client attached to it must move to another member."""

    cut = ""

    async def inject(self) -> str:
        members = self.bed.members
        leader = await asyncio.to_thread(members.leader) or members.names[0]
        followers = [n for n in members.names if n != leader]
        follower = followers[self.fault.pick % len(followers)]
        self.cut = leader if self.fault.target == "leader" else follower
        for other in self.others():
            self.lab.partition(self.lab[self.cut], self.lab[other])
        return f"{self.cut} | {', '.join(self.others())} (leader {leader})"

    def others(self) -> list[str]:
        return [n for n in self.bed.members.names if n != self.cut]

    async def heal(self) -> None:
        for other in self.others():
            self.lab.heal(self.lab[self.cut], self.lab[other])


class Switchover(Action):
    """``hapair switchover PAIR`` through the admin path, in the middle of another fault."""

    def __init__(self, fault: Fault, bed: Testbed) -> None:
        super().__init__(fault, bed)
        assert fault.base is not None
        self.base = make(fault.base, bed)

    async def inject(self) -> str:
        return await self.base.inject()

    async def hold(self) -> str:
        await asyncio.sleep(self.fault.at_s)
        store = self.bed.cluster.store
        try:
            request = await request_switchover(
                store, self.fault.pair, None, "chaos", f"fault #{self.fault.index}"
            )
            note = f"switchover accepted ({request.id})"
        except AdminError as err:
            note = f"switchover refused: {err}"
        except StoreError as err:
            note = f"switchover not sent: {err}"
        await asyncio.sleep(max(0.0, self.fault.hold_s - self.fault.at_s))
        return note

    async def heal(self) -> None:
        await self.base.heal()


class PgCrashFreeze(PgCrash):
    """The active's postmaster killed and restarted in place by the agent, which then
    freezes: the watchdog must stop the new postmaster before the standby promotes."""

    async def inject(self) -> str:
        hit = await super().inject()
        old, node = self.killed, self.node
        if old is None:
            return hit
        new = await self._restarted(node, old)
        if new is None:
            self.missed = True
            return f"{node} (postmaster {old} killed, not restarted in place)"
        self.bed.signal_agent(node, signal.SIGSTOP)
        return f"{node} (postmaster {old} killed, {new} in its place, agent frozen)"

    async def hold(self) -> str:
        return await Action.hold(self)  # the freeze lasts, unlike the crash alone

    async def _restarted(self, node: str, old: int) -> int | None:
        deadline = asyncio.get_running_loop().time() + 15.0
        while asyncio.get_running_loop().time() < deadline:
            pid = self.bed.postmaster_pid(self.fault.pair, node)
            lead = await self.bed.cluster.leader(self.fault.pair)
            if lead is None or lead[0] != node:
                return None  # the pair moved instead: nothing to freeze on
            if pid is not None and pid != old:
                return pid
            await asyncio.sleep(0.05)
        return None

    async def heal(self) -> None:
        if self.node and not self.missed:
            self.bed.signal_agent(self.node, signal.SIGCONT)


class RestartPromised(PartitionEtcd):
    """The active cut from etcd holds the pair on its peers' promises; the standby's
    agent is restarted meanwhile and must not forget what it promised."""

    async def hold(self) -> str:
        await asyncio.sleep(self.fault.at_s)
        peer = self.bed.other(self.fault.pair, self.node)
        await asyncio.to_thread(self.bed.restart_agent, peer)
        await asyncio.sleep(max(0.0, self.fault.hold_s - self.fault.at_s))
        return f"{peer}'s agent restarted at {self.fault.at_s:.1f}s"


class EscapeFreeze(NodeAction):
    """The active's service leaves a grandchild in a session of its own, then the agent
    freezes: fencing must kill the grandchild too, not only the process group."""

    async def inject(self) -> str:
        node = await self.target()
        pid = await self.bed.service_pid(self.fault.pair, node)
        if pid is None:
            self.missed = True
            return f"{node} (no service running)"
        before = self.bed.escaped_runs()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
        deadline = asyncio.get_running_loop().time() + 5.0
        while self.bed.escaped_runs() == before:
            if asyncio.get_running_loop().time() > deadline:
                self.missed = True
                return f"{node} (service pid {pid} left no grandchild)"
            await asyncio.sleep(0.02)
        self.bed.signal_agent(node, signal.SIGSTOP)
        return f"{node} (service pid {pid} left a grandchild; agent frozen)"

    async def heal(self) -> None:
        if self.node and not self.missed:
            self.bed.signal_agent(self.node, signal.SIGCONT)


class CatchupIsolated(NodeAction):
    """The standby crashes and the active commits alone; the standby comes back and is
    still catching up when the active loses its network (a critical resource): handing
    the pair to that standby would lose what it has not received."""

    async def inject(self) -> str:
        node = await self.target()
        self.standby = self.bed.other(self.fault.pair, node)
        count = await asyncio.to_thread(self.bed.crash, self.standby)
        return f"{self.standby} crashed ({count} processes), {node} alone"

    async def hold(self) -> str:
        await asyncio.sleep(self.fault.hold_s)  # past degrade_after_s: commits on one node
        self.bed.cluster.start(self.standby)
        back = await self.bed.healthy_standby(self.standby, 60.0)
        self.lab.partition(self.lab[self.node], self.lab[OBSERVER])
        # Long enough for the isolation delay, the resource's grace and a handover.
        await asyncio.sleep(self.fault.at_s + 2.5)
        state = "back" if back else "not back in 60 s"
        return f"{self.standby} restarted ({state}); {self.node} cut from its probe target"

    async def heal(self) -> None:
        self.lab.heal(self.lab[self.node], self.lab[OBSERVER])


ACTIONS: dict[str, type[Action]] = {
    "crash": Crash,
    "freeze": Freeze,
    "service_kill": ServiceKill,
    "link_down": LinkDown,
    "partition_pair": PartitionPair,
    "partition_etcd": PartitionEtcd,
    "etcd_then_peer": EtcdThenPeer,
    "etcd_member": EtcdMember,
    "etcd_quorum": EtcdMember,
    "etcd_member_cut": EtcdMemberCut,
    "loss": Loss,
    "delay": Delay,
    "switchover": Switchover,
    "pg_crash": PgCrash,
    "pg_crash_freeze": PgCrashFreeze,
    "restart_promised": RestartPromised,
    "escape_freeze": EscapeFreeze,
    "catchup_isolated": CatchupIsolated,
}


def make(fault: Fault, bed: Testbed) -> Action:
    return ACTIONS[fault.kind](fault, bed)
