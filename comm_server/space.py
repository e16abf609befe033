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
outcome; only a writer's (access.py) get that far. No client may write anything else:
not ServiceLevel, the redundancy nodes, the role and diagnostic variables, nor any
attribute but a tag's value.

Its endpoints: with security on (the default) Basic256Sha256 and Aes256_Sha256_RsaPss,
each with Sign and with SignAndEncrypt, under the server's certificate, whose
application URI is the server's; with ``opcua: {security: none}`` (labs) NoSecurity and
anonymous clients only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from asyncua.crypto.permission_rules import UserRole
from asyncua.server.address_space import AttributeService
from asyncua.ua.uatypes import DataValue
from cryptography.x509.oid import ExtendedKeyUsageOID

from hapair.comm_server.access import CommUser, ServerSecurity, UserManager
from hapair.comm_server.nodes import NodeBuilder
from hapair.comm_server.opcua_plc import VARIANT
from hapair.comm_server.tags import Quality, TagState
from hapair.comm_server.uatypes import Server, ua
from hapair.shared.log import EventLog
from hapair.shared.opcua_security import SERVER_POLICIES, validator

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
        may_write: Callable[[Any], bool],
        log: EventLog,
    ):
        super().__init__(base._aspace)
        self._may_write = may_write
        self._log = log
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
        # asyncua's own writes come as its internal administrator; a client's session
        # always holds one of our users (access.py), never an administrator.
        if isinstance(user, CommUser) or user is None or user.role != UserRole.Admin:
            return await self._client_write(params.NodesToWrite, user)
        return await super().write(params, user=user)

    async def _client_write(self, items: list[Any], user: Any) -> list[ua.StatusCode]:
        """A client's writes: tag values only, by a writer only, each sent in order."""
        results: list[ua.StatusCode] = []
        for item in items:
            key = self._tags.get(item.NodeId)
            who = getattr(user, "name", None) or "anonymous"
            if key is None or item.AttributeId != ua.AttributeIds.Value:
                self._log.warning("write refused", node=item.NodeId.to_string(), user=who)
                code = ua.StatusCodes.BadUserAccessDenied
            elif not self._may_write(user):
                self._log.warning("write refused", tag=key, user=who, reason="not a writer")
                code = ua.StatusCodes.BadUserAccessDenied
            elif item.IndexRange:
                code = ua.StatusCodes.BadWriteNotSupported
            else:
                variant = item.Value.Value if item.Value is not None else None
                code = await self._writer(key, variant)
            results.append(ua.StatusCode(code))
        return results


class OpcUaSpace:
    def __init__(
        self,
        url: str,
        app_uri: str,
        name: str,
        redundancy: str,
        log: EventLog,
        security: ServerSecurity,
    ) -> None:
        self.url = url
        self.security = security
        self.app_uri = security.uri or app_uri
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
        await self._secure(server)
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
            server.iserver.attribute_service,
            tag_nodes,
            writer,
            reader,
            self._datavalue,
            self.security.access.may_write,
            self.log,
        )
        await self._write(
            REDUNDANCY_SUPPORT,
            ua.DataValue(ua.Variant(REDUNDANCY[self.redundancy], ua.VariantType.Int32)),
        )
        await self.set_service_level(0)
        return len(self._vtypes)

    async def _secure(self, server: Any) -> None:
        """Endpoints, certificates and users (see the module's docstring)."""
        security = self.security
        server.allow_remote_admin(False)
        server.iserver.set_user_manager(UserManager(security.access, self.log))
        if security.certificate is None or security.key is None:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
            server.set_identity_tokens([ua.AnonymousIdentityToken])
            self.log.warning(
                "opcua security off",
                reason="opcua: {security: none} for the pair: NoSecurity, "
                "anonymous clients may read and write every writable tag",
            )
            return
        # PEM files whatever their names (asyncua takes all but *.pem for DER)
        await server.load_certificate(str(security.certificate), format="pem")
        await server.load_private_key(str(security.key), format="pem")
        server.set_security_policy(SERVER_POLICIES)
        tokens = [ua.UserNameIdentityToken]
        if security.access.ca is not None:
            tokens.append(ua.X509IdentityToken)
            server.set_certificate_validator(
                validator(security.access.ca, ExtendedKeyUsageOID.CLIENT_AUTH)
            )
        if security.access.anonymous is not None:
            tokens.append(ua.AnonymousIdentityToken)
        server.set_identity_tokens(tokens)

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
