"""The comm server's PLC list: the ``plcs:`` section, validated at the boundary.

A file given with ``--config`` holds ``plcs:`` and nothing else. Every mistake is
reported with its field path (``plcs[0].tags[3].address: ...``), the way the site file
is, and an invalid file starts nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from comm_server.uatypes import ua
from shared.topology import NAME_PATTERN, format_errors
from shared.validation import parse_yaml, read_file

# PLC names make up node ids ``{plc}.{tag}``, so they carry no dot; tag names may
# (PLC symbols such as ``motor.speed`` are common), the first dot separates the two.
PlcName = Annotated[str, Field(pattern=NAME_PATTERN)]
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


class ConfigError(ValueError):
    """The PLC list is invalid; ``problems`` lists ``path: message``."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(
            f"{source}: invalid PLC configuration\n" + "\n".join(f"  {p}" for p in problems)
        )


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def canonical_type(value: object) -> object:
    """``double`` -> ``float64``: the OPC UA names are accepted too."""
    return _TYPE_ALIASES.get(value, value) if isinstance(value, str) else value


class ModbusPath(_Model):
    host: str = Field(min_length=1)
    port: int = Field(502, ge=1, le=65535)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class OpcUaPath(_Model):
    url: str

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.fullmatch(r"opc\.tcp://[^/\s:]+(:\d{1,5})?(/\S*)?", value):
            raise ValueError(f"url must look like opc.tcp://HOST:PORT[/PATH], got {value!r}")
        return value

    def __str__(self) -> str:
        return self.url


class _Tag(_Model):
    name: TagName
    type: ValueType
    writable: bool = False

    @field_validator("type", mode="before")
    @classmethod
    def _type(cls, value: object) -> object:
        return canonical_type(value)


class ModbusTag(_Tag):
    address: str = Field(description="C, DI, IR or HR and a zero-based number: HR100")
    word_order: Literal["big", "little"] = "big"
    byte_order: Literal["big", "little"] = "big"
    scale: float = 1.0
    offset: float = 0.0

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
        if not re.fullmatch(r"(ns=\d+;)?[isgb]=.+", value):
            raise ValueError(f"{value!r} is not an OPC UA node id such as ns=2;s=Oven.Temp")
        try:
            ua.NodeId.from_string(value)
        except Exception as err:  # asyncua's parser: ValueError, UaStringParsingError, ...
            raise ValueError(f"{value!r} is not a valid OPC UA node id: {err}") from None
        return value


class _Plc(_Model):
    name: PlcName
    poll_interval_s: float = Field(1.0, ge=0.01, le=3600.0)
    timeout_s: float | None = Field(
        None, gt=0.0, description="per request; default the smaller of 1 s and the interval"
    )
    critical: bool = False
    switch_after_s: float = Field(
        5.0, ge=0.0, description="every path lost this long on the active: the pair moves"
    )
    failback_after_s: float = Field(
        10.0, ge=0.0, description="primary healthy this long: back from the backup"
    )
    probe_interval_s: float = Field(1.0, gt=0.0, description="checks of the path not in use")
    bad_after_s: float = Field(10.0, ge=0.0, description="no answer this long: stale -> bad")

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
    protocol: Literal["modbus"] = "modbus"
    paths: list[ModbusPath] = Field(min_length=1, max_length=2)
    unit: int = Field(1, ge=0, le=255)
    max_gap: int = Field(16, ge=0, description="unused registers/bits a grouped read may span")
    max_registers: int = Field(MAX_REGISTERS, ge=1, le=MAX_REGISTERS)
    max_bits: int = Field(MAX_BITS, ge=1, le=MAX_BITS)
    tags: list[ModbusTag] = Field(min_length=1)

    def tag_list(self) -> list[ModbusTag]:
        return self.tags


class OpcUaPlc(_Plc):
    protocol: Literal["opcua"]
    paths: list[OpcUaPath] = Field(min_length=1, max_length=2)
    tags: list[OpcUaTag] = Field(min_length=1)

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


class CommConfig(_Model):
    plcs: list[Plc] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> CommConfig:
        names = [p.name for p in self.plcs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(
                "; ".join(
                    f"duplicate PLC name {n!r} at "
                    + ", ".join(f"plcs[{i}].name" for i, m in enumerate(names) if m == n)
                    for n in dupes
                )
            )
        return self


# The union's tag (modbus/opcua) is part of pydantic's error location; a reader wants
# ``plcs[0].tags[1].address``, not ``plcs[0].modbus.tags[1].address``.
_UNION_TAG = re.compile(r"(plcs\[\d+\])\.(modbus|opcua)(?=[.\[:]|$)")


def parse_config(data: object, source: str) -> CommConfig:
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): expected a mapping with plcs"])
    try:
        return CommConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(source, [_UNION_TAG.sub(r"\1", p) for p in format_errors(err)]) from None


def loads(text: str, source: str = "<text>") -> CommConfig:
    return parse_config(parse_yaml(text, source, ConfigError), source)


def load(path: str | Path) -> CommConfig:
    return loads(read_file(path, ConfigError), str(path))
