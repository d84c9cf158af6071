"""Idempotent topic creation/deletion through aiokafka's admin client."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    GroupIdNotFound,
    KafkaError,
    NonEmptyGroup,
    UnknownTopicOrPartitionError,
    for_code,
)

from core.admin import differing_configs, ensure_topics
from core.aiokafka_internals import delete_group
from core.secrets import kafka_auth

log = logging.getLogger(__name__)


async def delete_topics(bootstrap: str, names: Iterable[str], timeout_s: float = 30.0) -> None:
    """Delete the named topics; names that do not exist are ignored."""
    names = list(names)
    if not names:
        return
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, **kafka_auth(), request_timeout_ms=int(timeout_s * 1000)
    )
    await admin.start()
    try:
        resp = await admin.delete_topics(names, timeout_ms=int(timeout_s * 1000))
        for err in resp.topic_error_codes:
            topic, code = err[0], err[1]
            if code == 0 or code == UnknownTopicOrPartitionError.errno:
                continue
            raise for_code(code)(f"deleting topic {topic!r}")
    finally:
        await admin.close()


async def delete_groups(
    bootstrap: str, groups: Iterable[str], timeout_s: float = 30.0, busy_s: float = 20.0
) -> None:
    """Delete the named consumer groups and their committed offsets; unknown ones are ignored.

    A topic deleted and recreated keeps its group's offsets, so whoever resets
    topics must drop the group too. A group with members cannot be deleted;
    members of a process killed moments ago stay until their session times
    out, so that is waited for up to ``busy_s`` before NonEmptyGroup is raised.
    """
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, **kafka_auth(), request_timeout_ms=int(timeout_s * 1000)
    )
    await admin.start()
    try:
        for group in groups:
            t0 = time.monotonic()
            while True:
                try:
                    # A fresh broker has no coordinator until its offsets topic exists.
                    code = await delete_group(admin, group)
                    err = for_code(code) if code else None
                except KafkaError as e:
                    err = type(e)
                if err is None or err is GroupIdNotFound:
                    break
                waited = time.monotonic() - t0
                if not (
                    (err.retriable and waited < timeout_s)
                    or (err is NonEmptyGroup and waited < busy_s)
                ):
                    raise err(f"deleting consumer group {group!r}")
                await asyncio.sleep(0.5)
    finally:
        await admin.close()


async def list_topics(bootstrap: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **kafka_auth())
    await admin.start()
    try:
        return list(await admin.list_topics())
    finally:
        await admin.close()


@dataclass
class TopicSet:
    """raw/ticks/deadletter topics and a consumer group private to one test or run.

    Mirrors the production names in ``core.constants`` under a unique prefix.
    """

    bootstrap: str
    prefix: str
    raw_partitions: int
    ticks_partitions: int
    deadletter_partitions: int = 1
    names: list[str] = field(default_factory=list)

    @property
    def raw(self) -> str:
        return f"{self.prefix}.md.raw"

    @property
    def ticks(self) -> str:
        return f"{self.prefix}.md.ticks"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}.md.deadletter"

    @property
    def group(self) -> str:
        return f"{self.prefix}.feed-handlers"


# What the ``make_topics`` pytest fixture yields.
MakeTopics = Callable[..., Awaitable[TopicSet]]


__all__ = [
    "MakeTopics",
    "TopicSet",
    "delete_groups",
    "delete_topics",
    "differing_configs",
    "ensure_topics",
    "list_topics",
]
