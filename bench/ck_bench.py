"""confluent-kafka (librdkafka) pieces of the handler bench: the bare passthrough
beside aiokafka's, the packing of raw records into frames, and resident memory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from core.constants import HDR_CODEC, HDR_DATE, HDR_SEQ
from ingest.codecs import itch
from ingest.handler.ck_path import PACKED_CODEC


def passthrough_ck(bootstrap: str, src: str, dst: str, total: int, group: str) -> float:
    """consume(5000) -> produce -> flush -> synchronous commit; records per second.

    The same at-least-once loop as the aiokafka baseline, on librdkafka. Blocking:
    the caller runs it in a thread.
    """
    c = Consumer({
        "bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    })  # fmt: skip
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 2,
                  "queue.buffering.max.messages": 1_000_000})  # fmt: skip
    c.subscribe([src])
    n = 0
    t0: float | None = None
    try:
        while n < total:
            msgs = c.consume(5000, 0.5)
            if not msgs:
                continue
            if t0 is None:
                t0 = time.monotonic()
            for m in msgs:
                if m.error() is None:
                    _send(p, dst, m.value(), m.key())
            n += len(msgs)
            p.flush()
            c.commit(asynchronous=False)
        assert t0 is not None
        return n / (time.monotonic() - t0)
    finally:
        c.close()


def _send(p: Producer, topic: str, value: bytes | None, key: bytes | None) -> None:
    while True:
        try:
            p.produce(topic, value, key)
            return
        except BufferError:
            p.poll(0.05)


def pack_topic(bootstrap: str, src: str, dst: str, partitions: int, per: int) -> tuple[int, int]:
    """Copy ``src`` into ``dst`` partition by partition, ``per`` consecutive feed
    messages to a record (each behind the ITCH length prefix, ``itch.frame``), as
    MoldUDP64 packets carry many ITCH messages. Returns (records, messages) written.

    A packed record keeps its first message's date and feed sequence headers.
    """
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"pack-{dst}",
                  "enable.auto.commit": False})  # fmt: skip
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all"})
    records = messages = 0
    try:
        for part in range(partitions):
            _, high = c.get_watermark_offsets(TopicPartition(src, part), timeout=30)
            c.assign([TopicPartition(src, part, 0)])
            frame: list[bytes] = []
            headers: dict[str, Any] = {}
            done = 0
            while done < high:
                for m in c.consume(5000, 1.0):
                    if m.error() is not None:
                        continue
                    done = (m.offset() or 0) + 1
                    if not frame:
                        headers = dict(m.headers() or ())
                    frame.append(itch.frame(m.value() or b""))
                    messages += 1
                    if len(frame) == per or done == high:
                        hdr = [(HDR_CODEC, PACKED_CODEC), (HDR_DATE, headers[HDR_DATE]),
                               (HDR_SEQ, headers[HDR_SEQ])]  # fmt: skip
                        _produce_frame(p, dst, part, b"".join(frame), hdr)
                        records += 1
                        frame = []
        p.flush(60)
    finally:
        c.close()
    return records, messages


def _produce_frame(p: Producer, topic: str, part: int, value: bytes,
                   headers: list[tuple[str, bytes]]) -> None:  # fmt: skip
    while True:
        try:
            p.produce(topic, value, None, part, headers=headers)  # type: ignore[arg-type]
            return
        except BufferError:
            p.poll(0.05)


def rss_mb(pid: int) -> tuple[float, float] | None:
    """Resident memory of process ``pid`` now and at its peak (VmRSS, VmHWM), MB."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kb = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            kb[k] = int(v.split()[0])
    if len(kb) < 2:
        return None
    return kb["VmRSS"] / 1024, kb["VmHWM"] / 1024
