"""What the demo shows: the site's state read from etcd and the registry, as lines of
change and as a live table. Read-only: etcd through the project's client, the registry
and the services over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from hapair.shared import keys
from hapair.shared.pki import TlsFiles
from hapair.shared.store import Kv, Store, StoreError

# --- reading etcd and the registry ---------------------------------------------------------------


def http(method: str, url: str, body: Any = None, timeout: float = 0.5) -> tuple[int | None, Any]:
    """``(status, parsed JSON or text)``; status None when nothing answered."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    except (OSError, ValueError) as err:
        return None, str(getattr(err, "reason", err))
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


class EtcdReader:
    """Reads etcd through the project's own client, on an event loop of its own so that
    the demo's synchronous loop can call it. Over TLS it shows the certificate it is
    given: etcd's JSON gateway cannot carry a client certificate's name once auth is on
    (it refuses a certificate with a CN there), so the view does not read through it."""

    def __init__(self, url: str, tls: TlsFiles | None, timeout: float = 1.0) -> None:
        self.loop = asyncio.new_event_loop()
        self.timeout = timeout

        async def open_store() -> Store:  # its channel belongs to the loop it runs on
            return Store(url, timeout=timeout, tls=tls)

        self.store = self.loop.run_until_complete(open_store())

    def prefix(self, prefix: str) -> list[Kv]:
        """Every key under ``prefix``; OSError when etcd does not answer in time."""
        try:
            kvs, _ = self.loop.run_until_complete(
                asyncio.wait_for(self.store.get_prefix(prefix), self.timeout * 2)
            )
        except (StoreError, TimeoutError) as err:
            raise OSError(str(err) or type(err).__name__) from None
        return kvs

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.run_until_complete(asyncio.wait_for(self.store.close(), 3))
        self.loop.close()


def _json(text: str) -> dict[str, Any]:
    with contextlib.suppress(ValueError):
        value = json.loads(text)
        if isinstance(value, dict):
            return value
    return {}


# --- the site's state, as etcd and the registry show it ----------------------------------


@dataclass
class State:
    error: str | None = None
    leaders: dict[str, tuple[str, int]] = field(default_factory=dict)
    paused: dict[str, dict[str, Any]] = field(default_factory=dict)
    recovery: dict[str, dict[str, Any]] = field(default_factory=dict)
    sync: dict[str, dict[str, Any]] = field(default_factory=dict)
    drained: dict[str, dict[str, Any]] = field(default_factory=dict)
    status: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    endpoints: dict[str, tuple[int | None, Any]] = field(default_factory=dict)
    answers: dict[str, str | None] = field(default_factory=dict)


_SERVED_BY = re.compile(r"served by node <b>([^<]+)</b>")


def probe(record: dict[str, Any]) -> str | None:
    """Does the published endpoint answer? Returns which node served it, or None."""
    host, port = str(record.get("host", "")), int(record.get("port", 0))
    if record.get("protocol") == "http":
        status, body = http("GET", f"http://{host}:{port}/", timeout=0.5)
        if status is None:
            return None
        found = _SERVED_BY.search(body) if isinstance(body, str) else None
        return found.group(1) if found else f"HTTP {status}"
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return "port open"
    return None


def read_state(etcd: EtcdReader, registry_url: str, services: list[str]) -> State:
    state = State()
    try:
        for kv in etcd.prefix(keys.PAIRS_PREFIX):
            key, value, created = kv.key, kv.value.decode(errors="replace"), kv.create_revision
            parts = keys.split(key)
            if parts[-1] == "leader" and len(parts) == 3:
                state.leaders[parts[1]] = (str(_json(value).get("node", "?")), created)
            elif parts[-1] == "paused" and len(parts) == 3:
                state.paused[parts[1]] = _json(value)
            elif parts[-1] == "recovery" and len(parts) == 3:
                state.recovery[parts[1]] = _json(value)
            elif parts[-1] == "sync_standby" and len(parts) == 3:
                state.sync[parts[1]] = _json(value)
        for kv in etcd.prefix(keys.NODES_PREFIX):
            key, value = kv.key, kv.value.decode(errors="replace")
            parts = keys.split(key)
            if parts[-1] == "status" and len(parts) == 3:
                state.status[parts[1]] = _json(value)
            elif parts[-1] == "drained" and len(parts) == 3:
                state.drained[parts[1]] = _json(value)
        events = sorted(etcd.prefix(keys.EVENTS_PREFIX), key=lambda kv: keys.event_order(kv.key))
        state.events = [(kv.key, _json(kv.value.decode(errors="replace"))) for kv in events[-8:]]
    except OSError as err:
        state.error = f"etcd: {err}"
    for service in services:
        status, body = http("GET", f"{registry_url}/v1/endpoints/{service}")
        state.endpoints[service] = (status, body)
        if status == 200 and isinstance(body, dict):
            state.answers[service] = probe(body)
    return state


def endpoint_text(reply: tuple[int | None, Any]) -> str:
    status, body = reply
    if status is None:
        return f"registry unreachable ({body})"
    if status == 200 and isinstance(body, dict):
        where = f"{body.get('host')}:{body.get('port')}"
        return f"{where} {body.get('protocol', '')} on {body.get('node')} epoch {body.get('epoch')}"
    reason = body.get("reason") or body.get("error") if isinstance(body, dict) else body
    return f"{status} {str(reason or '').strip()[:100]}".strip()


def changes(old: State | None, new: State, seen_events: set[str]) -> Iterator[str]:
    """One line per change worth telling; events are told once each."""
    if new.error and (old is None or old.error != new.error):
        yield f"cannot read the state: {new.error}"
    if new.error:
        return
    if old is not None and old.error:
        yield "etcd answers again"
    pairs = set(new.leaders) | set(old.leaders if old else {})
    for pair in sorted(pairs):
        was = old.leaders.get(pair) if old else None
        now = new.leaders.get(pair)
        if was != now:
            before = f" (was {was[0]}, epoch {was[1]})" if was else ""
            if now:
                yield f"{pair}: {now[0]} is active, epoch {now[1]}{before}"
            else:
                yield f"{pair}: no active node{before}"
    for pair in sorted(set(new.paused) | set(old.paused if old else {})):
        if (pair in new.paused) != (old is not None and pair in old.paused):
            by = new.paused.get(pair, {}).get("by")
            yield f"{pair}: automatic failover PAUSED by {by}" if by else f"{pair}: resumed"
    for pair, rec in sorted(new.recovery.items()):
        seen = old.recovery.get(pair) if old else None
        if seen is None or (rec.get("epoch"), rec.get("state")) != (
            seen.get("epoch"),
            seen.get("state"),
        ):
            if rec.get("state") == "awaiting":
                yield (
                    f"{pair}: AWAITING OPERATOR at epoch {rec.get('epoch')} "
                    f"({rec.get('cause')}): held {', '.join(rec.get('held', []))}"
                )
            else:
                by = rec.get("acked_by")
                yield f"{pair}: recovery at epoch {rec.get('epoch')} acknowledged by {by}"
        if rec.get("contexts") and rec["contexts"] != (seen or {}).get("contexts"):
            for service, ctx in sorted(rec["contexts"].items()):
                yield f"{pair}: {context_text(service, ctx)}"
    for node in sorted(set(new.drained) | set(old.drained if old else {})):
        if (node in new.drained) != (old is not None and node in old.drained):
            yield f"{node}: drained" if node in new.drained else f"{node}: undrained"
    for node, status in sorted(new.status.items()):
        before = old.status.get(node, {}) if old is not None else {}
        yield from (f"{node}: {line}" for line in package_changes(before, status))
    for service, reply in new.endpoints.items():
        text = endpoint_text(reply)
        if old is None or endpoint_text(old.endpoints.get(service, (None, ""))) != text:
            yield f"{service}: registry says {text}"
        answer = new.answers.get(service)
        if old is None or old.answers.get(service) != answer:
            if answer:
                yield f"{service}: answering ({answer})"
            elif reply[0] == 200:
                yield f"{service}: published but not answering"
    for key, event in new.events:
        if key not in seen_events:
            seen_events.add(key)
            if old is not None:
                yield "event: " + " ".join(
                    f"{k}={event[k]}"
                    for k in ("kind", "pair", "node", "epoch", "reason")
                    if event.get(k) not in (None, "")
                )


def package_changes(old: dict[str, Any], new: dict[str, Any]) -> Iterator[str]:
    """A node's packages that became installed or failed since its last status."""

    def states(status: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
        packages = status.get("packages") or []
        return {(str(p.get("service")), str(p.get("version"))): p for p in packages}

    was = states(old)
    for key, package in sorted(states(new).items()):
        state = package.get("state")
        if state in ("installed", "failed") and was.get(key, {}).get("state") != state:
            why = f": {package.get('detail')}" if state == "failed" else ""
            yield f"package {key[0]} {key[1]} {state}{why}"


def context_text(service: str, ctx: dict[str, Any]) -> str:
    """Where a held service would resume, from the context its new active published."""
    if ctx.get("error"):
        return f"{service}: process context unreadable: {ctx['error']}"
    if ctx.get("step") is None:
        return f"{service}: no process context (it never committed a step)"
    state = ", ".join(f"{k}={v}" for k, v in (ctx.get("state") or {}).items())
    text = f"{service} would resume at step {ctx['step']}" + (f" ({state})" if state else "")
    if ctx.get("last_step") is not None:
        at = ctx.get("committed_at")
        when = time.strftime("%H:%M:%S", time.localtime(float(at))) if at else "?"
        text += f"; last committed: step {ctx['last_step']} by epoch {ctx.get('epoch')} at {when}"
    return text


def database_text(db: dict[str, Any]) -> str:
    """A node's PostgreSQL: role, and what a commit waits for or how far behind it is."""
    role = str(db.get("role", "?"))
    if role == "primary":
        sync = [
            str(r.get("name"))
            for r in db.get("replicas") or []
            if isinstance(r, dict) and r.get("sync_state") in ("sync", "quorum")
        ]
        return (
            f"db primary, sync standby {', '.join(sync)}" if sync else "db primary, NO sync standby"
        )
    if role == "standby":
        if not db.get("streaming"):
            return "db standby NOT STREAMING"
        lag = db.get("lag_bytes")
        return "db standby" + (f" lag {lag} B" if lag is not None else "")
    return f"db {role}"


# --- the view ------------------------------------------------------------------------------


def render(site: Any, state: State, agents: dict[str, str], header: str, footer: str) -> Any:
    """The live view: nodes, endpoints, recent events; ``agents`` says how each agent is."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    nodes = Table(box=None, header_style="bold", pad_edge=False, expand=False)
    for column in ("pair", "node", "address", "agent", "role", "health", "services"):
        nodes.add_column(column, no_wrap=column != "services")
    for pair in site.pairs():
        leader = state.leaders.get(pair.name)
        pair_text = Text(pair.name, style="bold")
        if pair.name in state.paused:
            pair_text.append(" PAUSED", style="bold white on red")
        for i, node in enumerate(pair.nodes):
            status = state.status.get(node.name)
            if status:
                role = str(status.get("role", "?"))
                if status.get("epoch"):
                    role += f" e{status['epoch']}"
            else:
                role = "no status"
            if leader and leader[0] == node.name and not role.startswith("active"):
                role += f" (holds leader e{leader[1]})"
            style = "bold green" if role.startswith("active") else ""
            role_text = Text(role, style=style)
            if node.name in state.drained:
                role_text.append(" DRAINED", style="bold yellow")
            if status is None:
                health = Text("-")
            elif status.get("healthy", True):
                health = Text("ok", style="green")
            else:
                health = Text("UNHEALTHY " + "; ".join(status.get("problems", [])), style="red")
            services = []
            for svc in status.get("services", []) if status else []:
                text = f"{svc.get('name')} {svc.get('state')}"
                if svc.get("pid"):
                    text += f" pid {svc['pid']}"
                if svc.get("restarts"):
                    text += f" restarts {svc['restarts']}"
                services.append(text)
            if status and isinstance(status.get("database"), dict):
                services.append(database_text(status["database"]))
            nodes.add_row(
                pair_text if i == 0 else "",
                node.name,
                node.address,
                agents.get(node.name, "-"),
                role_text,
                health,
                ", ".join(services) or "-",
            )
    endpoints = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("service", "pair", "registry GET /v1/endpoints/{service}", "answering"):
        endpoints.add_column(column)
    for pair in site.pairs():
        names = [(s.name, s.critical) for s in pair.services if s.endpoint is not None]
        if pair.database is not None:
            names.append((f"{pair.name}.db", False))
        for name, critical in names:
            reply = state.endpoints.get(name, (None, "not asked yet"))
            answer = state.answers.get(name)
            endpoints.add_row(
                name + (" (critical)" if critical else ""),
                pair.name,
                Text(endpoint_text(reply), style="green" if reply[0] == 200 else "yellow"),
                Text(answer or "no", style="green" if answer else "red"),
            )
    parts: list[Any] = [Text(header, style="bold"), nodes]
    for pair in site.pairs():
        rec = state.recovery.get(pair.name)
        leader = state.leaders.get(pair.name)
        if not rec or rec.get("state") != "awaiting" or not leader or leader[1] != rec.get("epoch"):
            continue
        line = Text(f"{pair.name} AWAITING OPERATOR", style="bold black on yellow")
        line.append(
            f" {rec.get('cause')}; held: {', '.join(rec.get('held', []))}; "
            f"acknowledge: hapair ack {pair.name} --epoch {rec.get('epoch')} (or a in hapair top)",
            style="yellow",
        )
        parts.append(line)
        for service, ctx in sorted((rec.get("contexts") or {}).items()):
            parts.append(Text("  " + context_text(service, ctx), style="yellow"))
    parts += [Text(""), endpoints]
    if state.error:
        parts.append(Text(state.error, style="bold red"))
    if state.events:
        parts.append(Text("\nlast events", style="bold"))
        for _, event in state.events[-5:]:
            stamp = time.strftime("%H:%M:%S", time.localtime(float(event.get("at", 0))))
            what = " ".join(
                str(event[k]) for k in ("kind", "pair", "node") if event.get(k) not in (None, "")
            )
            if event.get("epoch"):
                what += f" epoch {event['epoch']}"
            if event.get("reason"):
                what += f": {event['reason']}"
            parts.append(Text(f"  {stamp} {what}", style="dim"))
    parts.append(Text("\n" + footer, style="cyan"))
    return Group(*parts)
