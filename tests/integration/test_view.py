"""SiteView read from a real etcd."""

from __future__ import annotations

from hapair.shared import keys
from hapair.shared.store import Store
from hapair.shared.view import SiteView
from tests.support.site_records import FakeAgent, apply_site


async def test_view_from_a_real_store_carries_the_leader_create_revision(store: Store) -> None:
    await apply_site(store)
    agent = await FakeAgent(store, "asm-b", "asm").up()
    epoch = await agent.become_active()
    await agent.publish("mes-api", 8080)
    kvs, revision = await store.get_prefix(keys.PREFIX + "/")
    view = SiteView.from_kvs(kvs, revision=revision)
    assert view.leaders["asm"].epoch == epoch
    assert view.leaders["asm"].lease == agent.lease
    assert view.lookup("mes-api").body["node"] == "asm-b"
    assert view.lookup("mes-api").epoch == epoch
