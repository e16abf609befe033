"""The member client's connection handed on to its successor (no etcd needed: a gRPC
channel exists before anything answers on it)."""

from __future__ import annotations

import grpc

from hapair.shared.store import MemberClient
from tests.support.harness import free_port


async def test_a_successor_takes_the_connection_over_with_a_watch_stream_of_its_own() -> None:
    old = MemberClient("127.0.0.1", free_port(), timeout=1.0)
    await old.connect()
    new = old.successor()
    assert new.channel is old.channel and new.name == old.name
    assert new._watcher is not old._watcher  # a late confirmation stays on the old stream
    await old.close()
    assert new.channel.get_state() is not grpc.ChannelConnectivity.SHUTDOWN
    await new.close()
    assert old.channel.get_state() is grpc.ChannelConnectivity.SHUTDOWN


async def test_a_client_never_connected_hands_nothing_on() -> None:
    old = MemberClient("127.0.0.1", free_port(), timeout=1.0)
    new = old.successor()
    await old.close()  # nothing to close, nothing handed on
    await new.connect()
    assert new.channel is not None
    await new.close()
