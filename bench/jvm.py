"""How long a local JVM has spent compiling, read from its performance-data file.

The HotSpot JVM publishes its counters in ``/tmp/hsperfdata_<user>/<pid>`` (what
``jstat`` reads). Reading the file directly needs no JDK tools, which a machine
with only a Java runtime lacks. Layout: a 32-byte prologue (magic 0xcafec0c0,
byte order, versions, ..., the first entry's offset and the entry count), then
entries, each a header (length, name offset, vector length, type, flags, units,
variability, data offset) with its name and value at offsets from its start.
"""

from __future__ import annotations

import os
import pwd
import struct
from pathlib import Path

_MAGIC = b"\xca\xfe\xc0\xc0"


def perf_counters(pid: int) -> dict[str, int] | None:
    """The scalar long counters of the JVM ``pid``; None if it publishes none."""
    # HotSpot puts it under /tmp on Linux whatever TMPDIR says, named after the
    # effective user (not whatever $USER claims).
    user = pwd.getpwuid(os.geteuid()).pw_name
    path = Path("/tmp") / f"hsperfdata_{user}" / str(pid)
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) < 32 or data[:4] != _MAGIC:
        return None
    order = "<" if data[4] == 1 else ">"
    entry_offset, num_entries = struct.unpack_from(order + "ii", data, 24)
    counters: dict[str, int] = {}
    at = entry_offset
    for _ in range(num_entries):
        length, name_off, vector_len, dtype, _f, _u, _v, data_off = struct.unpack_from(
            order + "iiiBBBBi", data, at
        )
        if length <= 0:
            break
        if vector_len == 0 and dtype == ord("J"):
            end = data.index(b"\0", at + name_off)
            name = data[at + name_off : end].decode("ascii", "replace")
            (counters[name],) = struct.unpack_from(order + "q", data, at + data_off)
        at += length
    return counters


def compile_seconds(pid: int) -> float | None:
    """Seconds the JVM ``pid`` has spent in its JIT compilers (jstat's ``Time``)."""
    c = perf_counters(pid)
    if not c or "sun.os.hrt.frequency" not in c:
        return None
    ticks = c.get("java.ci.totalTime", c.get("sun.ci.totalTime"))
    if ticks is None:
        return None
    return ticks / c["sun.os.hrt.frequency"]


def gc_pauses(pid: int) -> tuple[int, float] | None:
    """Collections and seconds the JVM ``pid`` has spent in them (jstat's GC and GCT).

    Every collector the JVM publishes is counted: with G1 these are the young
    and full collections and the pauses of the concurrent cycle, all of which
    stop the broker's threads.
    """
    c = perf_counters(pid)
    if not c or "sun.os.hrt.frequency" not in c:
        return None
    count = ticks = 0
    n = 0
    while f"sun.gc.collector.{n}.invocations" in c:
        count += c[f"sun.gc.collector.{n}.invocations"]
        ticks += c.get(f"sun.gc.collector.{n}.time", 0)
        n += 1
    if n == 0:
        return None
    return count, ticks / c["sun.os.hrt.frequency"]
