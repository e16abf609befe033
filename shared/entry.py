"""The console scripts' entry points, and the version every command reports.

``pip install hapair`` brings the client library alone (aiohttp and pydantic); the
daemons and the operator CLI need the ``server`` extra. A command whose parts are not
installed says which extra to add instead of failing on an import, and ``--version``
answers either way.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

SERVER_MODULES = (
    "aetcd",
    "asyncua",
    "cryptography",
    "prometheus_client",
    "psycopg",
    "pymodbus",
    "pydantic_settings",
    "rich",
    "yaml",
)
"""What the ``server`` extra installs, by import name (a unit test holds it to
pyproject.toml)."""


def version() -> str:
    from importlib import metadata  # not at import: it loads a dozen modules

    try:
        return metadata.version("hapair")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


class _Version(argparse.Action):
    """``--version``, the version looked up only when asked: ``importlib.metadata``
    weighs 2 MiB in a daemon that never answers it."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, argparse.SUPPRESS, nargs=0, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        print(f"{parser.prog} {version()}")
        parser.exit()


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action=_Version, help="print it and exit")


def missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _run(command: str, module: str, server: bool = True) -> None:
    if sys.argv[1:] == ["--version"]:
        print(f"{command} {version()}")
        return
    absent = missing(SERVER_MODULES) if server else []
    if absent:
        sys.exit(
            f"{command}: this installation lacks {', '.join(absent)}: "
            "install the server parts with: pip install 'hapair[server]'"
        )
    main = importlib.import_module(module).main
    sys.exit(main())


def hapair() -> None:
    _run("hapair", "hapair.registry.console.cli")


def agent() -> None:
    _run("hapair-agent", "hapair.workshop_agent.main")


def registry() -> None:
    _run("hapair-registry", "hapair.registry.main")


def comm() -> None:
    _run("hapair-comm", "hapair.comm_server.main")


def proxy() -> None:
    _run("hapair-proxy", "hapair.shared.client.proxy", server=False)
