"""Confirmation of a disruptive command: the operator types the pair's name."""

from __future__ import annotations

import asyncio
import sys

from hapair.registry.console.command import REFUSED, USAGE, Failed


async def typed_name(name: str, question: str) -> bool | None:
    """Ask ``question`` and read a line; whether it was ``name``. None without a
    terminal to ask on (the caller says how to go on without one)."""
    if not sys.stdin.isatty():
        return None
    answer = await asyncio.to_thread(input, f"{question}; type {name} to go on: ")
    return answer.strip() == name


async def confirmed(name: str, question: str, to: str, cancelled: str) -> None:
    """Ask as :func:`typed_name` does; :class:`Failed` unless ``name`` was typed: without
    a terminal, saying that ``--yes`` does it (``to``: what it does), else ``cancelled``."""
    answer = await typed_name(name, question)
    if answer is None:
        raise Failed(USAGE, f"no terminal to confirm on: add --yes to {to}")
    if not answer:
        raise Failed(REFUSED, f"{cancelled}: nothing was changed")
