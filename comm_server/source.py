"""The PLC list from the pair's topology: the ``plcs:`` section of the comm server's pair
in the site applied to etcd, followed while it runs.

The agent restarts a service when the service's own entry changes, not when another
part of its pair does; so the comm server watches the topology itself and hands over
a new PLC list when its pair's ``plcs:`` changed. A topology that is invalid, or that
no longer gives the pair a PLC list, is reported and the list in use is kept, the way
the agent keeps the last valid topology.
"""

from __future__ import annotations

import asyncio

from hapair.comm_server.config import CommConfig
from hapair.shared import keys
from hapair.shared.log import EventLog
from hapair.shared.mirror import Mirror
from hapair.shared.records import RecordError, TopologyDoc, decode
from hapair.shared.store import Change, Store
from hapair.shared.topology import Pair, TopologyError, parse_site
from hapair.shared.waits import cancelled

WAIT_WARNING_S = 2.0


class PairError(Exception):
    """The topology in etcd does not describe the pair; the message says why."""


class PlcListError(PairError):
    """The topology gives no PLC list for the pair; the message says why."""


def stored_pair(raw: bytes | None, pair: str) -> Pair:
    """``pair`` as the stored topology ``raw`` describes it (None: no topology)."""
    if raw is None:
        raise PairError("no topology in etcd: apply one with `hapair topology apply FILE`")
    try:
        doc = decode(TopologyDoc, raw, keys.TOPOLOGY)
        site = parse_site(doc.site, keys.TOPOLOGY)
    except (RecordError, TopologyError) as err:
        raise PairError(str(err).replace("\n", " ")) from None
    found = site.pair(pair)
    if found is None:
        raise PairError(f"pair {pair!r} is not in the topology applied to etcd")
    return found


def plcs_of(raw: bytes | None, pair: str) -> CommConfig:
    """The PLC list of ``pair`` in the stored topology ``raw`` (None: no topology)."""
    if raw is None:
        raise PlcListError(
            "no topology in etcd: apply one with `hapair topology apply FILE`, "
            "or give the PLC list with --config FILE"
        )
    try:
        found = stored_pair(raw, pair)
    except PairError as err:
        raise PlcListError(str(err)) from None
    if not found.plcs:
        raise PlcListError(
            f"pair {pair!r} has no plcs: section in the topology: add the PLC list to the "
            "pair in the site file and apply it, or give it with --config FILE"
        )
    return CommConfig(plcs=found.plcs, opcua=found.opcua)


class TopologyPlcs:
    """The PLC list of ``pair``, read from etcd and followed (``start`` first)."""

    def __init__(self, store: Store, pair: str, log: EventLog) -> None:
        self.store = store
        self.pair = pair
        self.log = log
        self._mirror = Mirror(store, keys.TOPOLOGY, self._changed)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._seen_revision = -1

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._mirror.run(), name="topology watch")

    async def close(self) -> None:
        await cancelled(self._task)  # its errors were told as they came: it retries
        self._task = None

    async def first(self) -> CommConfig:
        """The list as it is in etcd now; waits for etcd (warning once), PlcListError
        when the topology gives none."""
        try:
            async with asyncio.timeout(WAIT_WARNING_S):
                await self._mirror.synced.wait()
        except TimeoutError:
            self.log.warning(
                "waiting for etcd to read the PLC list",
                etcd=self.store.describe,
                error=self._mirror.error,
            )
            await self._mirror.synced.wait()
        kv = self._mirror.items.get(keys.TOPOLOGY)
        self._seen_revision = kv.mod_revision if kv is not None else 0
        return plcs_of(kv.value if kv is not None else None, self.pair)

    async def changed(self, current: CommConfig) -> CommConfig:
        """Wait until the pair's PLC list in etcd differs from ``current``; the new one."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            kv = self._mirror.items.get(keys.TOPOLOGY)
            revision = kv.mod_revision if kv is not None else 0
            if revision == self._seen_revision:
                continue  # a reload of the same topology (etcd came back)
            self._seen_revision = revision
            try:
                new = plcs_of(kv.value if kv is not None else None, self.pair)
            except PlcListError as err:
                self.log.error(
                    "no PLC list in the topology; keeping the one in use", problem=str(err)
                )
                continue
            if new != current:
                return new

    def _changed(self, change: Change | None) -> None:
        self._wake.set()
