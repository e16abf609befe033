"""The comm server's pure parts: value codec, read plans, path switching, ServiceLevel,
tag quality. Values are checked against pymodbus's own converter, not our codec."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hapair.comm_server.codec import (
    EncodeError,
    encode_registers,
    plan_reads,
    register_decoder,
    registers_bytes,
    split_block,
)
from hapair.comm_server.level import service_level
from hapair.comm_server.paths import PathSwitch
from hapair.comm_server.tags import Quality, TagState, TagTable
from hapair.comm_server.uatypes import S
from hapair.shared.plcs import ModbusTag
from tests.support.plc_sim import to_registers

RANGES = {
    "int16": st.integers(-(2**15), 2**15 - 1),
    "uint16": st.integers(0, 2**16 - 1),
    "int32": st.integers(-(2**31), 2**31 - 1),
    "uint32": st.integers(0, 2**32 - 1),
    "int64": st.integers(-(2**63), 2**63 - 1),
    "uint64": st.integers(0, 2**64 - 1),
    "float32": st.floats(width=32, allow_nan=False),
    "float64": st.floats(allow_nan=False),
}


def tag(type_: str = "float32", address: str = "HR0", **kw: Any) -> ModbusTag:
    return ModbusTag(name="t", address=address, type=type_, **kw)  # type: ignore[arg-type]


def decode(t: ModbusTag, registers: list[int], offset: int = 0) -> int | float:
    return register_decoder(t)(registers_bytes(registers), offset)


@pytest.mark.parametrize("type_", sorted(RANGES))
@pytest.mark.parametrize("word_order", ["big", "little"])
@given(data=st.data())
def test_every_type_and_word_order_decodes_as_pymodbus_encodes(
    type_: str, word_order: str, data: st.DataObject
) -> None:
    value = data.draw(RANGES[type_])
    t = tag(type_, word_order=word_order)
    registers = to_registers(value, type_, word_order)
    assert decode(t, [0xDEAD, *registers, 0xBEEF], 1) == value  # at an offset in a block
    assert encode_registers(t, value) == registers


@given(value=RANGES["float32"])
def test_byte_swapped_registers(value: float) -> None:
    standard = to_registers(value, "float32")
    swapped = [((r & 0xFF) << 8) | (r >> 8) for r in standard]
    t = tag("float32", byte_order="little")
    assert decode(t, swapped) == value
    assert encode_registers(t, value) == swapped
    both = tag("float32", byte_order="little", word_order="little")
    assert decode(both, swapped[::-1]) == value


def test_scale_and_offset_both_ways() -> None:
    t = tag("int16", scale=0.1, offset=-40.0)
    assert decode(t, [650]) == pytest.approx(25.0)
    assert encode_registers(t, 25.0) == [650]
    assert encode_registers(t, -40.04) == [0]  # rounded to the nearest raw step
    with pytest.raises(EncodeError, match="out of range for int16"):
        encode_registers(t, 4000.0)


def test_values_that_do_not_fit_are_refused() -> None:
    with pytest.raises(EncodeError, match="out of range for uint16"):
        encode_registers(tag("uint16"), -1)
    with pytest.raises(EncodeError, match="needs a number"):
        encode_registers(tag("int32"), True)
    with pytest.raises(EncodeError, match="cannot be written to an integer"):
        encode_registers(tag("int32"), math.inf)
    with pytest.raises(EncodeError, match="out of range for float32"):
        encode_registers(tag("float32"), 1e39)


def tags_at(*specs: str) -> list[ModbusTag]:
    """``"HR10:float32"`` ... -> tags named t0, t1, ..."""
    out = []
    for i, spec in enumerate(specs):
        address, type_ = spec.split(":")
        out.append(ModbusTag(name=f"t{i}", address=address, type=type_))  # type: ignore[arg-type]
    return out


def test_neighbouring_tags_share_a_request_per_area() -> None:
    tags = tags_at("HR10:float32", "HR12:float32", "C5:bool", "HR14:int16", "DI7:bool", "C6:bool")
    blocks = plan_reads(tags, max_gap=0, max_registers=125, max_bits=2000)
    assert [(b.area, b.start, b.count, b.tags, b.spans_gaps) for b in blocks] == [
        ("C", 5, 2, (2, 5), False),
        ("DI", 7, 1, (4,), False),
        ("HR", 10, 5, (0, 1, 3), False),
    ]


def test_gaps_and_size_limits() -> None:
    tags = tags_at("HR0:float32", "HR10:float32", "HR40:float32")
    spans = plan_reads(tags, max_gap=8, max_registers=125, max_bits=2000)
    assert [(b.start, b.count, b.spans_gaps) for b in spans] == [(0, 12, True), (40, 2, False)]
    # 100 float32 in a row: 200 registers, never a tag cut in two at the 125 limit
    row = tags_at(*(f"HR{2 * i}:float32" for i in range(100)))
    blocks = plan_reads(row, max_gap=0, max_registers=125, max_bits=2000)
    assert [(b.start, b.count) for b in blocks] == [(0, 124), (124, 76)]
    assert sorted(i for b in blocks for i in b.tags) == list(range(100))
    assert plan_reads(row, 0, 10, 2000)[0].count == 10


def test_a_block_across_gaps_splits_into_contiguous_runs() -> None:
    tags = tags_at("HR0:int16", "HR1:int16", "HR5:float32", "HR9:int16")
    [block] = plan_reads(tags, max_gap=16, max_registers=125, max_bits=2000)
    pieces = split_block(block, tags)
    assert [(p.start, p.count, p.tags, p.spans_gaps) for p in pieces] == [
        (0, 2, (0, 1), False),
        (5, 2, (2,), False),
        (9, 1, (3,), False),
    ]


def test_path_switching_and_failback() -> None:
    sw = PathSwitch(["a:1", "b:1"], failback_after_s=5.0, probe_interval_s=1.0)
    assert sw.attempt_order() == [0, 1]
    assert sw.failed(0, "connection refused", now=10.0)
    assert not sw.failed(0, "connection refused", now=10.1)  # already down: no news
    assert sw.succeeded(1, 0.002, now=10.1)
    assert sw.use(1) == 0 and sw.attempt_order() == [1, 0]
    assert sw.probes_due(10.5) == []  # the primary failed at 10.1: not yet
    assert sw.probes_due(11.2) == [0]
    sw.succeeded(0, 0.001, now=11.2)
    assert not sw.failback_due(16.1)
    assert sw.failback_due(16.2)
    sw.failed(0, "no reply", now=16.0)  # a flap restarts the count
    sw.succeeded(0, 0.001, now=17.0)
    assert not sw.failback_due(21.9) and sw.failback_due(22.0)
    assert sw.paths[0].errors == 3 and sw.paths[0].last_error == "no reply"


@pytest.mark.parametrize(
    ("serving", "states", "level"),
    [
        (True, ["ok", "ok"], 255),
        (True, ["ok", "degraded"], 100 + int(98 * 0.75)),
        (True, ["ok", "down"], 100 + 49),
        (True, ["down", "down"], 0),
        (True, ["starting"], 0),
        (False, ["ok", "ok"], 50),
        (False, ["ok", "down"], 30),
        (False, ["down"], 0),
    ],
)
def test_service_level_bands(serving: bool, states: list[str], level: int) -> None:
    assert service_level(serving, states) == level


def test_an_active_with_data_always_ranks_above_any_standby() -> None:
    worst_active = min(
        service_level(True, s)
        for s in (["ok", "down", "down", "down"], ["degraded"] + ["down"] * 9)
    )
    assert worst_active > service_level(False, ["ok"] * 10)


def test_quality_changes_are_reported_once_and_stale_keeps_the_value() -> None:
    seen: list[tuple[str, Quality, object]] = []

    def dirty(t: TagState) -> None:
        seen.append((t.name, t.quality, t.value))

    table = TagTable("p", ["a", "b"], dirty)
    assert table.tags[0].status == S.BadWaitingForInitialData
    table.good(0, 1.5, 100.0)
    table.good(0, 1.5, 100.1)  # unchanged: nothing to publish
    table.good(1, math.nan, 100.0)
    table.good(1, math.nan, 100.1)  # NaN again is no change either
    assert seen == [("a", Quality.GOOD, 1.5), ("b", Quality.GOOD, seen[1][2])]
    assert table.stale("PLC unreachable", 101.0) == 2
    assert table.tags[0].value == 1.5 and table.tags[0].quality is Quality.STALE
    assert table.tags[0].status == S.UncertainNoCommunicationLastUsableValue
    table.unreachable("PLC unreachable", 111.0)
    assert table.tags[0].value is None and table.tags[0].status == S.BadNoCommunication
    assert table.counts() == {"good": 0, "stale": 0, "bad": 2}
