"""Packages for tests: archives built in a temporary directory, a real aiohttp file
server started by the test (with the faults a plant's file server has: a missing file,
a transfer cut short, a slow one), and a small tmpfs for a full disk."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import subprocess
import tarfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from hapair.shared.pki import TlsFiles
from tests.support.harness import PYTHON, ROOT

CUT_AFTER_S = 0.2
APP = """#!/bin/sh
# The test's packaged program: says which version it is, then waits.
echo "{version}" > "$HAPAIR_RECORD_DIR/$HAPAIR_NODE.running"
exec sleep 600
"""


def build(
    directory: Path, name: str, version: str, files: dict[str, str | bytes] | None = None
) -> Path:
    """``name-version.tar.gz`` holding ``bin/app`` (the program above), ``VERSION`` and
    ``files``."""
    path = directory / f"{name}-{version}.tar.gz"
    members = {"bin/app": APP.format(version=version), "VERSION": version, **(files or {})}
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for member, content in members.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(member)
            info.size = len(data)
            info.mode = 0o755 if member.startswith("bin/") or member.endswith(".sh") else 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def package(path: Path, url: str, version: str, **extra: Any) -> dict[str, Any]:
    """The ``package:`` block of a site file for the file at ``path``, served at ``url``."""
    return {"version": version, "url": url, "sha256": sha256(path), **extra}


@dataclass
class FileServer:
    """Serves the files of ``root`` at ``/NAME``. ``cut[NAME] = n``: every transfer of
    NAME ends after ``n`` bytes of its body (the connection closed), Range honoured;
    ``delay_s``: each answer waits that long first. Counts requests and the most that
    ran at once."""

    root: Path
    cut: dict[str, int] = field(default_factory=dict)
    delay_s: float = 0.0
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    running: int = 0
    most_at_once: int = 0
    port: int = 0
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.requests.append((name, request.headers.get("Range")))
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            path = self.root / name
            if not path.is_file():
                raise web.HTTPNotFound()
            data = path.read_bytes()
            start = 0
            ask = request.headers.get("Range", "")
            if ask.startswith("bytes=") and ask.endswith("-"):
                start = int(ask[6:-1])
            body = data[start:]
            resp = web.StreamResponse(status=206 if start else 200)
            resp.content_length = len(body)
            if start:
                resp.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            await resp.prepare(request)
            limit = self.cut.get(name)
            if limit is None:
                await resp.write(body)
                await resp.write_eof()
                return resp
            await resp.write(body[:limit])
            # Cut short: the connection closed with the body unfinished, a moment after
            # (as a link that drops mid-transfer: what came before it was read).
            await asyncio.sleep(CUT_AFTER_S)
            assert request.transport is not None
            request.transport.close()
            return resp
        finally:
            self.running -= 1


@contextlib.asynccontextmanager
async def serving(root: Path, tls: TlsFiles | None = None) -> AsyncIterator[FileServer]:
    """``root`` served on 127.0.0.1; over HTTPS with ``tls`` (a certificate for
    127.0.0.1 and its key), clients not asked for one."""
    server = FileServer(root, scheme="https" if tls else "http")
    app = web.Application()
    app.router.add_get("/{name}", server._serve)
    runner = web.AppRunner(app)
    await runner.setup()
    context = tls.server_context(require_client_cert=False) if tls else None
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    server.port = runner.addresses[0][1]
    try:
        yield server
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[bool]:
    """A tmpfs of ``size`` mounted at ``path`` for the block, unmounted after; yields
    False (nothing mounted) where this process may not mount."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "tmpfs", str(path)],
        capture_output=True,
    )
    if done.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


SERVE = """#!/bin/sh
# The test's packaged server (tests/support/svc.py): answers its health check with 500
# when its version ships a SICK file.
exec {python} {svc} --sick-flag "$(dirname "$0")/../SICK" "$@"
"""


def build_server(
    directory: Path,
    name: str,
    version: str,
    sick: bool = False,
    files: dict[str, str | bytes] | None = None,
) -> Path:
    """``name-version.tar.gz`` holding ``bin/serve``, the recording test server, which
    fails its health check in a version built ``sick``, and ``files``."""
    svc = ROOT / "tests" / "support" / "svc.py"
    files = {**(files or {}), "bin/serve": SERVE.format(python=PYTHON, svc=svc)}
    if sick:
        files["SICK"] = "this version fails its health check\n"
    return build(directory, name, version, files)


def served(
    name: str,
    port: int,
    pkg: dict[str, Any],
    record: Path,
    start_period_s: float = 5.0,
    **extra: Any,
) -> dict[str, Any]:
    """The packaged test server as service ``name`` on ``port`` of each node's address,
    recording its runs in ``record``, given ``start_period_s`` to answer its check."""
    record.mkdir(exist_ok=True)
    # An active-only service answers with its term's epoch; one on every node has none.
    epoch = ["--epoch", "{epoch}"] if extra.get("placement", "active") == "active" else []
    return {
        "name": name,
        "command": [
            "{package.dir}/bin/serve",
            *("--service", name, "--pair", "{pair.name}", "--node", "{node.name}"),
            *epoch,
            *("--bind", "{node.address}", "--port", str(port), "--record", str(record)),
        ],
        "health": {
            "http": f"http://{{node.address}}:{port}/",
            "interval_s": 0.2,
            "timeout_s": 1.0,
            "failures": 2,
            "start_period_s": start_period_s,
        },
        "package": pkg,
        **extra,
    }
