"""Topic administration the pipeline itself needs: idempotent creation with
the settings each role calls for (the local stack and the tests reuse it)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError, for_code

from core.secrets import kafka_auth

log = logging.getLogger(__name__)


async def ensure_topics(
    bootstrap: str,
    specs: Mapping[str, int],
    replication: int = 1,
    configs: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
) -> None:
    """Create every topic in ``specs`` (name -> partitions) that does not exist yet.

    An existing topic is left alone even if its partition count or one of
    ``configs`` differs: the caller owns that decision (growing partitions
    reshuffles keys, a shorter retention deletes data); a differing count or setting
    is logged as a warning naming the topic, the setting and both values. Returns
    only once every partition has a leader, because a producer that races a
    fresh topic gets UNKNOWN_TOPIC_OR_PARTITION and, with transactions, that
    aborts the transaction instead of retrying quietly.
    """
    if not specs:
        return
    topic_configs = {k: str(v) for k, v in (configs or {}).items()}
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, **kafka_auth(), request_timeout_ms=int(timeout_s * 1000)
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(name, n, replication, topic_configs=topic_configs)
            for name, n in specs.items()
            if name not in existing
        ]
        if missing:
            resp = await admin.create_topics(missing, timeout_ms=int(timeout_s * 1000))
            for err in resp.topic_errors:
                topic, code = err[0], err[1]
                if code == 0 or code == TopicAlreadyExistsError.errno:
                    continue
                message = err[2] if len(err) > 2 else ""
                raise for_code(code)(f"creating topic {topic!r}: {message}")
        kept = [name for name in specs if name in existing]
        for t in await admin.describe_topics(kept) if kept else []:
            count = len(t.get("partitions") or [])
            if t["error_code"] == 0 and count != specs[t["topic"]]:
                log.warning(
                    "topic %s exists with %d partitions, not %d; left as it is (more "
                    "partitions would move keys between them)",
                    t["topic"], count, specs[t["topic"]],
                )  # fmt: skip
        for topic, key, have, want in await differing_configs(admin, kept, topic_configs):
            log.warning(
                "topic %s exists with %s=%s, not %s as this project creates it; left as it "
                "is (change it with the broker's config tools if %s should apply)",
                topic, key, have, want, want,
            )  # fmt: skip
        await _wait_for_leaders(admin, list(specs), timeout_s)
    finally:
        await admin.close()


async def differing_configs(
    admin: AIOKafkaAdminClient, topics: list[str], wanted: Mapping[str, str]
) -> list[tuple[str, str, str | None, str]]:
    """(topic, setting, current value, wanted value) for each of ``wanted`` that an
    existing topic has otherwise."""
    if not topics or not wanted:
        return []
    resources = [ConfigResource(ConfigResourceType.TOPIC, t, dict(wanted)) for t in topics]
    out = []
    for resp in await admin.describe_configs(resources):
        # (error, message, type, name, [(key, value, ...)]) per resource, in every version
        for error, _, _, topic, entries in (r[:5] for r in resp.resources):
            if error:
                raise for_code(error)(f"describing the settings of topic {topic!r}")
            have = {e[0]: e[1] for e in entries}
            for key, want in wanted.items():
                if have.get(key) != want:
                    out.append((topic, key, have.get(key), want))
    return sorted(out, key=lambda d: (d[0], d[1]))


async def _wait_for_leaders(
    admin: AIOKafkaAdminClient, topics: list[str], timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        pending = []
        for t in await admin.describe_topics(topics):
            partitions = t.get("partitions") or []
            if t["error_code"] != 0 or not partitions or any(p["leader"] < 0 for p in partitions):
                pending.append(t["topic"])
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics without leaders after {timeout_s:.0f}s: {pending}")
        await asyncio.sleep(0.1)
