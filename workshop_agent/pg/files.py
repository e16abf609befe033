"""The configuration files the agent writes into a node's data dir.

``postgresql.conf`` is rewritten before every start: our settings, then the site
file's ``parameters``, after an include of what ``initdb`` wrote. ``pg_hba.conf``
(:func:`pg_hba_conf`) lets the superuser and the replication user in only from the
pair's node addresses, over TLS, and rejects them from anywhere else; the ``clients``
networks may log in as any other user, over TLS; the local socket admits ``os_user``.
All with scram-sha-256. ``postgresql.auto.conf`` keeps whatever ALTER SYSTEM put
there, except the two settings the role decides (``primary_conninfo``,
``synchronous_standby_names``), which are replaced: a clone or a rewind copies the
primary's, and a stale one is a trap.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from hapair.workshop_agent.pg.config import DatabaseConfig, Layout

BASE_CONF = "postgresql.base.conf"
AUTO_CONF = "postgresql.auto.conf"
ROLE_SETTINGS = ("primary_conninfo", "synchronous_standby_names", "primary_slot_name")
HEADER = "# Written by hapair at every start; do not edit (see the site file's database:).\n"


def quote_setting(value: str) -> str:
    """A postgresql.conf string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def quote_conninfo(value: str) -> str:
    """A libpq keyword/value literal, quoted only when it must be."""
    if value and not any(c in value for c in " '\\\t\n"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def sync_names(names: Sequence[str]) -> str:
    """``synchronous_standby_names`` for these standbys: any one of several suffices."""
    quoted = [f'"{n}"' for n in names]
    if not quoted:
        return ""
    if len(quoted) == 1:
        return quoted[0]
    return f"ANY 1 ({', '.join(quoted)})"


# A standby name no node can have: commits on a just promoted primary wait for it until
# the agent has recorded the new primary as the only node holding every commit.
HOLD_WRITES = sync_names(["hapair promotion"])


def postgresql_conf(config: DatabaseConfig, layout: Layout, address: str, cluster: str) -> str:
    tls = config.tls_files is not None
    settings: dict[str, str] = {
        "listen_addresses": quote_setting(address),
        "port": str(config.port),
        "unix_socket_directories": quote_setting(str(layout.run_dir)),
        "unix_socket_permissions": "0700",
        "cluster_name": quote_setting(cluster),
        "wal_level": "replica",
        "wal_log_hints": "on",  # pg_rewind needs it (data checksums also log hints)
        "hot_standby": "on",
        "max_wal_senders": "10",
        "wal_keep_size": quote_setting("512MB"),  # WAL left for a standby or a rewind
        # After a crash a standby can read a torn last record and wait this long before
        # it finishes recovery: the default 5 s stalls a promotion.
        "wal_retrieve_retry_interval": quote_setting("100ms"),
        "password_encryption": quote_setting("scram-sha-256"),
        "ssl": "on" if tls else "off",
    }
    if tls:  # the copies in the run dir (see tls.py)
        settings["ssl_cert_file"] = quote_setting(str(layout.tls_cert))
        settings["ssl_key_file"] = quote_setting(str(layout.tls_key))
    settings.update({k: quote_setting(v) for k, v in config.parameters.items()})
    lines = [HEADER, f"include_if_exists {quote_setting(BASE_CONF)}\n"]
    lines += [f"{k} = {v}\n" for k, v in settings.items()]
    return "".join(lines)


def _host(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # a host name: PostgreSQL checks it forward and reverse
    return f"{ip}/{ip.max_prefixlen}"


def pg_hba_conf(config: DatabaseConfig, node_addresses: Iterable[str]) -> str:
    """The first line that matches a connection decides. The superuser and the
    replication user come only from the nodes (``hostssl``: never in clear, so a
    replication connection without TLS is refused) or the local socket; from any other
    address they are rejected before the client rule, whose networks may well hold the
    nodes' addresses too. Clients must use TLS as well: libpq's default (``sslmode=
    prefer``) takes it unasked, and ``verify-full`` with the site CA checks the server.
    In the lab mode (``security: none``) the same lines say ``host``: no TLS."""
    auth = config.auth
    ssl = "hostssl" if config.tls_files is not None else "host"
    rows = [("local", "all", "all", "", "peer map=hapair")]
    for address in node_addresses:
        rows.append((ssl, "replication", auth.replication_user, _host(address), "scram-sha-256"))
        rows.append((ssl, "all", auth.superuser, _host(address), "scram-sha-256"))
    rows += [
        ("host", "replication", "all", "all", "reject"),
        ("host", "all", auth.superuser, "all", "reject"),
        ("host", "all", auth.replication_user, "all", "reject"),
    ]
    rows += [(ssl, "all", "all", net, "scram-sha-256") for net in config.clients]
    return HEADER + "".join(
        f"{kind:<7} {db:<12} {user:<16} {addr:<24} {method}".rstrip() + "\n"
        for kind, db, user, addr, method in rows
    )


def pg_ident_conf(config: DatabaseConfig) -> str:
    """The local socket admits one operating system user, as the superuser."""
    return HEADER + f"hapair  {config.os_user}  {config.auth.superuser}\n"


def primary_conninfo(
    host: str,
    port: int,
    user: str,
    passfile: Path,
    application_name: str,
    tls: Mapping[str, str] | None = None,
) -> str:
    """A standby's connection to its primary (``tls``: libpq's TLS settings)."""
    parts = {
        "host": host,
        "port": str(port),
        "user": user,
        "passfile": str(passfile),
        "application_name": application_name,
        "connect_timeout": "2",
        "keepalives_idle": "5",
        "keepalives_interval": "2",
        "keepalives_count": "3",
        **(tls or {}),
    }
    return " ".join(f"{k}={quote_conninfo(v)}" for k, v in parts.items())


def pgpass(port: int, entries: Mapping[str, str]) -> str:
    """A libpq password file: ``*:port:*:user:password`` per user."""

    def esc(text: str) -> str:
        return text.replace("\\", "\\\\").replace(":", "\\:")

    return "".join(f"*:{port}:*:{esc(u)}:{esc(p)}\n" for u, p in entries.items())


_AUTO_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*=?")


def auto_conf(existing: str, role_settings: Mapping[str, str]) -> str:
    """``postgresql.auto.conf`` with the role's settings replaced, the rest kept."""
    kept = []
    for line in existing.splitlines():
        match = _AUTO_LINE.match(line)
        if match and match.group(1).lower() in ROLE_SETTINGS:
            continue
        kept.append(line + "\n")
    if not kept:
        kept = [
            "# Do not edit this file manually!\n",
            "# It will be overwritten by the ALTER SYSTEM command.\n",
        ]
    kept += [f"{k} = {quote_setting(v)}\n" for k, v in role_settings.items() if v]
    return "".join(kept)


def auto_conf_value(text: str, key: str) -> str | None:
    """The value ALTER SYSTEM wrote for ``key`` (the last one wins), unquoted."""
    value = None
    for line in text.splitlines():
        name, sep, rest = line.partition("=")
        if sep and name.strip().lower() == key:
            raw = rest.strip()
            if raw.startswith("'") and raw.endswith("'") and len(raw) >= 2:
                raw = raw[1:-1].replace("''", "'").replace("\\\\", "\\")
            value = raw
    return value


def write_file(path: Path, text: str, uid: int, gid: int, mode: int = 0o600) -> None:
    """Replace ``path`` atomically with a file owned by the database's OS user."""
    tmp = path.with_name(path.name + ".hapair-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
        os.fchown(fd, uid, gid)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""


def write_config(
    config: DatabaseConfig,
    layout: Layout,
    *,
    address: str,
    cluster: str,
    node_addresses: Iterable[str],
    role_settings: Mapping[str, str],
    standby: bool,
    owner: tuple[int, int],
) -> None:
    """Every file a start needs, for a primary (``standby=False``) or a standby."""
    uid, gid = owner
    data = layout.data_dir
    write_file(
        data / "postgresql.conf", postgresql_conf(config, layout, address, cluster), uid, gid
    )
    write_file(data / "pg_hba.conf", pg_hba_conf(config, node_addresses), uid, gid)
    write_file(data / "pg_ident.conf", pg_ident_conf(config), uid, gid)
    auto = auto_conf(read_text(data / AUTO_CONF), role_settings)
    write_file(data / AUTO_CONF, auto, uid, gid)
    signal = data / "standby.signal"
    if standby:
        write_file(signal, "", uid, gid)
    else:
        signal.unlink(missing_ok=True)
