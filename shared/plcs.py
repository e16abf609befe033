"""A pair's PLCs: the ``plcs:`` section, and the health the comm server reports of them.

The section is the same in a pair of the site file and in a file given to
``hapair-comm --config``; both validate it with these models, so every mistake is
named by its field path (``workshops[0].pairs[0].plcs[1].tags[2].address: ...``).
The health models are what the comm server writes in its report and what
``hapair status`` and ``hapair top`` read back.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import (
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from hapair.shared.model import LenientModel, StrictModel

# The site's name rule (shared.topology.NAME_PATTERN; repeated here because the site
# models import this module). PLC names make up node ids ``{plc}.{tag}``, so they
# carry no dot; tag names may (PLC symbols such as ``motor.speed`` are common), the
# first dot separates the two.
PLC_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"
PlcName = Annotated[str, Field(pattern=PLC_NAME_PATTERN)]
TagName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]

ValueType = Literal[
    "bool", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "string"
]
_TYPE_ALIASES = {"boolean": "bool", "float": "float32", "double": "float64"}
REGISTER_TYPES = {"int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"}
WORDS = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2}
WORDS |= {"int64": 4, "uint64": 4, "float64": 4}
Area = Literal["C", "DI", "IR", "HR"]
_ADDRESS = re.compile(r"^(C|DI|IR|HR)(\d{1,5})$")
MAX_REGISTERS = 125  # per read request, Modbus application protocol 6.3 / 6.4
MAX_BITS = 2000  # per read request, 6.1 / 6.2
_NODE_ID = re.compile(r"(?:ns=(\d+);)?([isgb])=(.+)", re.DOTALL)


def canonical_type(value: object) -> object:
    """``double`` -> ``float64``: the OPC UA names are accepted too."""
    return _TYPE_ALIASES.get(value, value) if isinstance(value, str) else value


def node_id_problem(text: str) -> str | None:
    """Why ``text`` is not an OPC UA node id in the string form (Part 6, 5.3.1.10),
    or None. Checked here rather than by asyncua's parser, which accepts namespace
    and numeric ids that no encoder can send."""
    match = _NODE_ID.fullmatch(text)
    if match is None:
        return f"{text!r} is not an OPC UA node id such as ns=2;s=Oven.Temp"
    ns, kind, identifier = match.groups()
    if ns is not None and int(ns) > 0xFFFF:
        return f"{text!r}: namespace index {ns} is above 65535"
    if kind == "i" and (not identifier.isdigit() or int(identifier) > 0xFFFFFFFF):
        return f"{text!r}: a numeric id (i=) is a number from 0 to 4294967295"
    if kind == "g":
        try:
            uuid.UUID(identifier)
        except ValueError:
            return f"{text!r}: a GUID id (g=) looks like 72962B91-FA75-4AE6-8D28-B404DC7DAF63"
    if kind == "b" and identifier.startswith("0x"):
        try:
            bytes.fromhex(identifier[2:])
        except ValueError:
            return f"{text!r}: a byte string id given as 0x... must be hexadecimal"
    return None


class ModbusPath(StrictModel):
    host: str = Field(min_length=1, description="the PLC's host name or IP address on this path")
    port: int = Field(502, ge=1, le=65535, description="its Modbus TCP port")

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class OpcUaPath(StrictModel):
    url: str = Field(description="the PLC's OPC UA server on this path: opc.tcp://HOST:PORT[/PATH]")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.fullmatch(r"opc\.tcp://[^/\s:]+(:\d{1,5})?(/\S*)?", value):
            raise ValueError(f"url must look like opc.tcp://HOST:PORT[/PATH], got {value!r}")
        return value

    def __str__(self) -> str:
        return self.url


class _Tag(StrictModel):
    name: TagName = Field(
        description="the tag's name, unique in its PLC; {plc}.{tag} in the comm server's "
        "OPC UA server"
    )
    type: ValueType = Field(
        description="bool, int16, uint16, int32, uint32, int64, uint64, float32, float64 or "
        "string (OPC UA only)"
    )
    writable: bool = Field(
        False,
        description="clients may write it, through the active's comm server (Modbus: coils "
        "and holding registers only)",
    )

    @field_validator("type", mode="before")
    @classmethod
    def _type(cls, value: object) -> object:
        return canonical_type(value)


class ModbusTag(_Tag):
    address: str = Field(description="C, DI, IR or HR and a zero-based number: HR100")
    word_order: Literal["big", "little"] = Field(
        "big",
        description="which register of a 32- or 64-bit value comes first: big, the most "
        "significant",
    )
    byte_order: Literal["big", "little"] = Field(
        "big", description="little: the device swaps the two bytes of every register"
    )
    scale: float = Field(
        1.0, description="served value = raw * scale + offset (then a Double); not 0"
    )
    offset: float = Field(0.0, description="added after scale: raw * scale + offset")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        match = _ADDRESS.fullmatch(value.strip().upper())
        if match is None or int(match.group(2)) > 65535:
            raise ValueError(
                f"{value!r} is not a Modbus address: C (coil), DI (discrete input), "
                "IR (input register) or HR (holding register) and a zero-based number "
                "from 0 to 65535, e.g. HR100"
            )
        return f"{match.group(1)}{int(match.group(2))}"

    @field_validator("scale")
    @classmethod
    def _scale(cls, value: float) -> float:
        if value == 0:
            raise ValueError("scale must not be 0")
        return value

    @model_validator(mode="after")
    def _fits(self) -> ModbusTag:
        area = self.area
        if area in ("C", "DI") and self.type != "bool":
            raise ValueError(f"{self.address} is a bit ({area}): its type must be bool")
        if area in ("IR", "HR") and self.type not in REGISTER_TYPES:
            raise ValueError(
                f"{self.address} is a register: type must be one of "
                + ", ".join(sorted(REGISTER_TYPES))
                + f", not {self.type}"
            )
        if self.writable and area in ("DI", "IR"):
            raise ValueError(f"{self.address} is read-only in Modbus ({area}): not writable")
        if self.type == "bool" and (self.scale != 1.0 or self.offset != 0.0):
            raise ValueError("a bool has no scale or offset")
        if self.index + self.words - 1 > 65535:
            raise ValueError(f"{self.type} at {self.address} runs past register 65535")
        return self

    @cached_property
    def area(self) -> Area:
        match = _ADDRESS.fullmatch(self.address)
        assert match is not None
        area: Area = match.group(1)  # type: ignore[assignment]
        return area

    @cached_property
    def index(self) -> int:
        return int(self.address[len(self.area) :])

    @property
    def words(self) -> int:
        """Registers (or bits, for C and DI) the tag occupies."""
        return WORDS.get(self.type, 1)

    @property
    def scaled(self) -> bool:
        return self.scale != 1.0 or self.offset != 0.0


class OpcUaTag(_Tag):
    node: str = Field(description="the PLC's node id: ns=2;s=Oven.Temp")

    @field_validator("node")
    @classmethod
    def _node(cls, value: str) -> str:
        problem = node_id_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


class _Plc(StrictModel):
    name: PlcName = Field(
        description="the PLC's name, unique in the pair (or the file); no dot: node ids are "
        "{plc}.{tag}"
    )
    poll_interval_s: float = Field(1.0, ge=0.01, le=3600.0, description="seconds between two polls")
    timeout_s: float | None = Field(
        None,
        gt=0.0,
        description="seconds per request, at most poll_interval_s; unset: the smaller of 1 s "
        "and the interval",
    )
    critical: bool = Field(
        False,
        description="true: every path to it lost on the active for switch_after_s, while a "
        "standby reaches it: the pair moves",
    )
    switch_after_s: float = Field(
        5.0,
        ge=0.0,
        description="seconds a critical PLC may be lost on the active before the pair moves",
    )
    failback_after_s: float = Field(
        10.0,
        ge=0.0,
        description="seconds the primary path must answer before polling goes back to it",
    )
    probe_interval_s: float = Field(
        1.0, gt=0.0, description="seconds between two checks of the path not in use"
    )
    bad_after_s: float = Field(
        10.0, ge=0.0, description="seconds without an answer before stale values turn bad"
    )

    @model_validator(mode="after")
    def _timing(self) -> _Plc:
        # A path switch has to fit in one poll interval: detection (a timeout at worst)
        # plus one request on the other path.
        if self.timeout_s is not None and self.timeout_s > self.poll_interval_s:
            raise ValueError(
                f"timeout_s ({self.timeout_s}) must not exceed poll_interval_s "
                f"({self.poll_interval_s}): a path switch has to fit in one poll interval"
            )
        names = [t.name for t in self.tag_list()]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            where = ", ".join(
                f"{n!r} at " + ", ".join(f"tags[{i}]" for i, m in enumerate(names) if m == n)
                for n in dupes
            )
            raise ValueError(f"duplicate tag name {where}")
        return self

    def tag_list(self) -> Sequence[_Tag]:
        raise NotImplementedError

    @property
    def timeout(self) -> float:
        return self.timeout_s if self.timeout_s is not None else min(1.0, self.poll_interval_s)


class ModbusPlc(_Plc):
    protocol: Literal["modbus"] = Field("modbus", description="Modbus TCP (the default)")
    paths: list[ModbusPath] = Field(
        min_length=1, max_length=2, description="one or two paths: the first is the primary"
    )
    unit: int = Field(1, ge=0, le=255, description="the Modbus unit (slave) id")
    max_gap: int = Field(
        16, ge=0, description="unused registers (or bits) one grouped read may span"
    )
    max_registers: int = Field(
        MAX_REGISTERS,
        ge=1,
        le=MAX_REGISTERS,
        description="registers one request reads at most, for a device that takes fewer "
        "than the protocol allows",
    )
    max_bits: int = Field(
        MAX_BITS,
        ge=1,
        le=MAX_BITS,
        description="coils or discrete inputs one request reads at most, likewise",
    )
    tags: list[ModbusTag] = Field(min_length=1, description="the values polled from it")

    def tag_list(self) -> list[ModbusTag]:
        return self.tags


class OpcUaPlcSecurity(StrictModel):
    """A PLC's OPC UA server reached over a secure channel; the comm server shows its
    own certificate (--opcua-cert), which the PLC must trust."""

    policy: Literal["Basic256Sha256", "Aes256_Sha256_RsaPss"] = Field(
        "Basic256Sha256", description="the channel's security policy"
    )
    mode: Literal["Sign", "SignAndEncrypt"] = Field(
        "SignAndEncrypt", description="Sign: messages signed; SignAndEncrypt: also encrypted"
    )
    trust: str = Field(
        min_length=1,
        description="a PEM file on each node: the PLC's certificate or the CA that issued it",
    )


class OpcUaPlc(_Plc):
    protocol: Literal["opcua"] = Field(description="OPC UA, the PLC being a server")
    paths: list[OpcUaPath] = Field(
        min_length=1, max_length=2, description="one or two servers: the first is the primary"
    )
    tags: list[OpcUaTag] = Field(min_length=1, description="the values read from it")
    security: OpcUaPlcSecurity | None = Field(
        None,
        description="a secure channel to the PLC, the comm server showing its --opcua-cert; "
        "unset: NoSecurity, the PLC's server open to its network",
    )

    def tag_list(self) -> list[OpcUaTag]:
        return self.tags


def _protocol(value: Any) -> str | None:
    if isinstance(value, dict):
        protocol = value.get("protocol", "modbus")
        return protocol if isinstance(protocol, str) else None
    return getattr(value, "protocol", None)


Plc = Annotated[
    Annotated[ModbusPlc, Tag("modbus")] | Annotated[OpcUaPlc, Tag("opcua")],
    Discriminator(
        _protocol,
        custom_error_type="protocol",
        custom_error_message="protocol must be modbus or opcua",
    ),
]

# pydantic puts the union's tag (modbus/opcua) into an error's location; a reader
# wants ``plcs[0].tags[1].address``, not ``plcs[0].modbus.tags[1].address``.
_UNION_TAG = re.compile(r"(plcs\[\d+\])\.(?:modbus|opcua)(?=[.\[]|$)")


def plain_path(problem: str) -> str:
    """``...plcs[0].modbus.tags[1]: msg`` -> ``...plcs[0].tags[1]: msg`` (a problem
    line of :func:`hapair.shared.validation.format_errors`; the message is left alone)."""
    path, sep, message = problem.partition(": ")
    return _UNION_TAG.sub(r"\1", path) + sep + message


def duplicate_names(plcs: Sequence[ModbusPlc | OpcUaPlc]) -> list[str]:
    """``duplicate PLC name 'c' at plcs[0].name, plcs[2].name``, one per name."""
    names = [p.name for p in plcs]
    return [
        f"duplicate PLC name {n!r} at "
        + ", ".join(f"plcs[{i}].name" for i, m in enumerate(names) if m == n)
        for n in sorted({n for n in names if names.count(n) > 1})
    ]


# ---- health, as the comm server reports it ----------------------------------------------


class PathHealth(LenientModel):
    """One network path to a PLC, as the reporting node sees it."""

    endpoint: str
    up: bool | None = None  # None: not tried yet
    latency_ms: float | None = None
    errors: int = 0
    last_error: str | None = None


class PlcHealth(LenientModel):
    """One PLC as the reporting node's comm server sees it.

    ``state`` is ``ok``, ``degraded`` (reachable, a path down), ``down`` or
    ``starting``; ``path`` is the index of the path in use (0: the primary)."""

    state: str
    path: int = 0
    paths: list[PathHealth] = Field(default_factory=list)
    tags: dict[str, int] = Field(default_factory=dict)
    problem: str | None = None
    critical: bool = False


class PlcReports(LenientModel):
    """The ``plcs`` part of a service's report (``/nodes/{node}/reports/{service}``);
    a report without it (another kind of service) has none."""

    service: str
    plcs: dict[str, PlcHealth] = Field(default_factory=dict)
