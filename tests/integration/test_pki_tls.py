"""Certificates from ``hapair pki`` in real TLS: a mutual handshake with Python's ``ssl``
over 127.0.0.1, and a real etcd serving and peering with an ``etcd`` certificate that
takes an ``admin`` certificate's CN as its user and refuses clients without one."""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from asyncua import ua
from asyncua.client.client import Client
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.uacrypto import CertProperties
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.server import Server as UaServer
from asyncua.ua.uaerrors import BadCertificateUntrusted

from hapair.shared import pki
from tests.support.harness import free_port
from tests.support.tls_etcd import TlsEtcd, running_tls_etcd

DEADLINE_S = 10.0


@dataclass
class Site:
    pki: Path  # the site's CA and certificates
    other: Path  # another CA, with a certificate of the same name


@pytest.fixture
def site(tmp_path: Path) -> Site:
    d, other = tmp_path / "pki", tmp_path / "other"
    pki.init(d, "Plant A")
    pki.issue(d, "etcd", "etcd-1", ["127.0.0.1"], ["localhost"])
    for kind, name in (("agent", "n1"), ("admin", "root"), ("operator", "alice")):
        pki.issue(d, kind, name)
    pki.init(other, "Plant A")
    pki.issue(other, "agent", "n1")
    return Site(d, other)


# ---- Python ssl -------------------------------------------------------------------


@dataclass
class Listening:
    port: int
    seen: list[str | None]  # the CN of each client whose handshake succeeded


async def serving(context: ssl.SSLContext) -> tuple[asyncio.Server, Listening]:
    seen: list[str | None] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        name = pki.peer_common_name(writer.get_extra_info("ssl_object"))
        seen.append(name)
        writer.write(f"hello {name}\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    return server, Listening(server.sockets[0].getsockname()[1], seen)


async def ask(port: int, context: ssl.SSLContext, hostname: str = "127.0.0.1") -> str:
    """The server's answer, or the reason the connection was refused."""
    async with asyncio.timeout(DEADLINE_S):
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname=hostname
            )
            try:
                # Under TLS 1.3 the server checks the client's certificate after the
                # client's side of the handshake is done: a refusal shows on this read.
                return (await reader.readline()).decode().strip() or "refused: closed"
            finally:
                writer.close()
        except (ssl.SSLError, ConnectionError) as err:
            return f"refused: {err}"


async def test_mutual_tls_between_an_etcd_and_an_agent_certificate(site: Site) -> None:
    listener, server = await serving(pki.TlsFiles.issued(site.pki, "etcd-1").server_context())
    try:
        agent = pki.TlsFiles.issued(site.pki, "n1").client_context()
        assert await ask(server.port, agent) == "hello n1"
        assert await ask(server.port, agent, hostname="localhost") == "hello n1"
        assert server.seen == ["n1", "n1"]

        # A client whose certificate another CA signed, and one without a certificate,
        # are refused before the server reads a byte of theirs.
        stranger = pki.TlsFiles(
            site.pki / pki.CA_CERT, site.other / "n1.crt", site.other / "n1.key"
        ).client_context()
        assert (await ask(server.port, stranger)).startswith("refused")
        anonymous = pki.TlsFiles(site.pki / pki.CA_CERT).client_context()
        assert (await ask(server.port, anonymous)).startswith("refused")
        # The client checks the server's name against its certificate.
        wrong_name = await ask(server.port, agent, hostname="etcd-2.plant")
        assert wrong_name.startswith("refused") and "Hostname mismatch" in wrong_name
        assert server.seen == ["n1", "n1"]
    finally:
        listener.close()
        await listener.wait_closed()


async def test_a_client_certificate_cannot_serve(site: Site) -> None:
    """An agent's certificate has no serverAuth: a client refuses it as a server's, even
    for the address it connects to."""
    pki.issue(site.pki, "agent", "n2")
    listener, server = await serving(pki.TlsFiles.issued(site.pki, "n2").server_context())
    try:
        admin = pki.TlsFiles.issued(site.pki, "root").client_context()
        answer = await ask(server.port, admin)
        assert answer.startswith("refused") and "certificate verify failed" in answer
        assert server.seen == []
    finally:
        listener.close()
        await listener.wait_closed()


# ---- etcd -------------------------------------------------------------------------


@pytest.fixture
def etcd(site: Site) -> Iterator[TlsEtcd]:
    with running_tls_etcd(site.pki, admin="root") as server:
        yield server


def ok(run: object) -> str:
    assert getattr(run, "returncode", None) == 0, run
    return str(getattr(run, "stdout", ""))


def test_etcd_serves_and_peers_with_an_etcd_certificate_and_refuses_clients_without_one(
    site: Site, etcd: TlsEtcd
) -> None:
    ok(etcd.etcdctl("put", "/t/k", "v1", identity="root"))
    assert ok(etcd.etcdctl("get", "/t/k", "--print-value-only", identity="root")).strip() == "v1"
    # The member talks to itself as a peer over its peer URL with the same certificate.
    members = json.loads(ok(etcd.etcdctl("member", "list", "-w", "json", identity="root")))
    assert members["members"][0]["peerURLs"] == [etcd.peer_url]

    refused = etcd.etcdctl("get", "/t/k", identity=None)
    assert refused.returncode != 0 and "v1" not in refused.stdout
    stranger = etcd.etcdctl("get", "/t/k", identity="n1", pki_dir=site.other)
    assert stranger.returncode != 0 and "v1" not in stranger.stdout

    # The same with Python's ssl and the contexts hapair builds: GET /version.
    def version(files: pki.TlsFiles) -> str:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", etcd.client_port, context=files.client_context(), timeout=DEADLINE_S
        )
        try:
            connection.request("GET", "/version")
            return str(json.loads(connection.getresponse().read())["etcdserver"])
        except (ssl.SSLError, ConnectionError) as err:
            return f"refused: {err}"
        finally:
            connection.close()

    assert version(pki.TlsFiles.issued(site.pki, "root")).startswith("3.")
    assert version(pki.TlsFiles(site.pki / pki.CA_CERT)).startswith("refused")


def test_etcd_takes_the_certificate_cn_as_its_user(site: Site, etcd: TlsEtcd) -> None:
    """With auth on, a certificate's CN is the etcd user: the admin's ``root`` may do
    everything, the agent ``n1`` only what its role grants, ``alice`` (no such user)
    nothing."""

    def root(*args: str) -> str:
        return ok(etcd.etcdctl(*args, identity="root"))

    root("user", "add", "root", "--no-password")
    root("user", "grant-role", "root", "root")
    root("user", "add", "n1", "--no-password")
    root("role", "add", "reader")
    root("role", "grant-permission", "reader", "read", "/t/", "--prefix=true")
    root("user", "grant-role", "n1", "reader")
    root("put", "/t/k", "v1")
    root("auth", "enable")

    root("put", "/t/k", "v2")
    assert ok(etcd.etcdctl("get", "/t/k", "--print-value-only", identity="n1")).strip() == "v2"
    denied = etcd.etcdctl("put", "/t/k", "n1 was here", identity="n1")
    assert denied.returncode != 0 and "permission denied" in denied.stderr
    unknown = etcd.etcdctl("get", "/t/k", identity="alice")
    assert unknown.returncode != 0 and "v2" not in unknown.stdout
    assert root("get", "/t/k", "--print-value-only").strip() == "v2"


# ---- OPC UA -----------------------------------------------------------------------


async def test_opc_ua_sign_and_encrypt_with_comm_certificates(site: Site, tmp_path: Path) -> None:
    """A comm certificate serves OPC UA's Basic256Sha256 (RSA) with asyncua: a client
    with an opcua-client certificate of the site CA reads signed and encrypted; the server, trusting
    the site CA alone, refuses a client whose certificate another CA signed."""
    host = "127.0.0.1"
    port = free_port(host)
    url = f"opc.tcp://{host}:{port}/hapair/"
    server_uri, client_uri = "urn:hapair:comm:line1:n1", "urn:plant:hmi-1"
    pki.issue(site.pki, "comm", "comm-1", [host], uri=server_uri)
    pki.issue(site.pki, "opcua-client", "hmi-1", uri=client_uri)
    pki.issue(site.other, "opcua-client", "hmi-1", uri=client_uri)
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    # asyncua's trust store reads *.pem and *.der files only.
    shutil.copy(site.pki / pki.CA_CERT, trusted / "ca.pem")

    server = UaServer()
    await server.init()
    server.set_endpoint(url)
    await server.set_application_uri(server_uri)
    server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
    await server.load_certificate(str(site.pki / "comm-1.crt"), format="pem")
    await server.load_private_key(str(site.pki / "comm-1.key"), format="pem")
    store = TrustStore([trusted], [])
    await store.load()
    server.set_certificate_validator(
        CertificateValidator(
            CertificateValidatorOptions.TRUSTED_VALIDATION
            | CertificateValidatorOptions.PEER_CLIENT,
            store,
        )
    )

    async def service_level(directory: Path) -> int:
        client = Client(url, timeout=DEADLINE_S)
        client.application_uri = client_uri
        await client.set_security(
            SecurityPolicyBasic256Sha256,
            CertProperties(directory / "hmi-1.crt", extension="pem"),
            CertProperties(directory / "hmi-1.key", extension="pem"),
            server_certificate=CertProperties(site.pki / "comm-1.crt", extension="pem"),
            mode=ua.MessageSecurityMode.SignAndEncrypt,
        )
        async with client:
            return int(await client.nodes.service_level.read_value())

    async with server:
        assert await service_level(site.pki) == 255  # what Server.init() writes
        with pytest.raises(BadCertificateUntrusted):
            await service_level(site.other)
