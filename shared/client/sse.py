"""An incremental parser of server-sent events (the ``text/event-stream`` format)."""

from __future__ import annotations

from dataclasses import dataclass

MAX_LINE = 1 << 20
"""A longer line is not an event stream any registry sends."""


class SseError(ValueError):
    """The stream is not a valid event stream."""


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str
    data: str
    id: str | None = None


class SseParser:
    """Feed it bytes as they come; it returns the events they complete.

    Lines end with LF or CRLF; ``:`` starts a comment (heartbeats); several ``data``
    lines join with LF; a blank line ends an event. ``retry`` and unknown fields are
    ignored, as the format says.
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._buffer = b""
        self._max_line = max_line
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self.last_id: str | None = None

    def feed(self, chunk: bytes) -> list[SseEvent]:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > self._max_line:
            raise SseError(f"event stream line longer than {self._max_line} bytes")
        events: list[SseEvent] = []
        for raw in lines:
            try:
                line = raw.removesuffix(b"\r").decode()
            except UnicodeDecodeError:
                raise SseError("event stream is not UTF-8") from None
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> SseEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        return None

    def _dispatch(self) -> SseEvent | None:
        if self._id is not None:
            self.last_id = self._id
        event = None
        if self._data:
            event = SseEvent(self._event or "message", "\n".join(self._data), self._id)
        self._event, self._data, self._id = "", [], None
        return event
