"""Event delivery: latency and throughput through consumer groups and webhooks, with their
baselines.

    .venv/bin/python -m bench.events [--events 2000] [--backlog 20000]

In one run, against one private redis-server on loopback:
- baseline: a Redis PING round trip, and XADD -> a plain `XREAD BLOCK` reader (no group,
  no acknowledgement): the floor of any delivery through the stream;
- XADD -> the handler of a `Client.events` consumer (XREADGROUP, the handler, XACK), one
  event at a time;
- events/s through a consumer group with 1 and 4 consumers, each in its own process (XADD of
  a backlog to the last XACK), against one plain XREAD reader process as the baseline;
- XADD -> a webhook receiver (a signed POST over loopback HTTP, `outputs/webhooks.py`, the
  group read and the acknowledgement included), one event at a time.
"""

import argparse
import asyncio
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from redis.asyncio import Redis
from tests.support import free_port
from tests.support.webhooks import Receiver

from bench.common import line
from sandboxd.client import Client
from sandboxd.config import WebhookConfig
from sandboxd.outputs.webhooks import WebhookSender
from sandboxd.store.events import EventPublisher
from sandboxd.store.eventtail import stream_end
from sandboxd.store.keys import Keys
from sandboxd.store.localredis import find_redis_server, start, wait_until_answering
from sandboxd.store.loops import cancelling

KEYS = Keys()


async def pings(redis: Redis, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await redis.ping()
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def one_at_a_time(publisher: EventPublisher, n: int, handled: asyncio.Queue) -> list[float]:
    """Publish, wait until the reader under test handled that very event; n times."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        event = await publisher.publish("pool.scaled", pool="bench")
        while (await handled.get())[0] != event.id:
            pass
        out.append((handled_at[event.id] - t0) * 1000)
    return out


handled_at: dict[str, float] = {}


async def plain_reader(redis: Redis, handled: asyncio.Queue) -> None:
    cursor = await stream_end(redis, KEYS.events)  # a concrete id: no gap between reads
    while True:
        reply = await redis.xread({KEYS.events: cursor}, block=1000, count=100)
        if cancelling():  # redis-py may swallow a cancel while it blocks
            raise asyncio.CancelledError
        for _, entries in reply or []:
            for entry_id, fields in entries:
                handled_at[fields["id"]] = time.perf_counter()
                handled.put_nowait((fields["id"],))
                cursor = entry_id


async def group_reader(url: str, handled: asyncio.Queue) -> None:
    async with Client.from_url(url) as client:
        async for event in client.events("latency", "c1", block_ms=1000):
            handled_at[event.id] = time.perf_counter()
            handled.put_nowait((event.id,))


async def latency(url: str, redis: Redis, n: int, reader: str) -> list[float]:
    handled: asyncio.Queue = asyncio.Queue()
    publisher = EventPublisher(redis, KEYS, maxlen=1_000_000)
    if reader == "group":
        await redis.xgroup_create(KEYS.events, "latency", id="$", mkstream=True)
        task = asyncio.create_task(group_reader(url, handled))
    else:
        task = asyncio.create_task(plain_reader(redis, handled))
    await asyncio.sleep(0.2)  # the reader is blocked in its first read
    try:
        await one_at_a_time(publisher, 50, handled)  # warm-up
        return await one_at_a_time(publisher, n, handled)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def consumer_process(url: str, group: str, name: str, ready) -> None:
    asyncio.run(_consume(url, group, name, ready))


async def _consume(url: str, group: str, name: str, ready) -> None:
    async with Client.from_url(url) as client:
        if group == "":  # the baseline: a plain XREAD reader, no group, no acknowledgement
            redis = Redis.from_url(url, decode_responses=True)
            cursor = await stream_end(redis, KEYS.events)
            ready.set()
            while True:
                reply = await redis.xread({KEYS.events: cursor}, block=1000, count=100)
                for _, entries in reply or []:
                    cursor = entries[-1][0]
                    await redis.set(f"bench:read:{name}", cursor)
        ready.set()
        async for _ in client.events(group, name, count=100, block_ms=1000, claim_idle_s=3600):
            pass


async def throughput(url: str, redis: Redis, backlog: int, consumers: int, group: str) -> float:
    """Events/s from the first XADD of `backlog` events to the last one acknowledged (read,
    for the baseline), with `consumers` consumer processes."""
    await redis.delete(KEYS.events)
    await redis.xadd(KEYS.events, {"id": "start", "type": "bench"})
    if group:
        await redis.xgroup_create(KEYS.events, group, id="$")
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for i in range(consumers):
        ready = ctx.Event()
        proc = ctx.Process(target=consumer_process, args=(url, group, f"c{i}", ready))
        proc.start()
        procs.append(proc)
        ready.wait(30)
    await asyncio.sleep(0.3)  # every consumer blocked in its first read
    publisher = EventPublisher(redis, KEYS, maxlen=1_000_000)
    fields = [publisher.build("pool.scaled", pool="bench", n=i).to_fields() for i in range(backlog)]
    t0 = time.perf_counter()
    for chunk in range(0, backlog, 500):
        async with redis.pipeline(transaction=False) as pipe:
            for f in fields[chunk : chunk + 500]:
                pipe.xadd(KEYS.events, f)
            await pipe.execute()
    last = (await redis.xrevrange(KEYS.events, count=1))[0][0]
    try:
        while True:
            if group:
                info = (await redis.xinfo_groups(KEYS.events))[0]
                if info["last-delivered-id"] == last and info["pending"] == 0:
                    break
            elif await redis.get("bench:read:c0") == last:
                break
            await asyncio.sleep(0.001)
        return backlog / (time.perf_counter() - t0)
    finally:
        for proc in procs:
            proc.terminate()
            proc.join(10)


async def webhook_latency(redis: Redis, n: int) -> list[float]:
    loop = asyncio.get_running_loop()
    arrived: asyncio.Queue = asyncio.Queue()

    def on_delivery(delivery) -> None:
        event_id = delivery.headers["webhook-id"]
        handled_at[event_id] = time.perf_counter()
        loop.call_soon_threadsafe(arrived.put_nowait, (event_id,))

    receiver = Receiver(port=free_port(), on_delivery=on_delivery).start()
    config = WebhookConfig(name="bench", url=receiver.url, secret="whsec_" + "A" * 43 + "=")
    sender = WebhookSender(redis=redis, keys=KEYS, config=config, consumer="bench")
    await sender.prepare()
    task = asyncio.create_task(sender.run())
    await asyncio.sleep(0.3)
    try:
        publisher = EventPublisher(redis, KEYS, maxlen=1_000_000)
        await one_at_a_time(publisher, 50, arrived)
        return await one_at_a_time(publisher, n, arrived)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        receiver.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=2000, help="latency samples each")
    parser.add_argument("--backlog", type=int, default=20_000, help="events per throughput run")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sandboxd-bench-"))
    port = free_port()
    redis_proc = start(find_redis_server(), port, root / "redis", daemonize=False)
    try:
        wait_until_answering("127.0.0.1", port)
        url = f"redis://127.0.0.1:{port}/0"
        redis = Redis.from_url(url, decode_responses=True)
        ping = await pings(redis, 2000)
        plain = await latency(url, redis, args.events, "plain")
        grouped = await latency(url, redis, args.events, "group")
        rates = {"plain XREAD, 1 reader": await throughput(url, redis, args.backlog, 1, "")}
        for consumers in (1, 4):
            name = f"group, {consumers} consumer{'s' * (consumers > 1)}"
            rates[name] = await throughput(url, redis, args.backlog, consumers, f"tp{consumers}")
        await redis.delete(KEYS.events)
        hooks = await webhook_latency(redis, args.events // 4)
        await redis.aclose()
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)
    print(f"{os.cpu_count()} CPUs; Redis on loopback; {args.backlog} events per throughput run")
    print(line("baseline: Redis PING round trip", ping))
    print(line("baseline: XADD -> plain XREAD reader", plain))
    print(line("XADD -> consumer-group handler", grouped))
    print(line("XADD -> webhook receiver (signed POST)", hooks))
    for name, rate in rates.items():
        print(f"{'events/s, ' + name:<40} {rate:10.0f}")
    base = statistics.median(plain)
    print(
        f"ratio group handler / plain XREAD        median {statistics.median(grouped) / base:.1f}x"
    )
    print(f"ratio webhook / plain XREAD              median {statistics.median(hooks) / base:.1f}x")
    plain_rate = rates["plain XREAD, 1 reader"]
    for consumers in (1, 4):
        name = f"group, {consumers} consumer{'s' * (consumers > 1)}"
        print(f"ratio events/s {name:<24} {rates[name] / plain_rate:.2f}x of plain XREAD")


if __name__ == "__main__":
    asyncio.run(main())
