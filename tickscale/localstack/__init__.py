"""Real Kafka (KRaft), Redis and Prometheus processes on 127.0.0.1 for tests and local runs.

Nothing here is mocked: the point is that the handlers, the scaler and the
verifier are exercised against the same broker code that runs in production.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tickscale.localstack.kafka import (
        KAFKA_VERSION,
        KafkaBroker,
        KafkaDist,
        consumer_groups_describe,
        ensure_kafka,
    )
    from tickscale.localstack.net import free_port, wait_for_port
    from tickscale.localstack.prometheus import PrometheusServer
    from tickscale.localstack.redis import RedisServer
    from tickscale.localstack.service import LocalService
    from tickscale.localstack.topics import TopicSet, delete_groups, delete_topics, ensure_topics

# Imported lazily so `python -m tickscale.localstack.kafka` does not find its own
# module already half-imported by the package (runpy warns about that), and so
# importing one launcher does not pull in aiokafka for the others.
_EXPORTS = {
    "KAFKA_VERSION": "kafka",
    "KafkaBroker": "kafka",
    "KafkaDist": "kafka",
    "consumer_groups_describe": "kafka",
    "ensure_kafka": "kafka",
    "free_port": "net",
    "wait_for_port": "net",
    "PrometheusServer": "prometheus",
    "RedisServer": "redis",
    "LocalService": "service",
    "TopicSet": "topics",
    "delete_groups": "topics",
    "delete_topics": "topics",
    "ensure_topics": "topics",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "KAFKA_VERSION",
    "KafkaBroker",
    "KafkaDist",
    "LocalService",
    "PrometheusServer",
    "RedisServer",
    "TopicSet",
    "consumer_groups_describe",
    "delete_groups",
    "delete_topics",
    "ensure_kafka",
    "ensure_topics",
    "free_port",
    "wait_for_port",
]
