"""Event keys: each writer's under its own prefix (what etcd's roles confine it to),
read in time order across writers and across the earlier layout."""

from __future__ import annotations

import pytest

from hapair.registry.console.etcd_auth_cmd import plan
from hapair.shared import keys, records
from hapair.shared.store import Kv
from hapair.shared.view import SiteView
from tests.unit.test_etcd_auth import SITE


def test_each_writer_has_its_own_prefix() -> None:
    assert keys.event(5, "asm-a").startswith(keys.events_of("asm-a"))
    assert not keys.event(5, "asm-ab").startswith(keys.events_of("asm-a"))


def test_events_of_every_writer_and_of_the_earlier_layout_sort_by_time() -> None:
    legacy = f"{keys.EVENTS_PREFIX}{3:020d}-asm-b"
    written = [keys.event(4, "asm-a"), keys.event(2, "zz"), legacy, keys.event(1, "alice")]
    ordered = sorted(written, key=keys.event_order)
    assert ordered == [keys.event(1, "alice"), keys.event(2, "zz"), legacy, keys.event(4, "asm-a")]
    # A key of neither form sorts first rather than breaking the order.
    assert keys.event_order(keys.EVENTS_PREFIX + "junk")[0] == 0


def test_the_site_view_shows_the_newest_events_in_time_order() -> None:
    kvs = [
        Kv(
            keys.event(stamp, writer),
            records.Event(kind="elected", reason=str(stamp)).encode(),
            stamp,
            stamp,
            0,
        )
        for stamp, writer in ((30, "a"), (10, "z"), (40, "m"), (20, "b"))
    ]
    view = SiteView.from_kvs(kvs, 50, recent_events=3)
    assert [e.reason for e in view.events.values()] == ["20", "30", "40"]


@pytest.mark.parametrize("name", ["", "alice/asm-a"])
def test_a_user_name_that_could_reach_another_writers_keys_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="no '/'"):
        plan(SITE, operators=[name])
