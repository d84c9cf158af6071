"""Names shared by every process: topics, consumer group, headers, Redis keys.

Kept in one module so a rename is one edit and the handler, replay, scaler and
verifier can never disagree about where data lives.
"""

from __future__ import annotations

RAW_TOPIC = "md.raw"
TICKS_TOPIC = "md.ticks"
DEADLETTER_TOPIC = "md.deadletter"
HANDLER_GROUP = "feed-handlers"

# Kafka record headers on md.raw.
HDR_CODEC = "codec"  # b"itch" or b"json": which decoder the handler uses
HDR_SEQ = "seq"  # per-partition feed sequence number, ASCII decimal, for gap detection
HDR_DATE = "date"  # trading date (ISO) of ITCH records: ITCH times are ns since midnight
HDR_BROADCAST = "bcast"  # b"1" on market-wide messages copied to every partition

# Headers on md.deadletter.
HDR_DL_REASON = "reason"
HDR_DL_PARTITION = "src-partition"
HDR_DL_OFFSET = "src-offset"
HDR_DL_TOPIC = "src-topic"

# Redis key prefixes.
REDIS_PREFIX = "tickscale:"
REDIS_LAST_QUOTE = REDIS_PREFIX + "quote:"  # + symbol -> hash
REDIS_LAST_TRADE = REDIS_PREFIX + "trade:"  # + symbol -> hash
REDIS_BOOK_SNAPSHOT = REDIS_PREFIX + "book:"  # + group:topic:partition -> snapshot blob
REDIS_SCALER_LEASE = REDIS_PREFIX + "scaler:leader"
REDIS_SCALER_EVENTS = REDIS_PREFIX + "scaler:events"
# Each handler publishes its own throughput here (hash, refreshed every second,
# expiring when the handler dies) so the scaler learns per-handler capacity
# without having to discover and scrape every handler's /metrics endpoint.
REDIS_HANDLER_STATS = REDIS_PREFIX + "handler:"  # + handler id -> hash
HANDLER_STATS_TTL_S = 10

# Labels the scaler puts on containers it owns; it touches nothing without them.
LABEL_ROLE = "io.tickscale.role"
LABEL_SCALER = "io.tickscale.scaler"

# The replay feed's clock (hash: date, clock_ns, wall, speed), refreshed every
# second while a replay runs, so a scaler with clock=replay follows the replayed
# day's sessions instead of today's.
REDIS_REPLAY_CLOCK = REDIS_PREFIX + "replay:clock"
# A handler's stats field naming the signal that makes it leave the group at the next
# rebalance instead of rejoining (a rollout step's one-rebalance handover); absent in
# handlers that predate it, which the scaler then only stops.
LEAVE_SIGNAL_FIELD = "leave_signal"
LEAVE_SIGNAL = "SIGUSR1"
# The same announcement through Redis, for backends that cannot signal one handler (a
# Swarm task): the scaler sets REDIS_HANDLER_LEAVE + handler id, the handler reads it
# with its stats each second. Handlers that read it say so in LEAVE_KEY_FIELD.
REDIS_HANDLER_LEAVE = REDIS_PREFIX + "handler-leave:"
LEAVE_KEY_FIELD = "leave_key"
