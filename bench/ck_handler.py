"""Runs the candidate confluent-kafka data path (ingest/handler/ck_path.py) as a
process of its own, for bench/bench_handler.py: the bench times it, reads its
resident memory and scrapes its end-to-end latency histogram, as it does for
``tickscale handler``.

    python -m bench.ck_handler --bootstrap B --in RAW --out TICKS --out-partitions 4 \
        --deadletter DL --group G --metrics-port P
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import uuid

from prometheus_client import start_http_server

from ingest.handler.ck_path import CkPath, CkSettings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--in", dest="in_topic", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--out-partitions", type=int, required=True)
    ap.add_argument("--deadletter", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--metrics-port", type=int, required=True)
    ap.add_argument("--batch", type=int, default=5000)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    start_http_server(a.metrics_port, addr="127.0.0.1")
    s = CkSettings(
        a.bootstrap, a.in_topic, a.out, a.out_partitions, a.deadletter, a.group,
        f"{a.group}-ck-{uuid.uuid4().hex[:8]}", batch=a.batch,
    )  # fmt: skip
    CkPath(s).run(stop)


if __name__ == "__main__":
    main()
