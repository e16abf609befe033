"""Tag values with their quality, as the pollers see them.

A tag is ``good`` only while a read confirmed its value within the last poll interval
plus timeout; ``stale`` once the PLC stopped answering (its last good value is kept,
OPC UA status UncertainNoCommunicationLastUsableValue); ``bad`` when there is no
usable value: never read, the PLC answered garbage or an error for it, or it has been
unreachable for longer than ``bad_after_s``. Every bad value carries a reason.

Only changes (value, quality or status) are handed on: each changed tag is put on a
dirty list that the OPC UA side drains.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from enum import StrEnum

from hapair.comm_server.codec import Value
from hapair.comm_server.uatypes import S

STALE_STATUS = S.UncertainNoCommunicationLastUsableValue


class Quality(StrEnum):
    GOOD = "good"
    STALE = "stale"
    BAD = "bad"


class TagState:
    """One tag's current value. Mutable on purpose: 100,000 updates a second."""

    __slots__ = (
        "index",
        "name",
        "node_id",
        "plc",
        "quality",
        "reason",
        "source_time",
        "status",
        "value",
    )

    def __init__(self, plc: str, name: str, index: int) -> None:
        self.plc = plc
        self.name = name
        self.index = index
        self.node_id = f"{plc}.{name}"
        self.value: Value | None = None
        self.quality = Quality.BAD
        self.status: int = S.BadWaitingForInitialData
        self.reason = "no value read yet"
        self.source_time = time.time()

    def __repr__(self) -> str:
        return f"<{self.node_id} {self.quality} {self.value!r} {self.reason}>"


def _same(a: Value | None, b: Value) -> bool:
    # NaN is not equal to itself, but an unchanged NaN is no change.
    return a == b or (a != a and b != b)


class TagTable:
    """The tags of one PLC. ``on_dirty`` is told of every tag whose state changed."""

    def __init__(
        self, plc: str, names: Sequence[str], on_dirty: Callable[[TagState], None]
    ) -> None:
        self.plc = plc
        self.tags = [TagState(plc, name, i) for i, name in enumerate(names)]
        self._on_dirty = on_dirty
        self.problems: dict[int, str] = {}  # bad tags and why, kept as they change
        self.problems_version = 0  # grows at every change of ``problems``

    def good(self, index: int, value: Value, when: float) -> None:
        tag = self.tags[index]
        if tag.quality is Quality.GOOD and _same(tag.value, value):
            return
        if self.problems.pop(index, None) is not None:
            self.problems_version += 1
        tag.value, tag.quality, tag.status, tag.reason = value, Quality.GOOD, S.Good, ""
        tag.source_time = when
        self._on_dirty(tag)

    def bad(self, index: int, status: int, reason: str, when: float) -> None:
        tag = self.tags[index]
        if tag.quality is Quality.BAD and tag.status == status and tag.reason == reason:
            return
        tag.value, tag.quality, tag.status, tag.reason = None, Quality.BAD, status, reason
        tag.source_time = when
        self.problems[index] = reason
        self.problems_version += 1
        self._on_dirty(tag)

    def bad_all(self, indices: Sequence[int], status: int, reason: str, when: float) -> None:
        for i in indices:
            self.bad(i, status, reason, when)

    def stale(self, reason: str, when: float) -> int:
        """Good values are no longer confirmed: keep them, as stale. Returns how many."""
        count = 0
        for tag in self.tags:
            if tag.quality is Quality.GOOD:
                tag.quality, tag.status, tag.reason = Quality.STALE, STALE_STATUS, reason
                tag.source_time = when
                self._on_dirty(tag)
                count += 1
        return count

    def unreachable(self, reason: str, when: float) -> None:
        """No answer for too long: nothing is usable any more."""
        for tag in self.tags:
            if tag.quality is not Quality.BAD or tag.status != S.BadNoCommunication:
                self.bad(tag.index, S.BadNoCommunication, reason, when)

    def summary(self, limit: int = 3) -> str:
        """``2 tags bad: speed, load: HR10-HR13: exception 4 (...)`` per reason."""
        by_reason: dict[str, list[str]] = {}
        for index, reason in self.problems.items():
            by_reason.setdefault(reason, []).append(self.tags[index].name)
        parts = [
            f"{len(names)} tag{'s' if len(names) > 1 else ''} bad "
            f"({', '.join(names[:limit])}{', ...' if len(names) > limit else ''}): {reason}"
            for reason, names in sorted(by_reason.items())
        ]
        return "; ".join(parts)

    def counts(self) -> dict[str, int]:
        result = {q.value: 0 for q in Quality}
        for tag in self.tags:
            result[tag.quality.value] += 1
        return result
