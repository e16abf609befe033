"""Who a service runs as, and the environment it gets.

Whoever can write the site file must not become root on the servers through it: a
service runs as its ``user:`` (or the node's default, ``--service-user``), and one that
would run as root (uid or gid 0, by name or by number, or by default as the agent's own
root) is refused unless the node's own settings allow it (``--allow-root-services``),
which the site file cannot change. Its environment is built from nothing: a fixed
``PATH``, the user's ``HOME``, ``USER`` and ``LOGNAME``, the ``HAPAIR_*`` variables the
agent gives every service and what the site file declares; never the agent's own
environment (which holds its etcd identity).
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from typing import Any

from hapair.shared.topology import Service
from hapair.workshop_agent.exec_guard import encode_ids

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ALLOW_ROOT = "--allow-root-services (HAPAIR_ALLOW_ROOT_SERVICES=1)"


class ServiceRefused(Exception):
    """The service may not run on this node as asked; the message says why and what
    would allow it."""


@dataclass(frozen=True)
class RunAs:
    """The ids a service's processes get; ``groups`` None: the agent's own (no switch)."""

    uid: int
    gid: int
    groups: tuple[int, ...] | None
    name: str
    home: str

    def guard_arg(self) -> str:
        """How ``exec_guard.py`` is told whom to become: ``-`` for no switch."""
        return "-" if self.groups is None else encode_ids(self.uid, self.gid, self.groups)


@dataclass(frozen=True)
class ServiceUsers:
    """The node's own rules for service users, from its local settings only."""

    default_user: str | None = None
    default_group: str | None = None
    allow_root: bool = False

    def resolve(self, spec: Service) -> RunAs:
        """Whom ``spec`` runs as on this node; ServiceRefused names what is wrong."""
        user = spec.user or self.default_user
        group = spec.group or self.default_group
        run = _agents_own(spec.name, group) if user is None else _account(spec.name, user, group)
        if not self.allow_root and 0 in (run.uid, run.gid, *(run.groups or ())):
            how = "as the agent's own user" if user is None else f"as user {user!r}"
            raise ServiceRefused(
                f"service {spec.name} not started: it would run {how} "
                f"(uid {run.uid}, gid {run.gid}{' with group root' if run.uid else ''}) "
                f"and this node does not allow root services; give it a user: in the site "
                f"file or this node a --service-user (HAPAIR_SERVICE_USER), or allow root "
                f"services on this node with {ALLOW_ROOT}"
            )
        if run.groups is None or os.geteuid() == 0:
            return run
        # Only root may change ids, even to its own groups: an agent of another user runs
        # services as itself, no switch, or not at all.
        if (run.uid, run.gid) != (os.geteuid(), os.getegid()):
            raise ServiceRefused(
                f"service {spec.name} not started: the agent runs as uid {os.geteuid()} "
                f"(gid {os.getegid()}) and cannot switch to user {run.name!r} (uid "
                f"{run.uid}, gid {run.gid}); run the agent as root"
            )
        return RunAs(run.uid, run.gid, None, run.name, run.home)


def process_ids(run: RunAs) -> dict[str, Any]:
    """What ``asyncio.create_subprocess_exec`` is given to run a command as ``run``: a
    service's health command, a package's ``install:`` (none for no switch)."""
    if run.groups is None:
        return {}
    return {"user": run.uid, "group": run.gid, "extra_groups": list(run.groups)}


NO_ROOT = ServiceUsers()  # a node's rules when its settings say nothing


def _agents_own(service: str, group: str | None) -> RunAs:
    uid = os.geteuid()
    try:
        entry: pwd.struct_passwd | None = pwd.getpwuid(uid)
    except KeyError:
        entry = None
    name = entry.pw_name if entry else str(uid)
    home = entry.pw_dir if entry else "/"
    if group is None:
        return RunAs(uid, os.getegid(), None, name, home)
    gid = _gid(service, group)
    return RunAs(uid, gid, (gid,), name, home)


def _account(service: str, user: str, group: str | None) -> RunAs:
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if not user.isdigit():
            raise ServiceRefused(
                f"service {service} not started: no user {user!r} on this node"
            ) from None
        if group is None:
            raise ServiceRefused(
                f"service {service} not started: uid {user} has no entry in this node's "
                "user database; give it a group: too"
            ) from None
        gid = _gid(service, group)
        return RunAs(int(user), gid, (gid,), user, "/")
    gid = entry.pw_gid if group is None else _gid(service, group)
    groups = tuple(os.getgrouplist(entry.pw_name, gid))
    return RunAs(entry.pw_uid, gid, groups, entry.pw_name, entry.pw_dir)


def _gid(service: str, group: str) -> int:
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ServiceRefused(
            f"service {service} not started: no group {group!r} on this node"
        ) from None


def service_env(run: RunAs, hapair: dict[str, str], declared: dict[str, str]) -> dict[str, str]:
    """A service's whole environment: nothing of the agent's but ``hapair``, the
    ``HAPAIR_*`` variables it gives its services, and then the site file's ``env:``."""
    return {
        "PATH": DEFAULT_PATH,
        "HOME": run.home,
        "USER": run.name,
        "LOGNAME": run.name,
        **hapair,
        **declared,
    }
