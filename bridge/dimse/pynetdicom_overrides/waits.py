"""Waits that end when there is work, instead of pynetdicom's 1 ms polling.

Both threads of an association poll: the DUL thread sleeps ``_run_loop_delay`` (1 ms)
whenever it found nothing to do, the association thread sleeps 1 ms every turn of its
reactor, and with the GIL busy a 1 ms sleep lasts longer (docs/performance.md). Here the
association thread waits on its DIMSE message queue (``_association_sleep``), the DUL
thread on its socket and on a socket pair that its outgoing queue writes to
(``_dul_sleep``, ``_WakingQueue``). The DUL thread waits no longer than pynetdicom would
have slept. On associations set up by ``prepare``, the association thread waits up to
``QUIET_WAIT``: woken every millisecond for nothing, it took the GIL from the network
thread several times per image. Everything its reactor looks for wakes it: a message
queued, a primitive from the DUL (release, abort, the peer gone), a ``send_*()`` call
pausing it, ``kill()``; only the idle timer (seconds) waits for the next turn.

The DUL thread's wait holds over TLS too: a TLS connection may hold bytes already
decrypted, in its own buffer, that ``select`` on the socket cannot see (a peer that
writes several PDUs at once), so there it does not wait while ``SSLSocket.pending()``.

On associations where a ``send_*()`` call waits for its response beside the reactor
thread (the bridge's requests, ``bridge.dimse.scu``; a handler of the listener that
sends, as C-GET and Storage Commitment do), the reactor's wait passes a wake-up on
instead of swallowing it.
"""

from __future__ import annotations

import queue
import select
import socket
import threading
import time
import weakref
from typing import Any

import pynetdicom.association

_real_sleep = time.sleep


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """The DUL's outgoing queue: putting an item wakes the DUL thread's wait.

    With ``maxsize``, a put waits for room (the sender is held back to the network's pace)
    for as long as the DUL thread runs; once it has ended, nothing will ever be sent and
    the item is dropped rather than waited on forever.
    """

    def __init__(self, wake: socket.socket, maxsize: int = 0, dul: threading.Thread | None = None) -> None:
        super().__init__(maxsize)
        self._wake = wake
        self._dul = weakref.ref(dul) if dul is not None else None

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if self.maxsize > 0 and block and timeout is None:
            while True:
                try:
                    super().put(item, True, 0.5)
                    break
                except queue.Full:
                    dul = self._dul() if self._dul is not None else None
                    if dul is None or not dul.is_alive():
                        return
        else:
            super().put(item, block, timeout)
        try:
            self._wake.send(b"\0")
        except OSError:
            pass  # already woken (buffer full) or closed at the end of the association


# How long a prepared association's reactor waits when nothing wakes it (see the module
# docstring): what it would notice only by looking again is its idle timer.
QUIET_WAIT = 0.05


def _association_sleep(seconds: float) -> None:
    """``time.sleep`` as the association thread's reactor uses it: end early on a message
    (on a prepared association, on anything its reactor looks for, see ``prepare``)."""
    thread = threading.current_thread()
    dimse = getattr(thread, "dimse", None)
    messages = getattr(dimse, "msg_queue", None)
    if messages is None or seconds > 0.01:
        _real_sleep(seconds)
        return
    if seconds == 0.001 and getattr(thread, "_bridge_quiet", False):
        # The reactor's turn, exactly (a send_*() call's wait for the pause sleeps 0.1 ms,
        # kill() 10 ms between their own looks: both as pynetdicom asks).
        seconds = QUIET_WAIT
    with messages.not_empty:
        if not messages.queue:
            messages.not_empty.wait(seconds)
        if messages.queue:
            # A put wakes one waiter. On a requestor's association another thread may be
            # blocked in get() for the same message (a send_*() call waiting for its
            # response): pass the wake-up on, or it sleeps until its DIMSE timeout.
            messages.not_empty.notify()


def _dul_sleep(seconds: float) -> None:
    """``time.sleep`` as the DUL thread uses it: end early on incoming data or an outgoing
    PDU. Not at all while a TLS connection holds decrypted bytes not yet read: a peer that
    writes several PDUs at once leaves them there, and the socket shows nothing until the
    peer sends again (after the answer it waits for)."""
    dul = threading.current_thread()
    wake: socket.socket | None = getattr(dul, "_bridge_wake", None)
    sock = getattr(getattr(dul, "socket", None), "socket", None)
    if wake is None or sock is None or seconds > 0.01:
        _real_sleep(seconds)
        return
    pending = getattr(sock, "pending", None)
    if pending is not None and pending():
        return  # TLS: bytes already decrypted, which select() on the socket cannot see
    try:
        ready, _, _ = select.select([sock, wake], [], [], seconds)
        if wake in ready:
            wake.recv(4096)
    except (OSError, ValueError):
        _real_sleep(seconds)  # the socket was closed under us: behave as pynetdicom would


def _wake_reactor(assoc: Any) -> None:
    messages = assoc.dimse.msg_queue
    with messages.not_empty:
        messages.not_empty.notify_all()


def _waking_reactor(method: Any, assoc: Any) -> Any:
    """``method``, then a wake-up for ``assoc``'s reactor."""
    def call(*args: Any, **kwargs: Any) -> Any:
        result = method(*args, **kwargs)
        _wake_reactor(assoc)
        return result
    return call


_pynetdicom_kill = pynetdicom.association.Association.kill


def _kill(self: Any) -> None:
    """``Association.kill``, after waking the reactor, whose loop then sees ``_kill``."""
    self._kill = True
    _wake_reactor(self)
    _pynetdicom_kill(self)
