"""How an instrument's records are keyed and partitioned: shared by the replay,
which writes raw records, and the handler, which writes ticks beside them."""

from __future__ import annotations

from aiokafka.partitioner import murmur2


def symbol_key(symbol: str) -> bytes:
    """The key of an instrument's records, raw and ticks alike."""
    return symbol.encode()


def partition_for(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner, so keyed records land where Java clients put them."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
