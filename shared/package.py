"""``package:`` of a service in the site file: the software every node of its pair
holds, pinned by its sha256, and where a node keeps each version of it.

```yaml
package:
  version: "2.4.1"
  url: "https://files.plant.example/mes/mes-api-2.4.1.tar.gz"   # https, http or file
  sha256: "9f2c..."                                               # 64 hex digits
  install: {command: ["{package.dir}/setup.sh"], timeout_s: 300}  # optional
```

A node unpacks a version into ``{state_dir}/packages/{service}/{version}-{sha256[:12]}``
(:func:`Package.dir_name`); the service's ``command:``, health check and ``install:``
name that directory ``{package.dir}``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, field_validator

from hapair.shared.model import StrictModel

SCHEMES = ("https", "http", "file")
PEER_PORT = 7401  # TCP; the peer path's UDP port is 7400 (``network.peer_port``)
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~-]{0,63}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
PLACEHOLDER = "package.dir"
ArchiveKind = Literal["tar.gz", "tar.xz", "zip", "file"]
ARCHIVES: dict[str, ArchiveKind] = {
    ".tar.gz": "tar.gz",
    ".tgz": "tar.gz",
    ".tar.xz": "tar.xz",
    ".txz": "tar.xz",
    ".zip": "zip",
}


def check_url(url: str) -> str:
    """``url`` if hapair can fetch it (https, http or file); ValueError naming the
    problem otherwise. Credentials in it are refused: the site file is stored in etcd."""
    if url != url.strip() or any(c.isspace() for c in url):
        raise ValueError(f"url {url!r} contains white space")
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(
            f"url {url!r}: scheme {parts.scheme or '(none)'!r} is not one of "
            + ", ".join(f"{s}://" for s in SCHEMES)
        )
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"url {url!r} carries credentials: the site file is stored in etcd, for every "
            "node and operator to read"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"url {url!r}: a query or fragment is not supported")
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(
                f"url {url!r}: a file:// URL names a path on the node itself (file:///PATH), "
                f"not host {parts.netloc!r}"
            )
        path = PurePosixPath(unquote(parts.path))
        if not path.is_absolute() or ".." in path.parts or parts.path.endswith("/"):
            raise ValueError(f"url {url!r}: a file:// URL needs an absolute file path")
        return url
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"url {url!r}: the port is not a number from 0 to 65535") from None
    if not parts.hostname:
        raise ValueError(f"url {url!r} names no host")
    if port == 0:
        raise ValueError(f"url {url!r}: port 0")
    if parts.path.endswith("/") or not PurePosixPath(unquote(parts.path)).name:
        raise ValueError(f"url {url!r} names no file (its path ends without a name)")
    return url


def archive_kind(url: str) -> ArchiveKind:
    """How a package's file is unpacked, from the name its URL ends with."""
    name = PurePosixPath(unquote(urlsplit(url).path)).name.lower()
    return next((kind for suffix, kind in ARCHIVES.items() if name.endswith(suffix)), "file")


def file_name(url: str) -> str:
    """The name a single-file package gets in its directory: its URL's last part."""
    return PurePosixPath(unquote(urlsplit(url).path)).name


def sha256_file(path: Path, each_chunk: Callable[[], None] = lambda: None) -> str:
    """The sha256 of a file, read a megabyte at a time; ``each_chunk`` may raise to stop."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            each_chunk()
            digest.update(chunk)
    return digest.hexdigest()


class Install(StrictModel):
    """``package.install``: run once per node and version inside the unpacked directory,
    as the service's user, before the version counts as installed."""

    command: list[str] = Field(
        min_length=1,
        description="argv, run in the unpacked directory as the service's user, with its env, "
        "HAPAIR_PACKAGE_DIR and HAPAIR_PACKAGE_VERSION",
    )
    timeout_s: float = Field(
        300.0,
        gt=0.0,
        le=86400.0,
        description="seconds: the install, with all it started, is killed and has failed "
        "after this long",
    )


class Package(StrictModel):
    version: str = Field(
        description="the version; with the hash, it names its directory on each node"
    )
    url: str = Field(
        description="https:// (its certificate checked against the site CA), http://, or "
        "file:///PATH on the node itself; no credentials"
    )
    sha256: str = Field(
        description="the file's sha256, 64 hex digits: nothing is unpacked before it matches"
    )
    install: Install | None = Field(
        None,
        description="run once per node and version before the version counts as installed; "
        "unset: nothing to run",
    )

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        # Part of a directory name on every node: no separator, no dot-only name.
        if not VERSION_PATTERN.fullmatch(value):
            raise ValueError(
                f"version {value!r}: 1 to 64 letters, digits, '.', '_', '+', '~' or '-', "
                "starting with a letter or a digit"
            )
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_url(value)

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str) -> str:
        lowered = value.lower()
        if not SHA256_PATTERN.fullmatch(lowered):
            raise ValueError(
                f"sha256 {value!r}: 64 hexadecimal digits expected, got {len(value)} "
                "characters" + ("" if value.isalnum() else " with others than 0-9 a-f")
            )
        return lowered

    @property
    def dir_name(self) -> str:
        """The version's directory below ``packages/{service}/`` on every node."""
        return f"{self.version}-{self.sha256[:12]}"

    @property
    def kind(self) -> ArchiveKind:
        return archive_kind(self.url)


class Sharing(StrictModel):
    """``packages:`` of a pair: whether its nodes fetch the packages its services name
    from each other first, before the origin (a remote workshop whose link to the
    origin is slow, metered or down).

    With ``from_peers: true`` every node keeps the archive of each version it installed
    and verified, and serves it read-only on ``{node.address}:peer_port`` (TCP) to the
    other nodes of its pair alone: over TLS, each end showing its agent certificate of
    the site CA (in the lab mode, in clear to the peers' addresses, with a warning).
    A node asks a peer that says (in its status) it holds the version, checks the
    sha256 itself, and falls back to the origin."""

    from_peers: bool = Field(
        False,
        description="true: each node asks the peers that hold a version before the origin, "
        "and serves the archives it holds to them",
    )
    peer_port: int = Field(
        PEER_PORT,
        ge=1,
        le=65535,
        description="the TCP port each node serves its archives on, to the other nodes of "
        "its pair alone; not a service's endpoint port",
    )
