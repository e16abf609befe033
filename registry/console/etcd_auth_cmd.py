"""``hapair etcd-auth apply``: etcd's users and roles from the site, then auth on.

With etcd's ``--client-cert-auth``, a client's certificate CN is its etcd user. The
users are the names ``hapair pki issue`` gave: each node's agent is its node name; a
service that talks to etcd (a comm server) is ``SERVICE@NODE``; operators, registries
and admins are named on the command line. :func:`plan` computes every role from the
site, purely; :func:`apply` makes etcd match it (a second run changes nothing) and
enables auth. Roles it manages are named ``hapair-*``: one no longer planned (a node
gone from the site) is deleted, so its user keeps no right.
"""

from __future__ import annotations

import argparse
import enum
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aetcd import rpc

from hapair.shared import admin, keys, pki
from hapair.shared.admin import AdminError
from hapair.shared.store import Store, StoreError
from hapair.shared.topology import Pair, Site, TopologyError, load

ROOT = "root"  # etcd's own: it must exist, with the root role, before auth goes on
ROLE_PREFIX = "hapair-"
READER = f"{ROLE_PREFIX}reader"
OPERATOR = f"{ROLE_PREFIX}operator"
REGISTRY = f"{ROLE_PREFIX}registry"


class Perm(enum.IntEnum):  # etcd's authpb.Permission.Type
    READ = 0
    WRITE = 1
    READWRITE = 2


@dataclass(frozen=True, order=True)
class Grant:
    """``perm`` on ``[key, end)``, or on ``key`` alone when ``end`` is empty."""

    key: str
    end: str
    perm: Perm


@dataclass(frozen=True)
class Role:
    name: str
    grants: frozenset[Grant]


@dataclass(frozen=True)
class Plan:
    roles: tuple[Role, ...]
    users: dict[str, tuple[str, ...]]  # user -> its roles
    # Where the key layout makes a grant broader than the holder's own keys.
    notes: tuple[str, ...] = field(default=())

    def allows(self, user: str, key: str, perm: Perm) -> bool:
        """Whether etcd, given this plan, lets ``user`` do ``perm`` on ``key``."""
        roles = self.users.get(user, ())
        if ROOT in roles:
            return True
        have: set[Perm] = set()
        for role in (r for r in self.roles if r.name in roles):
            for g in role.grants:
                if key == g.key or (g.end and g.key <= key < g.end):
                    have |= _PARTS[g.perm]
        return _PARTS[perm] <= have


_PARTS = {Perm.READ: {Perm.READ}, Perm.WRITE: {Perm.WRITE}, Perm.READWRITE: {Perm.READ, Perm.WRITE}}


def prefix_end(prefix: str) -> str:
    """The end of the range of every key starting with ``prefix``."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def under(prefix: str, perm: Perm) -> Grant:
    """``perm`` on every key starting with ``prefix`` (a watch of ``prefix`` reads the
    same range, so an exact key that is watched is granted this way too)."""
    return Grant(prefix, prefix_end(prefix), perm)


def service_user(service: str, node: str) -> str:
    """The etcd user, and certificate name, of ``service`` on ``node``."""
    return f"{service}@{node}"


NOTES = (
    "registries may write and delete any event (they delete old ones), and hold the "
    "operator's rights (they serve the operator's admin routes)",
    "agents read every pair's and node's keys (they watch the whole /pairs/ and /nodes/ "
    "prefixes): reading is not confined to their own pair",
)


def _agent_role(pair: Pair, node: str) -> Role:
    grants = {
        under(keys.PREFIX + "/topology/", Perm.READ),
        under(keys.PAIRS_PREFIX, Perm.READ),
        under(keys.NODES_PREFIX, Perm.READ),
        under(keys.node_status(node), Perm.READWRITE),
        # Its own report, as any service files its own (the agent's is its network).
        under(keys.reports_prefix(node) + "hapair-agent", Perm.READWRITE),
        under(keys.events_of(node), Perm.WRITE),
    }
    # The pair's election and records; ``paused`` stays the operator's. The agent
    # consumes switchover and takeover requests and writes handovers: all commands.
    for key in (keys.leader, keys.members, keys.sync_standby, keys.recovery):
        grants.add(under(key(pair.name), Perm.READWRITE))
    grants.add(under(f"{keys.PAIRS_PREFIX}{pair.name}/commands/", Perm.READWRITE))
    grants.add(under(keys.beats_of(pair.name), Perm.READWRITE))  # its term beat
    endpoints = [s.name for s in pair.services if s.endpoint is not None]
    if pair.database is not None:
        endpoints.append(f"{pair.name}.db")
    grants |= {Grant(keys.endpoint(name), "", Perm.READWRITE) for name in endpoints}
    return Role(f"{ROLE_PREFIX}agent-{node}", frozenset(grants))


def _service_role(pair: Pair, service: str, node: str) -> Role:
    grants = {
        under(keys.PREFIX + "/topology/", Perm.READ),
        under(keys.leader(pair.name), Perm.READ),
        under(keys.NODES_PREFIX, Perm.READ),  # its peers' reports (a comm server's role)
        under(keys.report(node, service), Perm.READWRITE),
    }
    return Role(f"{ROLE_PREFIX}service-{service_user(service, node)}", frozenset(grants))


def _own_role(user: str, prefix: str, perm: Perm) -> Role:
    """A user's own keys: its events, a registry's heartbeats."""
    return Role(f"{ROLE_PREFIX}own-{user}", frozenset({under(prefix, perm)}))


def _operator_role(site: Site) -> Role:
    grants: set[Grant] = set()
    for pair in site.pairs():
        for key in (keys.switchover, keys.takeover, keys.paused, keys.recovery, keys.rollout):
            grants.add(Grant(key(pair.name), "", Perm.READWRITE))
        grants |= {Grant(keys.drained(n.name), "", Perm.READWRITE) for n in pair.nodes}
        # A rollout's restart requests, one per node of the pair.
        grants |= {Grant(keys.restart(pair.name, n.name), "", Perm.READWRITE) for n in pair.nodes}
    return Role(OPERATOR, frozenset(grants))


def plan(
    site: Site,
    operators: Sequence[str] = (),
    registries: Sequence[str] = (),
    admins: Sequence[str] = (),
) -> Plan:
    """The roles and users for ``site``: pure, the same site gives the same plan."""
    roles = [
        Role(READER, frozenset({under(keys.PREFIX + "/", Perm.READ)})),
        _operator_role(site),
        Role(
            REGISTRY,
            frozenset(
                {under(keys.EVENTS_PREFIX, Perm.READWRITE)}  # it deletes old events
            ),
        ),
    ]
    users: dict[str, tuple[str, ...]] = {}

    def add(user: str, *names: str) -> None:
        if not user or "/" in user:
            # Its own keys are a prefix named after it: a slash would reach another's.
            raise ValueError(f"{user!r}: an etcd user name is not empty and has no '/'")
        if user in users and users[user] != names:
            raise ValueError(f"{user!r} named twice, for different rights: one name, one role")
        users[user] = names

    for name in {ROOT, *admins}:
        add(name, ROOT)
    for pair in site.pairs():
        for node in pair.nodes:
            role = _agent_role(pair, node.name)
            roles.append(role)
            add(node.name, role.name)
            for service in pair.services:
                role = _service_role(pair, service.name, node.name)
                roles.append(role)
                add(service_user(service.name, node.name), role.name)
    for name in operators:
        own = _own_role(name, keys.events_of(name), Perm.WRITE)
        roles.append(own)
        add(name, READER, OPERATOR, own.name)
    for name in registries:
        own = _own_role(name, keys.registries_of(name), Perm.READWRITE)
        roles.append(own)
        add(name, READER, OPERATOR, REGISTRY, own.name)
    return Plan(tuple(roles), dict(sorted(users.items())), NOTES)


# ---- etcd -------------------------------------------------------------------------


def _exists(err: StoreError) -> bool:
    return "already exists" in str(err)


async def _role_grants(store: Store, role: str) -> set[Grant]:
    reply = await store.auth("RoleGet", rpc.AuthRoleGetRequest(role=role))
    return {
        Grant(bytes(p.key).decode(), bytes(p.range_end).decode(), Perm(p.permType))
        for p in reply.perm
    }


async def _converge_role(store: Store, role: Role) -> list[str]:
    done: list[str] = []
    try:
        await store.auth("RoleAdd", rpc.AuthRoleAddRequest(name=role.name))
        done.append(f"role {role.name} added")
    except StoreError as err:
        if not _exists(err):
            raise
    have = await _role_grants(store, role.name)
    for grant in sorted(have - role.grants):
        request = rpc.AuthRoleRevokePermissionRequest(
            role=role.name, key=grant.key.encode(), range_end=grant.end.encode()
        )
        await store.auth("RoleRevokePermission", request)
        done.append(f"role {role.name}: revoked {grant.perm.name} {grant.key}")
    for grant in sorted(role.grants - have):
        perm = rpc.Permission(
            permType=int(grant.perm), key=grant.key.encode(), range_end=grant.end.encode()
        )
        await store.auth(
            "RoleGrantPermission", rpc.AuthRoleGrantPermissionRequest(name=role.name, perm=perm)
        )
        done.append(f"role {role.name}: granted {grant.perm.name} {grant.key}")
    return done


async def _converge_user(store: Store, user: str, roles: Iterable[str]) -> list[str]:
    done: list[str] = []
    try:
        # No password: the certificate is the only way to be this user.
        options = rpc.UserAddOptions(no_password=True)
        await store.auth("UserAdd", rpc.AuthUserAddRequest(name=user, options=options))
        done.append(f"user {user} added")
    except StoreError as err:
        if not _exists(err):
            raise
    have = set((await store.auth("UserGet", rpc.AuthUserGetRequest(name=user))).roles)
    wanted = set(roles)
    for role in sorted(have - wanted):
        if role.startswith(ROLE_PREFIX):  # a role of someone else's making stays
            await store.auth("UserRevokeRole", rpc.AuthUserRevokeRoleRequest(name=user, role=role))
            done.append(f"user {user}: role {role} revoked")
    for role in sorted(wanted - have):
        await store.auth("UserGrantRole", rpc.AuthUserGrantRoleRequest(user=user, role=role))
        done.append(f"user {user}: role {role} granted")
    return done


async def apply(store: Store, target: Plan) -> list[str]:
    """Make etcd's users and roles match ``target``, then enable auth; what changed."""
    done: list[str] = []
    for role in target.roles:
        done += await _converge_role(store, role)
    planned = {r.name for r in target.roles}
    listed = await store.auth("RoleList", rpc.AuthRoleListRequest())
    for stale in sorted(r for r in listed.roles if r.startswith(ROLE_PREFIX) and r not in planned):
        await store.auth("RoleDelete", rpc.AuthRoleDeleteRequest(role=stale))
        done.append(f"role {stale} deleted (no longer in the site)")
    for user, roles in target.users.items():
        done += await _converge_user(store, user, roles)
    await store.auth("AuthEnable", rpc.AuthEnableRequest())
    return done


# ---- the command ------------------------------------------------------------------


class UsageError(ValueError):
    """Nothing to take the roles from, or a name that cannot be a certificate's."""


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    func: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
    etcd_options: Callable[[argparse.ArgumentParser], None],
) -> None:
    """``etcd-auth apply`` on the ``hapair`` command's subparsers, run by ``func``."""
    top = sub.add_parser("etcd-auth", help="etcd's users and roles from the site; auth on")
    actions = top.add_subparsers(dest="etcd_auth_command", required=True, metavar="ACTION")
    p = actions.add_parser(
        "apply",
        help="create or update the users and roles, then enable etcd's auth (needs an admin)",
        description="Users are certificate names: each node's agent is NODE, a service "
        "that talks to etcd is SERVICE@NODE; operators, registries and admins are named "
        "here. Run it again after a topology change: it converges.",
    )
    p.add_argument("--site", metavar="FILE", help="the site file (default: the topology in etcd)")
    for option, what in (
        ("operator", "an operator's certificate name: commands, pause, drain, ack"),
        ("registry", "a registry's certificate name: reads, its heartbeats, admin routes"),
        ("admin", f"an admin's certificate name besides {ROOT}: everything"),
    ):
        p.add_argument(f"--{option}", action="append", default=[], metavar="NAME", help=what)
    etcd_options(p)
    p.set_defaults(func=func)


async def run(args: argparse.Namespace, store: Store) -> list[str]:
    """Apply the plan for the site of ``args`` (or etcd's); the lines to print."""
    for name in [*args.operator, *args.registry, *args.admin]:
        if not pki.CERT_NAME.match(name):
            raise UsageError(f"{name!r}: not a certificate name (see hapair pki issue)")
    try:
        site = load(args.site) if args.site else (await admin.read_topology(store))[1]
        target = plan(site, args.operator, args.registry, args.admin)
    except TopologyError as err:
        raise UsageError(f"{err.source}: invalid topology: {'; '.join(err.problems)}") from None
    except (AdminError, ValueError) as err:
        raise UsageError(f"no roles applied: {err}") from None
    done = await apply(store, target) or ["users and roles already as planned"]
    return [
        *done,
        *(f"note: {note}" for note in target.notes),
        f"etcd auth on at {store.describe}: {len(target.users)} users, {len(target.roles)} roles",
    ]
