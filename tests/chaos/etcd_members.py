"""A three-member etcd, each member in its own host of the lab, killed and restarted by PID."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

from hapair.shared.pki import Kind
from tests.support.harness import ETCD, Etcd, server_tls, stop_pid
from tests.support.netns import Lab, sh
from tests.support.tls_etcd import TestPki

CLIENT_PORT = 2379
PEER_PORT = 2380
CTL_TIMEOUT_S = 3.0


class EtcdMembers(Etcd):
    """The site's etcd: ``url`` lists every member, as agents are given it in a plant.

    Members keep their data directories, so a killed member restarts with its data and
    rejoins, as after a power cut. The caller must be able to reach the hosts (it runs
    inside the lab). With ``pki``, TLS and client certificates on both ports, as in a
    plant: each member shows its own certificate, issued for its address (and for
    127.0.0.1, where :class:`etcd_lab.EtcdLab` forwards clients to it); without, the lab
    mode."""

    def __init__(
        self, lab: Lab, names: tuple[str, ...], root: Path, pki: TestPki | None = None
    ) -> None:
        super().__init__(
            host=lab[names[0]].address,
            client_port=CLIENT_PORT,
            peer_port=PEER_PORT,
            data_dir=str(root),
            pki=pki,
        )
        self.lab = lab
        self.names = names
        self.root = root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # The cluster's ID derives from the members' peer URLs and this token. The peer
        # URLs are the same in every lab (its own namespaces, its own addresses), and the
        # agents' node locks are per cluster ID and node: two labs at once (two test
        # workers) must not share one, or an agent of one refuses to start beside the
        # other's ("another hapair-agent runs for node a").
        self.token = f"hapair-{os.getpid()}-{secrets.token_hex(4)}"

    @property
    def url(self) -> str:
        return ",".join(self.member_url(n) for n in self.names)

    def member_url(self, name: str) -> str:
        return f"{self.scheme}://{self.lab[name].address}:{CLIENT_PORT}"

    def client_url(self, name: str) -> str:
        """Where this process reaches ``name`` to look at it (``etcdctl``)."""
        return self.member_url(name)

    def _peer_url(self, name: str) -> str:
        return f"{self.scheme}://{self.lab[name].address}:{PEER_PORT}"

    def member_tls(self, name: str) -> list[str]:
        """``name``'s TLS options (none in the lab mode)."""
        if self.pki is None:
            return []
        address = self.lab[name].address
        return server_tls(self.pki.files(f"etcd-{name}", Kind.ETCD, [address, "127.0.0.1"]))

    def start(self, wait: bool = True) -> EtcdMembers:
        for name in self.names:  # together: a member is ready only once a quorum is up
            self.start_member(name)
        if wait:
            self.wait_healthy(self.names, 20.0)
        return self

    def start_member(self, name: str) -> None:
        """Start (or restart, on its old data) one member."""
        old = self.procs.get(name)
        if old is not None and old.poll() is None:
            return
        cluster = ",".join(f"{n}={self._peer_url(n)}" for n in self.names)
        log = (self.root / f"{name}.log").open("ab")
        self.procs[name] = self.lab.spawn(
            self.lab[name],
            ETCD,
            "--name", name,
            "--data-dir", str(self.root / name),
            "--logger", "zap",
            "--log-level", "error",
            "--listen-client-urls", self.member_url(name),
            "--advertise-client-urls", self.member_url(name),
            "--listen-peer-urls", self._peer_url(name),
            "--initial-advertise-peer-urls", self._peer_url(name),
            "--initial-cluster", cluster,
            "--initial-cluster-token", self.token,
            "--initial-cluster-state", "new",  # ignored once the data dir exists
            "--pre-vote",  # off by default in etcd 3.4: docs/operations.md, "etcd in a plant"
            *self.member_tls(name),
            stdout=log,
            stderr=log,
        )  # fmt: skip
        log.close()

    def kill(self, name: str) -> None:
        """SIGKILL one member, as a crash of its server would stop it."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)

    def running(self) -> list[str]:
        return [n for n in self.names if n in self.procs and self.procs[n].poll() is None]

    def _ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return sh(
            "etcdctl",
            "--dial-timeout=1s",
            "--command-timeout=1s",
            *self.ctl_tls(),
            *args,
            timeout=CTL_TIMEOUT_S,
            check=False,
        )

    def leader(self) -> str | None:
        """The member that leads the raft group now, as the members themselves say."""
        ids: dict[int, str] = {}
        leader_id = None
        for name in self.running():
            out = self._ctl(
                f"--endpoints={self.client_url(name)}", "endpoint", "status", "-w", "json"
            )
            with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
                status = json.loads(out.stdout)[0]["Status"]
                ids[int(status["header"]["member_id"])] = name
                leader_id = int(status["leader"]) or leader_id
        return None if leader_id is None else ids.get(leader_id)

    def healthy(self) -> list[str]:
        """The members that answer a quorum read (``endpoint health``)."""
        ok = []
        for name in self.running():
            out = self._ctl(f"--endpoints={self.client_url(name)}", "endpoint", "health")
            if out.returncode == 0 and "is healthy" in out.stdout + out.stderr:
                ok.append(name)
        return ok

    def wait_healthy(self, names: tuple[str, ...], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if set(names) <= set(self.healthy()):
                return
            time.sleep(0.1)
        raise AssertionError(f"etcd members {names} not healthy after {timeout}s")

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_pid(proc)

    def cleanup(self) -> None:
        # The data dirs live in the run's directory, removed with it.
        self.stop()
