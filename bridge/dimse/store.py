"""The Storage service (C-STORE, PS3.4 Annex B): an instance is answered 0x0000 only once it
is durable: the file fsynced, renamed into the spool, the folder fsynced, and its queue
rows committed (``bridge.forward.ingest``, the path it shares with watched folders).

A C-STORE sub-operation of a C-MOVE the bridge itself sent (a ``dimse`` source retrieving
with ``c-move``) is taken by the retrieval waiting for it (``bridge.dimse.inbox``) before
anything else, and answered by it.

What a refused instance is answered is decided here, by the type of what refused it
(``STATUSES``); so is the answer to an instance whose delivery failed, for rules with
``ack: delivered`` (docs/conformance.md, C-STORE statuses).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE

from bridge.config import Config
from bridge.dimse.inbox import INBOX
from bridge.dimse.listener import TRANSFER_SYNTAXES, AssociationState
from bridge.errors import (
    InboundError,
    InvalidUid,
    OutOfResources,
    SopClassMismatch,
    SopInstanceMismatch,
    Unparseable,
    Unrouted,
)
from bridge.forward.ingest import Ingest, IngestSettings
from bridge.forward.queue import Queue
from bridge.metrics import Metrics
from bridge.routing.rules import Context

LOGGER = logging.getLogger(__name__)

# The status of a C-STORE refused with each kind of ``InboundError``; a subclass (``Truncated``,
# ``NotDicom``, ``MissingUid``) is answered as its nearest class here.
STATUSES: dict[type[InboundError], int] = {
    OutOfResources: 0xA700,  # Refused: out of resources
    SopClassMismatch: 0xA900,  # Error: data set does not match SOP class
    Unrouted: 0x0124,  # Refused: not authorised
    Unparseable: 0xC000,  # Error: cannot understand
    InvalidUid: 0xC000,
    SopInstanceMismatch: 0xC000,
    InboundError: 0xC000,
}


def refusal(exc: InboundError) -> tuple[int, str]:
    """The status and ErrorComment of a C-STORE refused with ``exc``."""
    status = next(STATUSES[kind] for kind in type(exc).__mro__ if kind in STATUSES)
    return status, exc.reason[:64]  # ErrorComment is LO: 64 characters at most


def delivery_failure(status: int | None) -> int:
    """The status of a C-STORE whose delivery failed (``ack: delivered``): the status the
    destination failed it with, when it gave one that says failure to a modality too
    (0xA7xx, 0xA9xx, 0xCxxx, 0x0117, 0x0122, 0x0124), else 0xC000."""
    if status is not None and (status & 0xF000 in (0xA000, 0xC000) or status in (0x0117, 0x0122, 0x0124)):
        return status
    return 0xC000


def storage_sop_classes(config: Config) -> list[str]:
    """The storage SOP classes the listener accepts contexts for (with
    ``accept.any_sop_class``, pynetdicom accepts any other abstract syntax as storage too)."""
    sop_classes = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    return sop_classes + [uid for uid in config.accept.extra_sop_classes if uid not in sop_classes]


class Store:
    """C-STORE: each instance through ``Ingest``, answered with its status."""

    event = evt.EVT_C_STORE

    def __init__(self, ingest: Ingest, queue: Queue, metrics: Metrics) -> None:
        self.ingest = ingest
        self.queue = queue  # for ack: delivered, the rows' outcomes
        self.metrics = metrics

    def add_contexts(self, ae: AE, config: Config) -> None:
        for uid in storage_sop_classes(config):
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)

    def serves(self, primitive: Any) -> bool:
        # The seam takes C-STORE requests by their message type, before it asks; a C_STORE
        # primitive asked about came in another message (a response nothing asked for).
        return False

    def handle(self, event: evt.Event, association: AssociationState) -> int | Dataset:
        path = event.dataset_path
        status = -1
        retrieved = None
        try:
            # A sub-operation of the bridge's own C-MOVE (bridge.dimse.inbox) goes to the
            # retrieval waiting for it, never to ingest, the rules or the queue.
            retrieved = INBOX.take(association.called_ae, association.calling_ae, event.request, path)
            status, comment = retrieved or self._store(event, path, association)
        finally:
            if status != 0x0000 or retrieved is not None:  # refused, or taken by a retrieval (moved away)
                path.unlink(missing_ok=True)  # stored: moved into the spool
        self.metrics.dimse_requests.labels("C-STORE", f"0x{status:04X}").inc()
        if status != 0x0000:
            association.failed += 1
        elif retrieved is None:  # a retrieval's instance is not stored: its end wakes no delivery
            association.stored += 1
        if not comment:
            return status  # an int: no pydicom Dataset to build and take apart again
        rsp = Dataset()
        rsp.Status = status
        rsp.ErrorComment = comment[:64]
        return rsp

    def _store(self, event: evt.Event, path: Path, association: AssociationState) -> tuple[int, str]:
        request = cast(C_STORE, event.request)

        def matches_command(header: Dataset, sop_class: str, sop_instance: str) -> None:
            if sop_class != str(request.AffectedSOPClassUID):
                raise SopClassMismatch("SOP Class differs from the command's")
            if sop_instance != str(request.AffectedSOPInstanceUID):
                raise SopInstanceMismatch("SOP Instance UID differs from the command's")

        ctx = Context(calling_ae=association.calling_ae, called_ae=association.called_ae, peer=association.peer)
        try:
            stored = self.ingest.store(path, ctx, IngestSettings.of(association.config), association.rules,
                                       "C-STORE", check=matches_command)
        except InboundError as exc:
            status, comment = refusal(exc)
            if not isinstance(exc, OutOfResources | Unrouted):  # ingest logs those, with what only it knows
                LOGGER.warning("refused C-STORE: %s (0x%04X)", exc, status)
            return status, comment
        if stored.decision.await_delivery:
            return self._await_delivery(stored.sop_instance_uid, stored.sha256, stored.decision.await_delivery,
                                        stored.decision.ack_timeout)
        return 0x0000, ""

    def _await_delivery(self, sop_instance: str, sha256: str, destinations: set[str],
                        timeout: float) -> tuple[int, str]:
        """``ack: delivered``: answer once every destination holds the instance; a dead row
        is a failure status (``delivery_failure``), and no answer in time is 0xA700
        'delivery pending' (the row stays queued, so the modality's resend is a harmless
        duplicate)."""
        deadline = time.monotonic() + timeout
        while True:
            generation = self.queue.generation()
            try:
                states = self.queue.delivery_states(sop_instance, sha256, destinations)
            except sqlite3.Error as exc:  # not known now: look again, until the deadline
                self.metrics.queue_errors.labels("intake").inc()
                LOGGER.warning("C-STORE of %s: cannot read its delivery state: %s", sop_instance, exc)
                states, unknown = {}, True
            else:
                unknown = False
            dead = {name: (error or "", status) for name, (state, error, status) in states.items() if state == "dead"}
            if dead:
                name, (error, status) = next(iter(dead.items()))
                LOGGER.warning("C-STORE of %s answered as failed: delivery to %s failed: %s", sop_instance, name,
                               error)
                return delivery_failure(status), f"delivery to {name} failed: {error}"
            if all(states.get(name, ("", None, None))[0] == "done" for name in destinations):
                return 0x0000, ""
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                LOGGER.info("C-STORE of %s answered 0xA700: not yet delivered to %s after %.0fs (stays queued)",
                            sop_instance, ", ".join(sorted(destinations)), timeout)
                return 0xA700, "delivery pending"
            self.queue.wait_recorded(generation, min(remaining, 1.0) if unknown else remaining)
