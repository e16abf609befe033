"""A held service names its process context."""

from __future__ import annotations

from typing import Any

import pytest

from hapair.shared.topology import Pair, TopologyError, parse_site
from hapair.workshop_agent import recovery as rec_mod
from tests.support.cluster import Cluster

pytestmark = pytest.mark.e2e


def _pair(**batch: Any) -> Pair:
    services = [
        {"name": "mixer", "command": ["true"], "hold_until_ack": True},
        {"name": "batch", "command": ["true"], "hold_until_ack": True, **batch},
        {"name": "hmi", "command": ["true"]},
    ]
    nodes = [{"name": "a", "address": "10.0.0.1"}, {"name": "b", "address": "10.0.0.2"}]
    site = Cluster.site([{"name": "p", "nodes": nodes, "services": services}])
    return parse_site(site, "test").workshops[0].pairs[0]


def test_a_held_service_names_its_process_context() -> None:
    assert rec_mod.process_names(_pair(), {"mixer", "batch"}) == {
        "mixer": "mixer",
        "batch": "batch",
    }
    named = _pair(process="line-2-recipe")
    assert rec_mod.process_names(named, {"batch"}) == {"batch": "line-2-recipe"}
    with pytest.raises(TopologyError, match="process names what a held service resumes"):
        site = Cluster.site(
            [
                {
                    "name": "p",
                    "nodes": [
                        {"name": "a", "address": "10.0.0.1"},
                        {"name": "b", "address": "10.0.0.2"},
                    ],
                    "services": [{"name": "hmi", "command": ["true"], "process": "x"}],
                }
            ]
        )
        parse_site(site, "test")
