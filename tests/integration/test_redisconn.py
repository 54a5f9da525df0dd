"""The daemon and the client library share one way to open Redis: a bounded pool that
queues callers instead of failing when more commands are in flight than connections."""

import asyncio

from sandboxd.store.connection import MAX_CONNECTIONS, open_redis


async def test_more_commands_in_flight_than_connections_queue_not_fail(redis_server):
    redis = open_redis(redis_server)
    try:
        # Each BLPOP holds its connection until it times out, so all are in flight at once.
        replies = await asyncio.gather(
            *(redis.blpop(["nothing-here"], timeout=0.05) for _ in range(3 * MAX_CONNECTIONS))
        )
    finally:
        await redis.aclose()
    assert replies == [None] * (3 * MAX_CONNECTIONS)
