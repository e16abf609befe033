"""What the watchdog loads: at start, its etcd target checked but nothing that speaks to
etcd (``lease_revoke``, sockets); that only at the agent's death, to revoke its lease."""

from __future__ import annotations

import subprocess
import sys

from tests.support.harness import free_port

START = """
import sys
import hapair.workshop_agent.watchdog as watchdog

target = watchdog._target(["--etcd", "https://127.0.0.1:2379", "--etcd-ca", "/p/ca.crt"])
assert target is not None and target.secure
print(sorted(m for m in (
    "hapair.workshop_agent.lease_revoke", "socket", "ssl", "dataclasses", "inspect"
) if m in sys.modules))
"""

WATCHDOG = [sys.executable, "-m", "hapair.workshop_agent.watchdog"]
EXITS_WITHIN_S = 20.0  # generous: the watchdog exits at once when its pipe closes


def test_a_fresh_watchdog_checks_its_target_but_loads_nothing_that_speaks_to_etcd() -> None:
    out = subprocess.run(
        [sys.executable, "-c", START], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_a_bad_target_is_said_at_start() -> None:
    """Before anything is registered, before the agent's death: the log says the lease
    will only expire, and why."""
    proc = subprocess.Popen(
        [*WATCHDOG, "--etcd", "https://127.0.0.1:2379"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None and proc.stdin is not None
    try:
        first = proc.stderr.readline()  # written before the watchdog reads its pipe
    finally:
        proc.stdin.close()
        proc.wait(EXITS_WITHIN_S)
        proc.stderr.close()
    assert "etcd not usable, the agent's lease will expire on its own" in first
    assert "https:// etcd endpoints need the CA" in first


def test_at_the_agent_s_death_the_watchdog_loads_the_revoke_and_tries_it() -> None:
    """A lease registered, etcd nowhere (a port nothing listens on): the watchdog, loading
    ``lease_revoke`` only now, tries to revoke and says it could not."""
    port = free_port()
    out = subprocess.run(
        [*WATCHDOG, "--etcd", f"http://127.0.0.1:{port}"],
        input="lease 1f\n",
        capture_output=True,
        text=True,
        timeout=EXITS_WITHIN_S,
    )
    assert "could not revoke the agent's lease: it will expire" in out.stderr
    assert f"127.0.0.1:{port}" in out.stderr


def test_a_revoke_that_cannot_be_loaded_leaves_the_lease_to_expire() -> None:
    """Loaded late, ``lease_revoke`` may fail to load (its package replaced under the
    long-lived watchdog): the watchdog says so and ends as it would have, not with a
    traceback halfway through its work."""
    script = (
        "import sys\n"
        "sys.modules['hapair.workshop_agent.lease_revoke'] = None  # any import of it fails\n"
        "from hapair.workshop_agent import watchdog\n"
        "watchdog.main()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, "--etcd", f"http://127.0.0.1:{free_port()}"],
        input="lease 1f\n",
        capture_output=True,
        text=True,
        timeout=EXITS_WITHIN_S,
    )
    assert out.returncode == 0, out.stderr
    assert "cannot load the lease revoke: the agent's lease will expire" in out.stderr
    assert "Traceback" not in out.stderr
