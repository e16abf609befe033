"""The pair's virtual IP on this node: present while the node serves as active, gone
first whenever it stops.

The agent's loop says what it wants (:meth:`VipKeeper.update`); a worker task makes it
so with ``ip addr add|del`` and announces a new holder with gratuitous ARP (``arping
-U``), so that clients' ARP caches follow at once instead of after their entries age
out. Every command is bounded by a timeout. The fence path calls
:meth:`VipKeeper.drop_now`, which starts the removal without waiting for anything.

The watchdog is told of the address *before* it is added, so an agent that freezes
right after adding it still has it removed at the fence point.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable

from hapair.shared.log import EventLog
from hapair.shared.vip import Vip
from hapair.shared.waits import cancelled, wait_event
from hapair.workshop_agent.watchdog import WatchdogLink

COMMAND_TIMEOUT_S = 2.0
RETRY_S = 2.0
# `ip` answers these when the address is already there / already gone: both are success.
_EXISTS = "File exists"
_ABSENT = "Cannot assign requested address"


def ip_argv(verb: str, vip: Vip) -> list[str]:
    """``ip -4 addr add|del ADDRESS/PREFIX dev IF``."""
    return [shutil.which("ip") or "ip", "-4", "addr", verb, vip.address, "dev", vip.interface]


def arping_argv(vip: Vip) -> list[str] | None:
    """Gratuitous ARP for ``vip`` (iputils ``arping -U``), or None without arping."""
    arping = shutil.which("arping")
    if arping is None:
        return None
    count = str(vip.arp_count)
    return [arping, "-q", "-U", "-c", count, "-w", count, "-I", vip.interface, vip.ip]


async def run_bounded(argv: list[str], timeout: float = COMMAND_TIMEOUT_S) -> tuple[int, str]:
    """Run ``argv``; its exit code and stderr. A command past ``timeout`` is killed (-9)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as err:
        return 127, f"{argv[0]}: {err.strerror or err}"
    try:
        _, err_out = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return -9, f"no answer within {timeout:g} s"
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    return proc.returncode or 0, err_out.decode(errors="replace").strip()


class VipKeeper:
    """Keeps the pair's virtual address on this node exactly while it is wanted.

    ``update(spec, wanted)`` from every round of the agent's loop; ``drop_now()`` from
    the fence; ``await release()`` before a planned stop of the services."""

    def __init__(
        self,
        log: EventLog,
        watchdog: WatchdogLink,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.watchdog = watchdog
        self.clock = clock
        self.want: Vip | None = None
        self.have: Vip | None = None
        # Addresses that may be on the interface without being wanted: what a previous
        # run of the agent left, or a removal started by the fence and not yet confirmed.
        self.doubtful: set[Vip] = set()
        self._seen: set[Vip] = set()
        self._kick = asyncio.Event()
        self._settled = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._announce: asyncio.Task[None] | None = None
        self._dropping: list[subprocess.Popen[bytes]] = []
        self._said = ""

    @property
    def settled(self) -> bool:
        return self.have == self.want and not (self.doubtful - {self.want})

    def update(self, spec: Vip | None, wanted: bool) -> None:
        """The address the node should hold now: ``spec`` if ``wanted``, else none."""
        if spec is not None and spec not in self._seen:
            # First sight of this address in this run: a crashed run may have left it.
            self._seen.add(spec)
            self.doubtful.add(spec)
        want = spec if wanted else None
        if want == self.want and self.settled:
            return
        self.want = want
        self._wake()

    def drop_now(self) -> None:
        """Start removing the address at once and return (the fence never waits)."""
        self.want = None
        if self._announce is not None:
            self._announce.cancel()
        held, self.have = self.have, None
        if held is not None:
            self.doubtful.add(held)
            try:
                self._dropping.append(
                    subprocess.Popen(
                        ip_argv("del", held),
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            except OSError as err:
                self.log.error("cannot remove the virtual address", error=str(err))
            self.log.warning("virtual address dropped", vip=held.address, dev=held.interface)
        self._wake()

    async def release(self, timeout: float = COMMAND_TIMEOUT_S) -> bool:
        """Remove the address and wait (at most ``timeout``) until it is confirmed gone."""
        self.drop_now()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not self.settled:
                    self._settled.clear()
                    await self._settled.wait()
        return self.settled

    async def close(self) -> None:
        if self.have is not None or self.doubtful:
            await self.release()
        for err in await cancelled(self._worker, self._announce):
            self.log.exception("virtual address task failed", err)

    # -- the worker -------------------------------------------------------------------
    def _wake(self) -> None:
        self._settled.clear()
        self._kick.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work(), name="virtual-ip")

    async def _work(self) -> None:
        while True:
            self._kick.clear()
            try:
                done = await self._step()
            except Exception as err:  # a bug must not stop the address from following
                self.log.exception("virtual address step failed", err)
                done = False
            if self.settled:
                self._settled.set()
                await self._kick.wait()
            elif not done:
                await wait_event(self._kick, RETRY_S)

    async def _step(self) -> bool:
        """One command towards what is wanted; False when it failed (retry later)."""
        await self._reap()
        if self.have is not None and self.have != self.want:
            self.doubtful.add(self.have)
            self.have = None
        for vip in sorted(self.doubtful - {self.want}, key=lambda v: v.address):
            return await self._remove(vip)
        want = self.want
        if want is not None and self.have != want:
            return await self._add(want)
        return True

    async def _add(self, vip: Vip) -> bool:
        self.watchdog.add_vip(vip.address, vip.interface)
        started = self.clock()
        code, err = await run_bounded(ip_argv("add", vip))
        if code != 0 and _EXISTS not in err:
            self._problem(f"cannot add virtual address {vip.address} on {vip.interface}: {err}")
            return False
        self.doubtful.discard(vip)
        if self.want != vip:
            # Dropped while the command ran: the next step takes it away again.
            self.have = vip
            return True
        self.have = vip
        self._said = ""
        self.log.info(
            "virtual address added",
            vip=vip.address,
            dev=vip.interface,
            ms=round((self.clock() - started) * 1000),
        )
        if self._announce is not None:
            self._announce.cancel()
        self._announce = asyncio.create_task(self._garp(vip), name="gratuitous-arp")
        return True

    async def _remove(self, vip: Vip) -> bool:
        code, err = await run_bounded(ip_argv("del", vip))
        if code != 0 and _ABSENT not in err:
            self._problem(f"cannot remove virtual address {vip.address} on {vip.interface}: {err}")
            return False
        self.doubtful.discard(vip)
        self.watchdog.remove_vip(vip.address, vip.interface)
        if code == 0:
            self.log.info("virtual address removed", vip=vip.address, dev=vip.interface)
        return True

    async def _garp(self, vip: Vip) -> None:
        argv = arping_argv(vip)
        if argv is None:
            self.log.warning(
                "arping is not installed: clients learn the new holder of the virtual "
                "address only when their ARP entries expire (install iputils-arping)"
            )
            return
        code, err = await run_bounded(argv, timeout=vip.arp_count + COMMAND_TIMEOUT_S)
        if code != 0:
            self.log.warning("gratuitous ARP failed", vip=vip.ip, error=err or f"exit {code}")

    async def _reap(self) -> None:
        """Wait (bounded) for removals the fence started, so the next command follows them."""
        for proc in self._dropping:
            try:
                await asyncio.to_thread(proc.wait, COMMAND_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        self._dropping.clear()

    def _problem(self, message: str) -> None:
        if message != self._said:
            self.log.error(message)
            self._said = message
