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
