"""What every test run has: property tests without a time limit, and skips reported loudly
(the fixtures with etcd and agents are in integration/conftest.py)."""

from __future__ import annotations

import asyncio
import faulthandler
import os
import shutil
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import settings

# A time limit per example measures the machine's load, not the code: property tests
# bound their work by the number of examples only.
settings.register_profile("hapair", deadline=None)
settings.load_profile("hapair")


# A skipped test proves nothing. Outside CI a skip is reported loudly at the end; under
# CI=true it fails the run, unless the test is marked ``may_skip`` (a skip that weakens
# no safety claim, e.g. a machine without an IPv6 loopback).
_IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_SKIPPED = "hapair_skipped"  # a report's property: it travels from xdist's workers


# Every PostgreSQL cluster the run makes (in a test process or by an agent it starts) is
# a copy of the run's first initdb (HAPAIR_TEST_INITDB_TEMPLATES, workshop_agent/pg/ctl.py):
# made by this process, inherited by xdist's workers, removed at the end.
_TEMPLATES = "HAPAIR_TEST_INITDB_TEMPLATES"
_own_dirs: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "may_skip: a skip of this test weakens no safety claim (allowed under CI)"
    )
    config.addinivalue_line("markers", f"long: {LONG_HELP}")
    if _TEMPLATES not in os.environ:
        _own_dirs.append(tempfile.mkdtemp(prefix="hapair-initdb-"))
        os.environ[_TEMPLATES] = _own_dirs[-1]
    if _HUNG not in os.environ:  # where a worker ended by the last resort leaves its stacks
        _own_dirs.append(tempfile.mkdtemp(prefix="hapair-hung-"))
        os.environ[_HUNG] = _own_dirs[-1]


# A run on two workers ends when the later one does: a test of a minute started last
# keeps the other worker idle for that minute. The tests marked ``long`` (15 s or more
# on a loaded machine) run first, the rest keep their order; xdist's work stealing then
# evens out the short ones at the end.
LONG_HELP = "a test of 15 s or more: run before the others, so that no run ends on one"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


# A test that hangs (pyproject's ``timeout``) fails with the stack of every asyncio task
# it left waiting, so the report names the await that never ended; the event loop's own
# frame (all a plain stack dump shows) says nothing. A teardown that hangs as well, or a
# worker stuck where no signal handler runs, is ended a minute later from a thread of its
# own with every thread's stack; xdist reports it and goes on with the others.
LAST_RESORT_S = float(os.environ.get("HAPAIR_TEST_LAST_RESORT_S", "60"))
_HUNG = "HAPAIR_TEST_HUNG"


def _awaiting(coro: Any) -> list[str]:
    """Where a suspended coroutine waits, down its chain of awaits (a task's own stack
    stops at its outermost frame)."""
    lines: list[str] = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is not None:
            lines += traceback.format_stack(frame, limit=1)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    return lines


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    if settings.method != "signal" or threading.current_thread() is not threading.main_thread():
        return None

    def timed_out(signum: int, frame: Any) -> None:
        __tracebackhide__ = True
        try:
            tasks = asyncio.all_tasks(asyncio.get_running_loop())
        except RuntimeError:
            tasks = set()
        print(f"+++ timeout: {len(tasks)} asyncio task(s) pending", file=sys.stderr)
        for task in tasks:
            print(f"+++ {task!r}", file=sys.stderr)
            print("".join(_awaiting(task.get_coro())), file=sys.stderr)
        for thread in threading.enumerate():
            stack = sys._current_frames().get(thread.ident or 0)
            if thread not in (threading.main_thread(), last_resort) and stack is not None:
                print(f"+++ thread {thread.name}", file=sys.stderr)
                traceback.print_stack(stack, file=sys.stderr)
        pytest.fail(f"Timeout >{settings.timeout}s")

    def cancel() -> None:
        # Called as the failure is reported too, before the teardown: the last resort
        # stays armed until the end of the test (below).
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel  # type: ignore[attr-defined]
    signal.signal(signal.SIGALRM, timed_out)
    signal.setitimer(signal.ITIMER_REAL, settings.timeout)
    last_resort = threading.Timer(settings.timeout + LAST_RESORT_S, _end_worker, (item.nodeid,))
    last_resort.daemon = True
    last_resort.start()
    item.stash[_LAST_RESORT] = last_resort
    return True


def _end_worker(nodeid: str) -> None:
    # A worker's own output is not shown: the run's end prints this file.
    path = os.path.join(os.environ[_HUNG], f"{os.getpid()}.txt")
    with open(path, "w") as out:
        out.write(f"{nodeid} and its teardown hung; every thread of its worker:\n")
        out.flush()
        faulthandler.dump_traceback(file=out, all_threads=True)
    os._exit(3)


_LAST_RESORT = pytest.StashKey[threading.Timer]()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    yield
    if (last_resort := item.stash.get(_LAST_RESORT, None)) is not None:
        last_resort.cancel()


def pytest_unconfigure(config: pytest.Config) -> None:
    for directory in _own_dirs:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else "skipped"
    report.user_properties.append((_SKIPPED, reason))
    if _IN_CI and item.get_closest_marker("may_skip") is None:
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which proves nothing: {reason}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    hung = os.environ.get(_HUNG, "")
    for name in sorted(os.listdir(hung)) if os.path.isdir(hung) else []:
        terminalreporter.section("A WORKER ENDED BY THE LAST RESORT", sep="!", red=True)
        with open(os.path.join(hung, name)) as dump:
            terminalreporter.write(dump.read())
    skipped = [
        (report.nodeid, value)
        for reports in terminalreporter.stats.values()
        for report in reports
        for name, value in getattr(report, "user_properties", ())
        if name == _SKIPPED
    ]
    if not skipped:
        return
    terminalreporter.section("SKIPPED TESTS: these claims were not checked", sep="!", red=True)
    for nodeid, reason in skipped:
        terminalreporter.write_line(f"{nodeid}: {reason}", red=True)
