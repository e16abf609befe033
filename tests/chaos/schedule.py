"""The fault schedule, derived from the seed alone so that a failing run replays exactly.

Kinds are dealt like cards: each round is a shuffled deck of every enabled kind, so a
run of N faults hits every kind N/len(kinds) times, and even a smoke of a handful of
faults is a handful of different ones. A node fault names a role (``active`` or
``standby``), not a node: the node holding that role is found when the fault starts.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

KINDS: tuple[str, ...] = (
    "crash",  # SIGKILL of everything running in the node (agent, watchdog, services)
    "freeze",  # SIGSTOP / SIGCONT of the agent alone
    "service_kill",  # SIGKILL of the active's service
    "link_down",  # the node's switch port down
    "partition_pair",  # main and secondary do not see each other; both see etcd
    "partition_etcd",  # the node does not see any etcd member; it sees its peers
    "etcd_then_peer",  # the node cut from etcd, then from its peers too, while still cut
    "etcd_member",  # one etcd member killed (the leader or a follower), then restarted
    "etcd_quorum",  # two of the three members killed (the leader among them)
    "etcd_member_cut",  # one member cut from the other two; every node still reaches it
    "loss",  # random packet loss on the node's link, both ways
    "delay",  # added latency on the node's link (tc netem only)
    "switchover",  # `hapair switchover` requested while another fault is in place
    "pg_crash",  # SIGKILL of the active's postmaster (pairs with a database)
    "pg_crash_freeze",  # the active's postmaster killed, restarted in place, then a freeze
    "restart_promised",  # the active cut from etcd; the standby's agent restarted meanwhile
    "escape_freeze",  # the active's service leaves a setsid grandchild; then a freeze
    "catchup_isolated",  # the standby down, back and catching up; the active isolated then
)
NODE_KINDS = frozenset({"crash", "freeze", "link_down", "partition_etcd", "loss", "delay"})
ACTIVE_ONLY = frozenset({"service_kill", "pg_crash"})
DB_KINDS = frozenset({"pg_crash", "pg_crash_freeze", "catchup_isolated"})  # on a database pair
# Held longer than the fence point, then acted on the active at ``at_s``.
ACTIVE_HELD = frozenset(
    {"pg_crash_freeze", "restart_promised", "escape_freeze", "catchup_isolated"}
)
INSTANT = frozenset({"service_kill", "pg_crash"})  # nothing to hold or heal
ETCD_KINDS = frozenset({"etcd_member", "etcd_quorum", "etcd_member_cut"})  # touch every pair
# What a switchover is requested in the middle of.
SWITCHOVER_BASES = (
    "freeze",
    "link_down",
    "partition_pair",
    "partition_etcd",
    "etcd_member",
    "loss",
    "delay",
)
HOLD_S = (0.5, 4.0)  # below and above the fence point (1.5 s) and the lease TTL (2 s)
PAUSE_S = (0.0, 1.0)
LOSS_PERCENT = (10, 30, 60)
DELAY_MS = (50, 200, 800)


@dataclass(frozen=True)
class Fault:
    """One scheduled fault. ``hold_s`` is how long it stays before it is healed."""

    index: int
    kind: str
    pair: str
    target: str = ""  # active | standby, leader | follower, or "" (the whole pair)
    hold_s: float = 0.0
    pause_s: float = 0.0  # quiet time before it, once the site has settled
    percent: int = 0
    delay_ms: int = 0
    pick: int = 0  # which follower, for etcd faults
    at_s: float = 0.0  # switchover: when it is requested, after the base fault began
    base: Fault | None = field(default=None, compare=False)

    def describe(self) -> str:
        etcd = self.kind in ETCD_KINDS
        what = self.kind if etcd else f"{self.kind} {self.pair}"
        if self.target:
            what += f"/{self.target}"
        if (etcd and self.target != "leader") or self.kind == "etcd_quorum":
            what += f" pick {self.pick}"
        if self.kind == "loss":
            what += f" {self.percent}%"
        if self.kind == "delay":
            what += f" {self.delay_ms}ms"
        if self.base is not None:
            what += f" at {self.at_s:.1f}s during [{self.base.describe()}]"
        elif self.kind == "etcd_then_peer":
            what += f" peers at {self.at_s:.1f}s hold {self.hold_s:.1f}s"
        elif self.kind in ACTIVE_HELD:
            what += f" then at {self.at_s:.1f}s hold {self.hold_s:.1f}s"
        elif self.kind not in INSTANT:
            what += f" hold {self.hold_s:.1f}s"
        return what

    def __str__(self) -> str:
        return f"#{self.index:03d} {self.describe()}"


def enabled_kinds(*, netem: bool, database: bool) -> tuple[str, ...]:
    """Every kind this machine and site can run."""
    drop = set()
    if not netem:
        drop.add("delay")
    if not database:
        drop |= DB_KINDS
    return tuple(k for k in KINDS if k not in drop)


def make_schedule(
    seed: int, count: int, kinds: Iterable[str], pairs: Mapping[str, bool]
) -> list[Fault]:
    """``count`` faults from ``seed``; ``pairs`` maps each pair to whether it has a database."""
    kinds = tuple(kinds)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise ValueError(f"unknown fault kinds {unknown}; known: {', '.join(KINDS)}")
    if DB_KINDS & set(kinds) and not any(pairs.values()):
        raise ValueError(f"{', '.join(sorted(DB_KINDS & set(kinds)))} need a pair with a database")
    rng = random.Random(seed)
    deck: list[str] = []
    out = []
    for index in range(count):
        if not deck:
            deck = sorted(kinds)
            rng.shuffle(deck)
        out.append(_draw(rng, index, deck.pop(), pairs, kinds))
    return out


def _draw(
    rng: random.Random, index: int, kind: str, pairs: Mapping[str, bool], kinds: tuple[str, ...]
) -> Fault:
    # Every field is drawn, used or not, so that one kind's parameters never shift the
    # draws of the faults after it when a kind is added or changed.
    names = sorted(pairs)
    pair = rng.choice([p for p in names if pairs[p]] if kind in DB_KINDS else names)
    role = rng.choice(("active", "active", "standby"))
    hold = round(rng.uniform(*HOLD_S), 1)
    pause = round(rng.uniform(*PAUSE_S), 1)
    percent = rng.choice(LOSS_PERCENT)
    delay = rng.choice(DELAY_MS)
    pick = rng.randrange(2)
    member = rng.choice(("leader", "follower"))
    bases = [b for b in SWITCHOVER_BASES if b in kinds] or ["partition_pair"]
    base_kind = rng.choice(bases)
    base_role = rng.choice(("active", "standby"))
    at = round(rng.uniform(0.2, 0.8) * hold, 1)

    plain = Fault(index=index, kind=kind, pair=pair, pause_s=pause)
    if kind in ACTIVE_HELD:
        # Past the fence point (1.5 s) and the lease (2 s); the second step comes once
        # the first has had its effect (promises given, the standby back and behind).
        return replace(plain, target="active", hold_s=round(hold + 2.0, 1), at_s=round(at + 1.0, 1))
    if kind in ACTIVE_ONLY:
        return replace(plain, target="active")
    if kind in NODE_KINDS:
        return replace(plain, target=role, hold_s=hold, percent=percent, delay_ms=delay)
    if kind == "partition_pair":
        return replace(plain, hold_s=hold)
    if kind == "etcd_then_peer":
        # Held longer, and the peers cut later, so that the second cut often falls in
        # the time a node cut from etcd alone may keep running on its peers' word.
        return replace(plain, target=role, hold_s=round(hold + 2.0, 1), at_s=round(at + 1.0, 1))
    if kind in ETCD_KINDS:
        # A quorum loss always takes the leader and one follower.
        target = "leader" if kind == "etcd_quorum" else member
        return replace(plain, target=target, hold_s=hold, pick=pick)
    if kind == "switchover":
        base_target = {"etcd_member": member, "partition_pair": ""}.get(base_kind, base_role)
        base = Fault(
            index=index,
            kind=base_kind,
            pair=pair,
            target=base_target,
            hold_s=hold,
            percent=percent,
            delay_ms=delay,
            pick=pick,
        )
        return replace(plain, hold_s=hold, at_s=at, base=base)
    raise ValueError(f"no rule to draw a {kind} fault")


def parse_only(text: str, count: int) -> list[int]:
    """``"3,7-9"`` -> ``[3, 7, 8, 9]``: the faults of the schedule to run (for replays)."""
    chosen: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise ValueError(f"--only: {part!r} is not N or N-M")
        first, last = int(match[1]), int(match[2] or match[1])
        if first > last or last >= count:
            raise ValueError(f"--only: {part!r} is not within 0-{count - 1}")
        chosen.update(range(first, last + 1))
    return sorted(chosen)
