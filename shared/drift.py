"""Package drift: the versions the site file names that a node does not hold.

A node holds a version when that version's directory is marked installed on it
(``workshop_agent/packages.py``). What a peer holds is what it publishes in its node
status (``NodeStatus.packages``): a status that says nothing of a service holds nothing
of it, and a status that cannot be read is no status at all. Such a node is *drifted*:
it takes the pair over only when no node holding every declared version can. The
agents' choice of who becomes active (``workshop_agent/candidates.py``) and the
operator's tools (``hapair status``, ``hapair top``, ``hapair switchover``) all read
drift through these functions.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

from hapair.shared.package import Package
from hapair.shared.records import PackageStatus
from hapair.shared.topology import Pair

ALARM = "package drift"


def declared(pair: Pair) -> dict[str, Package]:
    """The package each service of ``pair`` names, by service."""
    return {s.name: s.package for s in pair.services if s.package is not None}


def held(packages: Iterable[PackageStatus]) -> dict[str, frozenset[str]]:
    """Per service, the version directories a node's published status says it holds."""
    found: dict[str, set[str]] = {}
    for p in packages:
        found.setdefault(p.service, set()).update(p.installed)
    return {name: frozenset(dirs) for name, dirs in found.items()}


def lacking(pair: Pair, holds: Mapping[str, Collection[str]]) -> tuple[str, ...]:
    """The services of ``pair`` whose declared version is not among ``holds`` (version
    directories by service), sorted by name."""
    return tuple(
        sorted(
            name
            for name, package in declared(pair).items()
            if package.dir_name not in holds.get(name, ())
        )
    )


def versions(pair: Pair, services: Iterable[str]) -> str:
    """``app 2.0, tool 7``: the declared versions of ``services``."""
    found = declared(pair)
    return ", ".join(f"{s} {found[s].version}" if s in found else s for s in services)


def problems(pair: Pair, packages: Sequence[PackageStatus]) -> list[str]:
    """The alarm for a node's own status: what it lacks and why, or nothing."""
    missing = lacking(pair, held(packages))
    if not missing:
        return []
    wanted = declared(pair)
    parts = []
    for name in missing:
        package = wanted[name]
        status = next(
            (p for p in packages if p.service == name and p.version == package.version), None
        )
        why: str = "not reported" if status is None else status.state
        if status is not None and status.detail:
            why += f": {status.detail}"
        parts.append(f"{name} {package.version} not installed here ({why})")
    return [f"{ALARM}: " + "; ".join(parts)]


def planned_refusal(
    pair: Pair, target: str, lacks: Mapping[str, Sequence[str]], others: Iterable[str]
) -> str | None:
    """Why a planned move of ``pair`` to ``target`` is refused for its packages: it lacks
    a declared version while one of ``others`` (the active, the standbys that could take
    over) holds them all. None when it holds them all, or when no other node does (then
    it is no worse than any: it takes over with what it has, and says so)."""
    missing = lacks.get(target, ())
    if not missing:
        return None
    holders = [n for n in others if n != target and not lacks.get(n, ("?",))]
    if not holders:
        return None
    verb = "holds" if len(holders) == 1 else "hold"
    return (
        f"{target} does not hold the package version the site names "
        f"({versions(pair, missing)}); {', '.join(holders)} {verb} every one"
    )
