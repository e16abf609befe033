"""What the agent loads at start: no pydantic plugin machinery (``no_plugins.py``)."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import hapair.workshop_agent.main
from hapair.shared.records import Leader

assert Leader.model_validate({"node": "a"}).node == "a"
from pydantic.plugin._loader import get_plugins

assert tuple(get_plugins()) == ()
print(sorted(m for m in ("importlib.metadata", "email", "zipfile", "csv") if m in sys.modules))
"""


def test_the_agent_loads_no_pydantic_plugin_nor_the_package_metadata() -> None:
    """A fresh process, as the agent starts: its models build and validate, and what
    only pydantic's search for plugins loaded stays out."""
    out = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
