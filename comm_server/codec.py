"""Modbus values and read plans: pure functions, no I/O.

Registers are 16-bit words, sent big-endian on the wire (Modbus application protocol
4.2). A 32- or 64-bit value spans 2 or 4 consecutive registers; devices disagree on
which word comes first (``word_order``) and a few also swap the two bytes inside each
register (``byte_order``). ``big``/``big`` is the standard ABCD order.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hapair.shared.plcs import ModbusTag

_FORMAT = {
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "int64": "q",
    "uint64": "Q",
    "float32": "f",
    "float64": "d",
}
INTEGER_RANGE = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}


class EncodeError(ValueError):
    """A value cannot be written to the tag (wrong kind, out of range)."""


Value = bool | int | float | str


def register_decoder(tag: ModbusTag) -> Callable[[bytes, int], int | float]:
    """A function of (block bytes, register offset) -> the tag's value, scale applied.

    The block bytes are the registers as they came off the wire (big-endian words), so
    the standard order is one ``unpack_from``; other orders reorder the words first.
    """
    n = tag.words
    fmt = struct.Struct(">" + _FORMAT[tag.type])
    swap_bytes = tag.byte_order == "little"
    reverse_words = tag.word_order == "little" and n > 1

    def raw(buf: bytes, offset: int) -> int | float:
        at = 2 * offset
        if not (swap_bytes or reverse_words):
            value: int | float = fmt.unpack_from(buf, at)[0]
            return value
        words = [buf[at + 2 * i : at + 2 * i + 2] for i in range(n)]
        if reverse_words:
            words.reverse()
        if swap_bytes:
            words = [w[::-1] for w in words]
        value = fmt.unpack(b"".join(words))[0]
        return value

    if not tag.scaled:
        return raw
    scale, shift = tag.scale, tag.offset
    return lambda buf, offset: raw(buf, offset) * scale + shift


def encode_registers(tag: ModbusTag, value: object) -> list[int]:
    """The registers to write for ``value`` (in engineering units, before scaling back)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EncodeError(f"{tag.type} tag needs a number, got {type(value).__name__}")
    number = (value - tag.offset) / tag.scale if tag.scaled else value
    fmt = _FORMAT[tag.type]
    if tag.type in INTEGER_RANGE:
        if isinstance(number, float):
            if not math.isfinite(number):
                raise EncodeError(f"{value} cannot be written to an integer tag")
            number = int(math.copysign(math.floor(abs(number) + 0.5), number))
        low, high = INTEGER_RANGE[tag.type]
        if not low <= number <= high:
            raise EncodeError(f"{value} is out of range for {tag.type} ({low} to {high})")
    elif tag.type == "float32" and math.isfinite(number) and abs(number) > 3.4028234663852886e38:
        raise EncodeError(f"{value} is out of range for float32")
    data = struct.pack(">" + fmt, number)
    words = [data[i : i + 2] for i in range(0, len(data), 2)]
    if tag.word_order == "little":
        words.reverse()
    if tag.byte_order == "little":
        words = [w[::-1] for w in words]
    return [int.from_bytes(w, "big") for w in words]


def registers_bytes(registers: Sequence[int]) -> bytes:
    """Registers back to their wire bytes (pymodbus hands them over as ints)."""
    return struct.pack(f">{len(registers)}H", *registers)


@dataclass(frozen=True, slots=True)
class Block:
    """One read request: ``count`` registers or bits of ``area`` from ``start``."""

    area: str
    start: int
    count: int
    tags: tuple[int, ...]  # indices into the PLC's tag list
    spans_gaps: bool  # reads addresses no tag uses

    def describe(self) -> str:
        return f"{self.area}{self.start}-{self.area}{self.start + self.count - 1}"


_AREA_ORDER = {"C": 0, "DI": 1, "IR": 2, "HR": 3}


def plan_reads(
    tags: Sequence[ModbusTag], max_gap: int, max_registers: int, max_bits: int
) -> list[Block]:
    """Group the tags into as few read requests as the protocol allows.

    Neighbouring tags of one area share a request while the request stays within the
    protocol's size limit and the unused addresses between them are at most
    ``max_gap``. A tag is never split across two requests.
    """
    order = sorted(range(len(tags)), key=lambda i: (_AREA_ORDER[tags[i].area], tags[i].index))
    blocks: list[Block] = []
    current: list[int] = []
    area, start, end, used = "", 0, -1, 0  # end: last address read; used: addresses tags use

    def close() -> None:
        if current:
            count = end - start + 1
            blocks.append(Block(area, start, count, tuple(current), used < count))

    covered: set[int] = set()
    for i in order:
        tag = tags[i]
        limit = max_bits if tag.area in ("C", "DI") else max_registers
        t_end = tag.index + tag.words - 1
        joins = (
            current
            and tag.area == area
            and tag.index - end - 1 <= max_gap
            and max(end, t_end) - start + 1 <= limit
        )
        if not joins:
            close()
            current, area, start, end = [], tag.area, tag.index, t_end
            covered = set()
        current.append(i)
        end = max(end, t_end)
        covered.update(range(tag.index, t_end + 1))
        used = len(covered)
    close()
    return blocks


def split_block(block: Block, tags: Sequence[ModbusTag]) -> list[Block]:
    """The block's tags in contiguous runs only: for a device that refuses to be read
    across addresses it does not map (exception 2, illegal data address)."""
    members = [tags[i] for i in block.tags]
    limit = max(block.count, 1)
    pieces = plan_reads(members, 0, limit, limit)
    return [
        Block(p.area, p.start, p.count, tuple(block.tags[j] for j in p.tags), False) for p in pieces
    ]
