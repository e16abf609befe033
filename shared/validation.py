"""Validation helpers shared by the site file models: placeholders and error paths."""

from __future__ import annotations

import re
from collections.abc import Mapping

from pydantic import ValidationError

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")


class TopologyError(ValueError):
    """A site file or stored topology is invalid; ``problems`` lists ``path: message``."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid topology\n" + "\n".join(f"  {p}" for p in problems))


def placeholders_in(text: str) -> set[str]:
    return set(_PLACEHOLDER.findall(text))


def expand(text: str, values: Mapping[str, str]) -> str:
    """Replace ``{node.name}``-style placeholders; unknown names were refused at validation."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def format_errors(err: ValidationError) -> list[str]:
    """``workshops[0].pairs[0].nodes[1].address: value is not ...`` for each error."""
    problems = []
    for e in err.errors():
        path = ""
        for part in e["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        message = e["msg"].removeprefix("Value error, ")
        problems.append(f"{path or '(top level)'}: {message}")
    return problems
