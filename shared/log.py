"""Structured logs: one event per line, ``key=value`` pairs (logfmt).

Every line carries the component and, where known, the pair, node and epoch, so a
plant's log collector can follow a failover across servers with one grep.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' ="\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        fields: dict[str, Any] = getattr(record, "fields", {})
        parts = [
            f"ts={stamp}.{int(record.msecs):03d}",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
        ]
        if fields:
            parts.append(f"event={_quote(record.getMessage())}")
            parts.extend(f"{k}={_quote(v)}" for k, v in fields.items() if v is not None)
        else:
            parts.append(f"msg={_quote(record.getMessage())}")
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("grpc", "asyncio", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class EventLog:
    """A logger with bound context; ``epoch`` may change as terms come and go."""

    def __init__(self, name: str, **context: Any) -> None:
        self._log = logging.getLogger(name)
        self.context: dict[str, Any] = context

    def bind(self, **context: Any) -> None:
        self.context.update(context)

    def _emit(
        self, level: int, event: str, fields: dict[str, Any], err: BaseException | None = None
    ) -> None:
        if self._log.isEnabledFor(level):
            exc_info = None if err is None else (type(err), err, err.__traceback__)
            self._log.log(
                level, event, exc_info=exc_info, extra={"fields": {**self.context, **fields}}
            )

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit(logging.ERROR, event, fields)

    def exception(self, event: str, err: BaseException, **fields: Any) -> None:
        """An error nobody expected (a bug): its traceback goes with it, on the same line."""
        self._emit(logging.ERROR, event, {**fields, "error": repr(err)}, err)
