"""The daemon's lifecycle: connect, adopt, reconcile, serve until told to stop, shut down."""

import asyncio
import ctypes
import ctypes.util
import functools
import gc
import logging
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError
from tenacity import AsyncRetrying, retry_if_exception, wait_exponential_jitter

from sandboxd.config import Config
from sandboxd.control.adoption import AdoptionReport, adopt
from sandboxd.control.janitor import Janitor
from sandboxd.control.keepalive import Keepalive
from sandboxd.control.leases import LeaseKeeper
from sandboxd.control.localstate import LocalState
from sandboxd.control.outbox import Outbox
from sandboxd.control.reconciler import Reconciler
from sandboxd.control.restore import Restorer
from sandboxd.control.schedule import PoolSchedules
from sandboxd.control.specsource import SpecSource
from sandboxd.control.terminator import Terminator
from sandboxd.health.monitor import HealthMonitor
from sandboxd.leadership import Leadership
from sandboxd.logs import redact_url
from sandboxd.outputs import sdnotify
from sandboxd.outputs.cost import CostMeter
from sandboxd.outputs.heartbeat import Heartbeat, identity
from sandboxd.outputs.metrics import Metrics, MetricsServer, pool_gauges
from sandboxd.outputs.mqtt import MqttBridge
from sandboxd.outputs.poolfacts import PoolFacts
from sandboxd.outputs.resources import ResourceSampler
from sandboxd.outputs.watchdog import Watchdog
from sandboxd.outputs.webhooks import Webhooks
from sandboxd.providers import (
    CLOUD_PROVIDERS,
    IsolationError,
    Provider,
    make_providers,
    security_summary,
)
from sandboxd.providers.faults import hang_once
from sandboxd.providers.wrapper import Guarded, wrap
from sandboxd.reload import reload
from sandboxd.spec import PoolSpec
from sandboxd.store.claims import ClaimStore
from sandboxd.store.connection import make_client, wait_for_redis
from sandboxd.store.events import EventPublisher
from sandboxd.store.eventtail import EventTail
from sandboxd.store.fence import FencedRedis, LeaseLost
from sandboxd.store.keys import Keys
from sandboxd.store.loops import every, survive, why
from sandboxd.store.records import STATES, Owned, PassSnapshot, SandboxRecord, SandboxStore
from sandboxd.store.retention import Retention
from sandboxd.store.specs import SpecStore
from sandboxd.supervision import MAX_FAILURES, HardStop, supervise

log = logging.getLogger(__name__)
CANCEL_GRACE_S = 5.0
SHUTDOWN_TERMINATE_S = 3.0
STOP_CONCURRENCY = 64  # sandboxes being terminated at once by a stop
# At a stop, how long Redis may take to answer before the node's sandboxes are terminated
# from its local registry instead (each sandbox's own stop is bounded by the provider).
SHUTDOWN_REDIS_S = 2.0


# The unit's RestartPreventExitStatus: restarting cannot fix a host that lacks protections.
EXIT_WEAK_ISOLATION = 78
EXIT_WRONG_NODE = 78  # the node is served from another host or registry (see _cannot_stand_in)
EXIT_BAD_CONFIG = 78  # a setting that cannot work (a webhook's unreadable secret file)
# Lost the node's lease (another daemon took over, or this one was cut off past the TTL):
# systemd restarts it (Restart=on-failure) and it comes back as the standby.
EXIT_LEASE_LOST = 75


# Root tasks the daemon cannot work without: one that keeps failing ends the process (exit
# 1, so systemd restarts it); any other is restarted with backoff for as long as it takes.
ESSENTIAL_TASKS = frozenset({"reconciler", "heartbeat", "leases"})


@dataclass(frozen=True)
class Wings:
    """Every component of a running daemon, built together by `Daemon._build`."""

    events: EventPublisher
    store: SandboxStore
    outbox: Outbox
    specs: SpecSource
    terminator: Terminator
    restorer: Restorer
    reconciler: Reconciler
    monitor: HealthMonitor
    leases: LeaseKeeper
    janitor: Janitor
    keepalive: Keepalive
    metrics_server: MetricsServer
    tail: EventTail
    resources: ResourceSampler
    cost: CostMeter
    bridge: MqttBridge
    retention: Retention
    webhooks: Webhooks
    watchdog: Watchdog
    heartbeat: Heartbeat


class Daemon:
    """The composition root: builds the wings (`_build`), runs them as supervised root tasks
    under one TaskGroup, and shuts down along one path.

    `started` is set once the first reconcile pass is done and `daemon.started` published
    (embedding code and tests wait on it); `wings` exists from then on."""

    def __init__(
        self,
        config: Config,
        providers: dict[str, Provider] | None = None,
        *,
        config_path: Path | None = None,
        clock: Callable[[], datetime] | None = None,
    ):
        self.config = config
        self.config_path = config_path  # read again on SIGHUP
        self.providers = providers  # None: made from the config at start
        self.keys = Keys(config.key_prefix)
        self.instance = uuid.uuid4().hex[:12]
        self.stop = asyncio.Event()
        self.started = asyncio.Event()
        self.reload_requested = asyncio.Event()
        self.schedules = PoolSchedules(clock)
        self.metrics = Metrics()
        self.last_pass = PassSnapshot()
        self.wings: Wings | None = None
        self.isolation: dict[str, str] = {}
        self.security: dict[str, Any] = {}
        self.fatal: str | None = None  # why the daemon gave up, if it did
        self.hard_stop = HardStop()
        self._owns_process = False
        self._trim_due = 0.0
        self._identity = identity(self.instance, config.local.workspace_root)
        # Active or standby: the leases, and the fence every write goes through (made with
        # the Redis client, at start).
        self.leadership: Leadership | None = None

    async def run(self, *, handle_signals: bool = True) -> int:
        """Serve until SIGTERM/SIGINT (or `stop` is set, e.g. by an embedding test);
        SIGHUP reloads the config file. With `handle_signals` the process is ours: a stop
        request also arms the hard deadline (`supervision.HardStop`)."""
        self._owns_process = handle_signals
        if handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                # A plain handler, not the loop's: it runs (and arms the deadline) even
                # while the loop is stuck in a blocking call.
                signal.signal(sig, lambda signum, _: self._stop_requested(loop, signum))
            loop.add_signal_handler(signal.SIGHUP, self.reload_requested.set)
        try:
            code = await self._run()
        finally:
            if handle_signals:  # whatever asyncio or the interpreter still waits for
                self.hard_stop.arm("the daemon's end")
        if self.leadership is not None and self.leadership.fence.lost is not None:
            return EXIT_LEASE_LOST
        return 1 if self.fatal else code

    def _stop_requested(self, loop: asyncio.AbstractEventLoop, signum: int) -> None:
        self.hard_stop.arm(signal.Signals(signum).name)
        loop.call_soon_threadsafe(self.stop.set)

    def _give_up(self, task: str, error: str) -> None:
        """An essential task keeps failing: stop (gracefully, within the hard deadline)."""
        self.fatal = f"task {task} keeps failing ({error})"
        log.critical(
            "task %s failed %d times in a row, the daemon cannot work without it: "
            "stopping (exit 1). Last error: %s",
            task,
            MAX_FAILURES,
            error,
        )
        sdnotify.status(f"stopping: {self.fatal}")
        if self._owns_process:
            self.hard_stop.arm(f"giving up on task {task}")
        self.stop.set()

    def _lease_lost(self, reason: str) -> None:
        """Another daemon acts for this node now: stop at once, touching nothing."""
        if self.leadership is not None:
            self.leadership.role = "lost"
        sdnotify.status(f"stopping: lost the lease of node {self.config.node} ({reason})")
        if self._owns_process:
            self.hard_stop.arm("lease lost")
        self.stop.set()

    async def _run(self) -> int:
        log.info(
            "sandboxd starting",
            extra={
                "redis_url": redact_url(self.config.redis_url),
                "key_prefix": self.config.key_prefix,
                "instance": self.instance,
            },
        )
        for webhook in self.config.webhooks:  # before anything: a clear refusal, not a crash
            try:
                webhook.resolve_secret()
            except (OSError, ValueError) as exc:
                log.critical("refusing to start: webhook %r: %s", webhook.name, exc)
                sdnotify.status(f"refused to start: webhook {webhook.name}: secret unreadable")
                return EXIT_BAD_CONFIG
        sdnotify.status("connecting to Redis")
        redis = make_client(self.config, f"sandboxd:{self.config.node}:{self.instance}")
        try:
            if not await wait_for_redis(redis, self.config, self.stop):
                return 0
            try:
                self.providers = self.providers or make_providers(self.config, self.instance)
            except IsolationError as exc:
                log.critical("refusing to start: %s", exc)
                sdnotify.status(f"refused to start: {exc}")
                return EXIT_WEAK_ISOLATION
            self.leadership = leadership = Leadership(
                redis,
                self.config,
                instance=self.instance,
                identity=self._identity,
                stop=self.stop,
                on_lost=self._lease_lost,
                custody=LocalState(self.config.journal_dir()),
            )
            if not await leadership.until_active():
                return EXIT_WRONG_NODE if leadership.wrong_node else 0
            await self._act(redis, leadership, self.providers)
        finally:
            await redis.aclose()
        return 0

    async def _act(
        self, redis: Redis, leadership: Leadership, providers: dict[str, Provider]
    ) -> None:
        """Active for the node: every write through the fence, every sandbox action behind
        the lease's guard; the leases kept for as long as this runs."""
        leadership.activate()
        fence = leadership.fence
        fenced = FencedRedis.over(redis, fence)
        # The node's own (local) sandboxes stay in this daemon's custody while the lease
        # has only lapsed because Redis cannot be reached (`Leadership.check_local`); cloud
        # sandboxes follow the lease strictly (another host may lead them by then).
        guarded: dict[str, Provider] = {
            n: wrap(Guarded, p, fence.check if n in CLOUD_PROVIDERS else leadership.check_local)
            for n, p in providers.items()
        }
        # What this daemon manages: its node's providers; the cloud ones only as the leader.
        # Every loop gets this very dict, so leading later adds the cloud providers to all.
        managed: dict[str, Provider] = {
            n: p for n, p in guarded.items() if n not in CLOUD_PROVIDERS
        }
        cloud: dict[str, Provider] = {n: p for n, p in guarded.items() if n in CLOUD_PROVIDERS}
        if cloud and await leadership.try_lead():
            managed.update(cloud)
        try:
            async with asyncio.TaskGroup() as group:
                keeper = group.create_task(
                    leadership.keep(
                        may_lead=lambda: bool(cloud) and self.started.is_set(),
                        on_lead=lambda: self._lead_later(fenced, managed, cloud),
                    ),
                    name="lease",
                )
                try:
                    await self._serve(fenced, managed)
                finally:
                    keeper.cancel()
        except* LeaseLost:
            pass  # the fence already stopped everything; nothing more is written
        finally:
            await leadership.release()

    async def _lead_later(
        self, redis: Redis, managed: dict[str, Provider], cloud: dict[str, Provider]
    ) -> None:
        """The cloud leader went away while this daemon serves: lead, adopting the cloud
        sandboxes (from the providers' listings) the way a starting daemon does."""
        w, leadership = self.wings, self.leadership
        assert w is not None and leadership is not None
        scoped = SandboxStore(redis, self.keys, owns=lambda r: r.provider in cloud)
        report = await adopt(scoped, cloud, w.events)
        managed.update(cloud)
        await w.events.publish(
            "daemon.leading",
            instance=self.instance,
            node=self.config.node,
            epoch=leadership.leader_epoch,
            adopted=len(report.adopted),
            dropped=len(report.dropped),
            orphans=len(report.orphans),
        )
        w.reconciler.nudge()

    async def _serve(self, redis: Redis, providers: dict[str, Provider]) -> None:
        self.isolation = {name: p.isolation for name, p in providers.items()}
        self.security = security_summary(providers)
        wings = self.wings = self._build(redis, providers)
        await wings.bridge.prepare()
        await wings.webhooks.prepare()  # their groups hold retention from now on
        sdnotify.status("adopting sandboxes")
        await wings.outbox.flush()  # a stop during an outage: its records closed, not reaped
        await wings.restorer.check()  # Redis lost its data while we were away: put it back
        report = await adopt(wings.store, providers, wings.events)
        if self._owns_process:
            _tune_gc()
        try:
            await self._run_root_tasks(redis, wings, report)
        except TimeoutError:
            # Cancelled work overran the grace (an overloaded machine): it has stopped
            # now all the same, and the sandboxes must still be dealt with below.
            log.error("work did not stop within %ss of the stop request", CANCEL_GRACE_S)
        finally:
            await self._shut_down(wings)

    def _build(self, redis: Redis, providers: dict[str, Provider]) -> Wings:
        """Every component, in dependency order: store, control, health, outputs."""
        config, keys = self.config, self.keys
        events = EventPublisher(redis, keys, config.event_stream_maxlen)
        store = SandboxStore(redis, keys, owns=self._owns(providers))
        claims = ClaimStore(redis, keys, maxlen=config.event_stream_maxlen)
        specs = SpecSource(SpecStore(redis, keys), events, config)
        terminator = Terminator(store, providers, events)
        journal = LocalState(config.journal_dir())
        outbox = Outbox(journal, store, events)
        restorer = Restorer(
            redis=redis,
            keys=keys,
            journal=journal,
            events=events,
            providers=providers,
            instance=self.instance,
        )
        reconciler = Reconciler(
            config=config,
            store=store,
            claims=claims,
            specs=specs,
            events=events,
            providers=providers,
            terminator=terminator,
            instance=self.instance,
            on_pass=self._observe_pass,
            on_pass_time=self.metrics.reconcile_seconds.observe,
            schedules=self.schedules,
            restorer=restorer,
            before_pass=hang_once(config.watchdog_hang_file) if config.watchdog_hang_file else None,
            outbox=outbox,
        )
        monitor = HealthMonitor(
            config=config,
            store=store,
            events=events,
            providers=providers,
            nudge=reconciler.nudge,
            pool_extras=reconciler.pool_status,
        )
        leases = LeaseKeeper(
            claims=claims,
            store=store,
            events=events,
            terminator=terminator,
            interval_s=lambda: config.lease_check_interval_s,
            node=config.node,
            providers=providers,
            cloud=CLOUD_PROVIDERS,
        )

        async def before_sweep() -> bool:
            """What changed while Redis was away is written before the janitor judges the
            records (a reaped sandbox's record is closed, not found `lost`); what Redis lost
            is put back."""
            await reconciler.write_late()
            return await restorer.check()

        janitor = Janitor(
            store=store,
            providers=providers,
            events=events,
            terminator=terminator,
            replace=reconciler.replace,
            interval_s=lambda: config.janitor_interval_s,
            before_sweep=before_sweep,
            put_back=restorer.put_back,
        )
        keepalive = Keepalive(store=store, specs=specs, providers=providers, events=events)
        last_pass = lambda: self.last_pass  # noqa: E731
        cost = CostMeter(redis=redis, keys=keys, config=config, events=events, snapshot=last_pass)
        bridge = MqttBridge(redis=redis, keys=keys, config=config, events=events)
        metrics_server = MetricsServer(config, self.metrics)
        return Wings(
            events=events,
            store=store,
            outbox=outbox,
            specs=specs,
            terminator=terminator,
            restorer=restorer,
            reconciler=reconciler,
            monitor=monitor,
            leases=leases,
            janitor=janitor,
            keepalive=keepalive,
            metrics_server=metrics_server,
            # The counters are read from the endpoint only: the stream is tailed for them
            # while it is served (counting from then, as a restarted exporter would).
            tail=EventTail(redis, keys.events, self.metrics.observe, wanted=metrics_server.serving),
            resources=ResourceSampler(
                config=config, events=events, providers=providers, snapshot=last_pass
            ),
            cost=cost,
            bridge=bridge,
            retention=Retention(
                redis=redis, keys=keys, config=config, events=events, mqtt_cursor=bridge.held
            ),
            # Unfenced, on the same connections: XREADGROUP BLOCK cannot run inside the
            # fence's script, and all webhooks write is their group's progress and dead
            # letters (a daemon that lost its lease stops at once; delivery is at least once).
            webhooks=Webhooks(
                redis=Redis(connection_pool=redis.connection_pool),
                keys=keys,
                configs=config.webhooks,
                consumer=config.node,
            ),
            watchdog=Watchdog(reconciler.stuck_for),
            heartbeat=Heartbeat(
                redis,
                keys,
                interval_s=lambda: config.heartbeat_interval_s,
                identity=self._identity,
                facts=self._facts,
                pools=PoolFacts(
                    keys,
                    pools=lambda: reconciler.pools,
                    pacing=lambda: reconciler.creator.pacing,
                    health=monitor.summary,
                    schedules=self.schedules.status,
                    cost=lambda: cost.totals,
                    currency=lambda: config.cost.currency,
                ),
            ),
        )

    def _owns(self, providers: dict[str, Provider]) -> Callable[[Owned], bool]:
        """The records this daemon manages: its node's sandboxes (and those recorded before
        nodes), and the cloud ones while it leads them (`providers` grows when it does)."""
        node = self.config.node

        def owns(record: Owned) -> bool:
            if record.provider not in providers:
                return False
            return record.provider in CLOUD_PROVIDERS or record.node in ("", node)

        return owns

    def _observe_pass(self, records: list[SandboxRecord], specs: dict[str, PoolSpec]) -> None:
        if self.wings is None:
            self.last_pass = PassSnapshot(records, specs)
            return
        view = self.wings.reconciler.view.counts
        counts = {pool: Counter(states) for pool, states in view.items()}  # O(pools)
        # The view was read as the pass began: the same records unless the pass closed some
        # (then they are counted from `records` this once, not priced for another tick).
        same = sum(c.total() for c in counts.values()) == len(records)
        self.last_pass = PassSnapshot(records, specs, counts if same else None)
        self.wings.monitor.observe(records, specs)

    async def _sample(self, w: Wings) -> None:
        await w.resources.sample()
        await w.cost.sample()
        pools = (  # O(pools): only while a scraper can read them
            pool_gauges(
                self.last_pass.records,
                self.last_pass.specs,
                w.monitor.summary(),
                w.reconciler.pool_status(),
            )
            if w.metrics_server.listening
            else {}
        )
        self.metrics.update(
            pools=pools,
            host=w.resources.host,
            sandboxes=w.resources.sandboxes,
            cost=w.cost.totals,
            mqtt=w.bridge.stats(),
            revision=w.specs.revision,
            consumers=w.retention.stats(),
            webhooks=w.webhooks.stats(),
        )
        if self._owns_process and time.monotonic() >= self._trim_due:
            began = time.monotonic()
            _trim_heap()
            self._trim_due = began + max(TRIM_EVERY_S, (time.monotonic() - began) * 1000)

    def _facts(self) -> dict[str, Any]:
        w = self.wings
        if w is None:
            return {}
        return {
            "revision": w.specs.revision,
            "isolation": self.isolation,
            "security": self.security,
            "last_reconcile_at": w.reconciler.last_pass_at,
            "on_shutdown": self.config.on_shutdown,
            "pool_summary": w.heartbeat.pools.summary if w.heartbeat.pools else {},
            "host_resources": w.resources.host,
            "metrics_listen": w.metrics_server.listening,
            "mqtt": w.bridge.stats(),
            "consumers": w.retention.stats(),
            "webhooks": w.webhooks.stats(),
            "log_level": self.config.log_level,
            "reconcile_interval_s": self.config.reconcile_interval_s,
            "node": self.config.node,
            "role": self.leadership.role if self.leadership else "starting",
            "epoch": self.leadership.node.epoch if self.leadership else 0,
            "leader": bool(self.leadership and self.leadership.leading),
            "leader_epoch": self.leadership.leader_epoch if self.leadership else 0,
            "lease_ttl_s": self.config.lease_ttl_s,
        }

    async def _reloads(self, w: Wings) -> None:
        """One reload per SIGHUP (signals arriving during one coalesce into the next)."""
        while True:
            await self.reload_requested.wait()
            self.reload_requested.clear()
            try:
                applied = await reload(self.config, self.config_path, w.events)
            except RedisError as exc:  # applied all the same; only the event was lost
                if not survive(exc):
                    raise
                log.warning("reload event not published, %s: %s", why(exc), exc)
                continue
            if {"metrics_listen"} & set(applied):
                w.metrics_server.reconfigure()
            if "mqtt" in applied:
                w.bridge.reconfigure()
            if applied:
                w.reconciler.nudge()  # a new interval counts from now

    async def _run_root_tasks(self, redis: Redis, w: Wings, report: AdoptionReport) -> None:
        async with asyncio.timeout(None) as deadline:
            async with asyncio.TaskGroup() as group:
                roots: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
                    "reconciler": w.reconciler.run,
                    "heartbeat": w.heartbeat.run,
                    "leases": w.leases.run,
                    "health": w.monitor.run,
                    "janitor": w.janitor.run,
                    "keepalive": w.keepalive.run,
                    "nudges": lambda: _listen_for_nudges(redis, self.keys, w.reconciler),
                    "metrics": w.metrics_server.run,
                    "event-tail": w.tail.run,
                    "samples": lambda: every(
                        lambda: self.config.sample_interval_s,
                        lambda: self._sample(w),
                        "samples not taken",
                    ),
                    "mqtt": w.bridge.run,
                    "retention": w.retention.run,
                    "watchdog": w.watchdog.run,
                    "reloads": lambda: self._reloads(w),
                }
                if w.webhooks.senders:
                    roots["webhooks"] = w.webhooks.run
                tasks = [
                    group.create_task(
                        supervise(
                            name,
                            start,
                            events=w.events,
                            essential=name in ESSENTIAL_TASKS,
                            on_fatal=self._give_up,
                        ),
                        name=name,
                    )
                    for name, start in roots.items()
                ]
                await _first_of(w.reconciler.first_pass.wait(), self.stop.wait())
                if not self.stop.is_set():
                    await self._announce_ready(w, report)
                    self.started.set()
                await self.stop.wait()
                log.info("stop requested: no more reconciling")
                deadline.reschedule(asyncio.get_running_loop().time() + CANCEL_GRACE_S)
                for task in tasks:
                    task.cancel()

    async def _announce_ready(self, w: Wings, report: AdoptionReport) -> None:
        revision = w.specs.revision
        await w.events.publish(
            "daemon.started",
            **w.heartbeat.identity,
            isolation=self.isolation,
            security=self.security,
            revision=revision,
            adopted=len(report.adopted),
            dropped=len(report.dropped),
            orphans=len(report.orphans),
            node=self.config.node,
            epoch=self.leadership.node.epoch if self.leadership else 0,
            leader_epoch=self.leadership.leader_epoch if self.leadership else 0,
        )
        sdnotify.ready(f"active for node {self.config.node}, reconciling revision {revision}")
        log.info(
            "sandboxd ready",
            extra={
                "revision": revision,
                "isolation": self.isolation,
                "adopted": len(report.adopted),
            },
        )

    async def _shut_down(self, w: Wings) -> None:
        """Terminate or keep the sandboxes (`on_shutdown`), whether Redis answers or not:
        the node's sandboxes are found in its local registry, and what Redis should say
        about them is written now, or by the next start if Redis cannot be reached."""
        lost = self.leadership.fence.lost if self.leadership else None
        if lost is not None:
            log.critical(
                "stopped: the node's lease is lost (%s); its sandboxes are the new holder's", lost
            )
            return
        sdnotify.stopping(f"stopping ({self.config.on_shutdown} sandboxes)")
        terminated = kept = 0
        try:
            if self.config.on_shutdown == "terminate":
                terminated = await self._terminate_all(w)
            else:
                kept = await self._keep_all(w)
        except LeaseLost as exc:  # another daemon of this host took the sandboxes meanwhile
            log.critical("stopped: the node's lease is lost (%s); nothing more done", exc)
            return
        await self._say_stopping(w, terminated, kept)
        log.info("sandboxd stopped", extra={"terminated": terminated, "kept": kept})

    async def _terminate_all(self, w: Wings) -> int:
        """Every sandbox of the node: through its record while Redis answers, then whatever
        the local registries still hold (all of them, when Redis cannot be reached)."""
        terminated = 0
        try:
            async with asyncio.timeout(SHUTDOWN_REDIS_S):
                records = await w.store.records()
            async with asyncio.timeout(SHUTDOWN_TERMINATE_S * 3):
                terminated = await self._terminate_records(w, records)
        except (RedisError, TimeoutError) as exc:
            log.warning(
                "Redis unreachable at stop (%s): terminating the node's sandboxes from its "
                "local registry; their records are closed when Redis answers",
                exc,
            )
        return terminated + await self._terminate_registered(w)

    async def _terminate_records(self, w: Wings, records: list[SandboxRecord]) -> int:
        """Through their records, STOP_CONCURRENCY at a time (10,000 at once starved the
        lease's renewal, and the lease was lost mid-stop); every outcome is collected, the
        first Redis error (or a lost lease) raised after all have ended."""
        slots = asyncio.Semaphore(STOP_CONCURRENCY)

        async def one(record: SandboxRecord) -> bool:
            async with slots:
                return await w.terminator.terminate(record, "shutdown", *STATES)

        results = await asyncio.gather(*(one(r) for r in records), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for error in errors:
            if isinstance(error, LeaseLost):
                raise error
        if errors:
            raise errors[0]
        return sum(1 for r in results if r is True)

    async def _terminate_registered(self, w: Wings) -> int:
        """What the node's local registries still hold: terminated, and kept in the outbox
        for Redis (`sandbox.terminated`, reason `shutdown`, late)."""
        known = w.restorer.known()
        local = [p for n, p in w.terminator.providers.items() if n not in CLOUD_PROVIDERS]

        ended: list[dict[str, Any]] = []  # in the order they ended

        async def stop(provider: Provider, sandbox_id: str, pool: str) -> None:
            try:
                await provider.terminate(sandbox_id, {})
            except LeaseLost:
                raise
            except Exception as exc:
                log.error("terminate at stop failed: %s", exc, extra={"sandbox": sandbox_id})
                return
            state = known.get(sandbox_id, {}).get("state", "unknown")
            ended.append(
                w.outbox.late(
                    "sandbox.terminated",
                    pool=pool,
                    sandbox=sandbox_id,
                    close=True,
                    reason="shutdown",
                    state=state,
                )
            )

        try:
            for provider in local:
                found = await provider.list_sandboxes()
                async with asyncio.timeout(SHUTDOWN_TERMINATE_S * 3):
                    await asyncio.gather(*(stop(provider, s.id, s.pool) for s in found))
                await provider.cleanup_leftovers(keep=set())  # half-made ones: no process left
        except TimeoutError:
            log.error("sandboxes still stopping %ss into the stop", SHUTDOWN_TERMINATE_S * 3)
        finally:
            await w.outbox.keep(ended)  # one write for all of them
        return len(ended)

    async def _keep_all(self, w: Wings) -> int:
        try:
            async with asyncio.timeout(SHUTDOWN_REDIS_S):
                records = await w.store.records()
                await w.restorer.remember(records, w.specs.in_force, save=True, now=True)
            return len(records)
        except (RedisError, TimeoutError) as exc:  # kept all the same: the journal has them
            log.warning("Redis unreachable at stop (%s): the sandboxes are kept", exc)
            local = [p for n, p in w.terminator.providers.items() if n not in CLOUD_PROVIDERS]
            return sum([len(await p.list_sandboxes()) for p in local])

    async def _say_stopping(self, w: Wings, terminated: int, kept: int) -> None:
        """`daemon.stopping`, the outbox written and the heartbeat removed, if Redis answers
        in time; else `daemon.stopping` waits in the outbox for the next start."""
        data: dict[str, Any] = {
            "instance": self.instance,
            "on_shutdown": self.config.on_shutdown,
            "terminated": terminated,
            "kept": kept,
        }
        try:
            async with asyncio.timeout(SHUTDOWN_REDIS_S):
                await w.outbox.flush()
                await w.events.publish("daemon.stopping", **data)
        except (RedisError, TimeoutError) as exc:  # LeaseLapsed too: an outage
            log.warning("Redis unreachable at stop (%s): written when it answers", exc)
            await w.outbox.add("daemon.stopping", **data)
            return
        try:
            async with asyncio.timeout(SHUTDOWN_REDIS_S):
                await w.heartbeat.clear()
        except (RedisError, TimeoutError) as exc:  # it expires by itself
            log.warning("heartbeat not removed at stop: %s", exc)


async def _first_of(*coros: Coroutine[Any, Any, Any]) -> None:
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


TRIM_EVERY_S = 5.0


def _trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc's `malloc_trim`; nothing
    elsewhere). A full read or a journal write of 10,000 records frees tens of MB that
    glibc would otherwise keep: the daemon's RSS then follows what it holds, not its
    peaks. With each sample (a trim of a 150 MB heap takes well under a millisecond), and
    at most 0.1% of the time whatever it takes."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _tune_gc() -> None:
    """What is made at start (modules, models, the adopted records) is kept out of the
    collector's way for good, and young objects are collected less often: a daemon with
    10,000 records paused 100-200 ms in a full collection every other tick otherwise."""
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def _nudged_pool(data: object) -> tuple[str | None, bool]:
    """The pool a nudge names, and whether its pass may wait for more (`coalesce`): a claim
    or a release names its pool; a claim that found its pool empty says `empty:<pool>`
    (someone waits: at once); anything else asks for a whole pass."""
    if not isinstance(data, str):
        return None, False
    if data.startswith("empty:"):
        return data.removeprefix("empty:"), False
    return data, True


async def _listen_for_nudges(redis: Redis, keys: Keys, reconciler: Reconciler) -> None:
    """Wake the reconciler on every message on `<prefix>:nudge`; resubscribe after errors."""
    retrying = AsyncRetrying(
        wait=wait_exponential_jitter(multiplier=0.2, max=5),
        retry=retry_if_exception(survive),
    )
    async for attempt in retrying:
        with attempt:
            async with redis.pubsub() as pubsub:
                await pubsub.subscribe(keys.nudge)
                reconciler.nudge()  # whatever was sent while we were not listening
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        pool, coalesce = _nudged_pool(message.get("data"))
                        reconciler.nudge(pool, coalesce=coalesce)
