"""The console scripts' entry points: the server extra they check for is the one
pyproject.toml declares, and the client library loads none of it."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest

from hapair.shared import entry
from tests.support.harness import ROOT

IMPORT_NAME = {
    "prometheus-client": "prometheus_client",
    "pydantic-settings": "pydantic_settings",
    "PyYAML": "yaml",
}
"""Distributions whose import name differs from their name."""


def _extra(name: str) -> dict[str, str]:
    """{distribution: requirement} of an extra in pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["optional-dependencies"][name]
    return {re.match(r"[A-Za-z0-9_.-]+", r).group(0): r for r in requirements}  # type: ignore[union-attr]


def test_the_modules_checked_are_the_server_extra() -> None:
    declared = {
        IMPORT_NAME.get(name, name)
        for name, requirement in _extra("server").items()
        # uvloop is used when present, never required (the loop falls back to asyncio's).
        if name != "uvloop"
    }
    assert declared == set(entry.SERVER_MODULES)


def test_the_client_library_loads_nothing_of_the_server_extra() -> None:
    code = (
        "import sys, hapair.shared.client, hapair.shared.client.proxy;"
        f"print([m for m in {entry.SERVER_MODULES!r} if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


def test_a_missing_part_is_named_with_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["hapair-agent", "--node", "a"])
    monkeypatch.setattr(entry, "SERVER_MODULES", ("yaml", "no_such_module_here"))
    with pytest.raises(SystemExit) as exited:
        entry.agent()
    message = str(exited.value.code)
    assert "no_such_module_here" in message
    assert "yaml" not in message.split("lacks", 1)[1]
    assert "pip install 'hapair[server]'" in message


def test_version_answers_without_loading_the_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["hapair-comm", "--version"])
    monkeypatch.setattr(entry, "SERVER_MODULES", ("no_such_module_here",))
    entry.comm()
    assert capsys.readouterr().out == f"hapair-comm {entry.version()}\n"
