"""The comm server: pollers, the OPC UA address space, the role, wired together."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from hapair.comm_server.access import AccessError, ServerSecurity
from hapair.comm_server.codec import Value
from hapair.comm_server.config import CommConfig
from hapair.comm_server.driver import Driver, WriteError
from hapair.comm_server.level import service_level
from hapair.comm_server.modbus import ModbusDriver
from hapair.comm_server.opcua_plc import OpcUaDriver, OutOfRange, convert
from hapair.comm_server.poller import PlcPoller, PollStats
from hapair.comm_server.role import ReportParts
from hapair.comm_server.space import OpcUaSpace, TagSpec, variant_type
from hapair.comm_server.tags import TagState, TagTable
from hapair.comm_server.uatypes import S
from hapair.shared.log import EventLog
from hapair.shared.plcs import ModbusPlc, ModbusTag
from hapair.shared.plcs import OpcUaPlc as OpcUaPlcConfig
from hapair.shared.records import Resource


class Role(Protocol):
    """What the comm server needs to know of its node's role (see role.py)."""

    @property
    def serving(self) -> bool: ...

    epoch: int | None
    state: str

    async def run(self) -> None: ...

    def poke(self) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}/"


@dataclass(frozen=True)
class _Binding:
    poller: PlcPoller
    index: int
    served_as: str  # the value type a writer must send
    writable: bool


class CommServer:
    """Every PLC's poller, the OPC UA address space they feed, and the node's role.

    ``start`` builds and serves; the role (made by the factory it is given, once the
    server listens) decides the ServiceLevel band and whether writes are accepted."""

    def __init__(
        self,
        config: CommConfig,
        listen: Listen,
        log: EventLog,
        app_uri: str = "urn:hapair:comm",
        name: str = "hapair comm server",
        redundancy: str = "hot",
        stats: PollStats | None = None,
        security: ServerSecurity | None = None,
    ) -> None:
        """``security`` may be left out only when the configuration turns it off."""
        self.config = config
        self.log = log
        self.stats = stats or PollStats()
        if security is None:
            if config.opcua.security != "none":
                raise ValueError("OPC UA security is on: the server's security is needed")
            security = ServerSecurity.lab()
        for i, plc in enumerate(config.plcs):
            if isinstance(plc, OpcUaPlcConfig) and plc.security and security.identity is None:
                raise AccessError(
                    f"plcs[{i}].security",
                    ["the comm server's certificate and key are needed: --opcua-cert, --opcua-key"],
                )
        self.identity = security.identity
        self.space = OpcUaSpace(listen.url, app_uri, name, redundancy, log, security)
        self.role: Role | None = None
        self.pollers: list[PlcPoller] = []
        self._bindings: dict[str, _Binding] = {}
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # -- start and stop ---------------------------------------------------------------
    async def start(
        self, role_factory: Callable[[Callable[[], ReportParts], Callable[[], None]], Role]
    ) -> None:
        """Build everything and serve; polling starts once the server listens."""
        plcs = self.config.plcs
        specs: list[tuple[str, list[TagSpec]]] = []
        for i, plc in enumerate(plcs):
            table = TagTable(plc.name, [t.name for t in plc.tags], self.space.dirty)
            driver: Driver = (
                ModbusDriver(plc) if isinstance(plc, ModbusPlc) else OpcUaDriver(plc, self.identity)
            )
            # Spread the PLCs over the interval: never all of them on one tick.
            phase = plc.poll_interval_s * i / len(plcs)
            poller = PlcPoller(plc, driver, table, phase, self.log, self._changed.set, self.stats)
            self.pollers.append(poller)
            tags = []
            for index, tag in enumerate(plc.tags):
                scaled = isinstance(tag, ModbusTag) and tag.scaled
                vtype = variant_type(tag.type, scaled)
                tags.append(TagSpec(tag.name, vtype, tag.writable, plc.poll_interval_s * 1000))
                served_as = "float64" if scaled else tag.type
                binding = _Binding(poller, index, served_as, tag.writable)
                self._bindings[f"{plc.name}.{tag.name}"] = binding
            specs.append((plc.name, tags))
        started = time.monotonic()
        count = await self.space.build(specs, self._write, self._read)
        for poller in self.pollers:  # every tag starts as bad: waiting for its first read
            for state in poller.table.tags:
                self.space.dirty(state)
        await self.space.start()
        self.log.info(
            "serving",
            url=self.space.url,
            plcs=len(plcs),
            tags=count,
            build_s=round(time.monotonic() - started, 2),
        )
        self.role = role_factory(self._report_parts, self._changed.set)
        self._spawn(self.space.publish(), "publisher")
        self._spawn(self._follow(), "service level")
        self._spawn(self.role.run(), "role")
        for poller in self.pollers:
            self._spawn(poller.run(), f"poll {poller.plc.name}")

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def stop(self) -> None:
        """Drop to ServiceLevel 0 and release the role first, then stop everything."""
        with contextlib.suppress(Exception):
            await self.space.set_service_level(0)
        if self.role is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self.role.close()
        await cancel_all(self._tasks)
        for poller in self.pollers:
            with contextlib.suppress(Exception):
                await poller.driver.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5.0):
                await self.space.stop()

    async def wait(self) -> None:
        """Until a task of the comm server ends (which is a bug: they run forever)."""
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()

    # -- role and health --------------------------------------------------------------
    @property
    def serving(self) -> bool:
        return self.role is not None and self.role.serving

    def level(self) -> int:
        return service_level(self.serving, [p.state for p in self.pollers])

    async def _follow(self) -> None:
        """Keep ServiceLevel, the diagnostics and the report in line with the state."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            role = self.role
            assert role is not None
            await self.space.set_service_level(self.level())
            await self.space.set_text("_comm.role", role.state)
            await self.space.set_text("_comm.epoch", "" if role.epoch is None else str(role.epoch))
            for poller in self.pollers:
                name = poller.plc.name
                await self.space.set_text(f"{name}._state", poller.describe())
                await self.space.set_text(
                    f"{name}._path", poller.switch.name(poller.switch.current)
                )
            role.poke()

    def _report_parts(self) -> ReportParts:
        resources = {
            f"plc:{p.plc.name}": Resource(
                ok=p.reachable is True,
                critical=p.plc.critical,
                grace_s=p.plc.switch_after_s,
                detail=p.describe(),
            )
            for p in self.pollers
        }
        return resources, {p.plc.name: p.report() for p in self.pollers}

    # -- reads and writes from OPC UA clients ----------------------------------------
    def _read(self, key: str) -> TagState:
        """The tag as it is now: stale if no read confirmed it in time, even when the
        timer that marks it so has not run yet (the process was stalled)."""
        binding = self._bindings[key]
        binding.poller.check_fresh()
        return binding.poller.table.tags[binding.index]

    async def _write(self, key: str, variant: Any) -> int:
        binding = self._bindings[key]
        role = self.role
        if not binding.writable:
            return S.BadNotWritable
        if role is None or not role.serving:
            self.log.info(
                "write refused",
                tag=key,
                reason=f"this node is {role.state if role else 'starting'}",
            )
            return S.BadInvalidState
        epoch = role.epoch
        try:
            value: Value = convert(binding.served_as, variant)
        except OutOfRange as err:
            return self._refused(key, S.BadOutOfRange, str(err))
        except (ValueError, AttributeError) as err:
            return self._refused(key, S.BadTypeMismatch, str(err))

        def may_send() -> bool:
            return role.serving and role.epoch == epoch

        try:
            path = await binding.poller.write(binding.index, value, may_send)
        except WriteError as err:
            return self._refused(key, err.status, err.reason)
        self.log.info("write", tag=key, value=value, epoch=epoch, path=path)
        return S.Good

    def _refused(self, key: str, status: int, reason: str) -> int:
        self.log.warning("write failed", tag=key, reason=reason)
        return status


async def cancel_all(tasks: list[asyncio.Task[None]], limit: float = 5.0) -> None:
    """Cancel ``tasks`` and wait for them, cancelling again any that shrugged it off
    (a library's ``wait_for`` may swallow one); gives up on stragglers after ``limit``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    pending = {t for t in tasks if not t.done()}
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved, so asyncio does not complain at exit
