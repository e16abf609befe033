"""The one error type of the PostgreSQL control layer."""

from __future__ import annotations

TAIL_LINES = 12
TAIL_CHARS = 2000


def tail(text: str, lines: int = TAIL_LINES, chars: int = TAIL_CHARS) -> str:
    """The last lines of a command's output, trimmed: enough to say why it failed."""
    kept = "\n".join(text.strip().splitlines()[-lines:])
    return kept[-chars:]


class PgError(Exception):
    """A step of the PostgreSQL control layer failed.

    ``step`` names what was being done (``pg_rewind``, ``promote``, ``read secrets``),
    ``detail`` says what went wrong, ``stderr`` keeps the tail of the command's output.
    """

    def __init__(self, step: str, detail: str, stderr: str = "") -> None:
        self.step = step
        self.detail = detail
        self.stderr = tail(stderr)
        text = f"{step}: {detail}"
        if self.stderr:
            text += "\n  " + self.stderr.replace("\n", "\n  ")
        super().__init__(text)


class SecretError(PgError):
    """A password file is missing, unreadable or unusable; names the file and the field."""

    def __init__(self, field: str, path: str, problem: str) -> None:
        self.field = field
        self.path = path
        super().__init__("read secrets", f"password file {path} ({field}): {problem}")


class TlsError(PgError):
    """A TLS file of the server is missing, unreadable or unusable; names the file, the
    field that locates it, and the fix."""

    def __init__(self, field: str, path: object, problem: str) -> None:
        self.field = field
        self.path = str(path)
        super().__init__("read TLS files", f"{self.path} ({field}): {problem}")
