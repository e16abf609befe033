"""asyncua, as the rest of the comm server sees it.

asyncua ships type hints, but under ``mypy --strict`` most of its public names count
as not re-exported (``ua.StatusCodes``, ``asyncua.Client``) and its numeric types are
NewTypes a plain ``int`` does not satisfy. Going through this module keeps those
quirks in one place instead of a ``type: ignore`` on every line that touches OPC UA.
"""

from __future__ import annotations

from typing import Any

import asyncua.ua as _ua
from asyncua.client.client import Client as _Client
from asyncua.server.server import Server as _Server
from asyncua.ua.ua_binary import struct_from_binary as _struct_from_binary

ua: Any = _ua
Client: Any = _Client
Server: Any = _Server
struct_from_binary: Any = _struct_from_binary


class _StatusCodes:
    """``S.BadTimeout`` -> the code as an ``int``, looked up once."""

    def __getattr__(self, name: str) -> int:
        code = int(getattr(ua.StatusCodes, name))
        setattr(self, name, code)
        return code


S = _StatusCodes()
