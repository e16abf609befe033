"""Packages shared between the nodes of a pair (``packages: {from_peers: true}``).

Each agent serves the archives it installed and verified, read-only, on
``{node.address}:{packages.peer_port}`` (TCP), at ``/v1/packages/{service}/{version_dir}``
and nowhere else: the version the site names now, once installed here; no listing, 404
for anything else. Only the pair's other nodes may read:

- over TLS (the secure default: the agent's etcd runs over TLS), each end shows its
  agent certificate of the site CA, the one it shows etcd, and checks the other's: the
  server requires a client certificate of the CA whose CN is one of its peers' names;
  the client checks that the server's certificate is the agent certificate of the node
  it asked (the CA, the CN, and clientAuth: an agent's certificate is a client's, so
  OpenSSL's own server check, which wants serverAuth, is replaced by this one);
- in the lab mode (the agent's etcd in clear), in clear to the peers' addresses alone,
  which anyone on the network can spoof: said in a warning at start.

A node asks the peers whose status says they hold the version. When none does yet but
a node before it in the pair's order is fetching that version itself, it waits for that
node (the origin's link then carries each version once): as long as that node's status
says it is installing the version (its own download is bounded), or, while its status
does not name the version yet (its view of the site lags), for ``CATCH_UP_S``. A node
that is down, or whose install failed, is not waited for.

A peer is never trusted for content: the fetching node checks the sha256 the site file
names (``packages.py``) and falls back to the origin on any failure.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hapair.shared import keys, pki
from hapair.shared.lazy import LazyModule
from hapair.shared.log import EventLog
from hapair.shared.mirror import Mirror
from hapair.shared.package import Package
from hapair.shared.pki import PkiError, TlsFiles
from hapair.shared.records import NodeStatus, RecordError, decode_shared
from hapair.shared.store import Kv
from hapair.shared.topology import Node, Pair
from hapair.shared.waits import wait_event

if TYPE_CHECKING:
    # Loaded when a pair serves its peers: an agent that never does has no use for
    # aiohttp (about 11 MiB of its memory) nor cryptography (about 9).
    from aiohttp import web
    from aiohttp.typedefs import Handler
    from cryptography import x509
    from cryptography.x509 import oid, verification
else:
    x509 = LazyModule("cryptography.x509")
    oid = LazyModule("cryptography.x509.oid")
    verification = LazyModule("cryptography.x509.verification")
from hapair.workshop_agent.package_fetch import Fetcher, Limits

ROUTE = "/v1/packages/{service}/{version}"
# A peer is on the pair's own network: a silent one is given up soon, for the origin.
LIMITS = Limits(read_s=10.0, attempts=2, backoff_s=0.5, backoff_max_s=2.0)
TRANSFERS = 4  # served at once; more are answered 503 (the asker tries again, or the origin)
RECONCILE_S = 1.0
# Whom to ask comes from the peers' statuses: just after the agent starts, they are
# awaited that long (then the origin is asked).
STATUSES_S = 5.0
CATCH_UP_S = 10.0  # an earlier node whose status does not name the version yet
WAIT_S = Limits().total_s  # an earlier node installing it: as long as its download may take
POLL_S = 1.0
SharedFile = Callable[[str, str], Path | None]


# ---- who may read, and whom a node reads from (pure) ----------------------------------


def peers_of(pair: Pair, me: str) -> list[Node]:
    return [n for n in pair.nodes if n.name != me]


def admitted(
    pair: Pair, me: str, identity: str | None, address: str | None, tls: bool
) -> str | None:
    """Why a request is refused (None: a peer's, served). Over TLS ``identity`` is the
    agent name the client's verified certificate gives; in the lab mode only the source
    ``address`` can be checked."""
    if tls:
        if identity is None:
            return "no agent certificate of the site CA"
        if identity not in {n.name for n in peers_of(pair, me)}:
            return f"{identity!r} is not a node of pair {pair.name} besides this one"
        return None
    if address not in {n.address for n in peers_of(pair, me)}:
        return f"{address} is not the address of a node of pair {pair.name} besides this one"
    return None


def _status(statuses: Mapping[str, Kv], node: str) -> NodeStatus | None:
    """A node's published status; one that does not decode counts as none."""
    kv = statuses.get(keys.node_status(node))
    if kv is None:
        return None
    try:
        return decode_shared(NodeStatus, kv.value, kv.key)
    except RecordError:
        return None


def holders(
    pair: Pair, me: str, statuses: Mapping[str, Kv], service: str, version_dir: str
) -> list[Node]:
    """The peers whose published status says they hold ``service``'s ``version_dir``,
    in the pair's order."""
    found = []
    for node in peers_of(pair, me):
        status = _status(statuses, node.name)
        packages = status.packages if status is not None else []
        if any(p.service == service and version_dir in p.installed for p in packages):
            found.append(node)
    return found


@dataclass(frozen=True)
class Choice:
    """Whom a node asks for a version: ``ask``, the peers that hold it, in the pair's
    order; or none yet, ``wait_for`` naming a node before it that fetches the version
    itself (``catching_up``: its status does not name the version yet)."""

    ask: list[Node]
    wait_for: str | None = None
    catching_up: bool = False


def choose(
    pair: Pair, me: str, statuses: Mapping[str, Kv], service: str, package: Package
) -> Choice:
    found = holders(pair, me, statuses, service, package.dir_name)
    if found:
        return Choice(found)
    for node in pair.nodes:
        if node.name == me:
            break  # only a node before this one is waited for: nobody waits in a circle
        status = _status(statuses, node.name)
        if status is None:
            continue  # down, or not started: not waited for
        named = next((p for p in status.packages if p.service == service), None)
        if named is None or named.version != package.version:
            return Choice([], node.name, catching_up=True)
        if named.state == "installing":
            return Choice([], node.name)
    return Choice([])


def url(node: Node, port: int, service: str, version_dir: str, tls: bool) -> str:
    host = f"[{node.address}]" if ":" in node.address else node.address
    path = ROUTE.format(service=service, version=version_dir)
    return f"{'https' if tls else 'http'}://{host}:{port}{path}"


def agent_name(certificate: x509.Certificate) -> str | None:
    """The node a certificate names: its CN, unless ``hapair pki`` issued it to another
    kind of component (its OU names the kind), which never speaks for a node."""
    kinds = certificate.subject.get_attributes_for_oid(oid.NameOID.ORGANIZATIONAL_UNIT_NAME)
    if any(str(k.value) in set(pki.Kind) - {pki.Kind.AGENT} for k in kinds):
        return None
    return pki.common_name(certificate) or None


def server_refusal(der: bytes | None, node: str, anchors: list[x509.Certificate]) -> str | None:
    """Why the certificate a peer's server showed is not ``node``'s agent certificate of
    the site CA (None: it is)."""
    if der is None:
        return "it showed no certificate"
    try:
        certificate = x509.load_der_x509_certificate(der)
    except ValueError as err:
        return f"its certificate does not parse ({err})"
    # An agent's certificate names no address (its CN is its identity, as etcd reads it).
    leaf = verification.ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None
    )
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(anchors))
        .extension_policies(
            ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(), ee_policy=leaf
        )
        .build_client_verifier()
    )
    try:
        verifier.verify(certificate, [])
    except verification.VerificationError as err:
        return f"its certificate is not an agent certificate of the site CA ({err})"
    name = agent_name(certificate)
    if name != node:
        return f"its certificate names {name or 'no agent'!r}, not {node!r}"
    return None


# ---- TLS ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerTls:
    """This agent's certificate and key, and the site CA: what both ends show and check."""

    files: TlsFiles

    @classmethod
    def of(cls, files: TlsFiles) -> PeerTls:
        """PkiError when there is no certificate to show (the CA alone)."""
        if files.cert is None or files.key is None:
            raise PkiError(f"{files.ca}: no agent certificate and key are given")
        files.server_context()  # every file read and checked now (by OpenSSL)
        return cls(files)

    @functools.cached_property
    def anchors(self) -> list[x509.Certificate]:
        """The site CA, read on the first fetch from a peer: an agent that never fetches
        from one does not load cryptography."""
        return _certificates(self.files.ca)

    def server_context(self) -> ssl.SSLContext:
        return self.files.server_context(require_client_cert=True)

    def client_context(self) -> ssl.SSLContext:
        """Shows this agent's certificate; the server's is checked by
        :func:`server_refusal` once connected, before a byte of the body is read."""
        context = self.files.client_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context


def _certificates(path: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as err:
        raise PkiError(f"{path}: cannot be read as CA certificates ({err})") from None


# ---- the agent's side ---------------------------------------------------------------


class PeerPackages:
    """Serves this node's verified archives to its pair's peers (:meth:`run`) and fetches
    from them (:meth:`fetch`). ``tls`` None: the lab mode. ``place()`` gives the pair
    and node now; ``shared_file(service, version_dir)`` the archive this node may serve;
    ``nodes`` mirrors the nodes' published statuses."""

    def __init__(
        self,
        log: EventLog,
        tls: PeerTls | None,
        *,
        place: Callable[[], tuple[Pair | None, Node | None]],
        nodes: Mirror,
        limits: Limits = LIMITS,
    ) -> None:
        self.log = log
        self.tls = tls
        self._place = place
        self._nodes = nodes
        self.limits = limits
        self.fetcher: Fetcher | None = None  # made from the node's address, when it asks
        self.shared_file: SharedFile = lambda service, version_dir: None
        self._busy = asyncio.Semaphore(TRANSFERS)
        self._warned = False
        self._closing: set[asyncio.Task[None]] = set()

    @classmethod
    def create(
        cls,
        log: EventLog,
        files: TlsFiles | None,
        *,
        place: Callable[[], tuple[Pair | None, Node | None]],
        nodes: Mirror,
    ) -> PeerPackages | None:
        """Over TLS with this agent's files, in the lab mode without them; None (and
        said) when they hold no certificate of this agent's to show its peers."""
        tls = None
        if files is not None:
            try:
                tls = PeerTls.of(files)
            except PkiError as err:
                log.warning(
                    "packages are neither served to nor fetched from the pair's peers: "
                    "this agent has no certificate to show them",
                    reason=str(err),
                )
                return None
        return cls(log, tls, place=place, nodes=nodes)

    # -- fetching ---------------------------------------------------------------------
    async def sources(self, service: str, package: Package) -> list[tuple[str, str]]:
        """``(peer, url)`` to ask for ``service``'s ``package`` first, in the pair's
        order, once no node before this one is still fetching it (:func:`choose`);
        none unless the pair fetches from peers."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        said: Choice | None = None
        log = dict(service=service, version=package.version, sha256=package.sha256[:12])
        while True:
            pair, node = self._place()
            if pair is None or node is None or not pair.packages.from_peers:
                return []
            if not self._nodes.synced.is_set():
                await wait_event(self._nodes.synced, STATUSES_S)
            choice = choose(pair, node.name, self._nodes.items, service, package)
            if choice.wait_for is None:
                break
            if loop.time() - start >= (CATCH_UP_S if choice.catching_up else WAIT_S):
                self.log.info("package: no longer waiting for a peer", peer=choice.wait_for, **log)
                break
            if said is None or (said.wait_for, said.catching_up) != (
                choice.wait_for,
                choice.catching_up,
            ):
                self.log.info(
                    "package: waiting for a peer that fetches it first",
                    peer=choice.wait_for,
                    its_status_names_it=not choice.catching_up,
                    **log,
                )
            said = choice
            await asyncio.sleep(POLL_S)
        port, tls = pair.packages.peer_port, self.tls is not None
        return [(n.name, url(n, port, service, package.dir_name, tls)) for n in choice.ask]

    async def fetch(self, peer: str, source: str, dest: Path) -> None:
        """``source`` (a URL of :meth:`sources`) into ``dest``: FetchError says why not."""
        tls = self.tls
        accept = None if tls is None else (lambda der: server_refusal(der, peer, tls.anchors))
        await self._fetcher().fetch(source, dest, accept)

    def _fetcher(self) -> Fetcher:
        """In the lab mode, connections from this node's address: the one its peers
        know it by (over TLS its certificate says who it is, from any address)."""
        _, node = self._place()
        address = node.address if node is not None and self.tls is None else None
        if self.fetcher is None or self.fetcher.local_host != address:
            if self.fetcher is not None:  # the node's address changed: its last transfer is over
                self._closing.add(asyncio.create_task(self.fetcher.close()))
            context = self.tls.client_context() if self.tls is not None else None
            self.fetcher = Fetcher(self.log, context, self.limits, address)
        return self.fetcher

    # -- serving ----------------------------------------------------------------------
    async def run(self) -> None:
        """Serve while the pair fetches from peers, on its port at this node's address,
        until cancelled."""
        runner: web.AppRunner | None = None
        serving: tuple[str, int] | None = None
        wake = asyncio.Event()  # never set: the loop looks again every RECONCILE_S
        try:
            while True:
                pair, node = self._place()
                want = (
                    (node.address, pair.packages.peer_port)
                    if pair is not None and node is not None and pair.packages.from_peers
                    else None
                )
                if want != serving and runner is not None:
                    await runner.cleanup()
                    runner, serving = None, None
                    self.log.info("packages no longer served to the pair's peers")
                if want is not None and runner is None:
                    runner = await self._start(*want)
                    serving = want if runner is not None else None
                await wait_event(wake, RECONCILE_S)
        finally:
            if runner is not None:
                await runner.cleanup()
            if self.fetcher is not None:
                await self.fetcher.close()
            await asyncio.gather(*self._closing)

    async def _start(self, address: str, port: int) -> web.AppRunner | None:
        from aiohttp import web

        @web.middleware
        async def only_peers(request: web.Request, handler: Handler) -> web.StreamResponse:
            return await self._only_peers(request, handler)

        app = web.Application(middlewares=[only_peers])
        app.router.add_get(ROUTE, self._serve)  # and HEAD; 405 for other methods
        # A transfer under way when serving ends (the agent stops, the option is turned
        # off) is cut short soon: the peer turns to the origin, and the agent's stop waits
        # for nothing.
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        context = self.tls.server_context() if self.tls is not None else None
        site = web.TCPSite(runner, address, port, ssl_context=context, reuse_address=True)
        try:
            await site.start()
        except OSError as err:
            await runner.cleanup()
            if not self._warned:  # said once; tried again every round
                self.log.warning(
                    "cannot serve packages to the pair's peers",
                    address=address,
                    port=port,
                    error=str(err),
                )
            self._warned = True
            return None
        self._warned = False
        if self.tls is None:
            self.log.warning(
                "packages served to the pair's peers in clear (lab mode): anyone who can "
                "send from a peer's address can read them; run etcd over TLS with agent "
                "certificates for the secure default",
                address=address,
                port=port,
            )
        else:
            self.log.info(
                "packages served to the pair's peers over TLS", address=address, port=port
            )
        return runner

    async def _only_peers(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Before anything else, even a 404: a request that is not a peer's gets 403."""
        from aiohttp import web

        pair, node = self._place()
        refused = (
            "this node is in no pair"
            if pair is None or node is None
            else admitted(pair, node.name, _identity(request), request.remote, self.tls is not None)
        )
        if refused is not None:
            self.log.warning(
                "package request refused", source=request.remote, path=request.path, reason=refused
            )
            raise web.HTTPForbidden(text=f"refused: {refused}\n")
        return await handler(request)

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        service, version_dir = request.match_info["service"], request.match_info["version"]
        path = self.shared_file(service, version_dir)
        if path is None:
            raise web.HTTPNotFound(text="not held here\n")
        if self._busy.locked():
            raise web.HTTPServiceUnavailable(text="busy: try again\n")
        async with self._busy:
            self.log.info(
                "package served to a peer",
                peer=_identity(request),
                source=request.remote,
                service=service,
                version_dir=version_dir,
                range=request.headers.get("Range"),
            )
            response = web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})
            await response.prepare(request)
            return response


def _identity(request: web.Request) -> str | None:
    """The agent a request's verified client certificate names (None: none, or clear)."""
    tls = request.transport.get_extra_info("ssl_object") if request.transport else None
    if not isinstance(tls, ssl.SSLObject):
        return None
    der = tls.getpeercert(binary_form=True)
    return agent_name(x509.load_der_x509_certificate(der)) if der else None
