"""Packages: the site file's ``package:`` checked by field, archive members judged, the
versions a node keeps, and what ``hapair package hash`` prints. No server: files in a
temporary directory at most."""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import stat
import tarfile
import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from hapair.registry.console import package_cmd
from hapair.shared.package import Package, archive_kind, check_url
from hapair.shared.topology import TopologyError, parse_site
from hapair.workshop_agent.package_archive import (
    MARKER,
    ArchiveError,
    Held,
    member_problem,
    to_remove,
    unpack,
)
from hapair.workshop_agent.package_fetch import Limits, _range_start, backoff, origin

SHA = "9f2c" + "0" * 60
NEVER = threading.Event()


def site(service: dict[str, Any]) -> dict[str, Any]:
    nodes = [{"name": "a", "address": "127.0.0.1"}, {"name": "b", "address": "127.0.0.2"}]
    pair = {"name": "p", "nodes": nodes, "services": [service]}
    return {"site": "s", "workshops": [{"name": "w", "pairs": [pair]}]}


def problems(service: dict[str, Any]) -> list[str]:
    with pytest.raises(TopologyError) as caught:
        parse_site(site(service), "site.yaml")
    return caught.value.problems


SVC = "workshops[0].pairs[0].services[0]"


# ---- the site file ----------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://files.plant.example/mes/mes-api-2.4.1.tar.gz",
        "http://10.0.0.5:8080/pkg/app.zip",
        "file:///srv/share/mes-api-2.4.1.tar.xz",
        "file://localhost/srv/share/tool",
    ],
)
def test_urls_hapair_can_fetch_are_accepted(url: str) -> None:
    assert check_url(url) == url


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ftp://files/x.tgz", "scheme 'ftp' is not one of"),
        ("files/x.tgz", "scheme '(none)'"),
        ("https://user:secret@files/x.tgz", "carries credentials"),
        ("https:///x.tgz", "names no host"),
        ("https://files:99999/x.tgz", "port"),
        ("https://files/dir/", "names no file"),
        ("file://server/share/x.tgz", "not host 'server'"),
        ("file:relative/x.tgz", "absolute file path"),
        ("file:///srv/../etc/x", "absolute file path"),
        ("https://files/x.tgz?token=1", "query"),
        ("https://files/a b.tgz", "white space"),
    ],
)
def test_bad_urls_are_refused_saying_why(url: str, says: str) -> None:
    with pytest.raises(ValueError) as caught:
        check_url(url)
    assert says in str(caught.value)


def test_a_bad_package_is_reported_field_by_field() -> None:
    found = problems(
        {
            "name": "mes",
            "command": ["{package.dir}/bin/mes"],
            "package": {"version": "", "url": "ftp://x/y.tgz", "sha256": "9f2c..."},
        }
    )
    by_field = {p.split(": ", 1)[0]: p for p in found}
    assert set(by_field) == {
        f"{SVC}.package.version",
        f"{SVC}.package.url",
        f"{SVC}.package.sha256",
    }
    assert "64 hexadecimal digits" in by_field[f"{SVC}.package.sha256"]
    assert "scheme 'ftp'" in by_field[f"{SVC}.package.url"]


@pytest.mark.parametrize("version", ["..", "a/b", "-1", "1 2", "x" * 65])
def test_a_version_is_a_safe_directory_name(version: str) -> None:
    found = problems(
        {
            "name": "mes",
            "command": ["x"],
            "package": {"version": version, "url": "https://f/x.tgz", "sha256": SHA},
        }
    )
    assert [p.split(": ", 1)[0] for p in found] == [f"{SVC}.package.version"]


def test_sha256_is_read_in_lower_case_and_names_the_directory() -> None:
    p = Package(version="2.4.1", url="https://f/mes-2.4.1.tar.gz", sha256=SHA.upper())
    assert p.sha256 == SHA
    assert p.dir_name == "2.4.1-9f2c00000000"
    assert p.kind == "tar.gz"


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("https://f/a.tar.gz", "tar.gz"),
        ("https://f/a.TGZ", "tar.gz"),
        ("https://f/a.tar.xz", "tar.xz"),
        ("file:///a/b.zip", "zip"),
        ("https://f/bin/tool", "file"),
        ("https://f/a.gz", "file"),
    ],
)
def test_how_a_package_is_unpacked_follows_its_name(url: str, kind: str) -> None:
    assert archive_kind(url) == kind


def test_package_dir_only_where_the_service_has_a_package() -> None:
    found = problems({"name": "mes", "command": ["{package.dir}/bin/mes"]})
    assert found == [
        f"{SVC}: {{package.dir}} in '{{package.dir}}/bin/mes' needs a package: for the service"
    ]
    ok = parse_site(
        site(
            {
                "name": "mes",
                "command": ["{package.dir}/bin/mes"],
                "cwd": "{package.dir}",
                "health": {"command": ["{package.dir}/bin/check"]},
                "package": {
                    "version": "1",
                    "url": "https://f/x.tgz",
                    "sha256": SHA,
                    "install": {"command": ["{package.dir}/setup", "{node.name}"]},
                },
            }
        ),
        "site.yaml",
    )
    package = next(ok.pairs()).services[0].package
    assert package is not None and package.install is not None
    assert package.install.timeout_s == 300.0


def test_install_has_no_epoch() -> None:
    found = problems(
        {
            "name": "mes",
            "command": ["x"],
            "package": {
                "version": "1",
                "url": "https://f/x.tgz",
                "sha256": SHA,
                "install": {"command": ["setup", "{epoch}"], "timeout_s": 10},
            },
        }
    )
    assert len(found) == 1 and "{epoch}" in found[0] and "package.install" in found[0]


# ---- archive members --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "link", "says"),
    [
        ("bin/app", "file", None, None),
        ("./bin/app", "file", None, None),
        ("lib/", "dir", None, None),
        ("bin/current", "symlink", "app", None),
        ("bin/lib", "symlink", "../lib", None),
        ("lib/hard", "hardlink", "bin/app", None),
        ("/etc/passwd", "file", None, "an absolute path"),
        ("../outside", "file", None, "'..'"),
        ("a/../../b", "file", None, "'..'"),
        ("dev/sda", "device", None, "a device"),
        ("bin/escape", "symlink", "../../etc", "outside the package"),
        ("bin/abs", "symlink", "/etc/shadow", "absolute path"),
        ("hard", "hardlink", "../x", "outside the package"),
        (MARKER, "file", None, "reserves"),
        ("./" + MARKER, "file", None, "reserves"),
    ],
)
def test_archive_members_are_judged(
    name: str, kind: Any, link: str | None, says: str | None
) -> None:
    problem = member_problem(name, kind, link)
    if says is None:
        assert problem is None
    else:
        assert problem is not None and says in problem and repr(name) in problem


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:  # type: ignore[call-overload]
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def _info(
    name: str, kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    return info


def test_a_tar_is_unpacked_with_its_modes_and_links(tmp_path: Path) -> None:
    archive = _tar(
        tmp_path / "app-1.tar.xz",
        [
            (_info("bin", tarfile.DIRTYPE, mode=0o755), b""),
            (_info("bin/app", mode=0o4755), b"#!/bin/sh\necho hi\n"),
            (_info("bin/current", tarfile.SYMTYPE, "app"), b""),
        ],
        "w:xz",
    )
    into = tmp_path / "out"
    unpack(archive, "tar.xz", "app-1.tar.xz", into, 1 << 20, NEVER)
    assert (into / "bin/app").read_text() == "#!/bin/sh\necho hi\n"
    assert os.readlink(into / "bin/current") == "app"
    mode = stat.S_IMODE((into / "bin/app").stat().st_mode)
    assert mode & 0o111 and not mode & stat.S_ISUID  # runnable, never set-uid


@pytest.mark.parametrize(
    ("member", "says"),
    [
        (_info("../evil"), "'..'"),
        (_info("/abs"), "absolute"),
        (_info("x", tarfile.SYMTYPE, "../../etc"), "outside"),
        (_info("fifo", tarfile.FIFOTYPE), "device"),
        (_info("dev", tarfile.CHRTYPE), "device"),
    ],
)
def test_an_unsafe_tar_unpacks_nothing(tmp_path: Path, member: tarfile.TarInfo, says: str) -> None:
    archive = _tar(tmp_path / "a.tar.gz", [(_info("good"), b"fine"), (member, b"x")])
    into = tmp_path / "out"
    with pytest.raises(ArchiveError, match=says):
        unpack(archive, "tar.gz", "a.tar.gz", into, 1 << 20, NEVER)
    assert not into.exists()


def test_a_zip_is_unpacked_and_an_unsafe_one_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as z:
        info = zipfile.ZipInfo("bin/tool")
        info.external_attr = (stat.S_IFREG | 0o755) << 16
        z.writestr(info, "#!/bin/sh\n")
        z.writestr("etc/conf", "x=1\n")
    unpack(good, "zip", "good.zip", tmp_path / "g", 1 << 20, NEVER)
    assert stat.S_IMODE((tmp_path / "g/bin/tool").stat().st_mode) == 0o755
    assert (tmp_path / "g/etc/conf").read_text() == "x=1\n"

    for name, link, says in [("../x", None, "'..'"), ("l", "../../etc", "outside")]:
        bad = tmp_path / f"bad-{says}.zip"
        with zipfile.ZipFile(bad, "w") as z:
            info = zipfile.ZipInfo(name)
            if link is not None:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, link or "data")
        into = tmp_path / f"out-{says}"
        with pytest.raises(ArchiveError, match=says):
            unpack(bad, "zip", bad.name, into, 1 << 20, NEVER)
        assert not into.exists()


def test_a_package_larger_than_the_limit_unpacks_nothing(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "big.tar.gz", [(_info("zeros"), bytes(4096))])
    into = tmp_path / "out"
    with pytest.raises(ArchiveError, match="more than the limit"):
        unpack(archive, "tar.gz", "big.tar.gz", into, 1024, NEVER)
    assert not into.exists()


def test_a_single_file_becomes_a_program_in_its_directory(tmp_path: Path) -> None:
    (tmp_path / "tool").write_bytes(b"#!/bin/sh\n")
    unpack(tmp_path / "tool", "file", "tool-1.2", tmp_path / "out", 1 << 20, NEVER)
    assert stat.S_IMODE((tmp_path / "out/tool-1.2").stat().st_mode) == 0o755


def test_a_corrupt_archive_is_said_to_be_so(tmp_path: Path) -> None:
    (tmp_path / "x.tar.gz").write_bytes(b"not a tar at all" * 10)
    with pytest.raises(ArchiveError, match="not a readable tar"):
        unpack(tmp_path / "x.tar.gz", "tar.gz", "x.tar.gz", tmp_path / "out", 1 << 20, NEVER)
    assert not (tmp_path / "out").exists()


# ---- versions kept ----------------------------------------------------------------


def test_the_declared_version_and_the_newest_other_are_kept() -> None:
    held = [Held("1", 10.0), Held("2", 20.0), Held("3", 30.0), Held("4", 40.0)]
    assert to_remove(held, "4") == ["1", "2"]
    # Going back to an older version keeps it and the one installed last.
    assert to_remove(held, "2") == ["1", "3"]


def test_incomplete_versions_are_always_removed() -> None:
    held = [Held("1", 10.0), Held("2", None), Held("3", 30.0)]
    assert to_remove(held, "3") == ["2"]


def test_with_the_declared_version_not_installed_the_two_newest_stay() -> None:
    held = [Held("1", 10.0), Held("2", 20.0), Held("3", 30.0)]
    assert to_remove(held, "9") == ["1"]


# ---- downloads --------------------------------------------------------------------


def test_one_download_at_a_time_per_origin() -> None:
    assert origin("https://Files.example:8443/a.tgz") == origin("https://files.example:8443/b")
    assert origin("https://files.example/a") != origin("http://files.example/a")
    assert origin("file:///a") == origin("file:///b")


def test_back_off_grows_to_its_cap() -> None:
    limits = Limits(backoff_s=1.0, backoff_max_s=5.0)
    assert [backoff(n, limits) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_a_resumed_range_names_its_first_byte() -> None:
    assert _range_start("bytes 1000-1999/2000") == 1000
    assert _range_start("bytes */2000") is None
    assert _range_start("") is None


# ---- hapair package hash ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "version"),
    [
        ("mes-api-2.4.1.tar.gz", "2.4.1"),
        ("tool_v1.2.zip", "1.2"),
        ("comm-3.0.0rc1.tar.xz", "3.0.0rc1"),
        ("agent-7", "7"),
        ("noversion.tar.gz", None),
    ],
)
def test_the_version_is_read_from_the_file_name(name: str, version: str | None) -> None:
    assert package_cmd.version_in_name(name) == version


async def test_package_hash_prints_a_block_the_site_file_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mes-api-2.4.1.tar.gz"
    path.write_bytes(b"the package")
    args = argparse.Namespace(file=path, url=None, version=None)
    assert await package_cmd.package_hash(args) == 0
    block = yaml.safe_load(capsys.readouterr().out)["package"]
    package = Package.model_validate(block)
    assert package.version == "2.4.1"
    assert package.url == path.resolve().as_uri()
    assert package.sha256 == hashlib.sha256(b"the package").hexdigest()
