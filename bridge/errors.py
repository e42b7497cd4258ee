"""The exceptions that callers catch differently.

One root, ``BridgeError``; a subclass only where a caller handles it in its own way.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every error dicom-bridge raises on purpose."""


class ConfigError(BridgeError):
    """The configuration (or rules) is invalid; ``errors`` lists every problem with its path."""

    def __init__(self, errors: list[str], source: str = "configuration") -> None:
        self.errors = errors
        self.source = source
        lines = "\n".join(f"  {e}" for e in errors)
        super().__init__(f"{source}: {len(errors)} error(s)\n{lines}")


class StartError(BridgeError):
    """The daemon cannot start, for a reason the message names (an address already in
    use): ``dicom-bridge run`` prints it and exits 1, without a traceback."""


class UpstreamError(BridgeError):
    """A peer the bridge calls (a destination, or a server a source asks) cannot be used:
    what is wrong is the peer's, or the bridge's settings for it, not one instance."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class UpstreamUnavailable(UpstreamError):
    """The peer cannot take anything now: back off and try again later (a destination
    charges no row).

    ``retry_after`` (seconds) is a hint from the peer, e.g. HTTP Retry-After.
    """

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class UpstreamMisconfigured(UpstreamError):
    """The peer refuses us for a reason only an administrator can fix (a destination is
    suspended)."""


class IntakeError(BridgeError):
    """An incoming instance is refused; ``status`` is the DIMSE status to answer with."""

    def __init__(self, status: int, comment: str) -> None:
        self.status = status
        self.comment = comment[:64]  # ErrorComment is LO: 64 characters at most
        super().__init__(comment)


class ModificationError(BridgeError):
    """A rule's modification cannot be applied to this instance (a value its VR or the data
    set's character set cannot hold, a regex result invalid for the VR): the row is dead
    for that destination. ``keyword`` names the element, when one is to blame."""

    def __init__(self, keyword: str | None, reason: str) -> None:
        self.keyword = keyword
        self.reason = reason
        super().__init__(f"{keyword}: {reason}" if keyword else reason)
