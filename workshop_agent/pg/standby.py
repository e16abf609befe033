"""Becoming a streaming standby of the current primary, from whatever is on disk.

A running standby is repointed live (``primary_conninfo`` reloads) unless it holds WAL
the new primary's history does not; a stopped data dir starts as it is, is rewound, or
is cloned afresh. The rewind decision follows the timeline history of the primary, as
Patroni does: a standby may follow if it has not gone past the switch point, a former
primary only if the switch point is exactly the end of its shutdown checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Literal

from hapair.workshop_agent.pg import ctl
from hapair.workshop_agent.pg import query as q
from hapair.workshop_agent.pg.errors import PgError
from hapair.workshop_agent.pg.node import PgNode
from hapair.workshop_agent.pg.status import LocalPosition, needs_rewind

StandbyAction = Literal["none", "repointed", "started", "cloned", "rewound", "recloned"]


async def become_standby(node: PgNode, primary_host: str) -> StandbyAction:
    """Follow ``primary_host``; what it took."""
    data = node.layout.data_dir
    diverged = False
    if node.running() is not None and await node.in_recovery():
        done = await follow_running(node, primary_host)
        if done is not None:
            return done
        diverged = True
    node.drop()
    # A primary here is a stale one (the agent says another node is active): stop it.
    await ctl.stop(node.layout, fast_s=node.timeouts.demote_fast_s, step="ensure_standby")
    ctl.prepare_dirs(node.layout, node.runner)
    node.write_run_files()
    if ctl.is_empty(data):
        with contextlib.suppress(FileNotFoundError):
            data.rmdir()
        await clone(node, primary_host)
        action: StandbyAction = "cloned"
    else:
        action = await rejoin(node, primary_host, diverged)
    await node.start(standby=True, upstream=primary_host)
    return action


async def follow_running(node: PgNode, primary_host: str) -> StandbyAction | None:
    """A running standby: nothing to do, or repoint it live; None if it diverged."""
    conn = await node.local()
    wanted = node.conninfo(primary_host)
    current, sync = await q.one(
        conn,
        "SELECT current_setting('primary_conninfo'), current_setting('synchronous_standby_names')",
        step="ensure_standby",
    )
    if sync:
        await q.set_sync_names(conn, "")  # or a later promotion blocks every commit
    pos = await q.standby_position(conn)
    if current == wanted and pos.streaming and pos.upstream == primary_host:
        return "none"
    local = LocalPosition(pos.timeline, max(pos.receive_lsn or 0, pos.replay_lsn or 0), True)
    if current == wanted:
        # Not streaming from the right node: still connecting, the primary is away,
        # or it holds WAL the primary never had and waits in vain. Only the last needs us.
        with contextlib.suppress(PgError):
            if await diverged_from(node, primary_host, local):
                return None
        return "none"
    if await diverged_from(node, primary_host, local):
        return None
    await q.set_primary_conninfo(conn, wanted)
    return "repointed"


async def rejoin(node: PgNode, primary_host: str, diverged: bool) -> StandbyAction:
    """A stopped data dir follows the primary: as it is, rewound, or cloned afresh."""
    data = node.layout.data_dir
    try:
        control = await ctl.controldata(node.runner, data) if ctl.is_cluster(data) else None
    except PgError:
        control = None
    if control is None:
        await reclone(node, primary_host)
        return "recloned"
    remote = await node.connect(primary_host)
    try:
        if await q.system_id(remote) != control.system_id:
            await reclone(node, primary_host)  # another cluster's data
            return "recloned"
        if (data / "backup_label").exists():
            return "started"  # a clone never started: it recovers from its label
        local = None if diverged else await local_position(node, control)
        if local is not None and not await rewind_needed(remote, local):
            return "started"
        await q.checkpoint(remote)  # else pg_rewind may read the old timeline there
    finally:
        await remote.close()
    if not control.rewindable:
        await reclone(node, primary_host)  # neither data checksums nor wal_log_hints
        return "recloned"
    try:
        await ctl.rewind(
            node.runner, node.layout, node.rewind_source(primary_host), node.timeouts.rewind_s
        )
    except PgError:
        if not await is_primary(node, primary_host):
            raise  # the primary went away mid-rewind: keep the data, try again later
        await reclone(node, primary_host)
        return "recloned"
    return "rewound"


async def is_primary(node: PgNode, host: str) -> bool:
    try:
        remote = await node.connect(host)
    except PgError:
        return False
    try:
        return not await q.is_in_recovery(remote)
    except PgError:
        return False
    finally:
        await remote.close()


async def local_position(node: PgNode, control: ctl.ControlData) -> LocalPosition | None:
    """Where the stopped data dir's WAL ends; None after a crash (pg_rewind finds out)."""
    if control.was_standby and control.min_recovery:
        return LocalPosition(control.min_recovery_timeline, control.min_recovery, True)
    if control.clean_primary:
        tli, lsn = control.checkpoint_timeline, control.checkpoint
        end = await ctl.checkpoint_end(node.runner, node.layout, tli, lsn)
        return LocalPosition(tli, lsn, False, end)
    return None


async def rewind_needed(remote: q.Conn, local: LocalPosition) -> bool:
    if await q.is_in_recovery(remote):
        raise PgError("ensure_standby", "the node to follow is not a primary (in recovery)")
    timeline, switches = await q.history(remote)
    return needs_rewind(local, timeline, switches)


async def diverged_from(node: PgNode, primary_host: str, local: LocalPosition) -> bool:
    remote = await node.connect(primary_host)
    try:
        return await rewind_needed(remote, local)
    finally:
        await remote.close()


async def clone(node: PgNode, primary_host: str) -> None:
    conninfo = node.conninfo(primary_host, clone=True)
    await ctl.basebackup(node.runner, node.layout, conninfo, node.timeouts.basebackup_s)


async def reclone(node: PgNode, primary_host: str) -> None:
    """Keep the old data dir aside (one generation) and clone afresh."""
    retired = node.layout.retired
    if retired.exists():
        shutil.rmtree(retired)
    if node.layout.data_dir.exists():
        os.replace(node.layout.data_dir, retired)
    await clone(node, primary_host)
