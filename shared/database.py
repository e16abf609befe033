"""The ``database:`` section of a pair, validated at the boundary.

The shape is the one of the site file::

    database:
      engine: postgresql
      port: 5432
      data_dir: /var/lib/hapair/{pair.name}/pg
      os_user: postgres
      synchronous: true
      degrade_after_s: 5
      parameters: {max_connections: "200"}
      auth: {superuser: postgres, superuser_password_file: /etc/hapair/pg-superuser.pw,
             replication_user: replicator, replication_password_file: /etc/hapair/pg-repl.pw}
      clients: [127.0.0.0/8]
      databases: [{name: mes, owner: mes, password_file: /etc/hapair/pg-mes.pw}]
      tls: {ca_file: /etc/hapair/pki/ca.crt,                      # these are the defaults
            cert_file: /etc/hapair/pki/postgres@{node.name}.crt,
            key_file: /etc/hapair/pki/postgres@{node.name}.key}
      # security: none                     # the lab mode: no TLS (a warning at start)

Errors name the field (``database.data_dir: unknown placeholder {pair.nam} ...``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from hapair.shared.model import StrictModel
from hapair.shared.validation import TopologyError, expand, format_errors, placeholders_in

DATA_DIR_PLACEHOLDERS = frozenset({"pair.name", "node.name", "node.address"})
RoleName = Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]{0,62}$")]
DbName = Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]{0,62}$")]
OsUser = Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_-]{0,31}$")]
ParamName = Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_.]{0,62}$")]

# Settings the agent owns: a site file may not set them, or replication would break.
MANAGED = frozenset(
    {
        "listen_addresses",
        "port",
        "unix_socket_directories",
        "unix_socket_permissions",
        "data_directory",
        "config_file",
        "hba_file",
        "ident_file",
        "external_pid_file",
        "cluster_name",
        "wal_level",
        "wal_log_hints",
        "hot_standby",
        "primary_conninfo",
        "primary_slot_name",
        "synchronous_standby_names",
        "password_encryption",
        "ssl",
        "ssl_cert_file",
        "ssl_key_file",
    }
)
# Settings that run a command or load code as the database's user: whoever writes the
# site file must not run programs on the servers through them. Set where the server is
# (``postgresql.base.conf`` in the data directory), not in the site file.
RUNS_CODE = frozenset(
    {
        "archive_command",
        "archive_library",
        "restore_command",
        "archive_cleanup_command",
        "recovery_end_command",
        "ssl_passphrase_command",
        "shared_preload_libraries",
        "session_preload_libraries",
        "local_preload_libraries",
        "dynamic_library_path",
        "jit_provider",
        # Directives, not settings: they would read any file as configuration.
        "include",
        "include_dir",
        "include_if_exists",
    }
)
# Settings of procedural languages that run code of that language when it loads.
RUNS_CODE_PREFIXES = ("plperl.on_", "plv8.start_proc", "pltcl.start_proc", "pltclu.start_proc")
SYNC_COMMIT_OK = frozenset({"on", "remote_apply"})


def _absolute(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path, got {value!r}")
    return value


class Auth(StrictModel):
    superuser: RoleName = Field(
        "postgres",
        description="PostgreSQL's superuser role, the agents' own (local socket and the "
        "pair's node addresses only)",
    )
    superuser_password_file: str = Field(
        description="absolute path on each node of the file holding the superuser's password "
        "(mode 600, owned by the agent's user; never in etcd)"
    )
    replication_user: RoleName = Field(
        "replicator",
        description="the role the standbys replicate as (from the pair's node addresses "
        "only); not the superuser",
    )
    replication_password_file: str = Field(
        description="absolute path on each node of the file holding the replication role's "
        "password (mode 600, owned by the agent's user; never in etcd)"
    )

    _paths = field_validator("superuser_password_file", "replication_password_file")(_absolute)

    @model_validator(mode="after")
    def _distinct(self) -> Auth:
        if self.superuser == self.replication_user:
            raise ValueError(f"replication_user must differ from superuser ({self.superuser!r})")
        return self


def _file_with_placeholders(value: str) -> str:
    _absolute(value)
    unknown = placeholders_in(value) - DATA_DIR_PLACEHOLDERS
    if unknown:
        names = ", ".join("{" + u + "}" for u in sorted(unknown))
        known = ", ".join("{" + p + "}" for p in sorted(DATA_DIR_PLACEHOLDERS))
        raise ValueError(f"unknown placeholder {names} in {value!r}; known: {known}")
    return value


PKI_DIR = "/etc/hapair/pki"


class Tls(StrictModel):
    """Where each node finds its PostgreSQL server's certificate and key, and the CA the
    agents and the standbys check it against: files on the node, never in etcd
    (``hapair pki issue DIR postgres postgres@NODE --ip ADDRESS``)."""

    ca_file: str = Field(
        f"{PKI_DIR}/ca.crt",
        description="absolute path on each node: the site CA the agents and the standbys "
        "check the servers against",
    )
    cert_file: str = Field(
        f"{PKI_DIR}/postgres@{{node.name}}.crt",
        description="absolute path on each node: the node's PostgreSQL certificate, issued by "
        "the CA and naming the node's address; {node.name} expanded",
    )
    key_file: str = Field(
        f"{PKI_DIR}/postgres@{{node.name}}.key",
        description="absolute path on each node: that certificate's key, with no access for "
        "group or others",
    )

    _paths = field_validator("ca_file", "cert_file", "key_file")(_file_with_placeholders)


class DatabaseSpec(StrictModel):
    name: DbName = Field(description="the database, created on the primary if missing")
    owner: RoleName = Field(
        description="the role that owns it, created with the password below: clients log in as it"
    )
    password_file: str = Field(
        description="absolute path on each node of the file holding the owner's password "
        "(mode 600, never in etcd)"
    )

    _path = field_validator("password_file")(_absolute)


class DatabaseConfig(StrictModel):
    engine: Literal["postgresql"] = Field("postgresql", description="PostgreSQL only")
    port: int = Field(
        5432,
        ge=1,
        le=65535,
        description="the TCP port PostgreSQL listens on, on every node; the active publishes "
        "it as the endpoint {pair}.db",
    )
    data_dir: str = Field(
        description="absolute path of the data directory on each node; {pair.name}, "
        "{node.name} and {node.address} expanded"
    )
    os_user: OsUser = Field(
        "postgres", description="the system user PostgreSQL runs as (it refuses root)"
    )
    synchronous: bool = Field(
        True,
        description="true: a commit is acknowledged once the synchronous standby has it too; "
        "false: asynchronous replication",
    )
    degrade_after_s: float = Field(
        5.0,
        gt=0.0,
        le=3600.0,
        description="seconds the synchronous standby may be gone before the primary stops "
        "waiting for it (writes go on, asynchronous)",
    )
    parameters: dict[ParamName, str] = Field(
        default_factory=dict,
        description="postgresql.conf settings, name to value; none the agent sets itself, "
        "none that runs a command or loads code",
    )
    auth: Auth = Field(description="the superuser's and the replication role's names and passwords")
    clients: list[str] = Field(
        default_factory=list,
        description="networks (CIDR) whose clients may connect to the databases, over TLS "
        "with scram-sha-256",
    )
    databases: list[DatabaseSpec] = Field(
        default_factory=list,
        description="the databases and their owners, created on the primary",
    )
    security: Literal["on", "none"] = Field(
        "on",
        description="on: TLS, replication and the superuser over TLS only; none (labs): "
        "no TLS, everything in clear",
    )
    tls: Tls | None = Field(None, description="the TLS files; unset: the defaults of Tls")

    @field_validator("data_dir")
    @classmethod
    def _data_dir(cls, value: str) -> str:
        _file_with_placeholders(value)
        if value.rstrip("/") in ("", "/"):
            raise ValueError("must not be the root directory")
        return value

    @field_validator("os_user")
    @classmethod
    def _not_root(cls, value: str) -> str:
        if value == "root":
            raise ValueError("PostgreSQL refuses to run as root; name an unprivileged user")
        return value

    @field_validator("parameters", mode="before")
    @classmethod
    def _as_text(cls, value: object) -> object:
        # YAML gives numbers and booleans; PostgreSQL wants text (on/off for booleans).
        if not isinstance(value, Mapping):
            return value
        return {k: _setting_text(v) for k, v in value.items()}

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, value: dict[str, str]) -> dict[str, str]:
        owned = sorted(MANAGED & value.keys())
        if owned:
            raise ValueError(f"{', '.join(owned)} is set by the agent and may not be given here")
        code = sorted(k for k in value if k in RUNS_CODE or k.startswith(RUNS_CODE_PREFIXES))
        if code:
            raise ValueError(
                f"{', '.join(code)} would run a command or load code on the servers and may "
                "not be set from the site file; set it on each server, in the data "
                "directory's postgresql.base.conf"
            )
        sync_commit = value.get("synchronous_commit")
        if sync_commit is not None and sync_commit not in SYNC_COMMIT_OK:
            raise ValueError(
                f"synchronous_commit {sync_commit!r} would acknowledge commits the standby "
                f"does not have; use one of {', '.join(sorted(SYNC_COMMIT_OK))}"
            )
        return value

    @field_validator("clients")
    @classmethod
    def _clients(cls, value: list[str]) -> list[str]:
        networks = []
        for i, text in enumerate(value):
            try:
                networks.append(str(ipaddress.ip_network(text, strict=True)))
            except ValueError as err:
                raise ValueError(f"clients[{i}] {text!r} is not a network: {err}") from None
        return networks

    @model_validator(mode="after")
    def _databases(self) -> DatabaseConfig:
        seen: dict[str, int] = {}
        owners: dict[str, str] = {}
        for i, db in enumerate(self.databases):
            if db.name in seen:
                raise ValueError(
                    f"duplicate database name {db.name!r} at "
                    f"databases[{seen[db.name]}] and databases[{i}]"
                )
            seen[db.name] = i
            if owners.setdefault(db.owner, db.password_file) != db.password_file:
                raise ValueError(
                    f"databases[{i}].owner {db.owner!r} owns another database with another "
                    "password_file; one role has one password"
                )
            if db.owner in (self.auth.superuser, self.auth.replication_user):
                raise ValueError(
                    f"databases[{i}].owner {db.owner!r} is the superuser or the replication "
                    "user; give the database an owner of its own"
                )
        return self

    @model_validator(mode="after")
    def _tls(self) -> DatabaseConfig:
        if self.security == "none" and self.tls is not None:
            raise ValueError(
                "tls is given but security is none: drop tls for the lab mode, or security: "
                "none to use it (never silently in clear)"
            )
        return self

    @property
    def tls_files(self) -> Tls | None:
        """The TLS files (the defaults unless ``tls`` names others); None in the lab mode."""
        if self.security == "none":
            return None
        return self.tls or Tls()

    def layout(self, values: Mapping[str, str]) -> Layout:
        """Where this node keeps its files, placeholders expanded."""
        return Layout.beside(Path(expand(self.data_dir, values)))


def _setting_text(value: object) -> object:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return value


@dataclass(frozen=True)
class Layout:
    """A node's paths: the data dir and, beside it (never inside it, or ``pg_basebackup``
    would copy the socket lock), a run dir for the socket, the password file for
    replication connections, the TLS files and the server log."""

    data_dir: Path
    run_dir: Path

    @classmethod
    def beside(cls, data_dir: Path) -> Layout:
        return cls(data_dir, data_dir.with_name(data_dir.name + ".run"))

    @property
    def passfile(self) -> Path:
        return self.run_dir / "pgpass"

    @property
    def tls_cert(self) -> Path:
        """The server's certificate, copied here for the database's user to read."""
        return self.run_dir / "server.crt"

    @property
    def tls_key(self) -> Path:
        return self.run_dir / "server.key"

    @property
    def tls_ca(self) -> Path:
        """The CA that the standby's connections (walreceiver, pg_basebackup, pg_rewind),
        which run as the database's user, check the primary against."""
        return self.run_dir / "ca.crt"

    @property
    def log_file(self) -> Path:
        return self.run_dir / "postgres.log"

    @property
    def staging(self) -> Path:
        """A fresh clone is made here, then renamed into place: never half a data dir."""
        return self.data_dir.with_name(self.data_dir.name + ".clone")

    @property
    def retired(self) -> Path:
        """A data dir that could not be rewound is kept here until the next one."""
        return self.data_dir.with_name(self.data_dir.name + ".old")


def parse_database(data: object, source: str = "database") -> DatabaseConfig:
    """Validate a ``database:`` mapping; errors name ``database.<field>``."""
    try:
        return DatabaseConfig.model_validate(data)
    except ValidationError as err:
        top = "(top level): "
        problems = [
            f"database: {p.removeprefix(top)}" if p.startswith(top) else f"database.{p}"
            for p in format_errors(err)
        ]
        raise TopologyError(source, problems) from None
