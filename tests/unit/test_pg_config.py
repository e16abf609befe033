"""The PostgreSQL layer without a server: config, secrets, generated files, LSNs, rewind rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from psycopg import pq

from hapair.shared.database import Tls
from hapair.shared.topology import TopologyError
from hapair.workshop_agent.pg import files, tls
from hapair.workshop_agent.pg.config import Layout, parse_database
from hapair.workshop_agent.pg.errors import PgError, SecretError
from hapair.workshop_agent.pg.query import scram_matches
from hapair.workshop_agent.pg.secrets import load_secrets, read_password
from hapair.workshop_agent.pg.status import (
    LocalPosition,
    TimelineSwitch,
    format_lsn,
    needs_rewind,
    parse_history,
    parse_lsn,
)

ISSUE_EXAMPLE = """
engine: postgresql
port: 5432
data_dir: /var/lib/hapair/{pair.name}/pg   # placeholders as for services
os_user: postgres          # PostgreSQL refuses to run as root
synchronous: true          # RPO 0; false = asynchronous
degrade_after_s: 5         # sync standby gone this long: primary goes async, recorded
parameters: {max_connections: "200"}
auth:                      # secrets live in files on each node, never in etcd
  superuser: postgres
  superuser_password_file: /etc/hapair/pg-superuser.pw
  replication_user: replicator
  replication_password_file: /etc/hapair/pg-replication.pw
clients: [127.0.0.0/8]     # networks allowed to connect (scram-sha-256)
databases:                 # created by the primary if missing
  - {name: mes, owner: mes, password_file: /etc/hapair/pg-mes.pw}
"""


def example(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(ISSUE_EXAMPLE)
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        target = data
        for part in path:
            target = target[part]
        if value is None:
            del target[last]
        else:
            target[last] = value
    return data


def problems(data: dict[str, Any]) -> str:
    with pytest.raises(TopologyError) as info:
        parse_database(data)
    return "\n".join(info.value.problems)


# --- config ---------------------------------------------------------------------------


def test_the_issue_example_parses_and_expands() -> None:
    config = parse_database(example())
    assert config.port == 5432 and config.synchronous and config.degrade_after_s == 5
    assert config.parameters == {"max_connections": "200"}
    layout = config.layout({"pair.name": "press", "node.name": "a", "node.address": "10.0.0.1"})
    assert layout == Layout(Path("/var/lib/hapair/press/pg"), Path("/var/lib/hapair/press/pg.run"))
    assert layout.passfile.parent == layout.run_dir != layout.data_dir


def test_tls_is_on_by_default_with_the_files_hapair_pki_names() -> None:
    config = parse_database(example())
    assert config.security == "on" and config.tls_files == Tls(
        ca_file="/etc/hapair/pki/ca.crt",
        cert_file="/etc/hapair/pki/postgres@{node.name}.crt",
        key_file="/etc/hapair/pki/postgres@{node.name}.key",
    )
    values = {"node.name": "a1", "node.address": "10.0.0.1", "pair.name": "p"}
    source = tls.TlsSource.of(config, values)
    assert source == tls.TlsSource(
        Path("/etc/hapair/pki/ca.crt"),
        Path("/etc/hapair/pki/postgres@a1.crt"),
        Path("/etc/hapair/pki/postgres@a1.key"),
    )
    named = parse_database(example(tls={"cert_file": "/srv/{pair.name}/{node.address}.pem"}))
    assert tls.TlsSource.of(named, values) == tls.TlsSource(
        Path("/etc/hapair/pki/ca.crt"), Path("/srv/p/10.0.0.1.pem"), source.key
    )
    assert tls.TlsSource.of(parse_database(example(security="none")), values) is None


def test_numbers_and_booleans_in_parameters_become_settings_text() -> None:
    config = parse_database(example(parameters={"max_connections": 200, "jit": False}))
    assert config.parameters == {"max_connections": "200", "jit": "off"}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"data_dir": "/srv/{pair.nam}/pg"}, "database.data_dir: unknown placeholder {pair.nam}"),
        ({"data_dir": "/srv/{epoch}/pg"}, "database.data_dir: unknown placeholder {epoch}"),
        ({"data_dir": "srv/pg"}, "database.data_dir: must be an absolute path"),
        ({"data_dir": None}, "database.data_dir: Field required"),
        ({"engine": "mysql"}, "database.engine: Input should be 'postgresql'"),
        ({"os_user": "root"}, "database.os_user: PostgreSQL refuses to run as root"),
        ({"port": 0}, "database.port: Input should be greater than or equal to 1"),
        ({"degrade_after_s": 0}, "database.degrade_after_s: Input should be greater than 0"),
        (
            {"auth__superuser_password_file": None},
            "database.auth.superuser_password_file: Field required",
        ),
        (
            {"auth__replication_password_file": "pw"},
            "database.auth.replication_password_file: must be an absolute",
        ),
        (
            {"auth__replication_user": "postgres"},
            "database.auth: replication_user must differ from superuser",
        ),
        ({"auth__password": "x"}, "database.auth.password: Extra inputs are not permitted"),
        ({"replicas": 2}, "database.replicas: Extra inputs are not permitted"),
        ({"parameters": {"port": "5433"}}, "database.parameters: port is set by the agent"),
        (
            {"parameters": {"synchronous_commit": "off"}},
            "synchronous_commit 'off' would acknowledge",
        ),
        ({"clients": ["10.0.0.1/8"]}, "database.clients: clients[0] '10.0.0.1/8' is not a network"),
        ({"clients": ["everyone"]}, "clients[0] 'everyone' is not a network"),
        (
            {"databases": [{"name": "mes", "owner": "mes", "password_file": "/a"}] * 2},
            "database: duplicate database name 'mes' at databases[0] and databases[1]",
        ),
        (
            {
                "databases": [
                    {"name": "mes", "owner": "mes", "password_file": "/a"},
                    {"name": "mes2", "owner": "mes", "password_file": "/b"},
                ]
            },
            "databases[1].owner 'mes' owns another database with another password_file",
        ),
        (
            {"databases": [{"name": "mes", "owner": "postgres", "password_file": "/a"}]},
            "databases[0].owner 'postgres' is the superuser",
        ),
        (
            {"databases": [{"name": "Mes", "owner": "mes", "password_file": "/a"}]},
            "database.databases[0].name",
        ),
        ({"security": "off"}, "database.security: Input should be 'on' or 'none'"),
        (
            {"security": "none", "tls": {"ca_file": "/etc/ca.crt"}},
            "database: tls is given but security is none",
        ),
        ({"tls": {"cert_file": "pg.crt"}}, "database.tls.cert_file: must be an absolute path"),
        (
            {"tls": {"key_file": "/pki/{node.nam}.key"}},
            "database.tls.key_file: unknown placeholder {node.nam}",
        ),
        ({"tls": {"cert": "/a"}}, "database.tls.cert: Extra inputs are not permitted"),
        ({"parameters": {"ssl": "off"}}, "database.parameters: ssl is set by the agent"),
        (
            {"parameters": {"ssl_key_file": "/k"}},
            "database.parameters: ssl_key_file is set by the agent",
        ),
    ],
)
def test_bad_config_names_the_field(changes: dict[str, Any], expected: str) -> None:
    assert expected in problems(example(**changes))


# --- secrets ----------------------------------------------------------------------------


def config_with_files(tmp_path: Path, **texts: str | None) -> Any:
    paths = {}
    for name in ("superuser", "replication", "mes"):
        path = tmp_path / f"{name}.pw"
        text = texts.get(name, f"{name}-pw\n")
        if text is not None:
            path.write_text(text)
            path.chmod(0o600)
        paths[name] = str(path)
    return parse_database(
        example(
            auth__superuser_password_file=paths["superuser"],
            auth__replication_password_file=paths["replication"],
            databases=[{"name": "mes", "owner": "mes", "password_file": paths["mes"]}],
        )
    )


def test_secrets_are_read_without_the_line_break_and_never_shown(tmp_path: Path) -> None:
    secrets = load_secrets(config_with_files(tmp_path))
    assert secrets.superuser.reveal() == "superuser-pw"
    assert secrets.owners["mes"].reveal() == "mes-pw"
    assert "pw" not in repr(secrets)


@pytest.mark.parametrize(
    ("name", "text", "field", "problem"),
    [
        ("superuser", None, "database.auth.superuser_password_file", "no such file"),
        ("replication", "", "database.auth.replication_password_file", "is empty"),
        ("replication", "\n", "database.auth.replication_password_file", "is empty"),
        ("mes", "one\ntwo\n", "database.databases[0].password_file", "more than one line"),
        ("mes", "x" * 2000, "database.databases[0].password_file", "longer than 1024 bytes"),
    ],
)
def test_an_unusable_password_file_is_named_with_its_field(
    tmp_path: Path, name: str, text: str | None, field: str, problem: str
) -> None:
    config = config_with_files(tmp_path, **{name: text})
    with pytest.raises(SecretError) as info:
        load_secrets(config)
    message = str(info.value)
    assert str(tmp_path / f"{name}.pw") in message and field in message and problem in message
    assert isinstance(info.value, PgError) and info.value.step == "read secrets"


def test_a_directory_is_not_a_password_file(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match="is a directory"):
        read_password(str(tmp_path), "database.auth.superuser_password_file")


# --- generated files ------------------------------------------------------------------


def test_pg_hba_lets_the_superuser_and_replication_in_from_the_nodes_over_tls_only() -> None:
    config = parse_database(example(clients=["10.1.0.0/16", "fd00::/8"]))
    text = files.pg_hba_conf(config, ["10.0.0.1", "10.0.0.2", "fd00::2"])
    rows = [line.split() for line in text.splitlines() if line and not line.startswith("#")]
    # The first line that matches decides: the two users are rejected from any address
    # that is not a node's (or from a node without TLS) before the clients' networks,
    # which may hold the nodes' addresses too, are reached.
    assert rows == [
        ["local", "all", "all", "peer", "map=hapair"],
        ["hostssl", "replication", "replicator", "10.0.0.1/32", "scram-sha-256"],
        ["hostssl", "all", "postgres", "10.0.0.1/32", "scram-sha-256"],
        ["hostssl", "replication", "replicator", "10.0.0.2/32", "scram-sha-256"],
        ["hostssl", "all", "postgres", "10.0.0.2/32", "scram-sha-256"],
        ["hostssl", "replication", "replicator", "fd00::2/128", "scram-sha-256"],
        ["hostssl", "all", "postgres", "fd00::2/128", "scram-sha-256"],
        ["host", "replication", "all", "all", "reject"],
        ["host", "all", "postgres", "all", "reject"],
        ["host", "all", "replicator", "all", "reject"],
        ["hostssl", "all", "all", "10.1.0.0/16", "scram-sha-256"],
        ["hostssl", "all", "all", "fd00::/8", "scram-sha-256"],
    ]
    ident = [
        line.split()
        for line in files.pg_ident_conf(config).splitlines()
        if not line.startswith("#")
    ]
    assert ident == [["hapair", "postgres", "postgres"]]


def test_pg_hba_in_the_lab_mode_has_the_same_rules_without_tls() -> None:
    config = parse_database(example(security="none"))
    text = files.pg_hba_conf(config, ["10.0.0.1", "10.0.0.2"])
    rows = [line.split() for line in text.splitlines() if line and not line.startswith("#")]
    assert rows == [
        ["local", "all", "all", "peer", "map=hapair"],
        ["host", "replication", "replicator", "10.0.0.1/32", "scram-sha-256"],
        ["host", "all", "postgres", "10.0.0.1/32", "scram-sha-256"],
        ["host", "replication", "replicator", "10.0.0.2/32", "scram-sha-256"],
        ["host", "all", "postgres", "10.0.0.2/32", "scram-sha-256"],
        ["host", "replication", "all", "all", "reject"],
        ["host", "all", "postgres", "all", "reject"],
        ["host", "all", "replicator", "all", "reject"],
        ["host", "all", "all", "127.0.0.0/8", "scram-sha-256"],
    ]


def test_postgresql_conf_sets_replication_and_then_the_site_parameters() -> None:
    config = parse_database(example())
    layout = Layout.beside(Path("/srv/p/pg"))
    text = files.postgresql_conf(config, layout, "10.0.0.1", "p-a")
    lines = text.splitlines()
    assert "include_if_exists 'postgresql.base.conf'" in lines
    for setting in (
        "listen_addresses = '10.0.0.1'",
        "unix_socket_directories = '/srv/p/pg.run'",
        "wal_log_hints = on",
        "wal_retrieve_retry_interval = '100ms'",
        "password_encryption = 'scram-sha-256'",
        "max_connections = '200'",
    ):
        assert setting in lines
    assert "synchronous_standby_names" not in text and "primary_conninfo" not in text
    # The server's certificate and key are the copies in the run dir (see tls.py).
    assert "ssl = on" in lines
    assert "ssl_cert_file = '/srv/p/pg.run/server.crt'" in lines
    assert "ssl_key_file = '/srv/p/pg.run/server.key'" in lines
    lab = files.postgresql_conf(parse_database(example(security="none")), layout, "10.0.0.1", "p")
    assert "ssl = off" in lab.splitlines() and "ssl_cert_file" not in lab


@pytest.mark.parametrize(
    ("names", "expected"),
    [([], ""), (["b"], '"b"'), (["b", "c-2"], 'ANY 1 ("b", "c-2")')],
)
def test_synchronous_standby_names(names: list[str], expected: str) -> None:
    assert files.sync_names(names) == expected


def test_auto_conf_replaces_the_role_settings_and_keeps_the_rest() -> None:
    copied = (
        "# Do not edit this file manually!\n"
        "work_mem = '8MB'\n"
        "synchronous_standby_names = '\"a\"'\n"
        "primary_conninfo = 'host=old'\n"
    )
    as_standby = files.auto_conf(copied, {"primary_conninfo": "host=10.0.0.2 user=r"})
    assert "work_mem = '8MB'" in as_standby
    assert "synchronous_standby_names" not in as_standby and "host=old" not in as_standby
    assert files.auto_conf_value(as_standby, "primary_conninfo") == "host=10.0.0.2 user=r"
    as_primary = files.auto_conf(copied, {"synchronous_standby_names": '"b"'})
    assert files.auto_conf_value(as_primary, "synchronous_standby_names") == '"b"'
    assert "primary_conninfo" not in as_primary


def test_conninfo_and_pgpass_quoting() -> None:
    info = files.primary_conninfo("10.0.0.1", 5432, "replicator", Path("/srv/my dir/pgpass"), "b")
    assert "host=10.0.0.1 port=5432 user=replicator passfile='/srv/my dir/pgpass'" in info
    assert "ssl" not in info  # the lab mode: libpq's default
    secure = files.primary_conninfo(
        "10.0.0.1", 5432, "r", Path("/p"), "b", tls.client_params(Path("/srv/p.run/ca.crt"))
    )
    assert secure.endswith(" sslmode=verify-full sslrootcert=/srv/p.run/ca.crt")
    assert files.pgpass(5432, {"replicator": "a:b\\c"}) == "*:5432:*:replicator:a\\:b\\\\c\n"


# --- LSNs, histories, the rewind rule --------------------------------------------------------


def test_lsn_text_round_trip() -> None:
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert format_lsn(parse_lsn("0/3000060")) == "0/3000060"
    with pytest.raises(ValueError, match="not an LSN"):
        parse_lsn("3000060")


def test_history_file() -> None:
    text = (
        "1\t0/3000060\tno recovery target specified\n\n2\t0/5000000\tno recovery target specified\n"
    )
    assert parse_history(text) == [TimelineSwitch(1, 0x3000060), TimelineSwitch(2, 0x5000000)]


HISTORY = [TimelineSwitch(1, 0x3000100), TimelineSwitch(2, 0x4000000)]


@pytest.mark.parametrize(
    ("local", "primary_tli", "expected"),
    [
        # a standby behind or at the switch point follows; past it, it diverged
        (LocalPosition(1, 0x3000000, True), 3, False),
        (LocalPosition(1, 0x3000100, True), 3, False),
        (LocalPosition(1, 0x3000101, True), 3, True),
        (LocalPosition(2, 0x3FFFFFF, True), 3, False),
        # a former primary: only if the switch point is its shutdown checkpoint's end
        (LocalPosition(1, 0x3000080, False, checkpoint_end=0x3000100), 3, False),
        (LocalPosition(1, 0x3000080, False, checkpoint_end=0x30000F0), 3, True),
        (LocalPosition(1, 0x3000080, False, checkpoint_end=None), 3, True),
        (LocalPosition(1, 0x3000100, False, checkpoint_end=0x3000180), 3, True),
        # same timeline: nothing to undo; a newer one, or one the primary never had: rewind
        (LocalPosition(3, 0x9000000, True), 3, False),
        (LocalPosition(4, 0x1000000, True), 3, True),
        (LocalPosition(1, 0x1000000, True), 1, False),
    ],
)
def test_needs_rewind(local: LocalPosition, primary_tli: int, expected: bool) -> None:
    assert needs_rewind(local, primary_tli, HISTORY) is expected


def test_a_timeline_missing_from_the_history_needs_a_rewind() -> None:
    assert needs_rewind(LocalPosition(5, 0x1000, True), 7, [TimelineSwitch(4, 0x2000)])


def test_scram_verifier_check_matches_libpq() -> None:
    verifier = pq.PGconn.connect_start(b"host=/nonexistent").encrypt_password(
        b"s3cret", b"mes", b"scram-sha-256"
    )
    assert scram_matches(verifier.decode(), "s3cret")
    assert not scram_matches(verifier.decode(), "other")
    assert not scram_matches(None, "s3cret") and not scram_matches("md5abcdef", "s3cret")
