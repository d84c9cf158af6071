"""Assembles a scaler from its settings: the only place that reads ScalerSettings.

Start-up checks happen here, before anything is scaled, and fail naming the
setting: Redis unreachable (redis_url), Kafka unreachable (bootstrap), the
backend unreachable (docker_host, image, ...).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from aiokafka.errors import KafkaError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.constants import REDIS_SCALER_EVENTS, REDIS_SCALER_LEASE
from core.http import HealthServer
from core.reach import BrokerUnreachable, RedisUnreachable, reach, reach_redis
from core.secrets import client_secrets, without_redis_password
from core.validation import check_out_dir
from scaler.audit import AuditLog
from scaler.backends.base import Backend, HandlerSpec
from scaler.baseline import BaselineConfig, ReactiveBaseline
from scaler.calendar import SessionCalendar, parse_session_min
from scaler.capacity import RedisCapacity
from scaler.clock import MarketClock, ReplayClock, WallClock
from scaler.floors import LearnedFloors
from scaler.guard import GuardConfig
from scaler.lag import LagProbe
from scaler.lease import LeaderLease
from scaler.policy import Policy, PolicyConfig
from scaler.rate_history import RateHistory
from scaler.rollout import RolloutController
from scaler.rollout_state import RolloutStore
from scaler.service import Decider, Scaler, ScalerParts
from scaler.settings import ScalerSettings

log = logging.getLogger("scaler")


class StartupError(RuntimeError):
    """A setting is wrong or a dependency unreachable; ``setting`` names it (``invalid``:
    the value itself is wrong, not only what it points at)."""

    def __init__(self, setting: str, message: str, invalid: bool = True) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.invalid = invalid


def policy_config(s: ScalerSettings) -> PolicyConfig:
    return PolicyConfig(
        min_handlers=s.min_handlers,
        max_handlers=s.max_handlers,
        lag_target_s=s.lag_target_s,
        headroom=s.headroom,
        fallback_capacity=s.fallback_capacity,
        scale_down_window_s=s.scale_down_window_s,
        scale_down_fraction=s.scale_down_fraction,
        scale_down_interval_s=s.scale_down_interval_s,
        settle_s=s.settle_s,
        rebalance_pause_s=s.rebalance_pause_s,
    )


def make_calendar(s: ScalerSettings) -> SessionCalendar | None:
    if s.calendar == "none":
        return None
    return SessionCalendar(s.calendar, parse_session_min(s.session_min), s.lead_s)


def make_floors(s: ScalerSettings) -> LearnedFloors | None:
    if s.policy == "reactive" or s.calendar == "none" or not s.learn_floors:
        return None
    return LearnedFloors(days=s.floor_days, min_days=s.floor_min_days)


def make_decider(s: ScalerSettings, floors: LearnedFloors | None = None) -> Decider:
    if s.policy == "reactive":
        return ReactiveBaseline(
            BaselineConfig(min_replicas=max(s.min_handlers, 1), max_replicas=s.max_handlers)
        )
    return Policy(policy_config(s), make_calendar(s), floors)


def handler_redis_url(s: ScalerSettings) -> str:
    """Containers never get the password in their environment (``docker inspect`` shows it):
    they read theirs from the secret file mounted for them (``handler_secrets``). Local
    processes, the scaler's own children, get the URL as it is."""
    url = s.handler_redis_url or s.redis_url
    return url if s.backend == "process" else without_redis_password(url)


def handler_spec(s: ScalerSettings) -> HandlerSpec:
    return HandlerSpec(
        bootstrap=s.handler_bootstrap or s.bootstrap,
        in_topic=s.topic,
        out_topic=s.out_topic,
        deadletter_topic=s.deadletter_topic,
        group=s.group,
        redis_url=handler_redis_url(s),
        secrets=s.handler_secrets,
        kafka_username=s.handler_kafka_username,
    )


def stop_handlers_on_exit(s: ScalerSettings) -> bool:
    """Containers outlive a scaler stopped in order unless told otherwise, local
    processes stop with it; a scaler that crashes leaves either running, for the
    next one to adopt."""
    if "stop_handlers_on_exit" in s.model_fields_set:
        return s.stop_handlers_on_exit
    return s.backend == "process"


def make_backend(s: ScalerSettings, spec: HandlerSpec) -> Backend:
    if s.backend == "process":
        from scaler.backends.process import ProcessBackend

        try:
            # Its logs and targets file go there from the first handler on: a folder that
            # cannot be written is named now, not as a traceback at the first scale-up.
            check_out_dir(Path(s.state_dir))
        except ValueError as e:
            raise StartupError("state_dir", str(e)) from None

        return ProcessBackend(
            spec,
            base_port=s.handler_base_port,
            state_dir=Path(s.state_dir),
            stop_grace_s=s.stop_grace_s,
            name=s.name,
            parent_pid=s.handler_parent_pid,
        )
    from scaler.backends.docker import ContainerShape

    shape = ContainerShape(s.network, s.handler_cpus, s.handler_mem_mb)
    if s.backend == "docker":
        from scaler.backends.docker import DockerBackend

        return DockerBackend(
            spec, image=s.image, name=s.name, shape=shape, stop_grace_s=s.stop_grace_s,
            docker_host=s.docker_host, connect_timeout_s=s.connect_timeout_s,
        )  # fmt: skip
    from scaler.backends.swarm import SwarmBackend

    return SwarmBackend(
        spec, image=s.image, service=s.swarm_service, name=s.name, shape=shape,
        stop_grace_s=s.stop_grace_s, docker_host=s.docker_host,
        connect_timeout_s=s.connect_timeout_s,
    )  # fmt: skip


async def build(s: ScalerSettings, backend: Backend | None = None) -> Scaler:
    """A ready-to-start Scaler; raises StartupError naming what is wrong.

    ``backend``: one the caller made instead of the settings' (``scaler.keda``'s reported
    count). Such a scaler runs no rollouts: whoever runs its handlers replaces them.
    """
    url = client_secrets().redis_url(s.redis_url)
    redis = Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    shown = without_redis_password(s.redis_url)
    try:
        # Started while Redis restarts (or before it, in a stack whose parts come up in any
        # order), the scaler waits for it as for its broker.
        await reach_redis(shown, s.connect_timeout_s, redis.ping)
    except RedisUnreachable as e:
        await redis.aclose()
        raise StartupError("redis_url", e.what, invalid=False) from e
    except (RedisError, OSError) as e:
        await redis.aclose()
        raise StartupError("redis_url", f"Redis at {shown} refused: {e}", invalid=False) from e

    async def first_read() -> None:
        # A probe per attempt, closed each time: the scaler starts its own with the rest.
        async with LagProbe(s.bootstrap, s.topic, s.group) as probe:
            await probe.partitions()

    try:
        # A scaler started while its broker restarts waits for it, as its handlers do.
        await reach(s.bootstrap, s.connect_timeout_s, first_read)
    except BrokerUnreachable as e:
        await redis.aclose()
        raise StartupError(e.where, e.what, invalid=False) from e
    except (KafkaError, OSError) as e:
        await redis.aclose()
        raise StartupError("bootstrap", f"the broker at {s.bootstrap} refused: {e}") from e
    rollouts = backend is None
    if backend is None:
        try:
            backend = make_backend(s, handler_spec(s))  # checked by Scaler.start()
        except StartupError:
            await redis.aclose()
            raise
    clock: MarketClock = ReplayClock(redis) if s.clock == "replay" else WallClock()
    floors = make_floors(s)
    rates = None
    if floors is not None:
        rates = RateHistory(redis, s.name, floors, f"{int(time.time())}-{s.scaler_id}")
        await rates.load()
    parts = ScalerParts(
        backend=backend,
        decider=make_decider(s, floors),
        probe=LagProbe(s.bootstrap, s.topic, s.group),
        redis=redis,
        lease=LeaderLease(redis, f"{REDIS_SCALER_LEASE}:{s.name}", s.scaler_id, s.lease_ttl_s),
        audit=AuditLog(redis, f"{REDIS_SCALER_EVENTS}:{s.name}"),
        capacity=RedisCapacity(redis, s.fallback_capacity, hold_s=s.capacity_hold_s),
        clock=clock,
    )
    scaler = Scaler(
        s.scaler_id,
        parts,
        poll_s=s.poll_s,
        dry_run=s.dry_run,
        stop_handlers_on_exit=stop_handlers_on_exit(s),
    )
    scaler.rates = rates
    scaler.http = HealthServer(s.metrics_host, s.metrics_port, scaler.healthy, scaler.ready)
    if not rollouts:
        return scaler
    scaler.rollout = RolloutController(
        backend=backend, redis=redis, store=RolloutStore(redis, s.name), audit=scaler.audit,
        scaler_id=s.scaler_id, guard=GuardConfig.parse(s.rollout_guard), group=parts.probe,
    )  # fmt: skip
    return scaler
