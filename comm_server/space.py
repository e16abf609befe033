"""The comm server's own OPC UA server: every tag, organised by PLC, with ServiceLevel.

Namespace ``urn:hapair:comm``; one folder per PLC under Objects; each tag a variable
with the string node id ``{plc}.{tag}``. The address space is built in bulk
(nodes.py: ~0.4 s for 10,000 tags, where asyncua's Node API needs ~50 s).

Values reach it from the pollers as changes only: a changed tag is marked dirty and a
publisher task writes the dirty tags' current state, yielding to the event loop every
few hundred writes so that the pollers keep their schedule. Subscriptions are fed
from there. A client's Read of a tag value is answered from the tag's state at that
moment instead, its freshness checked then: after a stall of the process, the stale
marking and its publication may not have run yet when the queued reads are answered.
Clients' writes to tag variables are taken out of asyncua's write service and handed
to the comm server, which sends them to the PLC (or refuses them) and answers with the
outcome.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from asyncua.server.address_space import AttributeService
from asyncua.ua.uatypes import DataValue

from hapair.comm_server.nodes import NodeBuilder
from hapair.comm_server.opcua_plc import VARIANT
from hapair.comm_server.tags import Quality, TagState
from hapair.comm_server.uatypes import Server, ua
from hapair.shared.log import EventLog

NAMESPACE = "urn:hapair:comm"
SERVICE_LEVEL = ua.NodeId(ua.ObjectIds.Server_ServiceLevel)
REDUNDANCY_SUPPORT = ua.NodeId(ua.ObjectIds.Server_ServerRedundancy_RedundancySupport)
REDUNDANCY = {
    "none": ua.RedundancySupport.None_,
    "cold": ua.RedundancySupport.Cold,
    "warm": ua.RedundancySupport.Warm,
    "hot": ua.RedundancySupport.Hot,
}
PUBLISH_CHUNK = 256  # writes between two yields to the event loop


class _Written(DataValue):
    """A DataValue that asyncua's subscriptions need not copy.

    asyncua deep-copies the value for every monitored item it notifies, to protect its
    copy from later changes of the written object: three quarters of the server's cost
    per change. The comm server makes a new DataValue for every write and never touches
    one again, so there is nothing to protect; sharing it is safe.
    """

    __slots__ = ()

    def __deepcopy__(self, memo: dict[int, object]) -> _Written:
        return self


_WRITTEN: Any = _Written  # asyncua types its timestamps as a NewType of datetime

Writer = Callable[[str, Any], Awaitable[int]]
Reader = Callable[[str], TagState]  # the tag's state, its freshness checked now


@dataclass(frozen=True, slots=True)
class TagSpec:
    """What the address space needs to know of a tag."""

    name: str
    vtype: ua.VariantType
    writable: bool
    sampling_ms: float


def variant_type(type_: str, scaled: bool) -> ua.VariantType:
    """A scaled register is served as a Double, whatever its raw type."""
    if scaled and type_ not in ("float32", "float64"):
        return ua.VariantType.Double
    return VARIANT[type_]


class _TagService(AttributeService):
    """asyncua's attribute service, except that tag values are written through
    ``writer`` and read from ``reader`` (which makes the ``DataValue`` with ``answer``)."""

    def __init__(
        self,
        base: AttributeService,
        tags: dict[ua.NodeId, str],
        writer: Writer,
        reader: Reader,
        answer: Callable[[TagState], ua.DataValue],
    ):
        super().__init__(base._aspace)
        self._tags = tags
        self._writer = writer
        self._reader = reader
        self._answer = answer

    def read(self, params: ua.ReadParameters) -> list[ua.DataValue]:
        results = []
        for item in params.NodesToRead:
            key = self._tags.get(item.NodeId) if item.AttributeId == ua.AttributeIds.Value else None
            if key is not None:
                results.append(self._answer(self._reader(key)))
            else:  # what asyncua's own read does
                results.append(self._aspace.read_attribute_value(item.NodeId, item.AttributeId))
        return results

    async def write(self, params: ua.WriteParameters, user: Any = None) -> list[ua.StatusCode]:
        items = params.NodesToWrite
        ours = [
            i
            for i, item in enumerate(items)
            if item.AttributeId == ua.AttributeIds.Value and item.NodeId in self._tags
        ]
        results: list[ua.StatusCode | None] = [None] * len(items)
        if len(ours) < len(items):
            mine = set(ours)
            rest = [i for i in range(len(items)) if i not in mine]
            kwargs = {} if user is None else {"user": user}
            request = ua.WriteParameters(NodesToWrite=[items[i] for i in rest])
            for i, answer in zip(rest, await super().write(request, **kwargs), strict=True):
                results[i] = answer
        for i in ours:  # in order, one at a time: a PLC sees them as the client sent them
            item = items[i]
            if item.IndexRange:
                code = ua.StatusCodes.BadWriteNotSupported
            else:
                variant = item.Value.Value if item.Value is not None else None
                code = await self._writer(self._tags[item.NodeId], variant)
            results[i] = ua.StatusCode(code)
        return [r if r is not None else ua.StatusCode() for r in results]


class OpcUaSpace:
    def __init__(self, url: str, app_uri: str, name: str, redundancy: str, log: EventLog) -> None:
        self.url = url
        self.app_uri = app_uri
        self.name = name
        self.redundancy = redundancy
        self.log = log
        self.server = Server()
        self.ns = 0
        self.changes = 0  # values written to the address space
        self.service_level = -1
        self._nodes: dict[str, ua.NodeId] = {}
        self._vtypes: dict[str, ua.VariantType] = {}
        self._status: dict[int, ua.StatusCode] = {}
        self._dirty: dict[str, TagState] = {}
        self._wake = asyncio.Event()
        self._texts: dict[str, str] = {}

    # -- building ---------------------------------------------------------------------
    async def build(
        self, plcs: Sequence[tuple[str, Sequence[TagSpec]]], writer: Writer, reader: Reader
    ) -> int:
        """Create the whole address space; returns how many variables it has."""
        server = self.server
        await server.init()
        server.set_endpoint(self.url)
        server.set_server_name(self.name)
        await server.set_application_uri(self.app_uri)
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        self.ns = await server.register_namespace(NAMESPACE)
        build = NodeBuilder(server.iserver.aspace, self.ns)
        objects = ua.NodeId(ua.ObjectIds.ObjectsFolder)
        tag_nodes: dict[ua.NodeId, str] = {}
        folder = build.folder("_comm", objects, "the comm server: role and epoch")
        for key in ("_comm.role", "_comm.epoch"):
            self._nodes[key] = build.variable(
                key, key.split(".", 1)[1], folder, ua.VariantType.String
            )
        for plc, tags in plcs:
            folder = build.folder(plc, objects, f"PLC {plc}")
            for diag in ("_state", "_path"):
                key = f"{plc}.{diag}"
                self._nodes[key] = build.variable(key, diag, folder, ua.VariantType.String)
            for tag in tags:
                key = f"{plc}.{tag.name}"
                node = build.variable(
                    key, tag.name, folder, tag.vtype, tag.writable, tag.sampling_ms
                )
                self._nodes[key] = node
                self._vtypes[key] = tag.vtype
                tag_nodes[node] = key
        # Every tag value goes through the comm server, writable or not: it answers.
        server.iserver.attribute_service = _TagService(
            server.iserver.attribute_service, tag_nodes, writer, reader, self._datavalue
        )
        await self._write(
            REDUNDANCY_SUPPORT,
            ua.DataValue(ua.Variant(REDUNDANCY[self.redundancy], ua.VariantType.Int32)),
        )
        await self.set_service_level(0)
        return len(self._vtypes)

    async def start(self) -> None:
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()

    # -- values -----------------------------------------------------------------------
    def dirty(self, tag: TagState) -> None:
        self._dirty[tag.node_id] = tag
        self._wake.set()

    async def publish(self) -> None:
        """Write every dirty tag's current state, forever."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._dirty = self._dirty, {}
            for n, tag in enumerate(batch.values(), 1):
                await self._write(self._nodes[tag.node_id], self._datavalue(tag))
                if n % PUBLISH_CHUNK == 0:
                    await asyncio.sleep(0)
            self.changes += len(batch)

    def _datavalue(self, tag: TagState) -> ua.DataValue:
        status = self._status.get(tag.status)
        if status is None:
            status = self._status[tag.status] = ua.StatusCode(tag.status)
        if tag.quality is Quality.BAD:
            variant = ua.Variant(None, ua.VariantType.Null)
        else:
            variant = ua.Variant(tag.value, self._vtypes[tag.node_id])
        return _WRITTEN(
            Value=variant,
            StatusCode=status,
            SourceTimestamp=datetime.fromtimestamp(tag.source_time, UTC),
            ServerTimestamp=datetime.now(UTC),
        )

    async def _write(self, node: ua.NodeId, value: ua.DataValue) -> None:
        await self.server.iserver.aspace.write_attribute_value(node, ua.AttributeIds.Value, value)

    async def set_service_level(self, level: int) -> None:
        if level == self.service_level:
            return
        self.service_level = level
        now = datetime.now(UTC)
        await self._write(
            SERVICE_LEVEL,
            ua.DataValue(
                ua.Variant(level, ua.VariantType.Byte), SourceTimestamp=now, ServerTimestamp=now
            ),
        )

    async def set_text(self, key: str, text: str) -> None:
        """A diagnostic string variable (``{plc}._state``, ``_comm.role``, ...)."""
        if self._texts.get(key) == text:
            return
        self._texts[key] = text
        now = datetime.now(UTC)
        await self._write(
            self._nodes[key],
            ua.DataValue(
                ua.Variant(text, ua.VariantType.String), SourceTimestamp=now, ServerTimestamp=now
            ),
        )
