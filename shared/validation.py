"""Validation helpers shared by the site file models: placeholders and error paths."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

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


@functools.cache
def _loader() -> Any:
    """libyaml's parser when PyYAML has it (10,000 PLC tags load in ~0.7 s instead of
    ~2.5 s), without the date type: a hapair file has no dates, only strings. Made on
    first use: an agent reads its site from etcd as JSON, and never loads PyYAML."""
    import yaml

    class YamlLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
        pass

    YamlLoader.yaml_implicit_resolvers = {
        first: [(t, regexp) for t, regexp in resolvers if t != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    return YamlLoader


ErrorFor = Callable[[str, list[str]], Exception]
"""Builds the caller's error from a source (file, key) and its problems."""


def parse_yaml(text: str, source: str, error: ErrorFor) -> object:
    """The document in ``text``; ``error(source, problems)`` is raised for bad YAML."""
    import yaml

    try:
        return yaml.load(text, Loader=_loader())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise error(source, [f"{where}YAML syntax error: {problem}"]) from None


def read_file(path: str | Path, error: ErrorFor) -> str:
    """A UTF-8 text file; ``error(path, problems)`` when it cannot be read."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except OSError as err:
        raise error(str(p), [f"cannot read file: {err.strerror}"]) from None
    except UnicodeDecodeError as err:
        raise error(str(p), [f"cannot read file: not UTF-8 text (byte {err.start})"]) from None
