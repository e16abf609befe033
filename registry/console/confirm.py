"""Confirmation of a disruptive command: the operator types the pair's name."""

from __future__ import annotations

import asyncio
import sys


async def typed_name(name: str, question: str) -> bool | None:
    """Ask ``question`` and read a line; whether it was ``name``. None without a
    terminal to ask on (the caller says how to go on without one)."""
    if not sys.stdin.isatty():
        return None
    answer = await asyncio.to_thread(input, f"{question}; type {name} to go on: ")
    return answer.strip() == name
