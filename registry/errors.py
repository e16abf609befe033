"""Domain errors to HTTP, in one place: every error answer is ``{"error": message}``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from hapair.shared.admin import AdminError
from hapair.shared.log import EventLog
from hapair.shared.store import StoreError
from hapair.shared.topology import format_errors

log = EventLog("hapair.registry")

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(Exception):
    """The request itself is wrong: a parameter or a body field, named in the message."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class Unauthorized(Exception):
    pass


def validate(model: type[M], data: object, where: str) -> M:
    """``model`` from request data; a failure names each field (``to: ...``)."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = format_errors(err)
        raise BadRequest(f"invalid {where}: " + "; ".join(problems), problems) from None


def error(status: int, message: str, **extra: object) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


@web.middleware
async def domain_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BadRequest as err:
        return error(400, str(err), problems=err.problems)
    except Unauthorized as err:
        return error(401, str(err))
    except AdminError as err:
        return error(409, str(err))
    except StoreError as err:
        log.warning("etcd request failed", path=request.path, error=str(err))
        return error(503, f"etcd unavailable: {err}")
