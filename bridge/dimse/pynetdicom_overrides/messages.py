"""DIMSE messages: C-STOREs served by the network thread, wrong requests answered, the rest aborted.

- A complete C-STORE request is queued by the network (DUL) thread for the association
  thread, which wakes, serves it and queues the response back for the network thread to
  send: two hand-offs between threads per image, each a wake-up that waits for a free
  core when the machine is busy. On the bridge's own listener (``prepare(assoc,
  serve_inline=True)``) the network thread serves a C-STORE request itself, with
  pynetdicom's ``_serve_request``, when the association thread has nothing queued or in
  hand (``_receive_primitive``, ``_serve_inline``; the peer waits for the answer either
  way, so nothing else arrives meanwhile); any other message, or a C-STORE while another
  request is being served, is queued for the association thread. A network thread that
  served the request sends the response PDU itself, as the state machine's DT-1 would
  (``_send_msg``, ``_may_send``), instead of queueing it for itself and waking itself
  through its socket pair to send it.
- ``StorageServiceClass.SCP`` builds the response primitive by setting the request's SOP
  Class and Instance UIDs on it again, and each set validates the UID with pydicom's
  regular expressions, though the request's were validated when it was decoded.
  ``_storage_scp`` is the same method sharing the request's UID objects; the handler,
  its error handling (0xC211) and the status checks are pynetdicom's.
- For hostile and broken peers (docs/conformance.md): a DIMSE message that cannot be
  decoded or grows too long in memory is aborted instead of ending the network thread,
  a C-STORE request whose command is wrong is answered with a failure status that
  names what is wrong (``_refuse_store``), where pynetdicom sent nothing or aborted,
  and the listener aborts what it does not serve (``prepare(serves=...)``, ``_awaited``):
  a request for a service without a handler, a response to nothing it asked.
- Handlers on the listener may send on their own association, as C-GET (C-STORE
  sub-operations) and Storage Commitment (N-EVENT-REPORT) do: the responses to what
  they send reach the ``send_*()`` call that waits for them (tests/test_pynetdicom_overrides.py
  runs both), and each message goes out whole (``_send_msg``). pynetdicom puts a
  message's PDUs on the outgoing queue one by one, unguarded, and a ``send_*()`` call
  from another thread does not wait for the handler's response, which it takes for a
  paused reactor: an N-EVENT-REPORT sent from a thread that the N-ACTION handler started
  could have the N-ACTION response's PDU between its command and its data set, and the
  peer abort. Each put of the outgoing queue here wakes the network thread through a
  socket, letting another thread run, which made that likely. A request the peer sends while such a call waits fares as
  without the overrides (pynetdicom hands it to the call as if it were the response),
  except a C-STORE request while the association thread has nothing in hand, which the
  network thread serves.
- On associations where a ``send_*()`` call waits for its response beside the reactor
  thread, the reactor takes no message while that call has paused it, and the call
  stops waiting when the association is aborted (``_get_msg``).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from io import BytesIO
from typing import Any, cast

import pynetdicom.dimse
import pynetdicom.service_class
from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pynetdicom import _config, evt
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_CANCEL, C_FIND, C_STORE, N_EVENT_REPORT
from pynetdicom.dsutils import decode
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.service_class import attempt as _attempt
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.utils import make_target

from bridge.dataset.uids import is_valid_uid
from bridge.dimse.pynetdicom_overrides import sending
from bridge.dimse.pynetdicom_overrides.encoders import _find_response_command, _p_data_tf, _store_response_command
from bridge.dimse.pynetdicom_overrides.fast_path import _c_store_request
from bridge.dimse.pynetdicom_overrides.reads import _abort, _describe, peer_name

LOGGER = logging.getLogger("pynetdicom.dul")  # pynetdicom's messages, under its name


_pynetdicom_send_msg = pynetdicom.dimse.DIMSEServiceProvider.send_msg


def _send_msg(self: Any, primitive: Any, context_id: int) -> None:
    """``DIMSEServiceProvider.send_msg``: C-STORE and C-FIND responses encoded directly,
    C-STORE ones sent directly by a network thread that served the request itself; on the listener, each
    message whole, never interleaved with another thread's (see ``prepare``)."""
    lock = getattr(self.assoc, "_bridge_send_lock", None)
    if lock is None:
        _send_whole(self, primitive, context_id)
    else:
        with lock:
            _send_whole(self, primitive, context_id)


def _send_whole(self: Any, primitive: Any, context_id: int) -> None:
    if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is None \
            and getattr(primitive, "_dataset_path", None) and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT) \
            and sending.send_file_request(self, primitive, context_id):
        return
    command, data = None, None
    if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None:
        command = _store_response_command(primitive)
    elif isinstance(primitive, C_FIND) and primitive.MessageIDBeingRespondedTo is not None:
        command = _find_response_command(primitive)
        data = primitive.Identifier.getvalue() if primitive.Identifier is not None else None
    if command is None or self.assoc.get_handlers(evt.EVT_DIMSE_SENT) or (
        self.maximum_pdu_size and len(command) > self.maximum_pdu_size - 6
    ):
        awaiting = getattr(self.assoc, "_bridge_awaiting", None)
        if awaiting is not None and getattr(primitive, "MessageIDBeingRespondedTo", 0) is None:
            awaiting.add(primitive.MessageID)  # a request: its responses may come (_awaited)
        _pynetdicom_send_msg(self, primitive, context_id)
        return
    dul = self.dul
    if data is None and threading.get_ident() == dul.ident and _may_send(dul):
        # Served inline (_serve_inline): queued, the answer would wait for this thread to
        # come back round its loop, pass a wake-up through a socket pair to itself and go
        # through the state machine's DT-1 to be sent as this PDU.
        dul.socket.send(_p_data_tf(context_id, command))
        return
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
    self.dul.send_pdu(pdata)
    if data:  # the identifier of a C-FIND response: fragments as pynetdicom's encode_msg cuts them
        size = self.maximum_pdu_size - 6 if self.maximum_pdu_size else len(data)
        for start in range(0, len(data), size):
            pdata = P_DATA()
            last = start + size >= len(data)
            pdata.presentation_data_value_list.append((context_id, (b"\x02" if last else b"\x00")
                                                       + data[start:start + size]))
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
    - the ``send_*()`` call's wait ends as soon as the association is aborted (by the peer,
      or here from another thread) or its connection closed (the reactor that would notice
      is paused), not at the end of the DIMSE timeout, which may be minutes for a PACS slow
      to store large instances, or never when there is none (a retrieval's C-GET).
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
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        wait = _ABORT_CHECK if deadline is None else max(0.0, min(_ABORT_CHECK, deadline - time.monotonic()))
        try:
            return self.msg_queue.get(block=True, timeout=wait)
        except queue.Empty:
            pass
        # An A-ABORT from the peer, or the association ended here (an abort from another
        # thread, as a retrieval closed early does: acse.is_aborted() sees only the peer's).
        if (deadline is not None and time.monotonic() >= deadline) or assoc.acse.is_aborted() \
                or not assoc.is_established:
            return None, None


_ABORT_CHECK = 0.2  # seconds between looks for an abort while a send_*() call waits


# Events whose handlers would see what sending a response directly skips.
_DIRECT_SEND_UNWATCHED = (evt.EVT_DATA_SENT, evt.EVT_PDU_SENT, evt.EVT_FSM_TRANSITION)


def _may_send(dul: Any) -> bool:
    """Whether the network thread may send a P-DATA-TF PDU itself, as the state machine's
    DT-1 would: the association is established (Sta6), nothing queued before it waits
    to be sent, and no handler is bound to the events that skips."""
    return dul.socket is not None and dul.state_machine.current_state == "Sta6" \
        and not dul.to_provider_queue.queue \
        and not any(dul.assoc.get_handlers(event) for event in _DIRECT_SEND_UNWATCHED)


_pynetdicom_receive_primitive = pynetdicom.dimse.DIMSEServiceProvider.receive_primitive


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
            and not _awaited(self.assoc, d_primitive) and not serves(d_primitive):
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


def _awaited(assoc: Any, primitive: Any) -> bool:
    """Whether ``primitive`` is a response to a request sent on ``assoc`` whose final
    response has not come yet (a C-GET's C-STORE sub-operations, Storage Commitment's
    N-EVENT-REPORT): the ``send_*()`` call that sent the request waits for it. The final
    response ends the wait."""
    responding_to = primitive.MessageIDBeingRespondedTo
    if responding_to is None or responding_to not in assoc._bridge_awaiting:
        return False
    if primitive.Status not in _PENDING:
        assoc._bridge_awaiting.discard(responding_to)
    return True


_PENDING = (0xFF00, 0xFF01)


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
