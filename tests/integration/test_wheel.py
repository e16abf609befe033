"""The wheel, installed as a plant installs it: into a fresh virtual environment, not
editable. With the server extra every command starts; without it the client library
works and the daemons say which extra they need."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.harness import ROOT

COMMANDS = ("hapair", "hapair-agent", "hapair-registry", "hapair-comm", "hapair-proxy")
pytestmark = pytest.mark.long  # a wheel built and installed twice
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def run(*argv: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Away from the checkout, so that only the installed copy can be imported."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd="/",
        env=env,
    )


def ok(*argv: str | Path) -> str:
    done = run(*argv)
    assert done.returncode == 0, f"{argv}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def runs(*argvs: Iterable[str | Path]) -> list[subprocess.CompletedProcess[str]]:
    """Each command line, run side by side (each is a Python start that mostly waits
    for the disk and a CPU), in the order given."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda argv: run(*argv), argvs))


def each_ok(*argvs: Iterable[str | Path]) -> list[str]:
    """The output of each command line, run side by side; each must succeed."""
    done = runs(*argvs)
    for argv, d in zip(argvs, done, strict=True):
        assert d.returncode == 0, f"{argv}: {d.returncode}\n{d.stdout}\n{d.stderr}"
    return [d.stdout for d in done]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy of the tree: the build leaves nothing in the checkout."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for name in ("hapair", "shared", "registry", "workshop_agent", "comm_server"):
        shutil.copytree(
            ROOT / name,
            src / name,
            symlinks=True,
            ignore=shutil.ignore_patterns("__pycache__"),
        )
    out = src / "dist"
    ok(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out, src)
    (built,) = out.glob("hapair-*.whl")
    return built


def venv(where: Path, requirement: str) -> Path:
    """A fresh environment holding ``requirement``; its bin directory. pip is this
    test's (the environment gets none), and skips compiling: only what runs matters."""
    ok(sys.executable, "-m", "venv", "--without-pip", where)
    python = where / "bin" / "python"
    ok(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-compile",
       "--progress-bar", "off", requirement)  # fmt: skip
    return where / "bin"


def test_with_the_server_extra_every_command_starts(wheel: Path, tmp_path: Path) -> None:
    bin_dir = venv(tmp_path / "server", f"hapair[server] @ {wheel.as_uri()}")
    *outputs, where = each_ok(
        *((bin_dir / command, opt) for command in COMMANDS for opt in ("--version", "--help")),
        [bin_dir / "python", "-c", "import hapair.shared; print(hapair.shared.__file__)"],
    )
    for command, version, usage in zip(COMMANDS, outputs[::2], outputs[1::2], strict=True):
        assert version == f"{command} {VERSION}\n"
        assert f"usage: {command}" in usage
    # The installed copy answers, not the checkout.
    assert str(tmp_path / "server") in where


def test_the_client_library_alone(wheel: Path, tmp_path: Path) -> None:
    bin_dir = venv(tmp_path / "client", str(wheel))
    daemons = ("hapair", "hapair-agent", "hapair-registry", "hapair-comm")
    _, usage, *versions = each_ok(
        [bin_dir / "python", "-c", "from hapair.shared.client import Resolver, TcpAdapter"],
        [bin_dir / "hapair-proxy", "--help"],
        *((bin_dir / command, "--version") for command in daemons),
    )
    assert "usage: hapair-proxy" in usage
    for command, version in zip(daemons, versions, strict=True):
        assert version == f"{command} {VERSION}\n"
    no_psycopg, *refusals = runs(
        [bin_dir / "python", "-c", "import psycopg"],
        *((bin_dir / command, "--help") for command in daemons),
    )
    assert no_psycopg.returncode != 0, "psycopg came with the client library"
    for command, refused in zip(daemons, refusals, strict=True):
        assert refused.returncode == 1
        assert f"{command}: this installation lacks" in refused.stderr
        assert "pip install 'hapair[server]'" in refused.stderr
