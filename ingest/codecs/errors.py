"""The one exception every codec raises for input it cannot decode."""

from __future__ import annotations


class DecodeError(ValueError):
    """A raw message that cannot be decoded; ``reason`` is a short stable code.

    The reason is what the dead-letter record and the error metric carry, so
    it stays machine-friendly; ``detail`` is for humans.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SourceError(ValueError):
    """Replay input that cannot be used as it is: a user's file, not one record.

    ``where`` names the input and the place in it (``day.itch @ byte 1234``,
    ``feed.jsonl line 7``); the command line prints ``error: {where}: {what}``
    and exits 2, before anything is published when the fault can be known in
    advance.
    """

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where}: {what}")
        self.where = where
        self.what = what
