"""The etcd key layout, in one place.

Every key hapair reads or writes lives under ``/hapair/v1``, but the term beats (under
``/hapair/beats/v1``, below); the functions below are the only place that spells a key,
so a reader can see the whole layout at a glance.
Keys are ``str`` here; the store (and :mod:`hapair.shared.txn`) encode them for the wire.
"""

from __future__ import annotations

PREFIX = "/hapair/v1"

TOPOLOGY = f"{PREFIX}/topology/site"
EVENTS_PREFIX = f"{PREFIX}/events/"
ENDPOINTS_PREFIX = f"{PREFIX}/endpoints/"
NODES_PREFIX = f"{PREFIX}/nodes/"
PAIRS_PREFIX = f"{PREFIX}/pairs/"
REGISTRIES_PREFIX = f"{PREFIX}/registries/"
# Outside PREFIX on purpose: an active beats 20 times a second, and no mirror of the
# whole layout (a registry's, an agent's watch of every pair) should receive that; only
# the pair's own nodes watch its beat key.
BEATS_PREFIX = "/hapair/beats/v1/"


def leader(pair: str) -> str:
    return f"{PAIRS_PREFIX}{pair}/leader"


def beats_of(pair: str) -> str:
    """Everything of the pair's term beat: its nodes watch this prefix, and only theirs
    (a pair's name may begin another's: the slash keeps them apart)."""
    return f"{BEATS_PREFIX}{pair}/"


def beat(pair: str) -> str:
    """The pair's term beat, written by its active while the leader key has its epoch
    (``workshop_agent/term_beat.py``)."""
    return f"{beats_of(pair)}term"


def sync_standby(pair: str) -> str:
    """Which nodes hold every acknowledged commit: the only ones that may take over."""
    return f"{PAIRS_PREFIX}{pair}/sync_standby"


def members(pair: str) -> str:
    """The nodes of the pair its active acknowledged: only they may campaign."""
    return f"{PAIRS_PREFIX}{pair}/members"


def paused(pair: str) -> str:
    return f"{PAIRS_PREFIX}{pair}/paused"


def switchover(pair: str) -> str:
    return f"{PAIRS_PREFIX}{pair}/commands/switchover"


def takeover(pair: str) -> str:
    """An operator forces a node that may lack commits to take a pair with no active."""
    return f"{PAIRS_PREFIX}{pair}/commands/takeover"


def handover(pair: str) -> str:
    """Written by an active that hands its pair to a named node (planned switchover)."""
    return f"{PAIRS_PREFIX}{pair}/commands/handover"


def restart(pair: str, node: str) -> str:
    """A rollout asks ``node`` to run its copies of the pair's services on named package
    versions (``records.RestartRequest``), on a short lease: it lapses unused."""
    return f"{PAIRS_PREFIX}{pair}/commands/restart/{node}"


def rollout(pair: str) -> str:
    """Held by the one rollout of ``pair`` under way, on its orchestrator's lease."""
    return f"{PAIRS_PREFIX}{pair}/commands/rollout"


def recovery(pair: str) -> str:
    return f"{PAIRS_PREFIX}{pair}/recovery"


def node_status(node: str) -> str:
    return f"{NODES_PREFIX}{node}/status"


def reports_prefix(node: str) -> str:
    return f"{NODES_PREFIX}{node}/reports/"


def report(node: str, service: str) -> str:
    """What a service of this node reports about resources it needs (PLCs, database)."""
    return f"{reports_prefix(node)}{service}"


def drained(node: str) -> str:
    return f"{NODES_PREFIX}{node}/drained"


def endpoint(service: str) -> str:
    return f"{ENDPOINTS_PREFIX}{service}"


def registries_of(identity: str) -> str:
    """A registry's keys, under its etcd user, so that etcd's roles let it write only
    its own."""
    return f"{REGISTRIES_PREFIX}{identity}/"


def registry_heartbeat(identity: str, run: str) -> str:
    """Written by a registry that checks its watch brings its own writes back in time;
    ``run`` keeps registries that share a certificate apart."""
    return f"{registries_of(identity)}{run}/heartbeat"


def events_of(writer: str) -> str:
    """The events one writer (a node's agent, an operator, a registry) files: its etcd
    user's, so that etcd's roles let each write only its own."""
    return f"{EVENTS_PREFIX}{writer}/"


def event(stamp_ns: int, writer: str) -> str:
    """Events sort by wall-clock stamp (:func:`event_order`), within a writer by key."""
    return f"{events_of(writer)}{stamp_ns:020d}"


def event_writer(key: str) -> str:
    """Whose event ``key`` is; ``""`` for a key of the earlier layout (below)."""
    return key[len(EVENTS_PREFIX) :].rpartition("/")[0]


def events_before(writer: str, stamp_ns: int) -> tuple[str, str]:
    """The range of ``writer``'s events older than ``stamp_ns``; with ``writer`` ``""``,
    of the earlier layout's, whose keys sort by stamp below the prefix itself."""
    if writer:
        return events_of(writer), event(stamp_ns, writer)
    return EVENTS_PREFIX, f"{EVENTS_PREFIX}{stamp_ns:020d}"


def event_order(key: str) -> tuple[int, str]:
    """An event key's place in time: its stamp, then the key to keep ties apart.

    Also reads the earlier layout, ``EVENTS_PREFIX/STAMP-WRITER``, which nodes not yet
    upgraded still write; a key of neither form sorts first.
    """
    rest = key[len(EVENTS_PREFIX) :] if key.startswith(EVENTS_PREFIX) else ""
    _, slash, stamp = rest.rpartition("/")
    if not slash:
        stamp = rest.partition("-")[0]
    return (int(stamp), key) if stamp.isdigit() else (0, key)


def prefix_end(prefix: str) -> str:
    """The end of the range of every key that starts with ``prefix``."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def b(key: str) -> bytes:
    """The wire form of ``key``, for a call the store does not wrap."""
    return key.encode()


def split(key: bytes | str) -> list[str]:
    """Parts below the prefix: ``/hapair/v1/pairs/asm/leader`` -> ``[pairs, asm, leader]``."""
    text = key.decode() if isinstance(key, bytes) else key
    if not text.startswith(PREFIX + "/"):
        return []
    return text[len(PREFIX) + 1 :].split("/")
