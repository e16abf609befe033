"""What a hapair daemon asks of etcd, counted in its own process.

``python -m bench.etcd_rates OUT MODULE [ARGS...]`` runs ``python -m MODULE ARGS...``
(an agent, a registry) with every call of :class:`hapair.shared.store.Store` counted by
kind, and the counts written to ``OUT`` (JSON, replaced whole) twice a second: what one
daemon of that kind sends etcd, read from the daemon rather than guessed from its code.
Each kind is one etcd request (a page of a range read is one), ``watch`` a watch opened
and ``watch_event`` a change received on one.
"""

from __future__ import annotations

import functools
import json
import runpy
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from hapair.shared import store as store_module

# Store's calls that each send etcd one request, and what they are counted as.
UNARY = {
    "get": "get",
    "put": "put",
    "delete": "delete",
    "delete_range": "delete",
    "txn": "txn",
    "grant_lease": "grant",
    "keepalive": "keepalive",
    "revoke": "revoke",
}
KINDS = (*dict.fromkeys(UNARY.values()), "range", "watch", "watch_event")

counts: Counter[str] = Counter()


def _counted(kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        counts[kind] += 1
        return await fn(*args, **kwargs)

    return wrapper


def install() -> None:
    """Count every request :class:`Store` sends from now on, in :data:`counts`."""
    cls = store_module.Store
    for name, kind in UNARY.items():
        setattr(cls, name, _counted(kind, getattr(cls, name)))
    original_call = cls.call

    async def call(self: Any, fn: Any, limit: float | None = None) -> Any:
        # A range read goes through get_range in pages, each its own call.
        if getattr(fn, "__name__", "") == "<lambda>" and "range_page" in fn.__code__.co_names:
            counts["range"] += 1
        return await original_call(self, fn, limit)

    cls.call = call  # type: ignore[method-assign]
    original_watch = cls.watch_prefix

    async def watch_prefix(self: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        counts["watch"] += 1
        async for change in original_watch(self, *args, **kwargs):
            counts["watch_event"] += 1
            yield change

    cls.watch_prefix = watch_prefix  # type: ignore[method-assign]


def _dump(out: Path) -> None:
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(json.dumps({"at": time.monotonic(), **counts}))
    partial.replace(out)


def _dumping(out: Path) -> None:
    while True:
        _dump(out)
        time.sleep(0.5)


def read(path: Path) -> dict[str, float]:
    """The counts a counted daemon last wrote (every kind, 0 when never sent)."""
    data = json.loads(path.read_text())
    return {"at": float(data["at"]), **{k: float(data.get(k, 0)) for k in KINDS}}


def rates(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Requests per second of each kind between two :func:`read` of one daemon."""
    span = after["at"] - before["at"]
    return {k: (after[k] - before[k]) / span for k in KINDS}


def wrap(out: Path, module: str) -> list[str]:
    """The Python arguments that run ``-m module`` counted into ``out``."""
    return ["-m", "bench.etcd_rates", str(out), module]


def main(argv: list[str]) -> None:
    out, module, *rest = argv
    install()
    threading.Thread(target=_dumping, args=(Path(out),), daemon=True).start()
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
