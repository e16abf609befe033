"""Imported first by the agent's entry point: pydantic finds no plugin in the agent.

pydantic looks for plugins when it builds its first model, through
``importlib.metadata``: that loads email, zipfile and csv and reads the metadata of
every installed distribution, 2 MiB of an idle agent's memory, for plugins the agent
never runs. Its loader, put in place before any model is built, finds none. Only the
agent does this: an application using hapair's client library keeps its plugins.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterable

LOADER = "pydantic.plugin._loader"


def _no_plugins() -> Iterable[object]:
    return ()


def _loader() -> types.ModuleType:
    loader = types.ModuleType(LOADER, "pydantic's plugin loader, finding no plugin")
    loader.get_plugins = _no_plugins  # type: ignore[attr-defined]
    return loader


# Once pydantic has loaded its own loader (a process that built a model already), it stays.
sys.modules.setdefault(LOADER, _loader())
