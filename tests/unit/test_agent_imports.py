"""What the agent loads at start: no pydantic plugin machinery (``no_plugins.py``), no
package metadata unless ``--version`` asks for it."""

from __future__ import annotations

import subprocess
import sys

from hapair.shared import entry

CHECK = """
import sys
import hapair.workshop_agent.main
from hapair.shared.records import Leader

hapair.workshop_agent.main.parse_args(["--node", "a"])

assert Leader.model_validate({"node": "a"}).node == "a"
from pydantic.plugin._loader import get_plugins

assert tuple(get_plugins()) == ()
print(sorted(m for m in ("importlib.metadata", "email", "zipfile", "csv") if m in sys.modules))
"""


def test_the_agent_loads_no_pydantic_plugin_nor_the_package_metadata() -> None:
    """A fresh process, as the agent starts: its models build and validate, its command
    line is read, and what only pydantic's search for plugins and the version loaded
    stays out."""
    out = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_the_version_is_looked_up_when_asked() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hapair.workshop_agent.main", "--node", "a", "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == f"hapair-agent {entry.version()}\n"
