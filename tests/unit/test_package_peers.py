"""Packages shared between the nodes of a pair: the site file's ``packages:`` option,
who may read a node's archives, whom a node asks, and how the server's certificate is
judged. No server: certificates from a CA in a temporary directory at most."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from hapair.shared import keys, pki
from hapair.shared.log import EventLog
from hapair.shared.mirror import Mirror
from hapair.shared.package import PEER_PORT, Package
from hapair.shared.records import NodeStatus, PackageStatus
from hapair.shared.store import Kv
from hapair.shared.topology import Pair, TopologyError, parse_site
from hapair.workshop_agent.package_archive import MARKER
from hapair.workshop_agent.package_peers import (
    Choice,
    PeerPackages,
    PeerTls,
    admitted,
    agent_name,
    choose,
    holders,
    server_refusal,
    url,
)
from hapair.workshop_agent.packages import DOWNLOADS, SHARED, Packages
from hapair.workshop_agent.run_as import ServiceUsers

MIRROR = Mirror(None, keys.NODES_PREFIX, lambda _: None)  # type: ignore[arg-type]  # never run
NODES = [
    {"name": "a", "address": "127.0.0.1"},
    {"name": "b", "address": "127.0.0.2"},
    {"name": "c", "address": "fd00::3"},
]


def pair(**extra: Any) -> Pair:
    site = {
        "site": "s",
        "workshops": [{"name": "w", "pairs": [{"name": "p", "nodes": NODES, **extra}]}],
    }
    found = parse_site(site, "site.yaml").pair("p")
    assert found is not None
    return found


# ---- the site file ----------------------------------------------------------------


def test_peers_are_not_asked_unless_the_pair_says_so_and_the_port_is_documented() -> None:
    assert pair().packages.from_peers is False
    assert pair().packages.peer_port == PEER_PORT == 7401
    on = pair(packages={"from_peers": True, "peer_port": 9000})
    assert on.packages.from_peers and on.packages.peer_port == 9000


@pytest.mark.parametrize(
    ("packages", "says"),
    [
        ({"from_peers": "maybe"}, "packages.from_peers: Input should be a valid boolean"),
        ({"from_peers": True, "peer_port": 0}, "packages.peer_port: Input should be greater"),
        ({"from_peer": True}, "packages.from_peer: Extra inputs are not permitted"),
    ],
)
def test_a_bad_packages_section_is_named(packages: dict[str, Any], says: str) -> None:
    with pytest.raises(TopologyError) as caught:
        pair(packages=packages)
    assert any(p.startswith(f"workshops[0].pairs[0].{says}") for p in caught.value.problems), (
        caught.value.problems
    )


def test_the_peer_port_may_not_be_a_service_port_of_the_pair() -> None:
    service = {"name": "web", "command": ["x"], "endpoint": {"port": 7401}}
    pair(services=[service])  # unused while peers are not asked
    with pytest.raises(TopologyError) as caught:
        pair(services=[service], packages={"from_peers": True})
    assert any(
        "7401" in p and "services[0].endpoint.port, packages.peer_port" in p
        for p in caught.value.problems
    ), caught.value.problems


# ---- who may read -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("identity", "refused"),
    [
        ("b", None),
        ("c", None),
        ("a", "'a' is not a node of pair p besides this one"),  # itself: no need
        ("z", "'z' is not a node of pair p besides this one"),
        (None, "no agent certificate of the site CA"),
    ],
)
def test_over_tls_only_a_peers_agent_certificate_is_served(
    identity: str | None, refused: str | None
) -> None:
    # The source address does not count over TLS: the certificate is the identity.
    assert admitted(pair(), "a", identity, "10.9.9.9", tls=True) == refused


@pytest.mark.parametrize(
    ("address", "served"),
    [("127.0.0.2", True), ("fd00::3", True), ("127.0.0.1", False), ("127.0.0.9", False)],
)
def test_in_the_lab_mode_only_a_peers_address_is_served(address: str, served: bool) -> None:
    refused = admitted(pair(), "a", "b", address, tls=False)
    assert (refused is None) == served
    if not served:
        assert refused == f"{address} is not the address of a node of pair p besides this one"


# ---- whom a node asks -------------------------------------------------------------


def status_kv(node: str, packages: list[PackageStatus], raw: bytes | None = None) -> Kv:
    status = NodeStatus(node=node, pair="p", address="127.0.0.9", role="standby", packages=packages)
    return Kv(keys.node_status(node), raw or status.encode(), 1, 1, 0)


def test_a_node_asks_the_peers_whose_status_says_they_hold_the_version_in_pair_order() -> None:
    holds = PackageStatus(service="app", version="2", state="installed", installed=["2-abc", "1-d"])
    older = PackageStatus(service="app", version="2", state="installing", installed=["1-d"])
    other = PackageStatus(service="web", version="2", state="installed", installed=["2-abc"])
    statuses = {
        kv.key: kv
        for kv in (
            status_kv("a", [holds]),  # itself: never asked
            status_kv("b", [holds]),
            status_kv("c", [holds]),
        )
    }
    assert [n.name for n in holders(pair(), "a", statuses, "app", "2-abc")] == ["b", "c"]
    assert [n.name for n in holders(pair(), "b", statuses, "app", "2-abc")] == ["a", "c"]
    statuses[keys.node_status("b")] = status_kv("b", [older, other])
    statuses[keys.node_status("c")] = status_kv("c", [], raw=b"{not json")
    assert holders(pair(), "a", statuses, "app", "2-abc") == []
    assert [n.name for n in holders(pair(), "a", statuses, "app", "1-d")] == ["b"]


V2 = Package(version="2", url="file:///m/app.tar.gz", sha256="c" * 64)


def app_status(node: str, version: str, state: str, installed: list[str]) -> Kv:
    named = PackageStatus(service="app", version=version, state=state, installed=installed)
    return status_kv(node, [named])


@pytest.mark.parametrize(
    ("statuses", "me", "ask", "wait_for", "catching_up"),
    [
        # b holds it: asked, whoever else is still at it.
        (
            {"a": ("2", "installing", []), "b": ("2", "installed", [V2.dir_name])},
            "c",
            ["b"],
            None,
            False,
        ),
        # a, before c, fetches it itself: c waits for it, and b never is.
        ({"a": ("2", "installing", []), "b": ("2", "installing", [])}, "c", [], "a", False),
        ({"a": ("2", "installing", []), "b": ("2", "installing", [])}, "b", [], "a", False),
        # a's status does not name the version yet (its view of the site lags).
        ({"a": ("1", "installed", ["1-x"])}, "b", [], "a", True),
        # Nobody waits for a node after it (a is first), a node down or one that failed.
        ({"b": ("2", "installing", []), "c": ("2", "installing", [])}, "a", [], None, False),
        ({"b": ("2", "installing", [])}, "c", [], "b", False),  # a down: b is waited for
        ({"a": ("2", "failed", []), "b": ("2", "failed", ["1-x"])}, "c", [], None, False),
        ({}, "b", [], None, False),
    ],
)
def test_a_node_waits_for_a_node_before_it_that_fetches_the_version_itself(
    statuses: dict[str, tuple[str, str, list[str]]],
    me: str,
    ask: list[str],
    wait_for: str | None,
    catching_up: bool,
) -> None:
    kvs = {keys.node_status(n): app_status(n, *st) for n, st in statuses.items()}
    choice = choose(pair(), me, kvs, "app", V2)
    assert [n.name for n in choice.ask] == ask
    assert (choice.wait_for, choice.catching_up) == (wait_for, catching_up)


def test_a_node_without_an_entry_for_the_service_is_still_catching_up() -> None:
    kvs = {keys.node_status("a"): status_kv("a", [])}
    assert choose(pair(), "b", kvs, "app", V2) == Choice([], "a", catching_up=True)


def test_a_peers_url_names_the_service_and_version_directory_only() -> None:
    b, c = pair().nodes[1], pair().nodes[2]
    assert url(b, 7401, "app", "2.0-9f2c00000000", tls=True) == (
        "https://127.0.0.2:7401/v1/packages/app/2.0-9f2c00000000"
    )
    assert url(c, 7401, "app", "2-x", tls=False) == "http://[fd00::3]:7401/v1/packages/app/2-x"


# ---- the server's certificate, as the asking node judges it -----------------------


@pytest.fixture
def site_ca(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    pki.init(directory, "Plant A")
    return directory


def der(issued: pki.Issued) -> bytes:
    return issued.certificate.public_bytes(serialization.Encoding.DER)


def test_the_server_must_show_the_agent_certificate_of_the_node_asked(
    site_ca: Path, tmp_path: Path
) -> None:
    anchors = [pki.load_certificate(site_ca / pki.CA_CERT)]
    b = pki.issue(site_ca, "agent", "b")
    assert agent_name(b.certificate) == "b"
    assert server_refusal(der(b), "b", anchors) is None
    refused = server_refusal(der(b), "c", anchors)
    assert refused == "its certificate names 'b', not 'c'"
    assert server_refusal(None, "b", anchors) == "it showed no certificate"
    # Another kind of component of the same CA never speaks for a node, whatever its CN.
    registry = pki.issue(site_ca, "registry", "c", ["127.0.0.3"])
    assert agent_name(registry.certificate) is None
    assert (
        server_refusal(der(registry), "c", anchors) == "its certificate names 'no agent', not 'c'"
    )
    # An agent certificate of another CA is nobody here.
    other = tmp_path / "other"
    pki.init(other, "Plant B")
    stranger = pki.issue(other, "agent", "b")
    refused = server_refusal(der(stranger), "b", anchors)
    assert refused is not None and refused.startswith(
        "its certificate is not an agent certificate of the site CA"
    )
    assert server_refusal(b"junk", "b", anchors) is not None


def test_peer_tls_needs_this_agents_certificate_and_checks_the_server_itself(
    site_ca: Path,
) -> None:
    with pytest.raises(pki.PkiError, match="no agent certificate and key are given"):
        PeerTls.of(pki.TlsFiles(site_ca / pki.CA_CERT))
    pki.issue(site_ca, "agent", "a")
    tls = PeerTls.of(pki.TlsFiles.issued(site_ca, "a"))
    server = tls.server_context()
    assert server.verify_mode == ssl.CERT_REQUIRED  # no certificate, no answer
    client = tls.client_context()
    # An agent's certificate is a client's: OpenSSL would refuse it as a server's, so
    # server_refusal judges it instead, before a byte of the body is read.
    assert client.verify_mode == ssl.CERT_NONE and not client.check_hostname
    assert client.minimum_version == ssl.TLSVersion.TLSv1_2


# ---- what a node keeps ------------------------------------------------------------


def test_retention_removes_a_services_old_downloads_and_kept_archives_alone(
    tmp_path: Path,
) -> None:
    def pkg(version: str, digit: str) -> Package:
        return Package(version=version, url="file:///m/app.tar.gz", sha256=digit * 64)

    v1, v2 = pkg("1.0", "a"), pkg("2.0", "b")
    pair_ = pair(packages={"from_peers": True})
    node = pair_.nodes[0]
    packages = Packages(
        tmp_path,
        ServiceUsers(),
        EventLog("test"),
        place=lambda: (pair_, node),
        event=lambda *a, **k: None,
        changed=lambda: None,
        peers=PeerPackages(EventLog("test"), None, place=lambda: (pair_, node), nodes=MIRROR),
    )
    packages._wanted = {"app": v2, "app-x": pkg("1.0", "c")}
    root = tmp_path / "packages"
    for version in (v1, v2):
        (root / "app" / version.dir_name).mkdir(parents=True)
        (root / "app" / version.dir_name / MARKER).write_text("{}")
    shared, downloads = root / SHARED / "app", root / DOWNLOADS
    shared.mkdir(parents=True)
    downloads.mkdir()
    for name in ("0.9-000000000000", v1.dir_name, v2.dir_name):
        (shared / name).write_bytes(b"archive")
    for name in ("app-0.9-x.part", "app-0.9-x.peer", "app-x-1.0-cccccccccccc.part"):
        (downloads / name).write_bytes(b"part")
    (downloads / f"app-{v2.dir_name}.peer").write_bytes(b"part")

    packages._retain("app", v2, busy=set())
    # Its last two versions, and their archives for the peers, are kept; another
    # service's download whose name starts the same is left alone.
    assert sorted(p.name for p in shared.iterdir()) == sorted([v1.dir_name, v2.dir_name])
    assert sorted(p.name for p in downloads.iterdir()) == sorted(
        ["app-x-1.0-cccccccccccc.part", f"app-{v2.dir_name}.peer"]
    )
    assert packages.shared_file("app", v2.dir_name) == shared / v2.dir_name
    assert packages.shared_file("app", v1.dir_name) is None  # not the version named now
    assert packages.shared_file("app-x", "1.0-cccccccccccc") is None  # not installed
