"""The comm server's PLC list: the ``plcs:`` section, validated at the boundary.

The list comes from the pair's topology or from a file given with ``--config``, which
holds ``plcs:`` (and ``opcua:``, as a pair does); both use the models of
:mod:`hapair.shared.plcs`. Every
mistake is reported with its field path (``plcs[0].tags[3].address: ...``), the way
the site file is, and an invalid file starts nothing.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError, model_validator

from hapair.shared.model import StrictModel
from hapair.shared.plcs import Plc, duplicate_names, plain_path
from hapair.shared.topology import OpcUaSecurity
from hapair.shared.validation import format_errors, parse_yaml, read_file


class ConfigError(ValueError):
    """The PLC list is invalid; ``problems`` lists ``path: message``."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(
            f"{source}: invalid PLC configuration\n" + "\n".join(f"  {p}" for p in problems)
        )


class CommConfig(StrictModel):
    """The PLC list the comm server runs with, from a file or from its pair's topology."""

    plcs: list[Plc] = Field(min_length=1)
    opcua: OpcUaSecurity = Field(default_factory=OpcUaSecurity)

    @model_validator(mode="after")
    def _unique(self) -> CommConfig:
        dupes = duplicate_names(self.plcs)
        if dupes:
            raise ValueError("; ".join(dupes))
        return self


def parse_config(data: object, source: str) -> CommConfig:
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): expected a mapping with plcs"])
    try:
        return CommConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(source, [plain_path(p) for p in format_errors(err)]) from None


def loads(text: str, source: str = "<text>") -> CommConfig:
    return parse_config(parse_yaml(text, source, ConfigError), source)


def load(path: str | Path) -> CommConfig:
    return loads(read_file(path, ConfigError), str(path))
