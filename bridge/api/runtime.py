"""What the HTTP server sees of the running daemon: a protocol, so that ``bridge.api``
needs nothing from ``bridge.daemon`` (which builds the server)."""

from __future__ import annotations

from typing import Protocol

from bridge.config import Config
from bridge.dimse.listener import Listener
from bridge.forward.delivery import Delivery
from bridge.forward.queue import Queue
from bridge.forward.spool import Spool
from bridge.metrics import Metrics
from bridge.sources import Sources


class Runtime(Protocol):
    """The running daemon. ``config`` is the configuration it runs now (a reload replaces
    it); ``queue``, ``listener`` and ``delivery`` are None until it has started them."""

    config: Config
    metrics: Metrics
    spool: Spool
    sources: Sources
    queue: Queue | None
    listener: Listener | None
    delivery: Delivery | None

    def reload_and_wait(self, timeout: float) -> str | None:
        """Reload the configuration file as SIGHUP does, and wait for it: None when the new
        configuration runs, else why it was refused (the running one serves on)."""
        ...
