"""Assisted recovery: which services wait for an operator, when they may start, and
where each would resume.

The decisions are pure functions; the agent writes the ``/pairs/{pair}/recovery``
record and starts the services they name. Once the new active's database is primary,
it reads the process context of every held service (:func:`read_contexts`) and adds it
to the record (:func:`publish_contexts`), so that the operator sees where the process
would go on before acknowledging. The context cannot move meanwhile: the held service
is not running, and the new primary raised every process fence to its epoch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from hapair.shared import keys
from hapair.shared.records import HeldContext, RecordError, Recovery, decode
from hapair.shared.store import Store
from hapair.shared.topology import Pair
from hapair.shared.txn import Compare, Op
from hapair.workshop_agent.pg.errors import PgError

if TYPE_CHECKING:
    # Only pairs with a database read contexts: the others never load psycopg.
    from hapair.shared.process_context import Resume
    from hapair.workshop_agent.pg.manager import PgManager


def held_services(pair: Pair, hold: bool) -> frozenset[str]:
    """The services marked ``hold_until_ack`` when this term must hold them."""
    if not hold:
        return frozenset()
    return frozenset(s.name for s in pair.services if s.hold_until_ack)


def release_due(
    pair: Pair, held: frozenset[str], record: Recovery | None, term: int, waited_s: float
) -> frozenset[str]:
    """Held services that may start now: all of them once the recovery of *this* term is
    acknowledged (an acknowledgement of an older term releases nothing), else those
    whose ``auto_ack_after_s`` has run out."""
    if record is not None and record.epoch == term and record.state == "acknowledged":
        return held
    return frozenset(
        s.name
        for s in pair.services
        if s.name in held and s.auto_ack_after_s is not None and waited_s >= s.auto_ack_after_s
    )


def release_at(pair: Pair, held: Iterable[str], held_since: float) -> float:
    """When the first of the held services' ``auto_ack_after_s`` is up (inf: none has
    one): with no acknowledgement, :func:`release_due` releases it then."""
    wanted = set(held)
    return held_since + min(
        (
            s.auto_ack_after_s
            for s in pair.services
            if s.name in wanted and s.auto_ack_after_s is not None
        ),
        default=float("inf"),
    )


# ---- where the held services would resume ---------------------------------------------


def process_names(pair: Pair, held: Iterable[str]) -> dict[str, str]:
    """Held service -> the name of the process context it drives."""
    wanted = set(held)
    return {s.name: s.process_name for s in pair.services if s.name in wanted}


def held_context(process: str, database: str, resume: Resume) -> HeldContext:
    return HeldContext(
        process=process,
        database=database,
        step=resume.step,
        state=resume.state,
        last_step=resume.last_step,
        last_result=resume.last_result,
        epoch=resume.epoch,
        steps_committed=resume.steps_committed,
        committed_at=resume.committed_at.timestamp(),
    )


def describe(ctx: HeldContext) -> str:
    """One line for the agent's log."""
    if ctx.error is not None:
        return f"{ctx.process}: unreadable ({ctx.error})"
    if ctx.step is None:
        return f"{ctx.process}: no context (never committed a step)"
    return f"{ctx.process}: next step {ctx.step}, last step {ctx.last_step} (epoch {ctx.epoch})"


async def read_contexts(manager: PgManager, names: Mapping[str, str]) -> dict[str, HeldContext]:
    """The committed context of each ``service -> process`` in ``names``, read from this
    node's server (the new primary) in each of the pair's databases, first found wins;
    a process found nowhere is reported without a step, or with the error that may
    have hidden it."""
    import psycopg

    from hapair.shared.process_context import read_context

    config, pg = manager.config, manager.pg
    found: dict[str, HeldContext] = {}
    errors: dict[str, str] = {}
    for db in config.databases:
        missing = {s: p for s, p in names.items() if s not in found}
        if not missing:
            break
        try:
            conn = await pg.connect(pg.node.address, dbname=db.name)
        except PgError as err:
            errors.update(dict.fromkeys(missing, f"database {db.name}: {err}"))
            continue
        try:
            async with asyncio.timeout(manager.timeouts.query_s):
                for service, process in missing.items():
                    resume = await read_context(conn, process)
                    if resume is not None:
                        found[service] = held_context(process, db.name, resume)
        except (psycopg.Error, TimeoutError) as err:
            why = str(err).strip() or "no answer in time"
            errors.update(dict.fromkeys(missing, f"database {db.name}: {why}"))
        finally:
            conn.pgconn.finish()  # never waits: the server may be the one that hangs
    for service, process in names.items():
        if service not in found:
            found[service] = HeldContext(process=process, error=errors.get(service))
    return found


async def publish_contexts(
    store: Store, pair: str, epoch: int, contexts: Mapping[str, HeldContext], tries: int = 5
) -> bool:
    """Add ``contexts`` to the pair's recovery record of ``epoch`` while ``epoch`` is the
    current term. Compare-and-set on the record: an operator's ack written meanwhile is
    kept, not overwritten. False if the record is gone, of another term, or kept
    changing."""
    key = keys.recovery(pair)
    for _ in range(tries):
        kv = await store.get(key)
        if kv is None:
            return False
        try:
            current = decode(Recovery, kv.value, kv.key)
        except RecordError:
            return False
        if current.epoch != epoch:
            return False
        done = current.model_copy(update={"contexts": dict(contexts)})
        result = await store.txn(
            [Compare.created(keys.leader(pair), epoch), Compare.modified(key, kv.mod_revision)],
            [Op.put(key, done.encode())],
        )
        if result.succeeded:
            return True
    return False
