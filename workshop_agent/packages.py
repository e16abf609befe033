"""The pair's software on this node: every service's ``package:`` fetched, checked,
unpacked and installed in the background, on standbys as on the active.

A version lives in ``{state_dir}/packages/{service}/{version}-{sha256[:12]}/``. It gets
there in steps, each of which leaves nothing half installed behind:

1. downloaded into ``packages/.downloads/`` (``package_fetch.py``: bounded, resumed,
   tried again, one download per origin at a time), from a peer of the pair that holds
   it first when the pair says ``packages: {from_peers: true}`` (``package_peers.py``),
   else (or when that fails) from the origin the site file names;
2. its sha256 checked against the site file before anything is unpacked (a peer's file
   too: a peer is never trusted for content);
3. unpacked into a temporary directory beside its final place, every member judged
   first (``package_archive.py``);
4. moved into place by one rename; then its ``install:``, if any, runs there as the
   service's user with its timeout (a virtual environment must be made where it will
   be used);
5. given to the agent's user, read-only for the service's group, and marked installed;
   when the pair fetches from peers, the verified archive is kept in
   ``packages/.shared/{service}/`` (0700) for them.

Only a marked directory is ever used (:meth:`Packages.ready_dir`): a failure at any step
removes what that step made, keeps the versions installed before, and is published in
the node's status and as an event with its reason. It is tried again later, with a
growing back-off, or at once when the site file names another URL for it. The last two
installed versions of each service are kept, and every version a process may run from
(:meth:`Packages.busy`); a service gone from the site file loses its versions once its
process is stopped.

A node that does not hold a version the site names is *drifted* (``shared/drift.py``):
the alarm ``package drift`` is in its status while it lasts, and an event marks its
start and its end.

Hashing and unpacking run in threads, downloads as asyncio I/O: the agent's loop and its
keepalives never wait for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hapair.shared import drift
from hapair.shared.log import EventLog
from hapair.shared.package import PLACEHOLDER, Package, file_name
from hapair.shared.records import PackageStatus, ServiceStatus
from hapair.shared.topology import Node, Pair, Service, expand, placeholder_values
from hapair.shared.waits import wait_event
from hapair.workshop_agent import package_archive as archive
from hapair.workshop_agent.package_archive import MARKER, Aborted, ArchiveError, Held
from hapair.workshop_agent.package_fetch import Fetcher, FetchError, Limits
from hapair.workshop_agent.package_install import PackageError, run_install
from hapair.workshop_agent.package_peers import PeerPackages
from hapair.workshop_agent.run_as import (
    RunAs,
    ServiceRefused,
    ServiceUsers,
    service_env,
)

T = TypeVar("T")
# A test hook, off by default: the first wait between two tries of a download, for the
# tests whose subject is what follows a failed download, not the back-off before it.
LIMITS = Limits(backoff_s=float(os.environ.get("HAPAIR_TEST_FETCH_BACKOFF_S", Limits.backoff_s)))
RECONCILE_S = 1.0
RETRY_S, RETRY_MAX_S = 30.0, 600.0
SWEEP_AGAIN_S = 30.0  # a version kept because a process may use it is looked at again
DOWNLOADS = ".downloads"
SHARED = ".shared"  # the verified archives a node serves its peers
ORIGIN = "origin"
TEMP = ".tmp-"


@dataclass
class _Failure:
    dir_name: str
    url: str
    reason: str
    retry_at: float
    failures: int


class Packages:
    """``place()`` gives this node's pair and node now; ``event(kind, reason, **details)``
    files an event; ``changed()`` tells the publisher the status changed; ``in_use()``
    gives the services' statuses (their processes, and the version each runs)."""

    def __init__(
        self,
        state_dir: Path,
        users: ServiceUsers,
        log: EventLog,
        *,
        place: Callable[[], tuple[Pair | None, Node | None]],
        event: Callable[..., None],
        changed: Callable[[], None],
        in_use: Callable[[], Iterable[ServiceStatus]] = tuple,
        ssl: ssl.SSLContext | None = None,
        limits: Limits = LIMITS,
        clock: Callable[[], float] = time.monotonic,
        peers: PeerPackages | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.root = state_dir / "packages"
        self.users = users
        self.log = log
        self.limits = limits
        self.fetcher = Fetcher(log, ssl, limits)
        self.clock = clock
        self._place = place
        self._event = event
        self._changed = changed
        self._in_use = in_use
        self._wanted: dict[str, Package] = {}
        self._tasks: dict[str, tuple[str, asyncio.Task[None]]] = {}
        self._failed: dict[str, _Failure] = {}
        self._abort = threading.Event()
        self._fallback: dict[str, str] = {}  # service: the older version it was given
        self._handed: dict[str, str] = {}  # service: the version last given to start it
        self._drift: tuple[str, ...] = ()  # the services whose declared version is missing
        self._lacking: tuple[tuple[tuple[str, str], ...], tuple[str, ...]] | None = None
        self._sweep_at: float | None = 0.0  # when to look for versions to remove (None: never)
        self._sweeping: asyncio.Task[bool] | None = None
        self.wake = asyncio.Event()
        self.peers = peers
        if peers is not None:
            peers.shared_file = self.shared_file

    # -- views ------------------------------------------------------------------------
    def version_dir(self, service: str, package: Package) -> Path:
        return self.root / service / package.dir_name

    def ready_dir(self, spec: Service) -> Path | None:
        """Where ``spec``'s program is: the version the site names once installed here;
        until then the newest version this node holds (what it has, and says so); None
        when it holds none."""
        if spec.package is None:
            return None
        top = self.version_dir(spec.name, spec.package)
        if (top / MARKER).is_file():
            self._handed[spec.name] = top.name
            return top
        held = [h for h in sorted(self._held(spec.name), key=_newest) if h.installed_at]
        if not held:
            return None
        self._handed[spec.name] = held[0].name
        if self._fallback.get(spec.name) != held[0].name:
            self._fallback[spec.name] = held[0].name
            self.log.warning(
                "service runs an older package version: the one the site names is not "
                "installed here",
                service=spec.name,
                declared=spec.package.dir_name,
                using=held[0].name,
            )
        return self.root / spec.name / held[0].name

    def lacking(self, pair: Pair) -> tuple[str, ...]:
        """The services of ``pair`` whose declared version this node does not hold (its
        directory marked installed), sorted; one that cannot be looked at is not held.
        The decision asks on every round: the disk is looked at again once a second
        (:meth:`_reconcile`, at once after an install) or when the site names others."""
        wanted = tuple(sorted((n, p.dir_name) for n, p in drift.declared(pair).items()))
        if self._lacking is not None and self._lacking[0] == wanted:
            return self._lacking[1]
        holds: dict[str, set[str]] = {}
        for name, package in drift.declared(pair).items():
            try:
                if (self.version_dir(name, package) / MARKER).is_file():
                    holds[name] = {package.dir_name}
            except OSError:
                pass
        found = drift.lacking(pair, holds)
        self._lacking = (wanted, found)
        return found

    def busy(self, name: str) -> set[str] | None:
        """The versions of service ``name`` a process may run from now: the one each of its
        processes runs, and the one last given to start it (a start may be under way).
        None when a process of it runs a version not known: then every one may be."""
        busy = {self._handed[name]} if name in self._handed else set()
        for status in self._in_use():
            if status.name != name or status.pid is None:
                continue
            if status.package is not None:
                busy.add(status.package)
            elif name not in self._handed:
                return None
        return busy

    def shared_file(self, service: str, version_dir: str) -> Path | None:
        """The verified archive of ``service``'s ``version_dir`` this node may serve its
        peers: the version the site names now, installed here; None otherwise."""
        package = self._wanted.get(service)
        if package is None or package.dir_name != version_dir or not self._sharing():
            return None
        if not (self.version_dir(service, package) / MARKER).is_file():
            return None
        path = self.root / SHARED / service / version_dir
        return path if path.is_file() else None

    def installed_dir(self, service: str, version: str) -> Path | None:
        """The directory of ``service``'s package version ``version``
        (``{version}-{sha256[:12]}``) if it is installed here."""
        top = self.root / service / version
        if version.startswith(TEMP) or "/" in version or not (top / MARKER).is_file():
            return None
        return top

    def statuses(self) -> list[PackageStatus]:
        out = []
        for name, package in sorted(self._wanted.items()):
            held = self._held(name)
            installed = [h.name for h in sorted(held, key=_newest) if h.installed_at is not None]
            failure = self._failed.get(name)
            if package.dir_name in installed:
                state, detail = "installed", None
            elif failure is not None and failure.dir_name == package.dir_name:
                state, detail = "failed", failure.reason
            else:
                state, detail = "installing", None
            out.append(
                PackageStatus(
                    service=name,
                    version=package.version,
                    state=state,
                    installed=installed,
                    detail=detail,
                )
            )
        return out

    # -- the background task ----------------------------------------------------------
    async def run(self) -> None:
        """Keep this node's packages in line with the site, until cancelled."""
        await asyncio.to_thread(self._prepare)
        try:
            while True:
                self._reconcile()
                if not self._sharing() and (self.root / SHARED).exists():
                    await asyncio.to_thread(shutil.rmtree, self.root / SHARED, True)
                await wait_event(self.wake, RECONCILE_S)
                self.wake.clear()
        finally:
            self._abort.set()  # any thread still unpacking stops at its next member
            tasks: list[asyncio.Task[Any]] = [t for _, t in self._tasks.values()]
            if self._sweeping is not None:
                tasks.append(self._sweeping)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.fetcher.close()

    def _prepare(self) -> None:
        """No leftover of a run that stopped half way through an unpack."""
        if self.root.is_dir():
            for service in self.root.iterdir():
                if service.name not in (DOWNLOADS, SHARED) and service.is_dir():
                    for leftover in service.glob(TEMP + "*"):
                        shutil.rmtree(leftover, ignore_errors=True)

    def _make_root(self, name: str) -> None:
        """The packages' directories, reachable by the services' users: the state
        directory gets o+x (not o+r: its other entries stay private), ``packages/`` and
        each service's directory 0755, the downloads 0700."""
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        mode = self.state_dir.stat().st_mode & 0o7777
        if not mode & 0o001:
            self.state_dir.chmod(mode | 0o001)
        (self.root / DOWNLOADS).mkdir(mode=0o700, exist_ok=True)
        (self.root / name).mkdir(mode=0o755, exist_ok=True)

    def _reconcile(self) -> None:
        pair, _ = self._place()
        wanted = {s.name: s.package for s in pair.services if s.package} if pair else {}
        if wanted != self._wanted:
            self._wanted = wanted
            self._sweep_at = 0.0
            self._changed()
        for name, (dir_name, task) in list(self._tasks.items()):
            package = wanted.get(name)
            if package is None or package.dir_name != dir_name:
                task.cancel()  # no longer what the site names; its own cleanup runs
        now = self.clock()
        for name, package in wanted.items():
            if name in self._tasks:
                continue
            failure = self._failed.get(name)
            if failure is not None and (failure.dir_name, failure.url) != (
                package.dir_name,
                package.url,
            ):
                del self._failed[name]  # another version, or another place: its own tries
                failure = None
            if failure is not None and now < failure.retry_at:
                continue
            if (self.version_dir(name, package) / MARKER).is_file():
                continue
            task = asyncio.create_task(self._install(name, package), name=f"package-{name}")
            self._tasks[name] = (package.dir_name, task)
        if pair is not None:
            self._drift_step(pair)
            self._sweep_step(pair, now)

    def _drift_step(self, pair: Pair) -> None:
        """The alarm ``package drift``: an event as it starts and as it ends."""
        self._lacking = None  # looked at again
        missing = self.lacking(pair)
        if missing == self._drift:
            return
        was, self._drift = self._drift, missing
        self._changed()
        if missing:
            reason = f"{drift.versions(pair, missing)} not installed on this node"
            self.log.warning(drift.ALARM, services=",".join(missing), reason=reason)
            if not was:
                self._event(drift.ALARM, reason, services=list(missing))
        else:
            self.log.info("package drift cleared")
            self._event(f"{drift.ALARM} cleared", "holds every package version the site names")

    def _sweep_step(self, pair: Pair, now: float) -> None:
        """Now and then, in a thread: remove the versions no longer kept, and those of a
        service gone from the site file once no process of it runs."""
        task = self._sweeping
        if task is not None and task.done():
            self._sweeping = None
            again = True  # a sweep that did not finish: look again later
            if not task.cancelled() and task.exception() is None:
                again = task.result()
            elif not task.cancelled():
                self.log.warning("package sweep failed", error=repr(task.exception()))
            if again and self._sweep_at is None:
                self._sweep_at = now + SWEEP_AGAIN_S
        if self._sweeping is not None or self._sweep_at is None or now < self._sweep_at:
            return
        self._sweep_at = None
        supervised = {s.name for s in self._in_use()}
        for name in set(self._handed) - supervised - set(self._wanted):
            del self._handed[name]  # no process of a service the supervisor no longer has
        plan: dict[str, tuple[Package | None, set[str] | None]] = {
            name: (self._wanted.get(name), self.busy(name)) for name in {*self._wanted, *supervised}
        }
        for name in supervised - set(self._wanted):
            plan[name] = (None, None)  # gone from the site, not stopped yet: keep it all
        skip = frozenset(self._tasks)  # an install under way owns its service's directory
        self._sweeping = asyncio.create_task(self._thread(self._sweep, plan, skip))

    async def _install(self, name: str, package: Package) -> None:
        log = dict(service=name, version=package.version, sha256=package.sha256[:12])
        self.log.info("package installing", url=package.url, **log)
        self._changed()
        try:
            source = await self._steps(name, package)
        except Exception as err:
            if not isinstance(err, PackageError):  # a bug: seen, and tried again later
                self.log.exception("package install failed unexpectedly", err, **log)
            reason = str(err) if isinstance(err, PackageError) else f"internal error: {err!r}"
            previous = self._failed.get(name)
            failures = previous.failures + 1 if previous is not None else 1
            wait = min(RETRY_S * 2 ** (failures - 1), RETRY_MAX_S)
            self._failed[name] = _Failure(
                package.dir_name, package.url, reason, self.clock() + wait, failures
            )
            self.log.warning("package failed", reason=reason, retry_after_s=wait, **log)
            self._event("package failed", reason, **log)
        else:
            self._failed.pop(name, None)
            self.log.info("package installed", source=source, **log)
            self._event("package installed", "", source=source, **log)
            busy = self.busy(name)
            kept = busy is None or await self._thread(self._retain, name, package, busy)
            if kept and self._sweep_at is None:
                self._sweep_at = self.clock() + SWEEP_AGAIN_S
        finally:
            current = self._tasks.get(name)
            if current is not None and current[1] is asyncio.current_task():
                del self._tasks[name]
            self._changed()
            self.wake.set()

    async def _steps(self, name: str, package: Package) -> str:
        """Install ``package``; where its file came from (a peer's name, or ORIGIN)."""
        top = self.version_dir(name, package)
        part = self.root / DOWNLOADS / f"{name}-{package.dir_name}.part"
        tmp = top.with_name(f"{TEMP}{package.dir_name}-{secrets.token_hex(4)}")
        spec = self._spec(name)
        if spec is None:
            raise PackageError("the service is no longer in this node's pair")
        try:
            run_as = self.users.resolve(spec)
        except ServiceRefused as refused:
            raise PackageError(str(refused)) from None
        try:
            await self._thread(self._make_root, name)
            await self._thread(self._clear, top)
        except OSError as err:
            raise PackageError(f"prepare {self.root}: {_os_reason(err)}") from None
        source = await self._download(name, package, part)
        try:
            await self._thread(
                archive.unpack,
                part,
                package.kind,
                file_name(package.url),
                tmp,
                self.limits.max_bytes,
                self._abort,
            )
        except ArchiveError as err:
            part.unlink(missing_ok=True)  # it will not unpack any better next time
            raise PackageError(f"unpack: {err}") from None
        except OSError as err:
            raise PackageError(f"unpack: {_os_reason(err)}") from None
        owner, group = os.geteuid(), os.getegid()
        if run_as.groups is not None:
            group = run_as.gid
        try:
            if package.install is None:
                await self._thread(archive.settle, tmp, owner, group, False)
                await self._thread(archive.mark, tmp, _marker(package))
                await self._thread(os.rename, tmp, top)
            else:
                await self._installed_in_place(name, package, tmp, top, run_as, owner, group)
        except OSError as err:
            raise PackageError(f"install: {_os_reason(err)}") from None
        finally:
            await self._thread(shutil.rmtree, tmp, True)
        if self._sharing():
            await self._thread(self._keep, name, package, part)
        else:
            part.unlink(missing_ok=True)
        return source

    async def _download(self, name: str, package: Package, part: Path) -> str:
        """The package's file into ``part``, its sha256 checked: from the first peer
        that holds it and serves it whole and right, else from the origin; where it
        came from."""
        peers = await self.peers.sources(name, package) if self.peers else []
        for peer, source in peers:
            if await self._from_peer(name, peer, source, package, part):
                return peer
        try:
            await self.fetcher.fetch(package.url, part)
        except FetchError as err:
            if not err.transient:
                await self._thread(part.unlink, True)
            raise PackageError(f"download from {package.url}: {err}") from None
        digest = await self._thread(archive.sha256_of, part, self._abort)
        if digest != package.sha256:
            await self._thread(part.unlink, True)
            raise PackageError(
                f"sha256 mismatch: the file at {package.url} has {digest}, "
                f"the site file names {package.sha256}; nothing was unpacked"
            )
        return ORIGIN

    async def _from_peer(
        self, name: str, peer: str, source: str, package: Package, part: Path
    ) -> bool:
        """``source`` (a peer's) into ``part`` if it comes whole with the sha256 the site
        file names; whatever it gave is thrown away otherwise (never resumed from)."""
        assert self.peers is not None
        got = part.with_name(part.name.removesuffix(".part") + ".peer")
        log = dict(service=name, version=package.version, sha256=package.sha256[:12])
        log.update(peer=peer, url=source)
        await self._thread(got.unlink, True)
        try:
            await self.peers.fetch(peer, source, got)
            digest = await self._thread(archive.sha256_of, got, self._abort)
        except FetchError as err:
            self.log.info("package not fetched from a peer", reason=str(err), **log)
            await self._thread(got.unlink, True)
            return False
        if digest != package.sha256:
            self.log.warning(
                "package from a peer refused: its sha256 is not the one the site file names",
                got=digest,
                **log,
            )
            await self._thread(got.unlink, True)
            return False
        await self._thread(os.replace, got, part)
        return True

    async def _installed_in_place(
        self,
        name: str,
        package: Package,
        tmp: Path,
        top: Path,
        run_as: RunAs,
        owner: int,
        group: int,
    ) -> None:
        """Move the unpacked tree into place and run ``install:`` there; on a failure the
        tree goes away whole (it was never marked, so never used)."""
        assert package.install is not None
        switch = run_as.groups is not None
        await self._thread(archive.settle, tmp, run_as.uid if switch else owner, group, True)
        await self._thread(os.rename, tmp, top)
        try:
            await self._run_install(name, package, top, run_as)
            await self._thread(archive.settle, top, owner, group, False)
            await self._thread(archive.mark, top, _marker(package))
        except BaseException:
            # Renamed aside first, so the half-installed tree is never seen at its name.
            with contextlib.suppress(OSError):
                await self._thread(os.rename, top, tmp)
            raise

    async def _run_install(self, name: str, package: Package, top: Path, run_as: RunAs) -> None:
        assert package.install is not None
        pair, node = self._place()
        spec = self._spec(name)
        if pair is None or node is None or spec is None:
            raise PackageError("install: the service left this node's pair")
        values = {**placeholder_values(pair, node, None), PLACEHOLDER: str(top)}
        argv = [expand(a, values) for a in package.install.command]
        hapair = {
            "HAPAIR_SERVICE": name,
            "HAPAIR_NODE": node.name,
            "HAPAIR_PAIR": pair.name,
            "HAPAIR_PACKAGE_DIR": str(top),
            "HAPAIR_PACKAGE_VERSION": package.version,
        }
        env = service_env(run_as, hapair, {k: expand(v, values) for k, v in spec.env.items()})
        log = self.state_dir / "logs" / f"{name}.install.log"
        await run_install(argv, top, run_as, env, log, package.install.timeout_s)

    # -- helpers ----------------------------------------------------------------------
    def _spec(self, name: str) -> Service | None:
        pair, _ = self._place()
        return next((s for s in pair.services if s.name == name), None) if pair else None

    async def _thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn`` in a thread; a cancel waits for it to end first (it checks ``abort``
        where it can), so cleaning up never races with it."""
        future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await future
            raise
        except Aborted:
            raise asyncio.CancelledError from None

    def _held(self, name: str) -> list[Held]:
        service = self.root / name
        if not service.is_dir():
            return []
        held = []
        for d in service.iterdir():
            if d.name.startswith(TEMP) or not d.is_dir():
                continue
            with contextlib.suppress(OSError):
                marker = d / MARKER
                held.append(Held(d.name, marker.stat().st_mtime if marker.exists() else None))
        return held

    def _clear(self, top: Path) -> None:
        """A directory at the version's name that was never marked: an earlier run
        stopped half way through its install."""
        if top.exists() and not (top / MARKER).exists():
            shutil.rmtree(top, ignore_errors=True)

    def _sharing(self) -> bool:
        """Whether this node keeps its verified archives for its pair's peers."""
        pair, _ = self._place()
        return self.peers is not None and pair is not None and pair.packages.from_peers

    def _keep(self, name: str, package: Package, part: Path) -> None:
        (self.root / SHARED).mkdir(mode=0o700, exist_ok=True)
        shared = self.root / SHARED / name
        shared.mkdir(mode=0o700, exist_ok=True)
        part.chmod(0o600)
        os.replace(part, shared / package.dir_name)

    def _retain(self, name: str, package: Package, busy: set[str]) -> bool:
        """Remove the versions of ``name`` no longer kept, the archives kept for the
        peers of versions gone, and its other downloads; True if a version was kept only
        because a process may run from it."""
        held = self._held(name)
        gone = archive.to_remove(held, package.dir_name, busy=busy)
        for old in gone:
            self.log.info("package version removed", service=name, version_dir=old)
            shutil.rmtree(self.root / name / old, ignore_errors=True)
        shared = self.root / SHARED / name
        for kept in shared.iterdir() if shared.is_dir() else []:
            if not (self.root / name / kept.name / MARKER).is_file():
                kept.unlink(missing_ok=True)
        for part in self._parts_of(name):
            if part.stem != f"{name}-{package.dir_name}":
                part.unlink(missing_ok=True)
        return set(archive.to_remove(held, package.dir_name)) != set(gone)

    def _sweep(
        self, plan: dict[str, tuple[Package | None, set[str] | None]], skip: frozenset[str]
    ) -> bool:
        """Remove what ``plan`` (per service: its declared version, the versions a process
        may run from) no longer keeps; True if something was kept only because a process
        may still use it. A service directory not in ``plan`` has no process: it is gone
        from the site file, and goes."""
        if not self.root.is_dir():
            return False
        again = False
        for service in sorted(self.root.iterdir()):
            name = service.name
            if name in (DOWNLOADS, SHARED) or name in skip or not service.is_dir():
                continue
            declared, busy = plan.get(name, (None, set()))
            if busy is None:
                again = True
            elif declared is not None:
                again |= self._retain(name, declared, busy)
            elif busy:
                again = True
            else:
                self.log.info("package removed: its service is no longer in the site", service=name)
                shutil.rmtree(service, ignore_errors=True)
                shutil.rmtree(self.root / SHARED / name, ignore_errors=True)
                for part in self._parts_of(name):
                    part.unlink(missing_ok=True)
        return again

    def _parts_of(self, name: str) -> list[Path]:
        """The downloads of service ``name`` (``{name}-{version}-{sha}.part``, or
        ``.peer`` from a peer), not those of a service whose own name starts with
        ``{name}-``."""
        longer = {
            d.name
            for d in self.root.iterdir()
            if d.name.startswith(f"{name}-") and d.name not in (DOWNLOADS, SHARED)
        } | {w for w in self._wanted if w.startswith(f"{name}-")}
        return [
            part
            for part in (self.root / DOWNLOADS).glob(f"{name}-*")
            if part.suffix in (".part", ".peer")
            and not any(part.name.startswith(f"{other}-") for other in longer)
        ]


def _newest(h: Held) -> float:
    return -(h.installed_at or 0.0)


def _marker(package: Package) -> str:
    return json.dumps(
        {
            "version": package.version,
            "sha256": package.sha256,
            "url": package.url,
            "at": time.time(),
        }
    )


def _os_reason(err: OSError) -> str:
    if archive.no_space(err):
        return f"no space left on device ({err.filename or 'the packages directory'})"
    return f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
