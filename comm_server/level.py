"""ServiceLevel, the OPC UA way (Part 4, 6.6.2.4.2): a pure function of role and data.

OPC UA clients of a redundant server set read ServiceLevel from every server and use
the highest. The bands:

| situation                                                        | ServiceLevel |
|------------------------------------------------------------------|--------------|
| no PLC answers (no data at all), whatever the role               | 0            |
| standby (or role unknown): reads only, refuses writes            | 10 to 50     |
| active, degraded: a path lost or a PLC unreachable               | 100 to 198   |
| active, every PLC answering on every path                        | 255          |

Within a band the value grows with the share of PLCs in good order (a PLC reachable
on one path only counts half), so a client comparing two degraded servers picks the
one that sees more. An active always ranks above any standby: only the active writes.
"""

from __future__ import annotations

from collections.abc import Sequence

HEALTHY = 255
DEGRADED_LOW, DEGRADED_HIGH = 100, 198
STANDBY_LOW, STANDBY_HIGH = 10, 50
NO_DATA = 0


def service_level(serving: bool, states: Sequence[str]) -> int:
    """``states``: each PLC's ``ok``, ``degraded``, ``down`` or ``starting``."""
    if not any(s in ("ok", "degraded") for s in states):
        return NO_DATA
    share = sum(1.0 if s == "ok" else 0.5 if s == "degraded" else 0.0 for s in states) / len(states)
    if not serving:
        return STANDBY_LOW + int((STANDBY_HIGH - STANDBY_LOW) * share)
    if share == 1.0:
        return HEALTHY
    return DEGRADED_LOW + int((DEGRADED_HIGH - DEGRADED_LOW) * share)
