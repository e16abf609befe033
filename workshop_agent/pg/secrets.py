"""Passwords, read from files on the node before anything starts (never from etcd)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hapair.shared.pki import PkiError, check_private
from hapair.workshop_agent.pg.config import DatabaseConfig
from hapair.workshop_agent.pg.errors import SecretError

MAX_BYTES = 1024


class Secret:
    """A password that never shows in a repr, a log line or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Secrets:
    superuser: Secret
    replication: Secret
    owners: dict[str, Secret] = field(default_factory=dict)  # database owner role -> password


def read_password(path: str, field_name: str) -> Secret:
    """One password: the file's text without its final line break, from a file only its
    owner, this agent's user, can read."""
    try:
        raw = Path(path).read_bytes()[: MAX_BYTES + 1]
    except FileNotFoundError:
        raise SecretError(field_name, path, "no such file") from None
    except IsADirectoryError:
        raise SecretError(field_name, path, "is a directory, not a file") from None
    except OSError as err:
        raise SecretError(field_name, path, f"cannot read it: {err.strerror}") from None
    try:
        # As libpq for .pgpass: a password others can read may be theirs already.
        check_private(Path(path))
    except PkiError as err:
        raise SecretError(field_name, path, str(err).removeprefix(f"{path}: ")) from None
    if len(raw) > MAX_BYTES:
        raise SecretError(field_name, path, f"longer than {MAX_BYTES} bytes: not a password")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(field_name, path, "not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise SecretError(field_name, path, "is empty")
    if any(c in text for c in "\n\r\0"):
        raise SecretError(field_name, path, "holds more than one line")
    return Secret(text)


def load_secrets(config: DatabaseConfig) -> Secrets:
    """Every password the node needs; the first unusable file is named in the error."""
    auth = config.auth
    owners = {
        db.owner: read_password(db.password_file, f"database.databases[{i}].password_file")
        for i, db in enumerate(config.databases)
    }
    return Secrets(
        superuser=read_password(
            auth.superuser_password_file, "database.auth.superuser_password_file"
        ),
        replication=read_password(
            auth.replication_password_file, "database.auth.replication_password_file"
        ),
        owners=owners,
    )
