"""Pinned overrides of pynetdicom's internals, for speed and correctness. Applied once, at start.

pynetdicom (3.0.x, pinned in pyproject.toml) spends much of a C-STORE's time in
places that have nothing to do with DICOM (measured in docs/performance.md):

- ``AssociationSocket.recv`` reads a PDU 4096 bytes at a time, each read a Python
  loop turn: a 128 KiB PDU costs 32 ``recv`` calls. Replaced by ``recv_into`` a
  buffer of the PDU's size (up to 1 MiB; beyond, it grows with what arrives).
- Both threads of an association poll: the DUL thread sleeps ``_run_loop_delay``
  (1 ms) whenever it found nothing to do, the association thread sleeps 1 ms every
  turn of its reactor. With the GIL busy, a 1 ms sleep lasts about 3 ms. Replaced by
  waits that end as soon as there is work: the association thread waits on its
  DIMSE message queue, the DUL thread on its socket and on a socket pair that its
  outgoing queue writes to. The DUL thread waits no longer than pynetdicom would have
  slept. On associations set up by ``prepare``, the association thread waits up to
  ``QUIET_WAIT`` (50 ms): woken every millisecond for nothing, it took the GIL from
  the network thread five times per image (a quarter of intake's context switches).
  Everything its reactor looks for wakes it: a message queued, a primitive from the
  DUL (release, abort, the peer gone), a ``send_*()`` call pausing it, ``kill()``;
  only the idle timer (seconds) waits for the next turn.
- Each received data set gets its File Meta Information built as a pydicom
  ``FileMetaDataset`` and written by pydicom's general writer: about 0.35 ms of
  Python per instance for seven elements. Replaced by a direct encoder of the same
  bytes (checked against pydicom's output by a test).
- Each accepted association gets its own copy of the acceptor's presentation contexts
  through ``copy.deepcopy``, which builds every transfer syntax UID again, validating
  each with pydicom's regular expressions: with every storage SOP class in every
  syntax (170 x 39) that is 35 ms of Python per association, holding the GIL while
  other associations wait. A modality that opens one association per image pays it
  for every image. Replaced by a copy of each context object and its list of syntaxes
  (0.3 ms); UIDs are immutable strings, so sharing them is safe.
- Each C-STORE response is turned into a pydicom command ``Dataset``, encoded by
  pydicom's writer and fragmented by a generator: about 0.9 ms of Python per
  instance for a ~150-byte message. Replaced, for C-STORE responses only, by a
  direct encoder of the same bytes (checked against pynetdicom's output by a test);
  every other message, and any response with fields it does not know, goes through
  pynetdicom as before.

- ``StorageServiceClass.SCP`` builds the response primitive by setting the request's
  SOP Class and Instance UIDs on it again, and each set validates the UID with
  pydicom's regular expressions, though the request's were validated when it was
  decoded: 4 % of intake's Python. Replaced by the same method sharing the request's
  UID objects (``_storage_scp``); the handler, its error handling (0xC211) and the
  status checks are pynetdicom's.

- Every P-DATA-TF PDU is copied whole, decoded into PDU and primitive objects, queued
  as a state-machine event and handed through the state machine to the DIMSE layer,
  which copies each fragment again before writing it to the data set's file. For the
  PDUs that only continue a C-STORE data set (all but its last few kilobytes), the
  DUL thread now writes the fragments straight from the received buffer to that file
  (``_read_pdu_data``), which is all pynetdicom ends up doing with them; a PDU that
  ends the data set is passed to the DIMSE layer directly, as the state machine's
  action DT-2 would. Anything else (commands, other PDUs, a state other than Sta6, a
  handler bound to the events this skips) goes through pynetdicom as before. A PDU
  that holds a whole plain C-STORE command starts the message the same way
  (``_take_store_command_pdu``: its data set's file and File Meta, as ``decode_msg``
  does, with the command read from its bytes instead of through pydicom).

- A complete C-STORE request is queued by the network (DUL) thread for the
  association thread, which wakes, serves it and queues the response back for the
  network thread to send: two hand-offs between threads per image, each a wake-up that
  waits for a free core when the machine is busy (as it is while the bridge forwards).
  On the bridge's own listener (``prepare(assoc, serve_inline=True)``) the network
  thread serves a C-STORE request itself, with pynetdicom's ``_serve_request``, when
  the association thread has nothing queued or in hand (``_receive_primitive``; the
  peer waits for the answer either way, so nothing else arrives meanwhile); any other
  message, or a C-STORE while another request is being served, is queued as before.
  A network thread that served the request sends the response PDU itself, as the state
  machine's DT-1 would (``_send_msg``, ``_may_send``), instead of queueing it for itself
  and waking itself through its socket pair to send it.

- Each association request is decoded UID by UID through ``set_uid``, which validates
  every UID again with pydicom's regular expressions: a storage SCU proposes hundreds
  (storescu: 120 contexts, 3 syntaxes each), the same ones on every association. The
  negotiation's modules (``pdu_items``, ``presentation``) get ``set_uid`` with its
  results remembered (``_set_uid_remembered``; failures are not, so they raise every
  time).

And for hostile and broken peers (docs/conformance.md): every PDU's announced length
is checked against a bound before its body is read (``_read_pdu_data``: A-ABORT beyond
it), nothing is read once an abort is decided or sent, a DIMSE message that cannot be
decoded or grows too long in memory is aborted instead of ending the network thread
(``_receive_primitive``), and a C-STORE request whose command is wrong is answered
with a failure status that names what is wrong (``_refuse_store``), where pynetdicom
sent nothing or aborted. Each costs the happy path a comparison or two.

And three for correctness on the associations the bridge requests (``bridge.dimse.scu``),
where a ``send_*()`` call waits for its response beside the reactor thread: the
reactor's wait for messages passes a wake-up on instead of swallowing it, the reactor
takes no message while a ``send_*()`` call has paused it, and that call stops waiting
when the association is aborted (see ``_get_msg``).

Every intake test runs through these overrides; tests/test_pynetdicom_overrides.py
checks that each one still finds what it replaces.
"""

from __future__ import annotations

import copy
import logging
import os
import queue
import select
import socket
import struct
import threading
import time as _time
import types
import weakref
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import pynetdicom.association
import pynetdicom.dimse
import pynetdicom.dimse_messages
import pynetdicom.dul
import pynetdicom.fsm
import pynetdicom.pdu_items
import pynetdicom.presentation
import pynetdicom.service_class
import pynetdicom.transport
import pynetdicom.utils
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info as _pydicom_write_file_meta_info
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, _config, evt
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_CANCEL, C_STORE, N_EVENT_REPORT
from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_P_ABORT, P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.service_class import attempt as _attempt
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.utils import make_target

from bridge.dataset.uids import is_valid_uid

LOGGER = logging.getLogger("pynetdicom.dul")  # pynetdicom's messages, under its name
_real_sleep = _time.sleep


# A PDU body is read into a buffer that grows by at most this much ahead of what has
# arrived: a peer that announces a long PDU and sends little costs little.
_RECV_CHUNK = 1024 * 1024


def _recv(self: Any, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv``: exactly ``nr_bytes`` unless the peer closes first."""
    sock = self.socket
    buffer = bytearray(min(nr_bytes, _RECV_CHUNK))
    read = 0
    while read < nr_bytes:
        if read == len(buffer):  # only PDUs longer than _RECV_CHUNK come here
            buffer.extend(bytes(min(nr_bytes - read, len(buffer))))
        with memoryview(buffer) as view:
            n = sock.recv_into(view[read:])
        if not n:
            del buffer[read:]
            return buffer
        read += n
    return buffer


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
    """``time.sleep`` as the DUL thread uses it: end early on incoming data or an outgoing PDU."""
    dul = threading.current_thread()
    wake: socket.socket | None = getattr(dul, "_bridge_wake", None)
    sock = getattr(getattr(dul, "socket", None), "socket", None)
    if wake is None or sock is None or seconds > 0.01:
        _real_sleep(seconds)
        return
    try:
        ready, _, _ = select.select([sock, wake], [], [], seconds)
        if wake in ready:
            wake.recv(4096)
    except (OSError, ValueError):
        _real_sleep(seconds)  # the socket was closed under us: behave as pynetdicom would


def _explicit_le(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH2s2xL", group, element, vr, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _padded(text: str, pad: bytes, errors: str = "strict") -> bytes:
    data = text.encode("ascii", errors)
    return data + pad if len(data) % 2 else data


def _create_file_meta(*, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                      implementation_uid: str = PYNETDICOM_IMPLEMENTATION_UID,
                      implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION) -> bytes:
    """The encoded File Meta Information group (PS3.10 7.1), as pynetdicom's would be.
    A UID that is not ASCII (from a peer's command, refused once complete) is written
    with ``?`` for what cannot be encoded, rather than ending the thread that receives."""
    body = b"".join((
        _explicit_le(0x0002, 0x0001, b"OB", b"\x00\x01"),
        _explicit_le(0x0002, 0x0002, b"UI", _padded(str(sop_class_uid), b"\x00", "replace")),
        _explicit_le(0x0002, 0x0003, b"UI", _padded(str(sop_instance_uid), b"\x00", "replace")),
        _explicit_le(0x0002, 0x0010, b"UI", _padded(str(transfer_syntax), b"\x00")),
        _explicit_le(0x0002, 0x0012, b"UI", _padded(str(implementation_uid), b"\x00")),
        _explicit_le(0x0002, 0x0013, b"SH", _padded(str(implementation_version), b" ")),
    ))
    return _explicit_le(0x0002, 0x0000, b"UL", struct.pack("<L", len(body))) + body


def _write_file_meta_info(fp: Any, file_meta: Any, enforce_standard: bool = True) -> None:
    if isinstance(file_meta, bytes):
        fp.write(file_meta)
    else:  # not ours: leave it to pydicom
        _pydicom_write_file_meta_info(fp, file_meta, enforce_standard)


def _implicit_le(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", group, element, len(value)) + value


# What pynetdicom would put in a C-STORE response besides the fields the direct encoder
# writes (MessageIDBeingRespondedTo, Affected SOP Class/Instance UID, Status, ErrorComment).
_STORE_RSP_OTHERS = tuple(
    name for name in (*C_STORE.RESPONSE_KEYWORDS, *C_STORE.STATUS_OPTIONAL_KEYWORDS)
    if name not in ("MessageIDBeingRespondedTo", "Status", "ErrorComment")
) + ("DataSet",)


def _store_response_command(primitive: Any) -> bytes | None:
    """The C-STORE-RSP command set (implicit VR little endian, PS3.7 9.3.1.2) as pynetdicom
    would encode it, or None when the primitive has a field this encoder does not write."""
    if any(getattr(primitive, name, None) is not None for name in _STORE_RSP_OTHERS):
        return None
    status = primitive.Status
    if status is None or primitive.AffectedSOPClassUID is None or primitive.AffectedSOPInstanceUID is None:
        return None
    elements = [
        _implicit_le(0x0000, 0x0002, _padded(str(primitive.AffectedSOPClassUID), b"\x00")),
        _implicit_le(0x0000, 0x0100, struct.pack("<H", 0x8001)),
        _implicit_le(0x0000, 0x0120, struct.pack("<H", primitive.MessageIDBeingRespondedTo)),
        _implicit_le(0x0000, 0x0800, struct.pack("<H", 0x0101)),
        _implicit_le(0x0000, 0x0900, struct.pack("<H", status)),
    ]
    comment = primitive.ErrorComment
    if comment:
        try:
            elements.append(_implicit_le(0x0000, 0x0902, _padded(str(comment), b" ")))
        except UnicodeEncodeError:
            return None
    elements.append(_implicit_le(0x0000, 0x1000, _padded(str(primitive.AffectedSOPInstanceUID), b"\x00")))
    body = b"".join(elements)
    return _implicit_le(0x0000, 0x0000, struct.pack("<L", len(body))) + body


def _copy_contexts(value: Any, memo: dict[int, Any] | None = None) -> Any:
    """``deepcopy`` as ``pynetdicom.transport`` uses it (the acceptor's supported
    contexts for a new association): each context copied with its own list of transfer
    syntaxes, the immutable UIDs shared. Anything else is deep-copied as before."""
    if isinstance(value, list) and all(isinstance(cx, PresentationContext) for cx in value):
        copies = []
        for cx in value:
            c = copy.copy(cx)
            c._transfer_syntax = list(cx._transfer_syntax)
            copies.append(c)
        return copies
    return copy.deepcopy(value, memo)


_pynetdicom_send_msg = pynetdicom.dimse.DIMSEServiceProvider.send_msg


def _send_msg(self: Any, primitive: Any, context_id: int) -> None:
    """``DIMSEServiceProvider.send_msg``: C-STORE responses encoded directly, and sent
    directly by a network thread that served the request itself."""
    command = None
    if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None:
        command = _store_response_command(primitive)
    if command is None or self.assoc.get_handlers(evt.EVT_DIMSE_SENT) or (
        self.maximum_pdu_size and len(command) > self.maximum_pdu_size - 6
    ):
        _pynetdicom_send_msg(self, primitive, context_id)
        return
    dul = self.dul
    if threading.get_ident() == dul.ident and _may_send(dul):
        # Served inline (_serve_inline): queued, the answer would wait for this thread to
        # come back round its loop, pass a wake-up through a socket pair to itself and go
        # through the state machine's DT-1 to be sent as this PDU (0.2 ms per C-STORE).
        dul.socket.send(_p_data_tf(context_id, command))
        return
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
    self.dul.send_pdu(pdata)


_pynetdicom_get_msg = pynetdicom.dimse.DIMSEServiceProvider.get_msg


def _get_msg(self: Any, block: bool = False) -> Any:
    """``DIMSEServiceProvider.get_msg``, for associations where another thread's
    ``send_*()`` call waits for a response beside the reactor thread (the bridge's own):

    - the reactor takes nothing while a ``send_*()`` call has asked it to pause.
      pynetdicom's pause is a handshake with a stale flag: ``send_c_store`` clears the
      reactor's checkpoint and waits for ``_is_paused``, which the reactor set before it
      last passed the checkpoint. A reactor woken by the end of the previous operation,
      but not yet run, can then run one more turn after the next request has gone out,
      and take the response ``send_c_store`` waits for (which then waits out its DIMSE
      timeout). The faster the peer, the likelier;
    - the ``send_*()`` call's wait ends as soon as the association is aborted or its
      connection closed (the reactor that would notice is paused), not at the end of the
      DIMSE timeout, which may be minutes for a PACS slow to store large instances.
    """
    assoc = self.assoc
    reactor = threading.current_thread() is assoc
    if not block:
        if reactor and not assoc._reactor_checkpoint.is_set():
            return None, None
        if not reactor:
            return _pynetdicom_get_msg(self, block)
        # While this is True the network thread queues C-STOREs rather than serving
        # them itself (_serve_inline): set before a message is taken, cleared only once
        # the reactor finds nothing to take.
        if self.msg_queue.queue:
            assoc._bridge_serving = True
        item = _pynetdicom_get_msg(self, block)
        if item[1] is None:
            assoc._bridge_serving = False
        return item
    if reactor:
        return _pynetdicom_get_msg(self, block)
    timeout = self.dimse_timeout
    deadline = None if timeout is None else _time.monotonic() + timeout
    while True:
        wait = _ABORT_CHECK if deadline is None else max(0.0, min(_ABORT_CHECK, deadline - _time.monotonic()))
        try:
            return self.msg_queue.get(block=True, timeout=wait)
        except queue.Empty:
            pass
        if (deadline is not None and _time.monotonic() >= deadline) or assoc.acse.is_aborted():
            return None, None


_ABORT_CHECK = 0.2  # seconds between looks for an abort while a send_*() call waits


_pynetdicom_read_pdu_data = pynetdicom.dul.DULServiceProvider._read_pdu_data
# Events whose handlers would see what the fast paths skip (the PDU's bytes and objects,
# the state machine's transition, a command set decoded by pydicom).
_FAST_PATH_UNWATCHED = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV, evt.EVT_FSM_TRANSITION, evt.EVT_DIMSE_RECV)


# PDU lengths read from the network are checked before anything is allocated for them
# (docs/conformance.md, "Hostile and broken peers"). Every PDU but P-DATA-TF carries a few AE
# titles, UIDs and contexts: 64 KiB is generous. A P-DATA-TF may be as long as the
# maximum this side announced, plus a margin for peers that miscount their item headers;
# with no maximum announced (0), as long as _UNANNOUNCED_PDU.
MAX_CONTROL_PDU = 64 * 1024
PDU_MARGIN = 1024
_UNANNOUNCED_PDU = 64 * 1024 * 1024
_PDU_NAMES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF",
              0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}


def _data_pdu_limit(dul: Any) -> int:
    """The longest P-DATA-TF ``dul`` reads (see ``MAX_CONTROL_PDU``), kept on it."""
    assoc = dul.assoc
    announced = (assoc.acceptor if assoc.is_acceptor else assoc.requestor).maximum_length
    dul._bridge_data_limit = announced + PDU_MARGIN if announced else _UNANNOUNCED_PDU
    return int(dul._bridge_data_limit)


def awaiting_request(assoc: Any) -> bool:
    """Whether ``assoc`` is an acceptor's connection still open and waiting for its
    A-ASSOCIATE-RQ: ARTIM not stopped (AE-5 starts it on the connection; it is stopped
    when the request arrives, AE-6, or the connection ends before it, AA-2, AA-5).
    Once its connection has ended, the association thread may still wait out its
    ``acse_timeout`` for a request that cannot come: it holds no connection."""
    return bool(assoc.is_acceptor and assoc.requestor.primitive is None and assoc.dul.artim_timer._end_time is None)


def peer_name(assoc: Any) -> str:
    """``host:port`` of the other side of ``assoc``, for log lines."""
    try:
        peer = assoc.requestor if assoc.is_acceptor else assoc.acceptor
        return f"{peer.address}:{peer.port}"
    except Exception:
        return "?"


def _abort(dul: Any, reason: str) -> None:
    """A-ABORT the association for ``reason`` (logged with the peer's address): the state
    machine sends it (Evt19, an invalid PDU) and nothing more is read (``_read_pdu_data``)."""
    LOGGER.error("A-ABORT to %s: %s", peer_name(dul.assoc), reason)
    dul._bridge_aborted = True
    dul.event_queue.put("Evt19")


def _read_pdu_data(self: Any) -> None:
    """``DULServiceProvider._read_pdu_data`` (pynetdicom 3.0) with a fast path for the
    P-DATA-TF PDUs that carry a C-STORE data set (see the module's docstring). Reads,
    errors and events are pynetdicom's otherwise, in the same order, except that:

    - a PDU longer than allowed (``MAX_CONTROL_PDU``, ``_data_pdu_limit``) is answered
      with A-ABORT before its body is read;
    - once an abort is decided or sent (Sta13), nothing more is read: the connection is
      closed (pynetdicom reads on in Sta13, each PDU as long as its header says);
    - failures are logged in one line that names the peer, without a traceback (a
      hostile peer should not be able to fill the log).
    """
    sock = self.socket
    if self._bridge_aborted or self.state_machine.current_state == "Sta13":
        if self.state_machine.current_state == "Sta13":
            sock.close()  # Evt17: the state machine ends the association
        return
    try:
        head = sock.recv(6)
    except (OSError, TimeoutError) as exc:
        _lost(self, exc)
        return
    try:
        pdu_type, _, pdu_length = struct.unpack(">BBL", head)
    except struct.error:
        self.event_queue.put("Evt17")
        return
    if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
        _abort(self, f"unknown PDU type 0x{pdu_type:02X}")
        return
    limit = (self._bridge_data_limit or _data_pdu_limit(self)) if pdu_type == 0x04 else MAX_CONTROL_PDU
    if pdu_length > limit:
        _abort(self, f"{_PDU_NAMES[pdu_type]} PDU of {pdu_length} bytes announced, more than the {limit} allowed")
        return
    try:
        body = sock.recv(pdu_length)
    except (OSError, TimeoutError) as exc:
        _lost(self, exc)
        return
    if len(body) != pdu_length:
        LOGGER.error("connection from %s closed within a PDU (%d of %d bytes received)", peer_name(self.assoc),
                     6 + len(body), 6 + pdu_length)
        self.event_queue.put("Evt17")
        return
    if pdu_type == 0x04 and _may_take(self) and (_take_data_set_pdu(self, body) or
                                                  _take_store_command_pdu(self, body)):
        return
    try:
        pdu, event = self._decode_pdu(head + body)
        self.event_queue.put(event)
    except Exception as exc:
        _abort(self, f"cannot decode the {_PDU_NAMES[pdu_type]} PDU: {_describe(exc)}")
        return
    self._recv_pdu.put(pdu)


_pynetdicom_do_action = pynetdicom.fsm.StateMachine.do_action


def _do_action(self: Any, event: str) -> None:
    """``StateMachine.do_action``, which lets an action's exception end the network
    thread (pynetdicom logs it and stops the reactor), leaving the connection open, the
    peer unanswered and the association thread without an end: a PDU that decodes but
    whose values its action cannot convert (an A-ABORT with source 122, say) did that.
    Here the association is aborted instead, as pynetdicom's reactor does when reading
    fails: A-ABORT sent, the connection closed, and, on an established association, an
    A-P-ABORT for the association thread, which then ends it as it ends any abort."""
    try:
        _pynetdicom_do_action(self, event)
    except Exception as exc:
        dul = self.dul
        if dul._bridge_aborted and self.current_state == "Sta1":
            return
        LOGGER.error("A-ABORT to %s: %s in %s failed: %s", peer_name(dul.assoc), event, self.current_state,
                     _describe(exc))
        dul._bridge_aborted = True
        abort = A_ABORT_RQ()
        abort.source, abort.reason_diagnostic = 0x02, 0x00
        try:
            dul.socket.send(abort.encode())
            dul.socket.close()
        except Exception:
            pass
        self.current_state = "Sta1"  # what AA-3 leaves: the connection closed
        if dul.assoc.is_established:
            primitive = A_P_ABORT()
            primitive.provider_reason = 0x00
            dul.to_user_queue.put(primitive)


def _lost(dul: Any, exc: BaseException) -> None:
    """The connection failed or timed out while a PDU was read (Evt17)."""
    LOGGER.error("connection from %s lost within a PDU: %s", peer_name(dul.assoc), _describe(exc))
    dul.event_queue.put("Evt17")


# Events whose handlers would see what sending a response directly skips.
_DIRECT_SEND_UNWATCHED = (evt.EVT_DATA_SENT, evt.EVT_PDU_SENT, evt.EVT_FSM_TRANSITION)


def _may_send(dul: Any) -> bool:
    """Whether the network thread may send a P-DATA-TF PDU itself, as the state machine's
    DT-1 would: the association is established (Sta6), nothing queued before it waits
    to be sent, and no handler is bound to the events that skips."""
    return dul.socket is not None and dul.state_machine.current_state == "Sta6" \
        and not dul.to_provider_queue.queue \
        and not any(dul.assoc.get_handlers(event) for event in _DIRECT_SEND_UNWATCHED)


def _p_data_tf(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF PDU of one PDV: the whole of a command set (PS3.8 9.3.5, E.2)."""
    return struct.pack(">BBLLBB", 0x04, 0, 6 + len(command), 2 + len(command), context_id, 0x03) + command


def _may_take(dul: Any) -> bool:
    """Whether the network thread may handle a P-DATA-TF PDU itself: the association is
    established (Sta6), nothing received before it waits to be handled, and no handler
    is bound to the events the fast paths skip."""
    return dul.state_machine.current_state == "Sta6" and not dul.event_queue.queue \
        and not dul._recv_pdu.queue and not any(dul.assoc.get_handlers(event) for event in _FAST_PATH_UNWATCHED)


def _take_data_set_pdu(dul: Any, body: bytearray) -> bool:
    """Write a P-DATA-TF PDU's data set fragments straight to the file of the C-STORE
    being received, if that is all the PDU holds (an ending fragment last, if any).
    Returns False, having done nothing, otherwise."""
    assoc = dul.assoc
    message = assoc.dimse.message
    target = getattr(message, "_data_set_file", None) if message is not None else None
    if target is None:
        return False
    view = memoryview(body)
    fragments: list[memoryview] = []
    ending: tuple[int, bytes] | None = None
    offset, end = 0, len(body)
    while offset < end:
        if ending is not None or end - offset < 6:
            return False  # something after the data set's last fragment, or a broken item
        (length,) = struct.unpack_from(">L", body, offset)
        context_id, control = body[offset + 4], body[offset + 5]
        if length < 2 or offset + 4 + length > end or control & 1:
            return False  # a malformed item, or command fragments: pynetdicom's path
        value = view[offset + 6:offset + 4 + length]
        if control & 2:
            ending = (context_id, bytes(view[offset + 5:offset + 4 + length]))
        else:
            fragments.append(value)
        offset += 4 + length
    for fragment in fragments:
        target.write(fragment)
    if fragments:
        target.file.flush()
    if ending is not None:
        # What the state machine's DT-2 does with the PDU, without the detour.
        primitive = P_DATA()
        primitive.presentation_data_value_list.append(ending)
        assoc.dimse.receive_primitive(primitive)
    return True


def _take_store_command_pdu(dul: Any, body: bytearray) -> bool:
    """Start a C-STORE from a PDU that holds its whole command set and nothing else,
    as ``DIMSEMessage.decode_msg`` would: the message, its data set's file in the spool
    and the File Meta written to it, without decoding the command through pydicom
    (``_plain_store_command`` reads it, ``_c_store_request`` makes the primitive of it
    later). Returns False, having done nothing, for anything else."""
    if len(body) < 6 or not _config.STORE_RECV_CHUNKED_DATASET:
        return False
    assoc = dul.assoc
    dimse = assoc.dimse
    (length,) = struct.unpack_from(">L", body, 0)
    context_id, control = body[4], body[5]
    if dimse.message is not None or length + 4 != len(body) or control & 3 != 3 \
            or context_id not in assoc._accepted_cx:
        return False
    raw = bytes(body[6:])
    command = _plain_store_command(raw)
    if command is None or command[4] == 0x0101:  # not a plain C-STORE request, or no data set
        return False
    # DIMSEMessage.__init__ without its fifteen empty command elements, each set through
    # pydicom (a tenth of this function): nothing reads the command set of a message
    # started here (no EVT_DIMSE_RECV handler, see _may_take); _receive_primitive
    # decodes it when pynetdicom needs it.
    message = C_STORE_RQ.__new__(C_STORE_RQ)
    message.context_id = context_id
    message.encoded_command_set = BytesIO(raw)
    message.encoded_command_set.seek(0, os.SEEK_END)  # as if written
    message.data_set = BytesIO()
    message.command_set = Dataset()
    message._bridge_command = command  # type: ignore[attr-defined]  # for _c_store_request, later
    dm: Any = pynetdicom.dimse_messages  # its file factory and File Meta writer, as installed
    target = dm.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")
    message._data_set_file = target
    message._data_set_path = Path(target.name)
    target.write(b"\x00" * 128)
    target.write(b"DICM")
    dm.write_file_meta_info(target, dm.create_file_meta(
        sop_class_uid=UID(command[2]), sop_instance_uid=UID(command[3]),
        transfer_syntax=assoc._accepted_cx[context_id].transfer_syntax[0],
    ))
    dimse.message = message
    return True


_pynetdicom_receive_primitive = pynetdicom.dimse.DIMSEServiceProvider.receive_primitive
_DIMSE_LOGGER = logging.getLogger("pynetdicom.dimse")


# What a DIMSE message may hold in memory while it arrives: a command set is a few
# hundred bytes; data sets other than a C-STORE's (written to a file as they arrive) are
# identifiers of a few kilobytes. A peer that sends more is aborted.
MAX_COMMAND = 64 * 1024
MAX_DATA_IN_MEMORY = 4 * 1024 * 1024


def _receive_primitive(self: Any, primitive: P_DATA) -> None:
    """``DIMSEServiceProvider.receive_primitive`` (pynetdicom 3.0), line for line, except
    that a C-STORE request may be served here, in the network thread (``_serve_inline``),
    instead of being queued for the association thread, that its data set's file,
    complete, is sealed first (a recycled spool file keeps nothing of its old content),
    and that nothing a peer sends goes unanswered or ends the thread:

    - a message that cannot be decoded, or grows beyond ``MAX_COMMAND`` /
      ``MAX_DATA_IN_MEMORY``, is answered with A-ABORT and logged with the peer's address
      (pynetdicom let the exception end the network thread: neither answer nor abort);
    - a C-STORE request whose command is wrong gets a failure status that says what is
      wrong (``_store_request_problem``), as long as its Message ID can be read.
    """
    if self.message is None:
        self.message = DIMSEMessage()
    message = self.message
    try:
        complete = message.decode_msg(primitive, self.assoc)
    except Exception as exc:
        _drop_message(self, f"cannot decode the DIMSE message: {_describe(exc)}")
        return
    if not complete:
        if message.encoded_command_set.tell() > MAX_COMMAND or (
                message._data_set_file is None and message.data_set.tell() > MAX_DATA_IN_MEMORY):
            _drop_message(self, "DIMSE message longer than allowed (command or data set held in memory)")
        return
    seal = getattr(message._data_set_file, "seal", None)
    if seal is not None:
        seal()
    evt.trigger(self.assoc, evt.EVT_DIMSE_RECV, {"message": message})
    context_id = message.context_id
    d_primitive: Any = None
    problem: tuple[int, str] | None = None
    try:
        d_primitive = _c_store_request(message)
        if d_primitive is None:
            if not message.command_set:  # started by _take_store_command_pdu
                message.command_set = decode(message.encoded_command_set, True, True)
            problem = _store_command_problem(message)
            if problem is None:
                d_primitive = message.message_to_primitive()
                if type(message) is C_STORE_RQ and not d_primitive.is_valid_request:
                    missing = [name for name in d_primitive.REQUEST_KEYWORDS if getattr(d_primitive, name) is None]
                    problem = 0xC000, f"incomplete command: no {', '.join(missing)}"
        if problem is None and type(message) is C_STORE_RQ:
            problem = _store_request_problem(self.assoc, d_primitive, context_id)
    except Exception as exc:
        problem = (0xC000, f"invalid command: {_describe(exc)}")
        if type(message) is not C_STORE_RQ:
            _drop_message(self, f"invalid DIMSE message: {_describe(exc)}")
            return
    if problem is not None:
        _refuse_store(self, message, d_primitive, context_id, *problem)
        return
    serves = getattr(self.assoc, "_bridge_serves", None)
    if serves is not None and type(message) is not C_STORE_RQ and not isinstance(d_primitive, C_CANCEL) \
            and not serves(d_primitive):
        _drop_message(self, f"{type(message).__name__} is not a service the listener provides")
        return
    inline = False
    if isinstance(d_primitive, C_CANCEL) and len(self.cancel_req) < 10:
        self.cancel_req[d_primitive.MessageIDBeingRespondedTo] = d_primitive
    elif isinstance(d_primitive, N_EVENT_REPORT) and d_primitive.is_valid_request:
        t = threading.Thread(target=make_target(self.assoc._serve_request), args=(d_primitive, context_id))
        t.start()
    elif _serve_inline(self, d_primitive):
        inline = True
    else:
        self.msg_queue.put((context_id, d_primitive))
    message.encoded_command_set = BytesIO()
    message.data_set = BytesIO()
    message._data_set_file = None
    message._data_set_path = None
    self.message = None
    if inline:
        self.assoc._serve_request(d_primitive, context_id)


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


def _discard_data_set(message: Any) -> None:
    """Close and remove the file a message's data set was being written to, if any."""
    target = getattr(message, "_data_set_file", None)
    if target is None:
        return
    message._data_set_file = message._data_set_path = None
    try:
        target.close()
    except Exception:
        pass
    try:
        os.unlink(target.name)
    except (OSError, AttributeError, TypeError):
        pass


def _drop_message(dimse: Any, reason: str) -> None:
    """The message being received cannot be answered: discard it and A-ABORT."""
    message, dimse.message = dimse.message, None
    _discard_data_set(message)
    _abort(dimse.dul, reason)


# The command's UID elements a C-STORE request must have (PS3.7 9.3.1.1).
_STORE_UIDS = ((0x00000002, "Affected SOP Class UID"), (0x00001000, "Affected SOP Instance UID"))


def _message_id(command: Dataset) -> int | None:
    try:
        value = command.get("MessageID")
    except Exception:
        return None
    return value if isinstance(value, int) and 0 <= value <= 0xFFFF else None


def _uid_problem(name: str, raw: Any) -> str | None:
    """What is wrong with a UID as the command holds it (bytes, or text once converted)."""
    if raw is None:
        return f"missing {name}"
    data = raw if isinstance(raw, bytes) else str(raw).encode("utf-8", "replace")
    data = data.rstrip(b"\x00 ")
    if not data:
        return f"empty {name}"
    if not data.isascii():
        return f"{name} is not ASCII"
    if len(data) > 64:
        return f"{name} longer than 64 characters ({len(data)})"
    if not is_valid_uid(data.decode("ascii")):
        return f"{name} is not a UID (digits and dots)"
    return None


def _store_command_problem(message: Any) -> tuple[int, str] | None:
    """What is wrong with the command of a C-STORE request that pynetdicom converts
    (``_c_store_request`` took only well-formed ones), before it converts it."""
    if type(message) is not C_STORE_RQ:
        return None
    command = message.command_set
    for tag, name in _STORE_UIDS:
        item = command.get_item(tag)
        found = _uid_problem(name, None if item is None else item.value)
        if found:
            return 0xC000, found
    for tag in list(command.keys()):
        try:
            command[tag].value  # noqa: B018 - converted here to name the element that fails
        except Exception:
            item = command.get_item(tag)
            size = len(item.value) if isinstance(getattr(item, "value", None), bytes) else "?"
            return 0xC000, f"invalid {keyword_for_tag(tag) or tag} in the command ({size} bytes)"
    return None


def _store_request_problem(assoc: Any, request: C_STORE, context_id: int) -> tuple[int, str] | None:
    """Why a complete C-STORE request cannot be served (pynetdicom would abort, or call the
    handler without a data set), or None. Costs two comparisons for a request with a data
    set under its own SOP Class's context."""
    if request._dataset_path is None:  # the command said it has none (0x0101)
        return 0xC000, "C-STORE request without a data set"
    context = assoc._accepted_cx.get(context_id)
    if context is not None and request.AffectedSOPClassUID == context.abstract_syntax:
        return None
    if context is None:
        return None  # pynetdicom aborts: no context to answer in
    if not _config.UNRESTRICTED_STORAGE_SERVICE and not issubclass(
            uid_to_service_class(str(request.AffectedSOPClassUID)), StorageServiceClass):
        return 0x0122, f"Affected SOP Class UID {request.AffectedSOPClassUID} is not a storage SOP class"
    return None


def _refuse_store(dimse: Any, message: Any, request: C_STORE | None, context_id: int, status: int,
                  reason: str) -> None:
    """Answer a C-STORE request that cannot be served with ``status`` and ``reason`` (as
    ErrorComment, and logged with the peer's address); A-ABORT if even its Message ID
    cannot be read."""
    message_id = request.MessageID if request is not None else _message_id(message.command_set)
    if message_id is None:
        _drop_message(dimse, f"C-STORE request without a readable Message ID ({reason})")
        return
    dimse.message = None
    _discard_data_set(message)
    assoc = dimse.assoc
    LOGGER.warning("C-STORE from %s refused with 0x%04X: %s", peer_name(assoc), status, reason)
    hook = getattr(assoc, "_bridge_on_refused", None)
    if hook is not None:
        hook(assoc, status, reason)
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.Status = status
    rsp.ErrorComment = reason.encode("ascii", "replace").decode()[:64]  # type: ignore[assignment]
    if request is not None and _uid_problem("", request.AffectedSOPClassUID) is None \
            and _uid_problem("", request.AffectedSOPInstanceUID) is None:
        rsp._affected_sop_class_uid = request.AffectedSOPClassUID
        rsp._affected_sop_instance_uid = request.AffectedSOPInstanceUID
    dimse.send_msg(rsp, context_id)


# The C-STORE-RQ command elements (PS3.7 9.3.1.1) _c_store_request reads; a command
# with any other element, or with the Move Originator ones, is left to pynetdicom.
_STORE_RQ_ELEMENTS = frozenset({0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000})


def _plain_store_command(raw: bytes) -> tuple[int, int, str, str, int] | None:
    """(Message ID, Priority, Affected SOP Class UID, Affected SOP Instance UID,
    Command Data Set Type) of a C-STORE-RQ command set (implicit VR little endian) that
    has only the usual elements, all well formed; None for anything else."""
    values: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(raw):
        group, element, length = struct.unpack_from("<HHL", raw, offset)
        if group != 0 or element not in _STORE_RQ_ELEMENTS or offset + 8 + length > len(raw):
            return None
        values[element] = raw[offset + 8:offset + 8 + length]
        offset += 8 + length
    if offset != len(raw) or any(len(values.get(e, b"")) != 2 for e in (0x0100, 0x0110, 0x0700, 0x0800)):
        return None
    (command,), (message_id,), (priority,), (data_set_type,) = (
        struct.unpack("<H", values[e]) for e in (0x0100, 0x0110, 0x0700, 0x0800)
    )
    sop_class = values.get(0x0002, b"").rstrip(b"\x00 ").decode("ascii", "replace")
    sop_instance = values.get(0x1000, b"").rstrip(b"\x00 ").decode("ascii", "replace")
    if command != 0x0001 or priority not in (0, 1, 2) or not is_valid_uid(sop_class) \
            or not is_valid_uid(sop_instance):
        return None
    return message_id, priority, sop_class, sop_instance, data_set_type


def _c_store_request(message: Any) -> C_STORE | None:
    """``message.message_to_primitive()`` for a plain C-STORE request, read straight from
    the command's bytes (implicit VR little endian): the same primitive, with the same
    checks, without converting each element through pydicom and setting it through the
    primitive's validating setters (a tenth of intake's Python). None for anything
    else, which pynetdicom converts as before."""
    if type(message) is not C_STORE_RQ:
        return None
    command = getattr(message, "_bridge_command", None) or _plain_store_command(
        message.encoded_command_set.getvalue())
    if command is None:
        return None  # pynetdicom's conversion says what is wrong
    message_id, priority, sop_class, sop_instance, _ = command
    primitive = C_STORE()
    primitive._message_id = message_id
    primitive._affected_sop_class_uid = UID(sop_class)
    primitive._affected_sop_instance_uid = UID(sop_instance)
    primitive._priority = priority
    primitive.DataSet = message.data_set
    primitive._context_id = message.context_id
    primitive._dataset_path = message._data_set_path
    primitive._dataset_file = message._data_set_file
    return primitive


def _serve_inline(dimse: Any, primitive: Any) -> bool:
    """Whether the network thread may serve ``primitive`` itself: a C-STORE request on an
    association prepared for it, with nothing queued for the association thread and
    nothing in its hands (``_get_msg`` keeps ``_bridge_serving``). Only this thread
    queues messages, so the answer cannot change before the request is served.

    Not before the association thread has marked the association established: a peer
    may send its first request as soon as the A-ASSOCIATE-AC is out, and a response is
    dropped (``_storage_scp``) on an association not yet marked established. The
    association thread serves such a request once it has."""
    assoc = dimse.assoc
    if not getattr(assoc, "_bridge_serve_inline", False) or not isinstance(primitive, C_STORE) \
            or primitive.MessageIDBeingRespondedTo is not None or not assoc.is_established:
        return False
    with dimse.msg_queue.mutex:
        return not dimse.msg_queue.queue and not getattr(assoc, "_bridge_serving", False)


_pynetdicom_storage_scp = pynetdicom.service_class.StorageServiceClass.SCP


def _storage_scp(self: Any, req: C_STORE, context: PresentationContext) -> None:
    """``StorageServiceClass.SCP`` (pynetdicom 3.0), line for line, except that the
    response takes the request's UIDs as they are: they were validated when the request
    was decoded, and ``UID`` objects are immutable."""
    rsp = C_STORE()
    rsp.MessageID = req.MessageID
    rsp.MessageIDBeingRespondedTo = req.MessageID
    rsp._affected_sop_instance_uid = req._affected_sop_instance_uid
    rsp._affected_sop_class_uid = req._affected_sop_class_uid
    cx_id = cast(int, context.context_id)
    with _attempt(rsp, self.dimse, cx_id, self.assoc) as ctx:
        ctx.error_msg = "Exception in handler bound to 'evt.EVT_C_STORE'"
        ctx.error_status = 0xC211
        rsp_status = evt.trigger(ctx.assoc, evt.EVT_C_STORE, {"request": req, "context": context.as_tuple})
        if req._dataset_file:
            req._dataset_file.close()
            try:
                os.unlink(req._dataset_file.name)
            except OSError:
                pass
    if not ctx.success or not self.assoc.is_established:
        return
    rsp = self.validate_status(rsp_status, rsp)
    self.dimse.send_msg(rsp, cx_id)


_pynetdicom_set_uid = pynetdicom.utils.set_uid
_UIDS: dict[tuple[Any, ...], Any] = {}
_UIDS_MAX = 4096  # beyond this many distinct UIDs, say from a peer proposing nonsense, no more are kept


def _set_uid_remembered(value: Any, name: str, allow_empty: bool = True, allow_none: bool = True,
                        validate: bool = True) -> Any:
    """``pynetdicom.utils.set_uid`` with each text's result kept: the same UID object for
    the same text (UIDs are immutable), the conformance warning logged once, a failure
    raised every time."""
    key = (type(value), value, allow_empty, allow_none, validate)
    if isinstance(value, str | bytes):
        found = _UIDS.get(key)
        if found is not None:
            return found
    uid = _pynetdicom_set_uid(value, name, allow_empty, allow_none, validate)
    if uid is not None and isinstance(value, str | bytes) and len(_UIDS) < _UIDS_MAX:
        _UIDS[key] = uid
    return uid


def install() -> None:
    """Apply the overrides (idempotent)."""
    pynetdicom.dimse.DIMSEServiceProvider.get_msg = _get_msg  # type: ignore[method-assign]
    pynetdicom.association.Association.kill = _kill  # type: ignore[method-assign]
    pynetdicom.transport.deepcopy = _copy_contexts  # type: ignore[assignment]
    pynetdicom.dimse_messages.create_file_meta = _create_file_meta  # type: ignore[assignment]
    pynetdicom.dimse_messages.write_file_meta_info = _write_file_meta_info
    pynetdicom.transport.AssociationSocket.recv = _recv  # type: ignore[method-assign]
    pynetdicom.dimse.DIMSEServiceProvider.send_msg = _send_msg  # type: ignore[method-assign]
    pynetdicom.service_class.StorageServiceClass.SCP = _storage_scp  # type: ignore[method-assign]
    pynetdicom.dul.DULServiceProvider._read_pdu_data = _read_pdu_data  # type: ignore[method-assign]
    pynetdicom.fsm.StateMachine.do_action = _do_action  # type: ignore[method-assign]
    pynetdicom.dul.DULServiceProvider._bridge_aborted = False  # type: ignore[attr-defined]
    pynetdicom.dul.DULServiceProvider._bridge_data_limit = 0  # type: ignore[attr-defined]
    pynetdicom.dimse.DIMSEServiceProvider.receive_primitive = _receive_primitive  # type: ignore[method-assign]
    pynetdicom.pdu_items.set_uid = _set_uid_remembered  # type: ignore[attr-defined]
    pynetdicom.presentation.set_uid = _set_uid_remembered  # type: ignore[attr-defined]
    pynetdicom.association.time = types.SimpleNamespace(  # type: ignore[assignment]
        sleep=_association_sleep, time=_time.time, monotonic=_time.monotonic, perf_counter=_time.perf_counter
    )
    pynetdicom.dul.time = types.SimpleNamespace(  # type: ignore[assignment]
        sleep=_dul_sleep, time=_time.time, monotonic=_time.monotonic, perf_counter=_time.perf_counter
    )


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


def prepare(assoc: Any, max_queued: int = 0, serve_inline: bool = False,
            on_refused: Callable[[Any, int, str], None] | None = None,
            serves: Callable[[Any], bool] | None = None) -> None:
    """Per association, from its ``EVT_CONN_OPEN``: a socket pair to wake the DUL's wait,
    and wake-ups for the association thread's wait (``QUIET_WAIT``).

    An acceptor's DUL thread has not started yet; a requestor's is the one running the
    handler, between taking the A-ASSOCIATE request off its queue and sending it, so the
    queue it replaces is empty either way. ``max_queued`` bounds the outgoing queue (PDUs;
    0 = unbounded), for associations that send data sets read from files.
    ``serve_inline``: the network thread may serve C-STORE requests itself
    (``_serve_inline``); for the bridge's listener, whose handlers never call ``send_*``.
    ``on_refused(assoc, status, reason)``: told of each C-STORE request answered here,
    without its handler, because its command is wrong (``_refuse_store``).
    ``serves(primitive)``: whether a request other than C-STORE and C-CANCEL (which has no
    answer, PS3.7 9.3.2.3) has a handler; one that has none is aborted, not handed to
    pynetdicom's service class of its SOP Class UID, which would leave it unanswered (a
    response) or abort from within the handler.
    """
    dul = assoc.dul
    assoc._bridge_serve_inline = serve_inline
    assoc._bridge_on_refused = on_refused
    assoc._bridge_serves = serves
    if getattr(dul, "_bridge_wake", None) is not None:
        return
    # The objects stay (a requestor's association thread may be waiting in
    # to_user_queue.get() already): their methods that change what the reactor looks at
    # wake it too.
    dul.to_user_queue.put = _waking_reactor(dul.to_user_queue.put, assoc)
    assoc._reactor_checkpoint.clear = _waking_reactor(assoc._reactor_checkpoint.clear, assoc)
    assoc._bridge_quiet = True
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    dul._bridge_wake = reader
    dul.to_provider_queue = _WakingQueue(writer, max_queued, dul)
    weakref.finalize(dul, reader.close)
    weakref.finalize(dul, writer.close)
