"""A package's file on disk: its sha256, its members judged safe or not, unpacked into a
new directory, and which versions a node keeps.

The judging and the retention are pure (:func:`member_problem`, :func:`to_remove`); the
rest is blocking file work, run by the agent in a thread (``packages.py``) so that its
loop and keepalives never wait for a disk. Every blocking function checks ``abort``
between members or chunks, so a version no longer wanted, or the agent's stop, ends it
soon.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal

from hapair.shared.lazy import LazyModule
from hapair.shared.package import ArchiveKind, sha256_file

if TYPE_CHECKING:
    import tarfile
    import zipfile
else:
    # Loaded when an archive is unpacked, not by every agent.
    tarfile = LazyModule("tarfile")
    zipfile = LazyModule("zipfile")

MARKER = ".hapair-installed"
"""Written in a version's directory once it is wholly unpacked and installed: a
directory without it is never used, and is removed."""
CHUNK = 1 << 20
MemberKind = Literal["file", "dir", "symlink", "hardlink", "device"]


class ArchiveError(Exception):
    """The file cannot be installed as it is; the message says why."""


class Aborted(Exception):
    """The work was ended from outside (``abort`` set)."""


# ---- pure -------------------------------------------------------------------------


def no_space(err: OSError) -> bool:
    """A full disk (or a user's quota): said as such, not as a failed write."""
    return err.errno in (errno.ENOSPC, errno.EDQUOT)


def _inside(parts: Iterable[str]) -> bool:
    """Whether a relative path, followed step by step, never leaves its root."""
    depth = 0
    for part in parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                return False
        elif part not in ("", "."):
            depth += 1
    return True


def member_problem(name: str, kind: MemberKind, link: str | None = None) -> str | None:
    """Why an archive member may not be unpacked, or None. ``link``: a symlink's target
    (relative to the member's own directory) or a hard link's (relative to the root)."""
    path = PurePosixPath(name)
    if kind == "device":
        return f"{name!r}: a device, FIFO or other special file"
    if name.startswith("/") or path.is_absolute():
        return f"{name!r}: an absolute path"
    if ".." in path.parts:
        return f"{name!r}: a path with '..'"
    if "\0" in name or not path.parts:
        return f"{name!r}: not a usable name"
    if path.parts[0] == MARKER or (path.parts[0] == "." and path.parts[1:2] == (MARKER,)):
        return f"{name!r}: a name the agent reserves for itself"
    if kind in ("symlink", "hardlink"):
        target = link or ""
        if not target or target.startswith("/"):
            return f"{name!r}: a link to an absolute path {target!r}"
        base = path.parent.parts if kind == "symlink" else ()
        if not _inside([*base, *PurePosixPath(target).parts]):
            return f"{name!r}: a link to {target!r}, outside the package's directory"
    return None


@dataclass(frozen=True)
class Held:
    """One version directory of a service on this node."""

    name: str
    installed_at: float | None
    """When it was installed (its marker's time); None: never completed."""


def to_remove(
    held: Iterable[Held], declared: str, keep: int = 2, busy: Iterable[str] = ()
) -> list[str]:
    """The directories to delete: every incomplete one, and all but the ``keep`` most
    recently installed, the declared version always among those kept. Those in ``busy``
    (a process may run from them) are kept too, whatever their age."""
    complete = sorted(
        (h for h in held if h.installed_at is not None and h.name != declared),
        key=lambda h: h.installed_at or 0.0,
        reverse=True,
    )
    others = keep - 1 if any(h.name == declared and h.installed_at for h in held) else keep
    kept = {declared, *(h.name for h in complete[: max(others, 0)])}
    gone = (h.name for h in held if h.name not in kept or h.installed_at is None)
    return sorted(set(gone) - set(busy))


# ---- blocking file work (run in a thread) -----------------------------------------


def _check(abort: threading.Event) -> None:
    if abort.is_set():
        raise Aborted


def sha256_of(path: Path, abort: threading.Event) -> str:
    return sha256_file(path, lambda: _check(abort))


def unpack(
    archive: Path,
    kind: ArchiveKind,
    file_name: str,
    into: Path,
    max_bytes: int,
    abort: threading.Event,
) -> None:
    """Unpack ``archive`` into the new directory ``into``; ArchiveError says why not.
    Every member is judged before anything is written; on any failure ``into`` is gone."""
    into.mkdir(mode=0o700)
    try:
        if kind == "file":
            target = into / file_name
            _copy(archive, target, max_bytes, abort)
            target.chmod(0o755)  # a single file is most often the program itself
        elif kind == "zip":
            _unzip(archive, into, max_bytes, abort)
        else:
            _untar(archive, into, max_bytes, abort)
    except BaseException:
        shutil.rmtree(into, ignore_errors=True)
        raise


def _copy(source: Path, target: Path, max_bytes: int, abort: threading.Event) -> None:
    with source.open("rb") as src, target.open("xb") as dst:
        copied = 0
        while chunk := src.read(CHUNK):
            _check(abort)
            copied += len(chunk)
            if copied > max_bytes:
                raise ArchiveError(f"larger than the limit of {max_bytes} bytes")
            dst.write(chunk)


def _judge(problems: list[str], total: int, max_bytes: int) -> None:
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ArchiveError("unsafe archive member " + "; ".join(problems[:3]) + more)
    if total > max_bytes:
        raise ArchiveError(f"unpacks to {total} bytes, more than the limit of {max_bytes}")


def _tar_kind(member: tarfile.TarInfo) -> MemberKind:
    if member.isfile():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    return "device"


def _untar(archive: Path, into: Path, max_bytes: int, abort: threading.Event) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            problems = [
                p
                for m in members
                if (p := member_problem(m.name, _tar_kind(m), m.linkname or None)) is not None
            ]
            _judge(problems, sum(m.size for m in members if m.isfile()), max_bytes)
            for m in members:
                _check(abort)
                # The data filter is the second guard: links through links, modes.
                tar.extract(m, into, set_attrs=True, filter="data")
    except (tarfile.TarError, EOFError) as err:
        raise ArchiveError(f"not a readable tar archive: {err}") from None


def _zip_kind(info: zipfile.ZipInfo) -> MemberKind:
    kind = stat.S_IFMT(info.external_attr >> 16)  # 0: no Unix mode recorded
    if info.is_dir():
        return "dir"
    if kind == stat.S_IFLNK:
        return "symlink"
    if kind not in (0, stat.S_IFREG):
        return "device"
    return "file"


def _unzip(archive: Path, into: Path, max_bytes: int, abort: threading.Event) -> None:
    try:
        with zipfile.ZipFile(archive) as z:
            infos = z.infolist()
            links = {i.filename: z.read(i).decode() for i in infos if _zip_kind(i) == "symlink"}
            problems = [
                p
                for i in infos
                if (p := member_problem(i.filename, _zip_kind(i), links.get(i.filename)))
                is not None
            ]
            _judge(problems, sum(i.file_size for i in infos), max_bytes)
            root = into.resolve()
            for info in infos:
                _check(abort)
                target = into / info.filename
                # Written only below the root, even through a link unpacked before it.
                if not target.parent.resolve().is_relative_to(root):
                    raise ArchiveError(f"unsafe archive member {info.filename!r}: through a link")
                mode = (info.external_attr >> 16) & 0o755
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                if info.filename in links:
                    os.symlink(links[info.filename], target)
                    continue
                with z.open(info) as src, target.open("xb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
                target.chmod(mode or 0o644)
    except (zipfile.BadZipFile, UnicodeDecodeError) as err:
        raise ArchiveError(f"not a readable zip archive: {err}") from None


def settle(top: Path, uid: int, gid: int, writable: bool) -> None:
    """Give a version's tree to ``uid``:``gid``. ``writable``: for its ``install:``, run
    as that user. Otherwise read-only for everyone but the owner (the agent), the group
    reading and running what the owner may, nothing set-uid."""
    for path in [top, *top.rglob("*")]:
        os.lchown(path, uid, gid)
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.lstat().st_mode) & ~0o7022
        mode |= (mode & 0o500) >> 3
        if writable:
            mode |= 0o200
        path.chmod(mode)
    top.chmod(0o750 | (0o200 if writable else 0))


def mark(top: Path, text: str) -> None:
    """The version is complete: the marker written whole, then renamed into place."""
    tmp = top / (MARKER + ".tmp")
    tmp.write_text(text)
    tmp.rename(top / MARKER)
