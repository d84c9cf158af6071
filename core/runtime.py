"""Process-wide settings: heap tuning for the latency-sensitive processes (handler, replay
feed), and signal handling for the commands that start a whole stack (up, loadtest)."""

from __future__ import annotations

import asyncio
import gc
import signal
from collections.abc import Callable

# What ends a command from outside: kill or a service manager, and a closed terminal.
TERMINATION_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
# What asks a long-running process to stop in order: Ctrl-C and the two above.
STOP_SIGNALS = (signal.SIGINT, *TERMINATION_SIGNALS)


def freeze_startup_heap() -> None:
    """Leave everything allocated so far out of all later garbage collections.

    Once a handler or a feed has started, its heap is mostly modules, classes
    and clients that live as long as the process. A full collection walks all
    of them (about 40 ms for the handler's imports on an idle core, 50-90 ms
    seen under load) and stalls the event loop in the middle of a batch.
    Frozen, they are never walked again; what is allocated later is collected
    as usual.
    """
    gc.collect()
    gc.freeze()


def _forward_to_sigint(signum: int, frame: object) -> None:
    signal.raise_signal(signal.SIGINT)


def sigterm_and_sighup_as_ctrl_c() -> None:
    """Make SIGTERM (kill, a service manager, a CI timeout) and SIGHUP (the terminal
    closed) do what Ctrl-C does.

    By default either ends the interpreter on the spot: no ``finally``, no
    ``atexit``, so every server and child the command started (each in its own
    session) keeps running. Forwarded as SIGINT they take the path Ctrl-C
    takes, in plain code (KeyboardInterrupt) and inside ``asyncio.run`` (the
    main task is cancelled, its cleanup awaited). An event loop that handles
    these signals itself resets them to the default when it closes: call this
    again after it.

    A command a script starts in the background (``tickscale up &``) inherits
    SIGINT ignored, and the forwarded signal would be lost with it: SIGINT gets
    its default handler back.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in TERMINATION_SIGNALS:
        signal.signal(sig, _forward_to_sigint)


def stop_on_signals(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
    """Call ``stop`` on any of STOP_SIGNALS: the orderly stop of a handler, a scaler or a
    replay, whichever way it was asked for."""
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop)
