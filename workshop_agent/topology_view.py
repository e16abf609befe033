"""The applied topology as this agent reads it from etcd: parsed when its key changes,
an invalid one reported and ignored (the last valid one stays)."""

from __future__ import annotations

from hapair.shared import keys
from hapair.shared.log import EventLog
from hapair.shared.mirror import Mirror
from hapair.shared.records import TopologyDoc, decode
from hapair.shared.topology import Site, TopologyError, parse_site


class TopologyView:
    def __init__(self, mirror: Mirror, describe_etcd: str, me: str, log: EventLog) -> None:
        self.mirror = mirror
        self.describe_etcd = describe_etcd
        self.me = me
        self.log = log
        self.site: Site | None = None
        self._rev = -1

    def load(self) -> Site | None:
        """A newly applied valid topology; None while the key has not changed, or is
        missing or invalid."""
        kv = self.mirror.items.get(keys.TOPOLOGY)
        rev = kv.mod_revision if kv else 0
        if rev == self._rev:
            return None
        self._rev = rev
        if kv is None:
            return None
        try:
            doc = decode(TopologyDoc, kv.value, kv.key)
            site = parse_site(doc.site, keys.TOPOLOGY)
        except (TopologyError, ValueError) as err:
            self.log.error(
                "invalid topology in etcd; keeping the last valid one",
                problem=str(err).replace("\n", " "),
            )
            return None
        self.site = site
        return site

    def why_waiting(self) -> str:
        """Why this node has no pair yet."""
        if self.mirror.error is not None:
            return f"waiting for etcd at {self.describe_etcd}: {self.mirror.error}"
        if not self.mirror.synced.is_set():
            return "connecting to etcd"
        if self.site is None:
            return "waiting for a valid topology (apply one with: hapair topology apply)"
        return f"node {self.me} is not in the applied topology; waiting"
