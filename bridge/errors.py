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


class TokenFileError(BridgeError):
    """``http.token_file`` cannot be used (``bridge.api.auth``); the message says why, naming the file."""


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


class InboundError(BridgeError):
    """An instance received (by C-STORE, or from a watched folder) cannot be taken, for
    ``reason`` (one line, for whoever sent it). What it becomes is decided by type where
    it is caught: a DIMSE status (``bridge.dimse.store``), a failed file's reason
    (``bridge.watch.watcher``)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class Unparseable(InboundError):
    """The data set cannot be parsed, or a value the rules ask for cannot be converted."""


class NotDicom(Unparseable):
    """The file is not Part 10: no ``DICM`` prefix and File Meta Information."""


class Truncated(Unparseable):
    """The file ends before its data set does: cut short, or still being written."""


class InvalidUid(InboundError):
    """A required UID (``keyword``) is not a UID (PS3.5 9.1)."""

    problem = "invalid"

    def __init__(self, keyword: str) -> None:
        self.keyword = keyword
        super().__init__(f"{self.problem} {keyword}")


class MissingUid(InvalidUid):
    """A required UID is absent or empty."""

    problem = "missing"


class SopClassMismatch(InboundError):
    """The data set's SOP Class UID is not the one its C-STORE request names."""


class SopInstanceMismatch(InboundError):
    """The data set's SOP Instance UID is not the one its C-STORE request names."""


class Unrouted(InboundError):
    """No rule routes the instance, and ``unrouted`` is ``reject``."""


class OutOfResources(InboundError):
    """The instance cannot be made durable now (a write to the spool or the queue failed,
    or the spool is below its free-space floor); the same instance may be taken later."""


class ModificationError(BridgeError):
    """A rule's modification cannot be applied to this instance (a value its VR or the data
    set's character set cannot hold, a regex result invalid for the VR): the row is dead
    for that destination. ``keyword`` names the element, when one is to blame."""

    def __init__(self, keyword: str | None, reason: str) -> None:
        self.keyword = keyword
        self.reason = reason
        super().__init__(f"{keyword}: {reason}" if keyword else reason)
