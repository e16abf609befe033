"""The client library's errors: one base class, each with a message that says why."""

from __future__ import annotations

from hapair.shared.client.models import Endpoint


class ClientError(Exception):
    """Base of every error the client library raises."""


class UnknownService(ClientError):
    """The registry does not know the service (404): a name to fix, not to wait for."""

    def __init__(self, service: str, reason: str) -> None:
        super().__init__(f"{service}: {reason}")
        self.service = service
        self.reason = reason


class ServiceUnavailable(ClientError):
    """The service is known but has no valid endpoint now (503: failing over, paused,
    or not yet published). ``last`` is the last endpoint seen, if any."""

    def __init__(self, service: str, reason: str, last: Endpoint | None = None) -> None:
        super().__init__(f"{service}: {reason}")
        self.service = service
        self.reason = reason
        self.last = last


class RegistryUnavailable(ClientError):
    """No registry gave a usable answer, and no endpoint of the service is known."""

    def __init__(self, service: str, problems: list[str]) -> None:
        super().__init__(f"{service}: no registry answered: " + "; ".join(problems))
        self.service = service
        self.problems = problems


class EndpointChanged(ClientError):
    """A newer endpoint was published while this connection used the old one."""

    def __init__(self, old: Endpoint | None, new: Endpoint) -> None:
        was = f" (was {old.describe()})" if old is not None else ""
        super().__init__(f"{new.service} moved to {new.describe()}{was}")
        self.old = old
        self.new = new


class OutcomeUnknown(ClientError):
    """An operation was sent and the connection was lost before its answer: it may or
    may not have been applied, so it is not sent again (check before trying again)."""

    def __init__(self, service: str, what: str, endpoint: Endpoint, err: BaseException) -> None:
        super().__init__(
            f"{service}: {what} to {endpoint.describe()}: connection lost before the answer "
            f"({describe_error(err)}); it may or may not have been applied and was not "
            "sent again"
        )
        self.service = service
        self.endpoint = endpoint
        self.error = err


class DeadlineExceeded(ClientError):
    """The service could not be reached within the caller's deadline."""

    def __init__(
        self,
        service: str,
        deadline_s: float,
        endpoint: Endpoint | None,
        error: BaseException | str | None,
        reason: str = "",
    ) -> None:
        if endpoint is None:
            detail = "no endpoint known" + (f" ({reason})" if reason else "")
        else:
            detail = f"last tried {endpoint.describe()}"
            if error is not None:
                detail += f": {describe_error(error)}"
            if reason:
                detail += f"; registry: {reason}"
        super().__init__(f"{service}: not reached within {deadline_s:g} s: {detail}")
        self.service = service
        self.deadline_s = deadline_s
        self.endpoint = endpoint
        self.error = error


def describe_error(err: BaseException | str) -> str:
    """``ConnectionRefusedError: [Errno 111] ...``; a bare name for a message-less one."""
    if isinstance(err, str):
        return err
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
