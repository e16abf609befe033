"""Domain errors to HTTP, in one place: every error answer is ``{"error": message}``,
aiohttp's own (404, 405, 413) too."""

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
    """No credential, or one that does not hold (401)."""


class Forbidden(Exception):
    """The admin routes are closed, or the credential is not an operator's (403)."""


class UnsupportedMediaType(Exception):
    """An admin request that is not ``application/json`` (415)."""


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
    except Forbidden as err:
        return error(403, str(err))
    except UnsupportedMediaType as err:
        return error(415, str(err))
    except AdminError as err:
        return error(409, str(err))
    except StoreError as err:
        log.warning("etcd request failed", path=request.path, error=str(err))
        return error(503, f"etcd unavailable: {err}")
    except web.HTTPException as err:
        if err.status < 400:
            raise
        # aiohttp's own refusals (no such path, another method, a body too large): in
        # JSON like every other answer, keeping what they say (Allow on a 405).
        refused = error(err.status, f"{err.reason.lower()}: {request.method} {request.path}")
        if "Allow" in err.headers:
            refused.headers["Allow"] = err.headers["Allow"]
        return refused
