"""The comm server's PLC list: the contract's shape parses, every mistake is named by path."""

from __future__ import annotations

import pytest

from hapair.comm_server.config import ConfigError, loads
from hapair.shared.plcs import ModbusPlc, OpcUaPlc

EXAMPLE = """
plcs:
  - name: press-1
    protocol: modbus                 # Modbus TCP, pymodbus
    paths:                           # first = primary, second = backup network path
      - {host: 127.0.0.61, port: 5020}
      - {host: 127.0.0.62, port: 5020}
    unit: 1
    poll_interval_s: 0.5
    timeout_s: 0.3
    critical: true                   # losing it on the active can move the pair
    tags:
      - {name: speed, address: HR100, type: float32, word_order: big, scale: 1.0, writable: true}
      - {name: count, address: IR10, type: uint32}
      - {name: running, address: C5, type: bool, writable: true}
      - {name: door_open, address: DI7, type: bool}
  - name: oven-1
    protocol: opcua                  # an OPC UA server in the PLC, asyncua client
    paths: [{url: "opc.tcp://127.0.0.63:4841"}, {url: "opc.tcp://127.0.0.64:4841"}]
    poll_interval_s: 1.0
    tags:
      - {name: temp, node: "ns=2;s=Oven.Temp", type: double}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        loads(text)
    return err.value.problems


def test_the_issue_example_parses_with_its_meaning() -> None:
    config = loads(EXAMPLE)
    press, oven = config.plcs
    assert isinstance(press, ModbusPlc) and isinstance(oven, OpcUaPlc)
    assert [str(p) for p in press.paths] == ["127.0.0.61:5020", "127.0.0.62:5020"]
    assert press.critical and press.timeout == 0.3 and press.unit == 1
    speed, count, running, door = press.tags
    assert (speed.area, speed.index, speed.words, speed.writable) == ("HR", 100, 2, True)
    assert (count.area, count.index, count.type) == ("IR", 10, "uint32")
    assert (running.area, door.area, door.index) == ("C", "DI", 7)
    assert oven.tags[0].type == "float64"  # OPC UA's "double"
    assert oven.timeout == 1.0  # default: the smaller of 1 s and the interval


def test_protocol_defaults_to_modbus_and_port_to_502() -> None:
    config = loads(
        "plcs: [{name: p, paths: [{host: plc.local}],"
        " tags: [{name: t, address: hr3, type: int16}]}]"
    )
    plc = config.plcs[0]
    assert isinstance(plc, ModbusPlc)
    assert plc.paths[0].port == 502
    assert plc.tags[0].address == "HR3"


def test_every_mistake_is_named_by_its_field_path() -> None:
    found = problems(
        """
plcs:
  - name: press-1
    paths: []
    tags:
      - {name: speed, address: HX100, type: float32}
      - {name: big, address: C1, type: float32}
      - {name: x, address: IR1, type: bool}
      - {name: y, address: DI1, type: bool, writable: true}
      - {name: z, address: HR65535, type: float64}
      - {name: w, address: HR1, type: int16, colour: red}
      - {name: s, address: HR2, type: int16, scale: 0}
  - name: oven-1
    protocol: opcua
    paths: [{url: "http://x"}]
    tags: [{name: temp, node: "Oven.Temp", type: double}]
  - {name: s7, protocol: s7}
  - name: has.dot
    paths: [{host: a}]
    tags: [{name: a, address: HR1, type: int16}]
extra: 1
"""
    )
    assert found == [
        "plcs[0].paths: List should have at least 1 item after validation, not 0",
        "plcs[0].tags[0].address: 'HX100' is not a Modbus address: C (coil), DI (discrete "
        "input), IR (input register) or HR (holding register) and a zero-based number from 0 "
        "to 65535, e.g. HR100",
        "plcs[0].tags[1]: C1 is a bit (C): its type must be bool",
        "plcs[0].tags[2]: IR1 is a register: type must be one of float32, float64, int16, "
        "int32, int64, uint16, uint32, uint64, not bool",
        "plcs[0].tags[3]: DI1 is read-only in Modbus (DI): not writable",
        "plcs[0].tags[4]: float64 at HR65535 runs past register 65535",
        "plcs[0].tags[5].colour: Extra inputs are not permitted",
        "plcs[0].tags[6].scale: scale must not be 0",
        "plcs[1].paths[0].url: url must look like opc.tcp://HOST:PORT[/PATH], got 'http://x'",
        "plcs[1].tags[0].node: 'Oven.Temp' is not an OPC UA node id such as ns=2;s=Oven.Temp",
        "plcs[2]: protocol must be modbus or opcua",
        "plcs[3].name: String should match pattern '^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$'",
        "extra: Extra inputs are not permitted",
    ]


def test_duplicates_and_timing_are_refused_where_they_are() -> None:
    found = problems(
        """
plcs:
  - name: a
    paths: [{host: h1}, {host: h2}, {host: h3}]
    tags: [{name: t, address: HR1, type: int16}]
  - name: b
    paths: [{host: h1}]
    poll_interval_s: 0.1
    timeout_s: 0.2
    tags: [{name: t, address: HR1, type: int16}]
  - name: c
    paths: [{host: h1}]
    tags: [{name: t, address: HR1, type: int16}, {name: t, address: HR2, type: int16}]
  - name: c
    paths: [{host: h1}]
    tags: [{name: u, address: HR1, type: int16}]
"""
    )
    assert found == [
        "plcs[0].paths: List should have at most 2 items after validation, not 3",
        "plcs[1]: timeout_s (0.2) must not exceed poll_interval_s (0.1): a path switch has "
        "to fit in one poll interval",
        "plcs[2]: duplicate tag name 't' at tags[0], tags[1]",
    ]
    assert problems(
        "plcs: [{name: c, paths: [{host: h}], tags: [{name: t, address: C1, type: bool}]},"
        " {name: c, paths: [{host: h}], tags: [{name: t, address: C1, type: bool}]}]"
    ) == ["(top level): duplicate PLC name 'c' at plcs[0].name, plcs[1].name"]


def test_not_yaml_and_not_a_mapping() -> None:
    assert problems("plcs: [") == [
        "line 2 column 1: YAML syntax error: did not find expected node content"
    ]
    assert problems("- 1") == ["(top level): expected a mapping with plcs"]
