"""Associations the bridge requests (its SCU role), to a node of the configuration.

One place opens them with the node's timeouts and TCP_NODELAY, and turns what can go
wrong while opening one into the upstream errors of ``bridge.errors`` (a destination
backs off or is suspended by them):

| what happens | raised |
| --- | --- |
| A-ASSOCIATE-RJ permanent (result 1) | ``UpstreamMisconfigured``: only an administrator can fix it |
| the peer accepts none of the proposed presentation contexts | ``UpstreamMisconfigured`` |
| A-ASSOCIATE-RJ transient (result 2) | ``UpstreamUnavailable`` |
| connection refused, unreachable, no answer within ``timeouts.connect`` | ``UpstreamUnavailable`` |
| no A-ASSOCIATE-AC within ``timeouts.acse``, or an A-ABORT instead | ``UpstreamUnavailable`` |
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from bridge.config import Node
from bridge.dimse import pynetdicom_overrides
from bridge.errors import UpstreamMisconfigured, UpstreamUnavailable

LOGGER = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are the odd numbers 1..255

# The largest P-DATA PDU we send, whatever the peer allows (0 = unlimited would make
# pynetdicom read a whole data set into one PDU), and how many PDUs may wait for the
# network: a data set is read from its file only as fast as the peer takes it.
MAX_SEND_PDU = 256 * 1024
MAX_QUEUED_PDUS = 32

_RESULTS = {1: "permanent", 2: "transient"}


class Peer:
    """A node, and how the bridge calls it."""

    def __init__(self, name: str, node: Node, calling_ae: str, network_timeout: float) -> None:
        self.name = name
        self.node = node
        self.calling_ae = calling_ae
        self.called_ae = node.ae_title or name
        self.network_timeout = network_timeout

    def __str__(self) -> str:
        return f"node {self.name} ({self.called_ae} at {self.node.host}:{self.node.port})"

    def associate(self, contexts: Sequence[PresentationContext], ext_neg: Sequence[Any] = (),
                  evt_handlers: Sequence[tuple[Any, Callable[..., Any]]] = ()) -> Association:
        """An established association with ``contexts`` proposed, or an upstream error.
        ``ext_neg``: extended negotiation items (SCP/SCU role selection for a C-GET's
        storage contexts, ``pynetdicom.build_role``); ``evt_handlers``: handlers bound on the
        association (a C-GET's EVT_C_STORE)."""
        timeouts = self.node.timeouts
        ae = AE(ae_title=self.calling_ae)
        ae.connection_timeout = timeouts.connect
        ae.acse_timeout = timeouts.acse
        ae.dimse_timeout = timeouts.dimse  # each C-STORE's response
        ae.network_timeout = self.network_timeout
        connected = threading.Event()

        def on_connection_open(event: evt.Event) -> None:
            _tune_socket(event.assoc, timeouts.dimse)
            pynetdicom_overrides.prepare(event.assoc, max_queued=MAX_QUEUED_PDUS)
            connected.set()

        assoc = ae.associate(
            self.node.host, self.node.port, contexts=list(contexts), ae_title=self.called_ae,
            ext_neg=list(ext_neg) or None, evt_handlers=[(evt.EVT_CONN_OPEN, on_connection_open), *evt_handlers],
        )
        if assoc.is_established:
            # Sending PDUs smaller than the peer allows is always correct (PS3.8 9.3.1).
            if not 0 < (assoc.acceptor.maximum_length or 0) <= MAX_SEND_PDU:
                assoc.acceptor.maximum_length = MAX_SEND_PDU
            LOGGER.info("association to %s as %s: %d of %d presentation contexts accepted", self,
                        self.calling_ae, len(assoc.accepted_contexts), len(contexts))
            return assoc
        raise self._failure(assoc, connected.is_set(), len(contexts))

    def _failure(self, assoc: Association, connected: bool, proposed: int) -> Exception:
        answer: Any = assoc.acceptor.primitive
        if assoc.is_rejected and answer is not None:
            result, source, reason = answer.result, answer.result_source, answer.diagnostic
            text = (f"A-ASSOCIATE-RJ {result}/{source}/{reason} ({_RESULTS.get(result, result)}, "
                    f"{answer.source_str}: {answer.reason_str})")
            if result == 0x01:
                return UpstreamMisconfigured(f"{self} rejected the association from {self.calling_ae}: {text}")
            return UpstreamUnavailable(f"{self} rejected the association for now: {text}")
        if not connected:
            return UpstreamUnavailable(f"cannot connect to {self}: refused, unreachable, or no answer within "
                                       f"{self.node.timeouts.connect:g}s")
        if answer is not None and answer.result == 0x00:
            return UpstreamMisconfigured(f"{self} accepted none of the {proposed} presentation contexts proposed")
        return UpstreamUnavailable(f"{self} did not accept the association within "
                                   f"{self.node.timeouts.acse:g}s (no answer, or aborted)")


def release(assoc: Association) -> None:
    """Release an association (A-RELEASE), or abort it if it is no longer established."""
    try:
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()
    except Exception:  # the peer may be gone already: nothing more to do
        LOGGER.debug("releasing an association failed", exc_info=True)


def _tune_socket(assoc: Association, timeout: float) -> None:
    sock = assoc.dul.socket.socket if assoc.dul.socket else None
    if sock is None:
        return
    # pynetdicom never sets TCP_NODELAY; without it each C-STORE can wait ~40 ms for Nagle.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # pynetdicom leaves the socket blocking without a timeout once connected: a peer that
    # stops reading would hold a send (and the worker behind it) forever. A send or read
    # that makes no progress for the DIMSE timeout closes the connection instead.
    sock.settimeout(timeout)
