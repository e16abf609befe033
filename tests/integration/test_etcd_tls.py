"""The store over TLS to a real etcd that requires client certificates: it works with an
agent's certificate from ``hapair pki``; without a CA for ``https://``, without a
certificate, or with another CA's certificate, it is refused with a clear error."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hapair.shared import keys, pki
from hapair.shared.etcd_tls import EtcdTlsError
from hapair.shared.store import Store, StoreError
from tests.support.cluster import until
from tests.support.etcd_relay import EtcdRelay
from tests.support.tls_etcd import TlsEtcd, running_tls_etcd

DEADLINE_S = 20.0


@dataclass
class Site:
    pki: Path
    other: Path  # another CA, with an agent certificate of the same name


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    d, other = tmp_path_factory.mktemp("pki"), tmp_path_factory.mktemp("other")
    pki.init(d, "Plant A")
    pki.issue(d, "etcd", "etcd-1", ["127.0.0.1"])
    for kind, name in (("agent", "n1"), ("admin", "root")):
        pki.issue(d, kind, name)
    pki.init(other, "Plant A")
    pki.issue(other, "agent", "n1")
    return Site(d, other)


@pytest.fixture(scope="module")
def etcd(site: Site) -> Iterator[TlsEtcd]:
    with running_tls_etcd(site.pki, admin="root") as server:
        yield server


async def test_the_store_works_over_tls_with_an_agent_certificate(
    site: Site, etcd: TlsEtcd
) -> None:
    store = Store(etcd.url, timeout=5.0, tls=pki.TlsFiles.issued(site.pki, "n1"))
    assert store.secure
    key = keys.PREFIX + "/tls/k"
    try:
        async with asyncio.timeout(DEADLINE_S):
            lease = await store.grant(2)
            await store.put(key, b"v1", lease=lease)
            got = await store.get(key)
            assert got is not None and got.value == b"v1" and got.lease == lease
            assert await store.keepalive(lease) > 0

            # A watch over the same TLS connection sees a change made after it opened.
            opened = asyncio.Event()
            changes = store.watch_prefix(keys.PREFIX + "/tls/", got.mod_revision + 1, opened.set)
            first = asyncio.ensure_future(anext(changes))
            await opened.wait()
            await store.put(key, b"v2", lease=lease)
            change = await first
            assert change.kv.key == key and change.kv.value == b"v2"
            await changes.aclose()
            await store.revoke(lease)
            assert await store.get(key) is None
    finally:
        await store.close()


async def test_the_store_reaches_etcd_over_a_slow_handshake(site: Site, etcd: TlsEtcd) -> None:
    """etcd's bytes arrive 150 ms late (a loaded etcd, a slow link): a TLS handshake, two
    of etcd's flights before the connection is up, takes ~0.3 s. The store's connection
    attempts must be given that long: given 100-250 ms each and started over from
    nothing, none completed, and no call was ever answered."""
    relay = EtcdRelay(etcd.url)
    await relay.heal()
    relay.slow(0.15)
    store = Store(relay.url, timeout=2.0, tls=pki.TlsFiles.issued(site.pki, "n1"))

    async def answered() -> bool:
        await store.get(keys.TOPOLOGY)
        return True

    try:
        await until(answered, DEADLINE_S, "an answer from etcd through the slow relay")
    finally:
        await store.close()
        await relay.cut()


async def test_a_watch_given_up_during_a_slow_handshake_leaves_the_connection_be(
    site: Site, etcd: TlsEtcd
) -> None:
    """etcd's bytes arrive 0.3 s late: the connection is up after ~0.6 s, longer than the
    store waits for a watch to open (0.5 s). A watch asked for meanwhile times out; the
    connection being made must go on, so that a watch asked for again finds it up. Thrown
    away with each watch given up and started over, it was never up in time for one."""
    relay = EtcdRelay(etcd.url)
    await relay.heal()
    relay.slow(0.3)
    store = Store(relay.url, timeout=0.5, tls=pki.TlsFiles.issued(site.pki, "n1"))

    async def a_watch_opens() -> bool:
        opened = asyncio.Event()
        changes = store.watch_prefix(keys.PREFIX + "/tls-slow/", 0, opened.set)
        first = asyncio.ensure_future(anext(changes))
        seen = asyncio.ensure_future(opened.wait())
        try:
            await asyncio.wait({first, seen}, return_when=asyncio.FIRST_COMPLETED)
            if first.done():
                first.result()  # the store's error: asked again
            return opened.is_set()
        finally:
            for task in (first, seen):
                task.cancel()
            await asyncio.wait({first, seen})
            await changes.aclose()

    try:
        await until(a_watch_opens, DEADLINE_S, "a watch opened through the slow relay")
    finally:
        await store.close()
        await relay.cut()


def test_https_without_a_ca_is_refused_naming_the_option(etcd: TlsEtcd) -> None:
    with pytest.raises(EtcdTlsError, match="--etcd-ca"):
        Store(etcd.url)
    with pytest.raises(ValueError, match="mix http:// and https://"):
        Store(f"{etcd.url},http://127.0.0.1:2379")


async def refused(store: Store) -> str:
    """The error of a read through ``store``, which must fail."""
    try:
        async with asyncio.timeout(DEADLINE_S):
            with pytest.raises(StoreError) as err:
                await store.get(keys.TOPOLOGY)
    finally:
        await store.close()
    return str(err.value)


async def test_a_client_without_a_certificate_is_refused(site: Site, etcd: TlsEtcd) -> None:
    text = await refused(Store(etcd.url, tls=pki.TlsFiles(site.pki / pki.CA_CERT)))
    assert etcd.url.split("//")[1] in text


async def test_a_certificate_of_another_ca_is_refused(site: Site, etcd: TlsEtcd) -> None:
    stranger = pki.TlsFiles(site.pki / pki.CA_CERT, site.other / "n1.crt", site.other / "n1.key")
    await refused(Store(etcd.url, tls=stranger))


def test_a_key_others_may_read_is_refused_before_any_connection(
    site: Site, etcd: TlsEtcd, tmp_path: Path
) -> None:
    key = tmp_path / "n1.key"
    key.write_bytes((site.pki / "n1.key").read_bytes())
    os.chmod(key, 0o644)
    files = pki.TlsFiles(site.pki / pki.CA_CERT, site.pki / "n1.crt", key)
    with pytest.raises(EtcdTlsError, match="chmod 600"):
        Store(etcd.url, tls=files)
    with pytest.raises(EtcdTlsError, match="not the key of"):
        Store(etcd.url, tls=pki.TlsFiles(files.ca, site.pki / "root.crt", site.pki / "n1.key"))


@pytest.mark.parametrize(
    "command",
    [
        ["hapair", "status"],
        ["hapair-agent", "--node", "n1"],
        ["hapair-registry"],
        ["hapair-comm", "--node", "n1", "--pair", "p"],
    ],
)
def test_every_component_refuses_https_without_a_ca(command: list[str], etcd: TlsEtcd) -> None:
    """Each component that talks to etcd takes the TLS options, and none falls back to
    plain when they are missing: it exits 2 before connecting, naming the option."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAPAIR_")}
    exe = str(Path(sys.executable).parent / command[0])
    run = subprocess.run(
        [exe, *command[1:], "--etcd", etcd.url], capture_output=True, text=True, env=env, timeout=30
    )
    assert run.returncode == 2, run
    assert "--etcd-ca (or HAPAIR_ETCD_CA)" in run.stderr and "Traceback" not in run.stderr
    # "hapair" has its options on each command, the daemons on their own.
    help_args = command[1:2] if command[0] == "hapair" else []
    help_text = subprocess.run([exe, *help_args, "--help"], capture_output=True, text=True)
    assert "--etcd-cert" in help_text.stdout and "--etcd-key" in help_text.stdout
