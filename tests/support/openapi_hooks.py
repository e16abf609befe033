"""schemathesis hooks for its runs against a registry (``SCHEMATHESIS_HOOKS``).

A long-poll lookup waits ``wait_s`` (30 s unless given, up to 60) when the answer has
no newer epoch: a generated case would hold the run that long. Every long-poll case is
sent with a short ``wait_s`` instead: a longer one is shortened, an absent one added;
a value the registry refuses (not a number, negative, infinite) is left as it is, and
everything else of the case is as generated.
"""

from __future__ import annotations

import math
from typing import Any

import schemathesis

LONGEST_WAIT_S = 0.3


def _short(value: Any) -> Any:
    if isinstance(value, list):  # the parameter given more than once
        return [_short(v) for v in value]
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return value
    return LONGEST_WAIT_S if math.isfinite(seconds) and seconds > LONGEST_WAIT_S else value


@schemathesis.hook
def before_call(
    context: schemathesis.HookContext, case: schemathesis.Case[Any], kwargs: Any
) -> None:
    if case.operation.path != "/v1/endpoints/{service}" or not isinstance(case.query, dict):
        return
    if case.query:
        case.query["wait_s"] = _short(case.query.get("wait_s", LONGEST_WAIT_S))
