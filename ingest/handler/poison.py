"""Finding the record that keeps a partition's commits failing.

A record's own faults (payload, headers, decoding, serialisation) are caught
as it is applied (partition.py) and dead-lettered with the batch. What is left
fails at commit time, where one transaction holds a whole poll and the fault
cannot be told apart from the broker's: a failed batch is retried with backoff.
When a partition's batch fails ``after`` times in a row at the same committed
offset, the partition is committed one record at a time, alone in its
transaction, up to the end of the largest batch that failed; a single record
that then fails ``after`` times in a row, each time while the broker accepts a
transaction without it and the error is one a record can cause, is
dead-lettered with reason ``repeated_failure``. If
that dead letter fails as often (a record too large for the dead-letter
topic), it is written without the record's bytes and headers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiokafka import TopicPartition
from aiokafka import errors as kafka_errors

# What a broker or client says about the records themselves. Every other Kafka
# error (the network, time-outs, leadership, fencing, authorisation) and every
# OSError says nothing about them: such failures are retried, never blamed on a
# record.
_RECORD_ERRORS = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordTooLargeError,
    kafka_errors.RecordListTooLargeError,
    kafka_errors.CorruptRecordException,
    kafka_errors.InvalidMessageError,
    kafka_errors.InvalidTimestampError,
    kafka_errors.UnsupportedForMessageFormatError,
)


def may_be_the_records(error: BaseException) -> bool:
    """Whether a failed commit's error can be the fault of a record in it."""
    if isinstance(error, kafka_errors.KafkaError):
        return isinstance(error, _RECORD_ERRORS)
    return not isinstance(error, OSError | TimeoutError)


@dataclass
class _Partition:
    at: int = -1  # the committed offset the failures happened at
    failures: int = 0  # in a row at ``at``
    until: int = 0  # one past the last record of the largest batch that failed at ``at``
    single_until: int | None = None  # committed one record at a time below this offset
    condemned: dict[int, str] = field(default_factory=dict)  # offset -> what kept failing
    bare: set[int] = field(default_factory=set)  # condemned, and their dead letter failed too


class PoisonTracker:
    """Per input partition: consecutive failed commits, and what to do about them.

    :param after: failures in a row at one offset before the handler narrows down
    """

    def __init__(self, after: int) -> None:
        self.after = after
        self._parts: dict[TopicPartition, _Partition] = {}

    def one_at_a_time(self, tp: TopicPartition, committed: int) -> bool:
        st = self._parts.get(tp)
        return st is not None and st.single_until is not None and committed < st.single_until

    def condemned(self, tp: TopicPartition) -> dict[int, str]:
        st = self._parts.get(tp)
        return dict(st.condemned) if st is not None else {}

    def bare(self, tp: TopicPartition) -> set[int]:
        """Condemned offsets whose dead letter must go without the record's content."""
        st = self._parts.get(tp)
        return set(st.bare) if st is not None else set()

    def failed(
        self, tp: TopicPartition, committed: int, next_offset: int, error: BaseException
    ) -> None:
        """A commit holding ``tp``'s records ``committed`` .. ``next_offset - 1`` failed.

        Call only for failures that may be the records' own: with a batch of one
        record, only when the broker took a transaction without it just after.
        """
        st = self._parts.setdefault(tp, _Partition())
        if st.at != committed:
            st.at, st.failures, st.until = committed, 0, next_offset
        st.until = max(st.until, next_offset)
        st.failures += 1
        if st.failures < self.after:
            return
        st.failures = 0
        if self.one_at_a_time(tp, committed) and next_offset == committed + 1:
            if committed in st.condemned:
                st.bare.add(committed)
            else:
                st.condemned[committed] = f"{type(error).__name__}: {error}"
        else:
            st.single_until = max(st.until, st.single_until or 0)

    def committed(self, tp: TopicPartition, next_offset: int) -> None:
        """``tp`` committed everything below ``next_offset``."""
        st = self._parts.get(tp)
        if st is None:
            return
        st.at, st.failures = -1, 0
        st.condemned = {o: why for o, why in st.condemned.items() if o >= next_offset}
        st.bare = {o for o in st.bare if o >= next_offset}
        if st.single_until is not None and next_offset >= st.single_until:
            st.single_until = None
        if st.single_until is None and not st.condemned:
            del self._parts[tp]
