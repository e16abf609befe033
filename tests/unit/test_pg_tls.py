"""The database server's TLS files as the agent checks and copies them (no server)."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from hapair.shared import pki
from hapair.workshop_agent.pg import tls
from hapair.workshop_agent.pg.config import Layout
from hapair.workshop_agent.pg.errors import PgError, TlsError

ADDRESS = "10.0.0.1"
NOBODY = 65534


@pytest.fixture
def site(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    pki.init(directory, "Plant A")
    pki.issue(directory, pki.Kind.POSTGRES, "postgres@a", [ADDRESS], ["srv-a.plant"])
    return directory


def source(site: Path, name: str = "postgres@a") -> tls.TlsSource:
    return tls.TlsSource(site / "ca.crt", site / f"{name}.crt", site / f"{name}.key")


def refused(src: tls.TlsSource, address: str = ADDRESS, db_uid: int | None = None) -> str:
    with pytest.raises(TlsError) as err:
        tls.load(src, address, os.geteuid() if db_uid is None else db_uid)
    assert isinstance(err.value, PgError)  # the agent reports it as any database error
    return str(err.value)


def test_the_files_are_read_checked_and_copied_for_the_database_user(
    site: Path, tmp_path: Path
) -> None:
    pem = tls.load(source(site), ADDRESS, os.geteuid())
    assert "***" in repr(pem) and "PRIVATE KEY" not in repr(pem)
    assert tls.load(source(site), "srv-a.plant", os.geteuid()) == pem  # by its DNS name too
    layout = Layout.beside(tmp_path / "pg")
    layout.run_dir.mkdir(mode=0o700)
    tls.install(pem, layout, os.geteuid(), os.getegid())
    for copy, original in (
        (layout.tls_cert, "postgres@a.crt"),
        (layout.tls_key, "postgres@a.key"),
        (layout.tls_ca, "ca.crt"),
    ):
        assert copy.read_bytes() == (site / original).read_bytes()
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600
        assert copy.parent == layout.run_dir != layout.data_dir  # never copied by a clone


def test_a_missing_file_is_named_with_its_field_the_command_and_the_lab_switch(
    site: Path,
) -> None:
    (site / "postgres@a.crt").unlink()
    message = refused(source(site))
    assert f"{site}/postgres@a.crt (database.tls.cert_file): no such file" in message
    assert "hapair pki issue DIR postgres postgres@NODE --ip ADDRESS" in message
    assert "database: {security: none}" in message
    message = refused(tls.TlsSource(site / "none.crt", site / "x.crt", site / "x.key"))
    assert "none.crt (database.tls.ca_file): no such file" in message


def test_a_key_others_may_read_is_refused_naming_the_fix(site: Path) -> None:
    key = site / "postgres@a.key"
    key.chmod(0o640)
    message = refused(source(site))
    assert f"{key} (database.tls.key_file): group or others have access (mode 0640)" in message
    assert f"chmod 600 {key}" in message


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to other users needs root")
def test_a_key_owned_by_the_database_user_is_taken_by_another_refused(site: Path) -> None:
    key = site / "postgres@a.key"
    os.chown(key, NOBODY, NOBODY)
    tls.load(source(site), ADDRESS, db_uid=NOBODY)  # the user PostgreSQL runs as
    message = refused(source(site), db_uid=NOBODY - 1)
    assert re.search(rf"owned by uid {NOBODY}, neither this agent's user .* chown it", message)


def test_a_certificate_that_does_not_name_the_node_address_is_refused(site: Path) -> None:
    message = refused(source(site), address="10.0.0.2")
    assert "does not name 10.0.0.2, the node's address" in message
    assert "it names 10.0.0.1, srv-a.plant" in message and "--ip 10.0.0.2" in message


def test_another_key_another_ca_or_a_client_certificate_is_refused(
    site: Path, tmp_path: Path
) -> None:
    pki.issue(site, pki.Kind.POSTGRES, "postgres@b", [ADDRESS])
    mixed = tls.TlsSource(site / "ca.crt", site / "postgres@a.crt", site / "postgres@b.key")
    assert f"not the key of {site}/postgres@a.crt" in refused(mixed)

    other = tmp_path / "other"
    pki.init(other, "Plant B")
    pki.issue(other, pki.Kind.POSTGRES, "postgres@a", [ADDRESS])
    foreign = tls.TlsSource(site / "ca.crt", other / "postgres@a.crt", other / "postgres@a.key")
    assert f"not issued by the CA of {site}/ca.crt" in refused(foreign)

    pki.issue(site, pki.Kind.AGENT, "a")
    assert "not a server's certificate (issue it as the kind postgres)" in refused(
        source(site, "a")
    )

    (site / "postgres@a.crt").write_text("not a certificate\n")
    assert "(database.tls.cert_file): not a PEM certificate" in refused(source(site))
