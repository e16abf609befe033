"""Who the comm server's OPC UA server lets in: the users file, passwords, client
certificates from the site CA, anonymous clients, and the security settings."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from asyncua.crypto.permission_rules import UserRole
from cryptography.hazmat.primitives import serialization

from hapair.comm_server.access import (
    Access,
    AccessError,
    ServerSecurity,
    UserManager,
    UsersFile,
    check_password,
    hash_password,
    load_users,
    server_security,
)
from hapair.comm_server.config import loads
from hapair.comm_server.main import main
from hapair.shared import pki
from hapair.shared.log import EventLog
from hapair.shared.topology import OpcUaSecurity

LOG = EventLog("test")


def users_file(tmp_path: Path, users: dict[str, Any], mode: int = 0o600) -> Path:
    path = tmp_path / "users.yaml"
    path.write_text(json.dumps({"users": users}))
    os.chmod(path, mode)
    return path


def der(path: Path) -> bytes:
    return pki.load_certificate(path).public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    pki.init(root / "own", "plant")
    pki.issue(root / "own", "comm", "comm-a", ["127.0.0.1"])
    pki.issue(root / "own", "comm", "scada", ["127.0.0.1"])
    pki.issue(root / "own", "agent", "n1")  # an agent's: not for OPC UA clients' use
    pki.init(root / "other", "elsewhere")
    pki.issue(root / "other", "comm", "scada", ["127.0.0.1"])
    return root


def test_a_password_is_checked_against_its_scrypt_hash_only() -> None:
    stored = hash_password("s3cret")
    assert stored.startswith("scrypt$") and "s3cret" not in stored
    assert check_password(stored, "s3cret")
    assert not check_password(stored, "s3cret ")
    assert not check_password(stored, "")
    assert hash_password("s3cret") != stored  # salted


def test_the_users_file_is_refused_when_others_may_read_it(tmp_path: Path) -> None:
    path = users_file(tmp_path, {"alice": {"role": "writer"}}, mode=0o644)
    with pytest.raises(AccessError, match="group or others have access"):
        load_users(path)
    os.chmod(path, 0o600)
    assert load_users(path).users["alice"].role == "writer"


def test_the_users_file_holds_roles_and_hashes_only(tmp_path: Path) -> None:
    with pytest.raises(AccessError, match="not a password hash"):
        load_users(users_file(tmp_path, {"alice": {"role": "writer", "password": "plain"}}))
    with pytest.raises(AccessError, match="role"):
        load_users(users_file(tmp_path, {"alice": {"role": "admin"}}))


def manager(access: Access) -> UserManager:
    return UserManager(access, LOG)


def test_users_by_password_never_administrators() -> None:
    users = UsersFile.model_validate(
        {
            "users": {
                "alice": {"role": "writer", "password": hash_password("a")},
                "bob": {"role": "reader", "password": hash_password("b")},
                "scada": {"role": "writer"},  # by certificate only
            }
        }
    )
    m = manager(Access(users))
    # a session over a NoSecurity channel: no certificate at all
    assert m.get_user(None, "alice", "a") is None
    channel = b"the channel's certificate"
    alice = m.get_user(None, "alice", "a", channel)
    assert alice is not None and alice.writer and alice.role == UserRole.User
    bob = m.get_user(None, "bob", "b", channel)
    assert bob is not None and not bob.writer
    assert m.get_user(None, "alice", "b", channel) is None
    assert m.get_user(None, "admin", "anything", channel) is None
    assert m.get_user(None, "Admin", "", channel) is None
    assert m.get_user(None, "scada", "", channel) is None  # no password: no password login
    assert m.get_user(None, certificate=channel) is None  # anonymous, not allowed


def test_anonymous_clients_read_only_when_allowed() -> None:
    channel = b"the channel's certificate"
    reader = manager(Access(UsersFile(), anonymous="read")).get_user(None, certificate=channel)
    assert reader is not None and not reader.writer and reader.role == UserRole.User
    lab = ServerSecurity.lab().access
    assert lab.anonymous == "write" and not lab.signed_channel
    anyone = manager(lab).get_user(None)
    assert anyone is not None and anyone.writer


def test_a_client_certificate_names_a_user_when_the_site_ca_issued_it(site: Path) -> None:
    users = UsersFile.model_validate({"users": {"scada": {"role": "writer"}}})
    ca = pki.load_certificate(site / "own" / "ca.crt")
    m = manager(Access(users, ca))
    user = m.get_user(None, certificate=der(site / "own" / "scada.crt"))
    assert user is not None and user.name == "scada" and user.writer
    # the same name from another CA, a certificate of a name not in the file, garbage
    assert m.get_user(None, certificate=der(site / "other" / "scada.crt")) is None
    assert m.get_user(None, certificate=der(site / "own" / "comm-a.crt")) is None
    assert m.get_user(None, certificate=b"not a certificate") is None
    # with a CA, a password is taken only over a channel whose certificate it issued
    users = UsersFile.model_validate(
        {"users": {"alice": {"role": "writer", "password": hash_password("a")}}}
    )
    m = manager(Access(users, ca))
    assert m.get_user(None, "alice", "a", der(site / "other" / "scada.crt")) is None
    alice = m.get_user(None, "alice", "a", der(site / "own" / "comm-a.crt"))
    assert alice is not None and alice.name == "alice"
    # without a CA no certificate is anyone
    assert (
        manager(Access(users)).get_user(None, certificate=der(site / "own" / "scada.crt")) is None
    )


def test_security_on_needs_the_servers_certificate_key_and_users(
    site: Path, tmp_path: Path
) -> None:
    own = site / "own"
    users = users_file(tmp_path, {})
    with pytest.raises(AccessError, match="--opcua-cert, --opcua-key missing"):
        server_security(OpcUaSecurity(), None, None, None, users)
    with pytest.raises(AccessError, match="--opcua-users missing"):
        server_security(OpcUaSecurity(), own / "comm-a.crt", own / "comm-a.key", None, None)
    with pytest.raises(AccessError, match="RSA"):  # an agent's ECDSA key
        server_security(OpcUaSecurity(), own / "n1.crt", own / "n1.key", None, users)
    secured = server_security(
        OpcUaSecurity(anonymous="read"), own / "comm-a.crt", own / "comm-a.key", None, users
    )
    # the server's application URI is the one its certificate names
    assert secured.uri == "urn:hapair:comm:comm-a"
    assert secured.access.anonymous == "read"
    lab = server_security(OpcUaSecurity(security="none"), None, None, None, None)
    assert lab.certificate is None and lab.access.anonymous == "write"


def test_the_opcua_settings_in_a_plc_list_file() -> None:
    plcs = "plcs: [{name: p, paths: [{host: h}], tags: [{name: t, address: HR1, type: int16}]}]"
    assert loads(plcs).opcua == OpcUaSecurity(security="on", anonymous="refused")
    lab = loads(plcs + "\nopcua: {security: none}")
    assert lab.opcua.security == "none"
    with pytest.raises(ValueError, match=r"opcua\.security"):
        loads(plcs + "\nopcua: {security: off}")


def test_hash_password_prints_a_hash_for_the_users_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    assert main(["--hash-password"]) == 0
    printed = capsys.readouterr().out.strip()
    assert check_password(printed, "s3cret")
    load_users_text = {"users": {"alice": {"role": "writer", "password": printed}}}
    assert UsersFile.model_validate(load_users_text).users["alice"].password == printed
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["--hash-password"]) == 2


def test_password_checks_are_rationed_so_a_flood_cannot_stall_the_loop() -> None:
    users = UsersFile.model_validate(
        {"users": {"alice": {"role": "writer", "password": hash_password("a")}}}
    )
    now = [0.0]
    m = UserManager(Access(users), LOG, clock=lambda: now[0])
    channel = b"the channel's certificate"
    # the burst: wrong passwords are checked, and fail
    assert [m.get_user(None, "alice", "guess", channel) for _ in range(4)] == [None] * 4
    # beyond it, even the right password is refused, unchecked, until tokens come back
    assert m.get_user(None, "alice", "a", channel) is None
    now[0] += 0.5  # one check's worth
    user = m.get_user(None, "alice", "a", channel)
    assert user is not None and user.name == "alice"


def test_hapair_comm_refuses_to_serve_without_its_security_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "plcs.yaml"
    config.write_text(
        "plcs: [{name: p, paths: [{host: 127.0.0.1}],"
        " tags: [{name: t, address: HR1, type: int16}]}]"
    )
    args = ["--standalone", "--config", str(config), "--listen", "127.0.0.1:1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--opcua-cert, --opcua-key, --opcua-users missing" in err
    assert "opcua: {security: none}" in err
