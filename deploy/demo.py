"""The hapair demo: a whole site on one machine, to watch failovers happen.

``python deploy/demo.py`` (or ``make demo``) starts a local etcd, applies
``deploy/demo-site.yaml`` with ``hapair topology apply``, starts one ``hapair-registry``
and one ``hapair-agent`` per node of the site (each node on its own 127.0.0.x address),
then shows the state of the site as it changes. Ctrl-C stops every process it started,
by PID (SIGTERM, then SIGKILL after a grace), and removes its temporary files. Logs are
kept in ``demo-run/logs``.

Like systemd would, the demo restarts an agent, the registry or etcd a few seconds after
it dies, so a crashed node comes back (as standby) by itself.

``python deploy/demo.py crash NODE [--server]`` kills a running demo's agent with
SIGKILL; with ``--server``, every process the agent started dies with it at once, as
in a power cut.

On the pair with a database and the batch process (``cell``) the demo tells a story of
assisted recovery by itself (``--no-scenario`` to skip it): the batch runs, the main
node crashes in the middle of a batch, the other one takes over and holds the batch
until an operator acknowledges (the demo does it after ``--ack-after`` seconds if
nobody did), the batch goes on at the next step, and the steps are checked from the
database. ``--exit-after-scenario`` stops the demo then, with status 0 if the check
passed.

What is shown (read from etcd and the registry) is in ``demo_view.py`` beside this file;
the site made local and the story are in ``demo_scenario.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from demo_view import EtcdReader, State, changes, http, read_state, render

from hapair.shared import keys, pki
from hapair.shared.pki import TlsFiles

ROOT = Path(__file__).resolve().parent.parent
PR_SET_CHILD_SUBREAPER = 36
# The demo's etcd users: its certificates' names.
ETCD_NAME, ADMIN, OPERATOR, REGISTRY = "etcd-1", "root", "demo", "reg-1"
LAB_WARNING = (
    "LAB MODE (--lab): etcd in clear on http://, without client certificates or roles, "
    "and no authenticated peer paths: anyone who reaches this machine can rewrite the site "
    "and run commands as the agents' user. Without --lab the demo runs secure."
)


class Stop(Exception):
    """Raised by the signal handlers to unwind into the clean-up."""


class DemoError(Exception):
    """Start-up failed; the message says why and what to do."""


# --- processes -------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, str, int] | None:
    """``(ppid, state, start_time)`` of a process, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0], int(fields[19])


def _process_table() -> dict[int, tuple[int, str, int]]:
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            table[int(entry.name)] = st
    return table


def descendants(root: int) -> dict[int, int]:
    """Every live descendant of ``root``: ``{pid: start_time}`` (the start time tells a
    reused PID apart)."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, int] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid not in found:
            found[pid] = table[pid][2]
            todo.extend(children.get(pid, []))
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


@dataclass
class Proc:
    """One process the demo started and restarts when it dies."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_at: float | None = None
    quick_failures: int = 0
    gave_up: bool = False

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        # setpriv --pdeathsig: if the demo itself is killed (SIGKILL: no clean-up), its
        # children die at once too, and what they started dies with them. KILL, not TERM:
        # with etcd gone as well, a graceful stop could wait forever. A new session keeps
        # the terminal's Ctrl-C for the demo, which stops everything in order.
        wrapper = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            out.write(f"==== demo: {stamp} starting {' '.join(self.argv)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                [*wrapper, *self.argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env or None,
                cwd=self.cwd,
                start_new_session=True,
            )
        self.started = time.monotonic()
        self.restart_at = None

    def exit_text(self) -> str:
        code = self.popen.returncode if self.popen else None
        if code is None:
            return "running"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"ended by {signal.Signals(-code).name}"
        return f"exited with status {code}"

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def signal_pid(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def stop_procs(procs: list[Proc], grace: float, hurry: list[bool], say: Any) -> None:
    """SIGTERM every live process of the group (after SIGCONT, in case it is frozen),
    then SIGKILL whatever still runs after ``grace`` seconds."""
    live = [p for p in procs if p.alive() and p.pid is not None]
    for p in live:
        assert p.pid is not None
        signal_pid(p.pid, signal.SIGCONT)
        signal_pid(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(p.alive() for p in live) and time.monotonic() < deadline and not hurry[0]:
        time.sleep(0.05)
    for p in live:
        if p.alive() and p.pid is not None:
            late = "" if hurry[0] else f" did not stop in {grace:.0f} s:"
            say(f"  {p.name} (pid {p.pid}){late} SIGKILL")
            signal_pid(p.pid, signal.SIGKILL)
        if p.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(5)
            say(f"  {p.name} (pid {p.pid}) {p.exit_text()}")


def crash_tree(pid: int) -> dict[int, int]:
    """A server crash: freeze ``pid`` (so it cannot react to its children dying), then
    SIGKILL every process it started and itself. What was killed besides it."""
    signal_pid(pid, signal.SIGSTOP)
    tree = descendants(pid)
    for child in tree:
        signal_pid(child, signal.SIGKILL)
    signal_pid(pid, signal.SIGKILL)
    return tree


def reap_orphans(known: set[int]) -> None:
    """Collect the exit status of orphans we adopted as subreaper (no zombies)."""
    me = os.getpid()
    for pid, (ppid, state, _) in _process_table().items():
        if ppid == me and state == "Z" and pid not in known:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def kill_leftovers(seen: dict[int, int], say: Any) -> None:
    """SIGKILL any process started under the demo that outlived its parent."""
    left = {**seen, **descendants(os.getpid())}
    for pid, start in left.items():
        st = _stat(pid)
        if st is None or st[2] != start or st[1] == "Z":
            continue
        say(f"  leftover process {pid} ({_cmdline(pid)[:80]}): SIGKILL")
        signal_pid(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        reap_orphans(set())
        if not any((st := _stat(p)) and st[2] == s and st[1] != "Z" for p, s in left.items()):
            break
        time.sleep(0.05)


# --- small helpers -----------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _kind(cmdline: str) -> str:
    """What a process of an agent is, in a word."""
    argv = cmdline.split()
    if not argv:
        return "exited"
    if Path(argv[0]).name.startswith("postgres"):
        return "postgres"
    script = next((Path(a).name for a in argv[1:] if a.endswith(".py")), None)
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1]
    return script or Path(argv[0]).name


def _agent_text(proc: Proc | None, now: float) -> str:
    if proc is None or proc.popen is None:
        return "-"
    if proc.alive():
        st = _stat(proc.popen.pid)
        return f"pid {proc.popen.pid}" + (" FROZEN" if st and st[1] in "Tt" else "")
    if proc.restart_at is not None:
        return f"down, back in {max(0.0, proc.restart_at - now):.0f} s"
    return "down"


# --- the demo ------------------------------------------------------------------------------


def _rel(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    return str(path)


def _set_subreaper() -> None:
    """Adopt the orphans of our children, so none escapes the clean-up."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _lock(run_dir: Path) -> IO[str]:
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = (run_dir / "lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        raise DemoError(
            f"another demo is running with {_rel(run_dir)} (pid {handle.read().strip() or '?'}); "
            "stop it with Ctrl-C, or give this one --run-dir"
        ) from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _forget_stale_tmp(run_dir: Path) -> None:
    """A demo killed with SIGKILL could not remove its temp dir: do it now."""
    marker = run_dir / "tmpdir"
    with contextlib.suppress(OSError):
        old = Path(marker.read_text().strip())
        if old.name.startswith("hapair-demo-") and old.parent == Path(tempfile.gettempdir()):
            _kill_postmasters(old)
            shutil.rmtree(old, ignore_errors=True)
        marker.unlink()


def _kill_postmasters(tmp: Path) -> None:
    """A standby's PostgreSQL outlives its agent (the agent finds it again when it
    restarts): those of a demo killed with SIGKILL would be left running."""
    for pid_file in tmp.glob("pg/*/*/*/postmaster.pid"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pid_file.read_text().splitlines()[0])
            if str(pid_file.parent) in _cmdline(pid):
                signal_pid(pid, signal.SIGKILL)


def _wait(what: str, ready: Any, proc: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise DemoError(f"{what} {proc.exit_text()} at start; its log:\n{proc.log_tail()}")
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(0.1)
    raise DemoError(f"{what} not ready after {timeout:.0f} s; its log:\n{proc.log_tail()}")


def _help(site: Any, run_dir: Path, bin_dir: Path, registry: str, lab: bool) -> str:
    pair = next(site.pairs())
    main_node, other = pair.nodes[0].name, pair.nodes[1].name
    service = next((s.name for p in site.pairs() for s in p.services if s.endpoint), "SERVICE")
    pids = _rel(run_dir / "pids")
    demo = _rel(Path(__file__))
    who = (
        f"{LAB_WARNING}\n"
        if lab
        else f"  (and $HAPAIR_ETCD_CA, _CERT, _KEY: the operator {OPERATOR}'s certificate in "
        f"{_rel(run_dir / 'pki')}/; etcd refuses a client without one)\n"
    )
    return f"""
In another terminal, in {Path.cwd()}:
  source {_rel(run_dir / "env")}   # {_rel(bin_dir)} on PATH; $HAPAIR_ETCD, $HAPAIR_REGISTRY
{who}
Crash the active node of {pair.name} (the view shows which node is active):
  python {demo} crash {main_node}            # kill -9 its agent; its services die with it
  python {demo} crash {main_node} --server   # the agent and every process it started, at once
  kill -9 $(cat {pids}/{main_node})   # the same as the first, by hand
Kill a service on an active node (the view shows its pid): a critical one moves the pair
at once, another is restarted in place until its restart budget is spent:
  kill -9 PID
Freeze it for longer than the lease (it fences itself, the watchdog stops its services):
  kill -STOP $(cat {pids}/{main_node}); sleep 4; kill -CONT $(cat {pids}/{main_node})
Planned switchover, maintenance, draining (the CLI reads $HAPAIR_ETCD):
  hapair switchover {pair.name}                 # or: hapair switchover {pair.name} --to {other}
  hapair pause {pair.name}        then  hapair resume {pair.name}
  hapair drain {main_node}      then  hapair undrain {main_node}
  hapair status                 (hapair status --watch --registry $HAPAIR_REGISTRY)
Ask the registry as a client would ({registry}):
  curl -s $HAPAIR_REGISTRY/v1/endpoints/{service}
  curl -s "$HAPAIR_REGISTRY/v1/endpoints/{service}?after_epoch=0&wait_s=30"
  curl -sN $HAPAIR_REGISTRY/v1/events
  curl -s -X POST -H 'Content-Type: application/json' \\
       $HAPAIR_REGISTRY/v1/pairs/{pair.name}/switchover
Watch the site as an operator would (acknowledge a recovery with a, switch over with s):
  hapair top
Crashed agents, the registry and etcd come back after a few seconds, as under systemd.
Logs: {_rel(run_dir / "logs")}/      Ctrl-C here stops everything.
"""


@dataclass
class Demo:
    args: argparse.Namespace
    site: Any
    bin_dir: Path
    run_dir: Path
    tmp: Path
    say: Any
    procs: list[Proc] = field(default_factory=list)
    agents: dict[str, Proc] = field(default_factory=dict)
    seen: dict[int, int] = field(default_factory=dict)
    etcd_url: str = ""
    registry_url: str = ""
    scenario: Any = None
    reader: EtcdReader | None = None

    @property
    def lab(self) -> bool:
        """The lab mode (--lab): etcd in clear without certificates, no peer keys."""
        return bool(self.args.lab)

    @property
    def pki_dir(self) -> Path:
        return self.run_dir / "pki"

    def etcd_env(self, identity: str) -> dict[str, str]:
        """``HAPAIR_ETCD*`` for a process that shows etcd ``identity``'s certificate
        (only the URL in the lab mode)."""
        env = {"HAPAIR_ETCD": self.etcd_url}
        if not self.lab:
            files = TlsFiles.issued(self.pki_dir, identity)
            env.update(
                HAPAIR_ETCD_CA=str(files.ca),
                HAPAIR_ETCD_CERT=str(files.cert),
                HAPAIR_ETCD_KEY=str(files.key),
            )
        return env

    def make_pki(self) -> None:
        """The demo's own site CA and a certificate for each of its parts, as
        ``hapair pki`` makes them, in the run directory: etcd's, the admin's (root), the
        operator's, the registry's and one per node; a peer key per pair."""
        d = self.pki_dir
        shutil.rmtree(d, ignore_errors=True)
        pki.init(d, self.site.site)
        pki.issue(d, pki.Kind.ETCD, ETCD_NAME, ["127.0.0.1"])
        pki.issue(d, pki.Kind.ADMIN, ADMIN)
        pki.issue(d, pki.Kind.OPERATOR, OPERATOR)
        pki.issue(d, pki.Kind.REGISTRY, REGISTRY, ["127.0.0.1"])
        for pair in self.site.pairs():
            pki.peer_key(d, pair.name)
            for node in pair.nodes:
                pki.issue(d, pki.Kind.AGENT, node.name)
                if pair.database is not None:  # its PostgreSQL server, by its address
                    pki.issue(d, pki.Kind.POSTGRES, f"postgres@{node.name}", [node.address])
        self.say(
            f"pki       {_rel(d)}/: a CA of its own; certificates for etcd, {ADMIN} (admin), "
            f"{OPERATOR} (operator), {REGISTRY} (registry), each node and each node's "
            "PostgreSQL; a peer key per pair"
        )

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HAPAIR_")}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def spawn(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        proc.start()
        self.write_pid(proc)
        return proc

    def write_pid(self, proc: Proc) -> None:
        (self.run_dir / "pids").mkdir(exist_ok=True)
        (self.run_dir / "pids" / proc.name).write_text(f"{proc.pid}\n")

    def local_site(self) -> Path:
        """The site file with what must be local to this demo filled in (see
        ``demo_scenario.localise``), written to the temporary directory."""
        import yaml
        from demo_scenario import localise

        from hapair.shared.topology import TopologyError, parse_site
        from hapair.shared.validation import parse_yaml

        path = self.tmp / "site.yaml"
        try:
            doc = parse_yaml(Path(self.args.site).read_text(), str(self.args.site), TopologyError)
            assert isinstance(doc, dict)  # the file was validated at start
            doc = localise(doc, self.tmp, sys.executable, ROOT, self.registry_url, self.say)
            for workshop in doc["workshops"]:
                for pair in workshop["pairs"]:
                    db = pair.get("database")
                    if self.lab:  # no TLS for the database either, said by name
                        if db is not None:
                            db["security"] = "none"
                        continue
                    # each pair's peer path authenticated with its key
                    key = self.pki_dir / f"peer-{pair['name']}.key"
                    pair.setdefault("network", {})["peer_key_file"] = str(key)
                    if db is not None:  # its database over TLS with the demo's PKI
                        db["tls"] = {
                            "ca_file": str(self.pki_dir / pki.CA_CERT),
                            "cert_file": f"{self.pki_dir}/postgres@{{node.name}}.crt",
                            "key_file": f"{self.pki_dir}/postgres@{{node.name}}.key",
                        }
            path.write_text(yaml.safe_dump(doc, sort_keys=False))
            self.site = parse_site(doc, str(path))
        except (OSError, ValueError) as err:  # a TopologyError is a ValueError
            raise DemoError(f"cannot make the site local to the demo: {err}") from None
        return path

    def etcd_tls_args(self) -> list[str]:
        """etcd's TLS, as deploy/etcd/etcd.conf.yml sets it: its certificate on both
        ports, and every client and peer must show one of the demo's CA."""
        if self.lab:
            return []
        files = TlsFiles.issued(self.pki_dir, ETCD_NAME)
        cert, key, ca = str(files.cert), str(files.key), str(files.ca)
        return [
            *("--cert-file", cert, "--key-file", key, "--trusted-ca-file", ca),
            "--client-cert-auth",
            *("--peer-cert-file", cert, "--peer-key-file", key, "--peer-trusted-ca-file", ca),
            "--peer-client-cert-auth",
        ]

    def hapair(self, what: str, *argv: str) -> str:
        """Run ``hapair ARGV`` as the admin; its output, or DemoError saying ``what``."""
        done = subprocess.run(
            [str(self.bin_dir / "hapair"), *argv],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env(**self.etcd_env(ADMIN)),
            stdin=subprocess.DEVNULL,
            check=False,
        )
        output = (done.stdout + done.stderr).strip()
        if done.returncode != 0:
            raise DemoError(f"`hapair {what}` failed ({done.returncode}):\n{output}")
        return output.replace("\n", "\n    ")

    def start(self) -> None:
        logs = self.run_dir / "logs"
        host = "127.0.0.1"
        client, peer = free_port(host), free_port(host)
        scheme = "http" if self.lab else "https"
        self.etcd_url = f"{scheme}://{host}:{client}"
        if self.lab:
            self.say(LAB_WARNING)
        else:
            self.make_pki()
        etcd = self.spawn(
            Proc(
                "etcd",
                [
                    shutil.which("etcd") or "etcd",
                    *("--name", "demo", "--data-dir", str(self.tmp / "etcd")),
                    *("--logger", "zap", "--log-level", "warn"),
                    *("--listen-client-urls", self.etcd_url),
                    *("--advertise-client-urls", self.etcd_url),
                    *("--listen-peer-urls", f"{scheme}://{host}:{peer}"),
                    *("--initial-advertise-peer-urls", f"{scheme}://{host}:{peer}"),
                    *("--initial-cluster", f"demo={scheme}://{host}:{peer}"),
                    *("--initial-cluster-state", "new"),
                    "--pre-vote",  # as in deploy/etcd/etcd.conf.yml (off by default in 3.4)
                    *self.etcd_tls_args(),
                ],
                logs / "etcd.log",
                env=self.env(),
            )
        )
        # The view reads etcd as the operator (who may read everything, write little).
        tls = None if self.lab else TlsFiles.issued(self.pki_dir, OPERATOR)
        reader = self.reader = EtcdReader(self.etcd_url, tls)
        _wait("etcd", lambda: reader.prefix(keys.TOPOLOGY) is not None, etcd, 20)
        how = (
            "LAB MODE: plain http, no client certificates"
            if self.lab
            else ("TLS, client certificates required")
        )
        self.say(f"etcd      {self.etcd_url}  (pid {etcd.pid}; {how})")

        # The registry's address goes into the site (a service follows the database
        # through it), so it is chosen first.
        port = self.args.registry_port
        if port == 0 or not port_is_free(host, port):
            if port:
                self.say(f"port {port} is in use: the registry takes a free port")
            port = free_port(host)
        self.registry_url = f"http://{host}:{port}"

        site_file = self.local_site()
        applied = self.hapair("topology apply", "topology", "apply", str(site_file))
        self.say(f"topology  {_rel(Path(self.args.site))} (made local) applied: {applied}")
        if not self.lab:
            people = ("--operator", OPERATOR, "--registry", REGISTRY)
            roles = self.hapair("etcd-auth apply", "etcd-auth", "apply", *people)
            # Its last line sums up what it made (every user and role is in the log).
            (self.run_dir / "logs" / "etcd-auth.log").write_text(roles + "\n")
            summary = roles.rsplit("\n", 1)[-1].strip()
            self.say(f"etcd-auth apply {' '.join(people)} (as {ADMIN}): {summary}")

        registry = self.spawn(
            Proc(
                "registry",
                [
                    str(self.bin_dir / "hapair-registry"),
                    "--listen",
                    f"{host}:{port}",
                    # On 127.0.0.1, for the tour's curl and hapair top: a lab's open admin.
                    "--open-admin",
                ],
                logs / "registry.log",
                env=self.env(**self.etcd_env(REGISTRY)),
            )
        )
        healthz = f"{self.registry_url}/healthz"
        _wait("hapair-registry", lambda: http("GET", healthz)[0] == 200, registry, 20)
        self.say(f"registry  {self.registry_url}  (pid {registry.pid})")

        # The demo's services name no user: they run as whoever runs the demo. As root,
        # each agent is told it may run them so (a server would name users instead).
        root_services = ["--allow-root-services"] if os.geteuid() == 0 else []
        if root_services:
            self.say("services run as root: the demo's agents allow it (--allow-root-services)")
        for pair in self.site.pairs():
            for node in pair.nodes:
                home = self.tmp / "nodes" / node.name
                (home / "state").mkdir(parents=True)
                (home / "index.html").write_text(
                    f"<!doctype html><title>{node.name}</title><p>hapair demo: served by node "
                    f"<b>{node.name}</b> ({node.address}), pair {pair.name}</p>\n"
                )
                agent = self.spawn(
                    Proc(
                        node.name,
                        [str(self.bin_dir / "hapair-agent"), "--node", node.name, *root_services],
                        logs / f"{node.name}.log",
                        env=self.env(
                            HAPAIR_STATE_DIR=str(home / "state"), **self.etcd_env(node.name)
                        ),
                        cwd=home,
                    )
                )
                self.agents[node.name] = agent
                self.say(f"agent     {node.name:<10} {node.address:<12} (pid {agent.pid})")

        exports = {**self.etcd_env(OPERATOR), "HAPAIR_REGISTRY": self.registry_url}
        (self.run_dir / "env").write_text(
            "# source this file to drive the running demo from another shell"
            + ("" if self.lab else f", as the operator {OPERATOR} (its certificate)")
            + f'\nexport PATH="{self.bin_dir}:$PATH"\n'
            + "".join(f"export {k}={shlex.quote(v)}\n" for k, v in exports.items())
        )

    def supervise(self) -> None:
        """Restart what died, as systemd would; give up on what dies at once, thrice."""
        now = time.monotonic()
        for proc in self.procs:
            if proc.gave_up or proc.alive():
                continue
            if proc.restart_at is None:
                quick = now - proc.started < 10
                proc.quick_failures = proc.quick_failures + 1 if quick else 0
                what = f"{proc.name} (pid {proc.pid}) {proc.exit_text()}"
                if self.args.no_restart or proc.quick_failures >= 3:
                    proc.gave_up = True
                    why = "" if self.args.no_restart else " (it failed 3 times at start)"
                    self.say(f"{what}; not restarted{why}. Its log:\n{proc.log_tail()}")
                    continue
                proc.restart_at = now + self.args.restart_delay
                self.say(f"{what}; restarting it in {self.args.restart_delay:g} s")
            elif now >= proc.restart_at:
                proc.start()
                self.write_pid(proc)
                self.say(f"{proc.name} restarted (pid {proc.pid})")

    def footer(self, state: State) -> str:
        hints = []
        for pair in self.site.pairs():
            leader = state.leaders.get(pair.name)
            if leader and leader[0] in self.agents:
                hints.append(
                    f"crash {pair.name}'s active: python {_rel(Path(__file__))} crash {leader[0]}"
                )
        hints.append(
            f"commands: see above, or `source {_rel(self.run_dir / 'env')}`; Ctrl-C stops the demo"
        )
        return "\n".join(hints)

    def watch(self, console: Any) -> None:
        from rich.live import Live

        services = [s.name for p in self.site.pairs() for s in p.services if s.endpoint]
        services += [f"{p.name}.db" for p in self.site.pairs() if p.database is not None]
        mode = "LAB MODE (no TLS, no peer keys)" if self.lab else "TLS"
        header = (
            f"site {self.site.site}   {mode}   etcd {self.etcd_url}   "
            f"registry {self.registry_url}   logs {_rel(self.run_dir / 'logs')}/"
        )
        seen_events: set[str] = set()
        old: State | None = None
        end = time.monotonic() + self.args.duration if self.args.duration else None
        live = (
            Live(console=console, auto_refresh=False, redirect_stdout=False, redirect_stderr=False)
            if console.is_terminal
            else None
        )
        with live or contextlib.nullcontext():
            while end is None or time.monotonic() < end:
                self.supervise()
                assert self.reader is not None
                state = read_state(self.reader, self.registry_url, services)
                for line in changes(old, state, seen_events):
                    self.say(line)
                old = state
                if self.scenario is not None and not self.scenario.done:
                    self.scenario.tick(state, time.monotonic())
                    if self.scenario.done:
                        if self.args.exit_after_scenario:
                            break
                        self.say("the story is over; the site keeps running (Ctrl-C stops it)")
                if live is not None:
                    stamp = time.strftime("%H:%M:%S")
                    now = time.monotonic()
                    agents = {name: _agent_text(p, now) for name, p in self.agents.items()}
                    view = render(
                        self.site, state, agents, f"{header}   {stamp}", self.footer(state)
                    )
                    live.update(view, refresh=True)
                self.seen.update(descendants(os.getpid()))
                reap_orphans({p.pid for p in self.procs if p.pid})
                time.sleep(self.args.interval)

    def start_scenario(self) -> None:
        """The assisted-recovery story, on the pair with a database and a held service."""
        from demo_scenario import BatchScenario, held_service

        found = held_service(self.site)
        if self.args.no_scenario or found is None:
            return
        pair, service = found
        self.scenario = BatchScenario(
            pair,
            service,
            hapair=str(self.bin_dir / "hapair"),
            etcd_url=self.etcd_url,
            # The operator acknowledges: over TLS its certificate names it.
            env=self.env(
                **self.etcd_env(OPERATOR), **({"HAPAIR_OPERATOR": OPERATOR} if self.lab else {})
            ),
            crash=self.crash_node,
            ack_after=self.args.ack_after,
            say=self.say,
            now=time.monotonic(),
        )
        self.say(
            f"the story: {service.name} runs on {pair.name}; once {pair.nodes[0].name} is half "
            f"way through a batch, the demo crashes it (as `python {_rel(Path(__file__))} "
            f"crash {pair.nodes[0].name} --server` would)"
        )

    def crash_node(self, node: str) -> str:
        """Kill the node's agent and everything it started, at once; what was killed."""
        proc = self.agents[node]
        if proc.pid is None or not proc.alive():
            return "its agent was not running"
        names: dict[str, int] = {}
        for pid in descendants(proc.pid):
            name = _kind(_cmdline(pid))
            names[name] = names.get(name, 0) + 1
        tree = crash_tree(proc.pid)
        what = ", ".join(f"{n} x{c}" if c > 1 else n for n, c in sorted(names.items()))
        return (
            f"SIGKILL to its agent (pid {proc.pid}) and the {len(tree)} processes it "
            f"started ({what})"
        )

    def stop(self, hurry: list[bool]) -> None:
        self.seen.update(descendants(os.getpid()))
        grace = max((s.stop_grace_s for p in self.site.pairs() for s in p.services), default=5)
        agents = [p for p in self.procs if p.name in self.agents]
        others = [p for p in self.procs if p.name not in self.agents]
        groups: list[tuple[str, list[Proc], float]] = [
            ("agents", agents, grace + 5),
            ("registry", [p for p in others if p.name == "registry"], 5),
            ("etcd", [p for p in others if p.name == "etcd"], 5),
        ]
        for what, live, wait in groups:
            if any(p.alive() for p in live):
                self.say(f"stopping {what} (SIGTERM, SIGKILL after {wait:g} s)")
            stop_procs(live, wait, hurry, self.say)
        kill_leftovers(self.seen, self.say)
        if self.reader is not None:
            self.reader.close()


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from hapair.shared.topology import TopologyError, load

    class QuietOnClose(Console):
        """The reader of our output is gone (``make demo | tee``, then Ctrl-C): stop
        printing, and stop the demo in order instead of exiting on the spot."""

        stopping = False

        def on_broken_pipe(self) -> None:
            self.quiet = True
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            if not self.stopping:
                raise Stop("output closed")

    console = QuietOnClose(highlight=False)

    def say(text: str) -> None:
        with contextlib.suppress(OSError):  # a closed pipe must not stop the clean-up
            console.print(
                f"{time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d} {text}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )

    try:
        site = load(args.site)
    except TopologyError as err:
        say(str(err))
        return 1
    bin_dir = Path(args.bin_dir)
    commands = ("hapair", "hapair-agent", "hapair-registry")
    missing = [n for n in commands if not (bin_dir / n).exists()]
    missing += [n for n in ("etcd",) if shutil.which(n) is None]
    if missing:
        say(
            f"not found: {', '.join(missing)} (in {bin_dir} and PATH). `make demo` installs "
            "etcd and the project's commands into .venv, then runs this."
        )
        return 1
    run_dir = Path(args.run_dir).resolve()
    try:
        lock = _lock(run_dir)
    except DemoError as err:
        say(str(err))
        return 1
    _forget_stale_tmp(run_dir)
    for old in ("logs", "pids", "env", "pki"):
        shutil.rmtree(run_dir / old, ignore_errors=True)
        with contextlib.suppress(OSError):
            (run_dir / old).unlink()
    tmp = Path(tempfile.mkdtemp(prefix="hapair-demo-"))
    (run_dir / "tmpdir").write_text(str(tmp))
    _set_subreaper()

    def interrupt(signum: int, frame: object) -> None:
        raise Stop(signal.Signals(signum).name)

    hurry = [False]

    def hurry_up(signum: int, frame: object) -> None:
        if not hurry[0]:
            hurry[0] = True
            say("stopping at once (SIGKILL)")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    demo = Demo(args, site, bin_dir, run_dir, tmp, say)
    code = 0
    try:
        say(
            f"hapair demo: site {site.site} from {_rel(Path(args.site))}; logs in "
            f"{_rel(run_dir / 'logs')}/"
        )
        demo.start()
        console.print(
            _help(demo.site, run_dir, bin_dir, demo.registry_url, demo.lab),
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        demo.start_scenario()
        demo.watch(console)
        if demo.scenario is not None and args.exit_after_scenario:
            code = 0 if demo.scenario.ok else 1
    except (KeyboardInterrupt, Stop):
        pass
    except DemoError as err:
        say(str(err))
        code = 1
    finally:
        console.stopping = True
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, hurry_up)
        say("stopping everything the demo started (Ctrl-C again: at once)")
        demo.stop(hurry)
        shutil.rmtree(tmp, ignore_errors=True)
        for name in ("pids", "env", "tmpdir", "pki"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
            with contextlib.suppress(OSError):
                (run_dir / name).unlink()
        say(f"stopped; logs kept in {_rel(run_dir / 'logs')}/")
        lock.close()
    return code


def crash(args: argparse.Namespace) -> int:
    """SIGKILL a running demo's agent (and, with --server, all it started, at once)."""
    pid_file = Path(args.run_dir) / "pids" / args.node
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        print(f"no agent {args.node} in a running demo ({pid_file} is missing)", file=sys.stderr)
        return 1
    if "hapair-agent" not in _cmdline(pid):
        print(f"the agent of {args.node} (pid {pid}) is not running", file=sys.stderr)
        return 1
    if not args.server:
        signal_pid(pid, signal.SIGKILL)
        print(f"killed the agent of {args.node} (pid {pid}) with SIGKILL")
        return 0
    tree = crash_tree(pid)
    print(
        f"killed the agent of {args.node} (pid {pid}) and the {len(tree)} processes it "
        f"started ({' '.join(map(str, sorted(tree))) or '-'}) with SIGKILL"
    )
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    run_dir = str(ROOT / "demo-run")
    if argv[:1] == ["crash"]:
        p = argparse.ArgumentParser(prog="demo.py crash", description=crash.__doc__)
        p.add_argument("node")
        p.add_argument(
            "--server",
            action="store_true",
            help="also kill every process the agent started (a server crash)",
        )
        p.add_argument("--run-dir", default=run_dir)
        args = p.parse_args(argv[1:])
        args.command = "crash"
        return args
    p = argparse.ArgumentParser(
        prog="demo.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--site",
        default=str(ROOT / "deploy" / "demo-site.yaml"),
        help="site file (default: deploy/demo-site.yaml)",
    )
    p.add_argument(
        "--registry-port",
        type=int,
        default=8700,
        help="registry port on 127.0.0.1; 0 or taken: a free port (default 8700)",
    )
    p.add_argument(
        "--run-dir",
        default=run_dir,
        help="where logs, PID files and the env file go (default: demo-run/)",
    )
    p.add_argument(
        "--bin-dir",
        default=str(Path(sys.executable).parent),
        help="where hapair, hapair-agent and hapair-registry are (default: beside this Python)",
    )
    p.add_argument(
        "--restart-delay",
        type=float,
        default=5.0,
        help="seconds before a dead process is started again (default 5)",
    )
    p.add_argument(
        "--lab",
        action="store_true",
        help="the lab mode: etcd over plain http:// without certificates, no peer keys "
        "(anyone on the machine can take the site over); default: TLS, its own PKI",
    )
    p.add_argument("--no-restart", action="store_true", help="do not restart dead processes")
    p.add_argument(
        "--no-scenario",
        action="store_true",
        help="do not crash the batch's pair by itself (the assisted-recovery story)",
    )
    p.add_argument(
        "--ack-after",
        type=float,
        default=30.0,
        help="in the story, acknowledge the recovery after this many seconds if nobody "
        "did; negative: wait for the operator (default 30)",
    )
    p.add_argument(
        "--exit-after-scenario",
        action="store_true",
        help="stop once the story is over; exit status 0 if its check passed",
    )
    p.add_argument("--interval", type=float, default=0.5, help="refresh period, s (0.5)")
    p.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="stop by itself after this many seconds (default: run until Ctrl-C)",
    )
    args = p.parse_args(argv)
    args.command = "run"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.command == "crash":
        return crash(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
