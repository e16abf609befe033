"""The demo's pair with a database: its site made local, and the story told on it.

:func:`localise` turns the database sections, the packages and the process commands
of the site file into what runs on this machine (data dirs and fresh password files
under the demo's temporary directory, a free port, the archives the demo builds and
their hashes, the demo's own Python, absolute paths).

:class:`BatchScenario` tells the assisted-recovery story on the first pair that runs
a held service on a database: the batch process runs; its main node crashes in the
middle of a batch (the agent and everything it started, SIGKILL); the other node takes
over and holds the batch, awaiting the operator, with the process context it would
resume from; the operator (or the demo, after a pause) acknowledges; the batch goes on
at the next step. Then the table the batch writes is read back to check that every
step ran exactly once and none was skipped.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import secrets
import shlex
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from demo_view import State
from psycopg.conninfo import make_conninfo

from hapair.shared.package import file_name, sha256_file
from hapair.shared.process_context import Resume, read_context
from hapair.shared.topology import Pair, Service, Site

Say = Callable[[str], None]
# The archives the demo builds, by the file name a site's package url ends with, and the
# files of this repository each holds (at its top).
PACKAGES = {
    "demo-web-1.0.tar.gz": ("deploy/demo_web.py",),
    "batch-1.0.tar.gz": ("deploy/batch_process.py",),
}


# --- the site, made local -------------------------------------------------------------------


def postgres_problem(os_user: str) -> str | None:
    """Why this machine cannot run the demo's PostgreSQL, or None."""
    from hapair.workshop_agent.pg.errors import PgError
    from hapair.workshop_agent.pg.proc import find_bin_dir

    try:
        find_bin_dir()
    except PgError as err:
        return f"{err} (`make demo` installs postgresql-15)"
    try:
        uid = pwd.getpwnam(os_user).pw_uid
    except KeyError:
        return f"no {os_user!r} user on this machine (`make demo` creates it)"
    if os.geteuid() not in (0, uid):
        return f"PostgreSQL runs as {os_user!r}, which only root can do: run the demo as root"
    return None


def _port_free(address: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def common_free_port(addresses: list[str]) -> int:
    """A port free on every address (each node listens on its own address)."""
    import socket

    for _ in range(50):
        with socket.socket() as s:
            s.bind((addresses[0], 0))
            port = int(s.getsockname()[1])
        if all(_port_free(a, port) for a in addresses):
            return port
    raise OSError("no port free on every node address")


def localise(
    doc: dict[str, Any], tmp: Path, python: str, root: Path, registry_url: str, say: Say
) -> dict[str, Any]:
    """The site ``doc`` as the demo runs it (see ``demo-site.yaml``'s header). A pair
    with a database is left out, with the reason said, if PostgreSQL cannot run here."""
    moved: dict[str, str] = {}
    for workshop in doc.get("workshops", []):
        kept = []
        for pair in workshop.get("pairs", []):
            db = pair.get("database")
            if db is not None:
                problem = postgres_problem(str(db.get("os_user", "postgres")))
                if problem is not None:
                    say(f"pair {pair['name']} left out (it runs PostgreSQL): {problem}")
                    continue
                _local_database(pair, db, tmp, moved, say)
            kept.append(pair)
        workshop["pairs"] = kept
    doc["workshops"] = [w for w in doc.get("workshops", []) if w["pairs"]]
    build_packages(doc, tmp / "packages", root)
    for workshop in doc["workshops"]:
        for pair in workshop["pairs"]:
            for service in pair.get("services", []):
                service["command"] = [
                    _local_arg(i, arg, python, root, moved)
                    for i, arg in enumerate(service["command"])
                ]
                env = service.get("env", {})
                for key, value in env.items():
                    env[key] = registry_url if key == "HAPAIR_REGISTRY" else moved.get(value, value)
    return doc


def build_packages(doc: dict[str, Any], directory: Path, root: Path) -> None:
    """Build each archive the site's packages name (:data:`PACKAGES`) into ``directory``
    and point them at it: a ``file://`` URL and its sha256. ValueError for an archive
    the demo does not know how to build."""
    built: dict[str, tuple[str, str]] = {}
    for workshop in doc["workshops"]:
        for pair in workshop["pairs"]:
            for service in pair.get("services", []):
                package = service.get("package")
                if package is None:
                    continue
                name = file_name(str(package["url"]))
                if name not in built:
                    if name not in PACKAGES:
                        raise ValueError(
                            f"service {service['name']}: the demo builds no {name} "
                            f"(it builds {', '.join(PACKAGES)})"
                        )
                    directory.mkdir(mode=0o755, exist_ok=True)
                    path = directory / name
                    with tarfile.open(path, "w:gz") as tar:
                        for member in PACKAGES[name]:
                            tar.add(root / member, arcname=Path(member).name)
                    built[name] = (path.as_uri(), sha256_file(path))
                package["url"], package["sha256"] = built[name]


def _local_arg(i: int, arg: str, python: str, root: Path, moved: dict[str, str]) -> str:
    if i == 0 and arg == "python3":
        return python
    if arg in moved:
        return moved[arg]
    if "/" in arg and not arg.startswith("/") and (root / arg).is_file():
        return str(root / arg)
    return arg


def _local_database(
    pair: dict[str, Any], db: dict[str, Any], tmp: Path, moved: dict[str, str], say: Say
) -> None:
    # PostgreSQL runs as its own user: it must reach its data dir through tmp, which
    # stays unreadable to others; the password files are for the agents (root) only.
    tmp.chmod(0o711)
    data = tmp / "pg"
    data.mkdir(mode=0o755, exist_ok=True)
    data.chmod(0o755)
    keys = tmp / "secrets" / pair["name"]
    keys.mkdir(mode=0o700, parents=True, exist_ok=True)
    db["data_dir"] = f"{data}/{{pair.name}}/{{node.name}}/data"
    holders = [db.get("auth", {}), *db.get("databases", [])]
    for holder in holders:
        for field in [f for f in holder if f.endswith("password_file")]:
            old = holder[field]
            if old not in moved:
                new = keys / Path(old).name
                new.write_text(secrets.token_urlsafe(18) + "\n")
                new.chmod(0o600)
                moved[old] = str(new)
            holder[field] = moved[old]
    addresses = [str(n["address"]) for n in pair["nodes"]]
    port = int(db.get("port", 5432))
    if not all(_port_free(a, port) for a in addresses):
        db["port"] = common_free_port(addresses)
        say(f"port {port} is in use: the database of pair {pair['name']} takes {db['port']}")


# --- the story ---------------------------------------------------------------------------------


def held_service(site: Site) -> tuple[Pair, Service] | None:
    """The first pair with a database and a service held after a failover."""
    for pair in site.pairs():
        if pair.database is None or not pair.database.databases:
            continue
        for service in pair.services:
            if service.hold_until_ack:
                return pair, service
    return None


def recipe_steps(service: Service) -> int:
    """Steps per batch, from the command (``--steps N``; the batch process's default)."""
    argv = service.command
    for i, arg in enumerate(argv[:-1]):
        if arg == "--steps":
            return int(argv[i + 1])
    return 10


@dataclass
class Phase:
    name: str
    deadline: float
    """monotonic time by which it must be over, else the story failed."""


class BatchScenario:
    """Driven by the demo's refresh loop: :meth:`tick` looks at the site's state and
    the database, says what happened, and acts when it is time. ``ok`` is None until
    the story is over, then whether the check from the database passed."""

    READY_S = 180.0  # initdb, the clone, the first batch steps: slow on a loaded machine
    STEP_S = 60.0

    def __init__(
        self,
        pair: Pair,
        service: Service,
        *,
        hapair: str,
        etcd_url: str,
        env: dict[str, str],
        crash: Callable[[str], str],
        ack_after: float,
        say: Say,
        now: float,
    ) -> None:
        assert pair.database is not None
        self.pair, self.service = pair, service
        self.process = service.process_name
        self.steps = recipe_steps(service)
        spec = pair.database.databases[0]
        self.conninfo = make_conninfo(
            port=pair.database.port,
            dbname=spec.name,
            user=spec.owner,
            password=Path(spec.password_file).read_text().strip(),
            connect_timeout=2,
        )
        self.hapair, self.etcd_url = hapair, etcd_url
        self.env, self.crash, self.say = env, crash, say
        self.ack_after = ack_after
        self.main = pair.nodes[0].name
        self.phase = Phase("ready", now + self.READY_S)
        self.ok: bool | None = None
        self.seen: Resume | None = None  # the last context told
        self.old_epoch = 0
        self.new_node = ""
        self.new_epoch = 0
        self.held: Resume | None = None
        self.ack_at: float | None = None
        self.acked = False
        self.problem = ""

    @property
    def done(self) -> bool:
        return self.ok is not None

    # --- reading ------------------------------------------------------------------------

    def _address(self, node: str) -> str:
        found = self.pair.node(node)
        assert found is not None
        return found.address

    def context(self, node: str) -> Resume | None:
        """The process context as ``node``'s server has it (None: not there yet)."""

        async def read() -> Resume | None:
            conn = await psycopg.AsyncConnection.connect(
                self.conninfo, host=self._address(node), autocommit=True
            )
            async with conn:
                return await read_context(conn, self.process)

        return asyncio.run(read())

    def steps_run(self, node: str, up_to_batch: int) -> list[tuple[int, int, int, str]]:
        """``(batch, step, epoch, node)`` of every step committed, in commit order."""
        with psycopg.connect(self.conninfo, host=self._address(node)) as conn:
            rows = conn.execute(
                "SELECT batch, step, epoch, node FROM batch_step"
                " WHERE process = %s AND batch <= %s ORDER BY id",
                (self.process, up_to_batch),
            ).fetchall()
        return [(int(b), int(s), int(e), str(n)) for b, s, e, n in rows]

    # --- the loop's entry ----------------------------------------------------------------

    def tick(self, state: State, now: float) -> None:
        if self.done:
            return
        try:
            getattr(self, "_" + self.phase.name)(state, now)
            self.problem = ""
        except (psycopg.Error, OSError) as err:  # a server starting, or just killed
            self.problem = (str(err).strip() or type(err).__name__).splitlines()[0]
        if not self.done and now > self.phase.deadline:
            why = f" (last error: {self.problem})" if self.problem else ""
            self._finish(False, f"the demo's story stopped: {self.phase.name} took too long{why}")

    def _next(self, name: str, now: float, seconds: float | None = None) -> None:
        self.phase = Phase(name, now + (seconds or self.STEP_S))

    def _finish(self, ok: bool, text: str) -> None:
        self.ok = ok
        self.say(("" if ok else "FAILED: ") + text)

    def _tell_steps(self, node: str, ctx: Resume | None) -> None:
        """One line per step committed since the last one told."""
        if ctx is None or ctx.last_step is None:
            return
        if self.seen is not None and ctx.steps_committed == self.seen.steps_committed:
            return
        batch = (ctx.last_result or {}).get("batch", ctx.state.get("batch", "?"))
        self.say(
            f"{self.service.name}: step {ctx.last_step}/{self.steps} of batch {batch} "
            f"committed on {node} (epoch {ctx.epoch})"
        )
        self.seen = ctx

    # --- the phases ------------------------------------------------------------------------

    def _ready(self, state: State, now: float) -> None:
        """The batch runs on the main node, whose standby holds every commit; crash the
        main once a batch is half done."""
        leader = state.leaders.get(self.pair.name)
        sync = state.sync.get(self.pair.name, {})
        if leader is None or leader[0] != self.main:
            return
        ctx = self.context(self.main)
        self._tell_steps(self.main, ctx)
        if ctx is None or ctx.steps_committed < 2 or not sync.get("sync"):
            return
        if sync.get("primary") != self.main or not self.steps // 2 <= ctx.step < self.steps:
            return
        self.old_epoch = leader[1]
        batch = int(ctx.state.get("batch", 1))
        self.say(
            f"crashing {self.main} in the middle of batch {batch} (steps 1-{ctx.step - 1} "
            f"committed, step {ctx.step} under way; {', '.join(sync['sync'])} is the "
            f"synchronous standby): {self.crash(self.main)}"
        )
        self._next("hold", now)

    def _hold(self, state: State, now: float) -> None:
        """Another node took over and holds the batch; it published where it resumes."""
        leader = state.leaders.get(self.pair.name)
        rec = state.recovery.get(self.pair.name, {})
        if leader is None or leader[1] <= self.old_epoch or rec.get("epoch") != leader[1]:
            return
        if rec.get("state") != "awaiting" or not rec.get("contexts"):
            return
        self.new_node, self.new_epoch = leader
        published = rec["contexts"].get(self.service.name, {})
        self.held = self.context(self.new_node)
        if self.held is None or published.get("step") != self.held.step:
            self._finish(
                False,
                f"the published context ({published}) is not the database's ({self.held})",
            )
            return
        self.say(
            f"{self.service.name} is held on {self.new_node}; the context {self.new_node} "
            f"published is the one in its database: next step {self.held.step}, last "
            f"committed step {self.held.last_step} by epoch {self.held.epoch}"
        )
        command = f"hapair ack {self.pair.name} --epoch {self.new_epoch}"
        when = (
            f"the demo does it in {self.ack_after:g} s"
            if self.ack_after >= 0
            else "the demo waits for you"
        )
        self.say(
            f"acknowledge it: in `hapair top` select {self.pair.name} and press a, then y; "
            f"or run `{command}`; {when}"
        )
        self.ack_at = now + self.ack_after if self.ack_after >= 0 else None
        self._next("ack", now, None if self.ack_at is None else self.ack_after + self.STEP_S)
        if self.ack_at is None:
            self.phase.deadline = float("inf")

    def _ack(self, state: State, now: float) -> None:
        """Nothing moves until the ack; then the batch starts where the context says."""
        ctx = self.context(self.new_node)
        if ctx != self.held:
            self._finish(False, f"the process moved before the operator's ack: {ctx}")
            return
        rec = state.recovery.get(self.pair.name, {})
        if rec.get("epoch") == self.new_epoch and rec.get("state") == "acknowledged":
            self._next("resume", now)
            return
        if self.ack_at is not None and now >= self.ack_at and not self.acked:
            self.acked = True
            argv = ["ack", self.pair.name, "--epoch", str(self.new_epoch)]
            self.say(
                f"nobody acknowledged in {self.ack_after:g} s; running: hapair {shlex.join(argv)}"
            )
            done = subprocess.run(
                [self.hapair, *argv, "--etcd", self.etcd_url],
                capture_output=True,
                text=True,
                timeout=30,
                env=self.env,
                stdin=subprocess.DEVNULL,
                check=False,
            )
            self.say("  " + (done.stdout + done.stderr).strip().replace("\n", "\n  "))

    def _resume(self, state: State, now: float) -> None:
        """The batch goes on at the next step; once the crashed batch is done, check."""
        assert self.held is not None
        ctx = self.context(self.new_node)
        self._tell_steps(self.new_node, ctx)
        crashed = int(self.held.state.get("batch", 1))
        if ctx is None or int(ctx.state.get("batch", 1)) <= crashed:
            return
        self._check(crashed)

    def _check(self, crashed: int) -> None:
        assert self.held is not None
        rows = self.steps_run(self.new_node, crashed)
        ran = [(b, s) for b, s, _, _ in rows]
        expected = [(b, s) for b in range(1, crashed + 1) for s in range(1, self.steps + 1)]
        first_new = self.held.step
        split = [(s, e, n) for b, s, e, n in rows if b == crashed]
        wanted = [
            *((s, self.old_epoch, self.main) for s in range(1, first_new)),
            *((s, self.new_epoch, self.new_node) for s in range(first_new, self.steps + 1)),
        ]
        self.say(
            f"check, from the table batch_step on {self.new_node}: batch {crashed} ran steps "
            f"1-{first_new - 1} on {self.main} (epoch {self.old_epoch}), then steps "
            f"{first_new}-{self.steps} on {self.new_node} (epoch {self.new_epoch})"
        )
        if ran != expected:
            twice = sorted({x for x in ran if ran.count(x) > 1})
            skipped = sorted(set(expected) - set(ran))
            self._finish(False, f"steps run twice: {twice}; skipped: {skipped}; all: {ran}")
        elif split != wanted:
            self._finish(False, f"batch {crashed} did not go on where it stopped: {split}")
        else:
            batches = f"batches 1-{crashed}" if crashed > 1 else "batch 1"
            self._finish(True, f"every step of {batches} ran exactly once, none was skipped: OK")
