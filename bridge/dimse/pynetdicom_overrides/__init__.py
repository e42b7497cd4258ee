"""The one seam between dicom-bridge and pynetdicom: everything that changes how pynetdicom behaves.

``install()`` is called once, at start (``bridge.daemon``), before any association is
made; nothing else in dicom-bridge sets pynetdicom's process globals or replaces its
functions (pynetdicom keeps its settings as module globals: they can only be set for the
whole process). It

- refuses any pynetdicom other than ``REQUIRED_VERSION`` (pinned in pyproject.toml) with
  a ``StartError``: the overrides below replace internals that change between releases,
  and an operator who upgraded pynetdicom by hand must learn that at start, not through
  a wrong image;
- sets pynetdicom's switches: ``STORE_RECV_CHUNKED_DATASET`` (data sets are written to a
  file as they arrive, never held in memory), with the temporary file factory of
  ``pynetdicom.dimse_messages`` replaced by ``new_temp`` (the spool's: the file lands on
  the spool's file system, so taking it is a rename, and is hashed as it is written);
  ``STORE_SEND_CHUNKED_DATASET`` (the ``dimse`` destination sends from spool files, read
  in PDU-sized pieces, not decoded); ``UNRESTRICTED_STORAGE_SERVICE`` for
  ``accept.any_sop_class``; private storage SOP classes registered
  (``accept.extra_sop_classes``); no per-event log handlers; pydicom's value validation off
  and pynetdicom's loggers quieter (see ``install``);
- replaces pynetdicom internals, for speed and against hostile peers, one module per
  group, each with its reasons (docs/performance.md has what each saved):

  - ``reads``: whole PDUs read at once, each one's length bounded before its body is
    read, a failing state-machine action aborting the association;
  - ``waits``: waits that end when there is work instead of 1 ms polling, in both
    threads of an association;
  - ``fast_path``: P-DATA PDUs that continue a C-STORE data set written straight to its
    file by the network thread; plain C-STORE commands read from their bytes;
  - ``messages``: C-STORE requests served and answered by the network thread on the
    listener, wrong ones answered with a status that says why, undecodable messages
    aborted; a ``send_*()`` call's wait for its response kept from the reactor;
  - ``encoders``: File Meta Information and C-STORE responses encoded directly;
  - ``negotiation``: presentation contexts copied and UIDs validated once, not for every
    association;
  - ``sending``: on associations the bridge requests, a C-STORE request whose data set
    is a file written to the socket PDU by PDU by the sending thread, not queued as one
    object per PDU for the network thread;
  - ``retrieval``: C-MOVE and C-GET requests handed whole to the bridge's handler, which
    sends every response itself (pynetdicom's service cannot fail before the first
    sub-operation, send a pending response early, or send from files).

``prepare(assoc, ...)``, from each association's ``EVT_CONN_OPEN``, turns on what only
some associations take: the waits' wake-ups, the network thread serving C-STOREs on the
listener, a bound on the PDUs queued for sending on the bridge's own requests.

Where they hold beyond C-STORE: a handler on the listener may send on its own
association, as C-GET (C-STORE sub-operations) and Storage Commitment (N-EVENT-REPORT)
do; the listener takes the requests its services claim (``prepare(serves=...)``) and the
responses to its own requests (``messages._awaited``), and aborts anything else. Over
TLS, the DUL thread does not wait while the TLS layer holds bytes it has decrypted and
``select`` on the socket cannot see (``waits._dul_sleep``).

Every intake test runs through these overrides; tests/test_pynetdicom_overrides.py
checks that each one still finds what it replaces, and runs C-GET, Storage Commitment
and TLS associations through them.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import pynetdicom
import pynetdicom.association
import pynetdicom.dimse
import pynetdicom.dimse_messages
import pynetdicom.dul
import pynetdicom.fsm
import pynetdicom.pdu_items
import pynetdicom.presentation
import pynetdicom.service_class
import pynetdicom.transport
from pydicom import config as pydicom_config
from pynetdicom import _config, register_uid
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from bridge.dimse.pynetdicom_overrides import sending
from bridge.dimse.pynetdicom_overrides.encoders import _create_file_meta, _identifier, _write_file_meta_info
from bridge.dimse.pynetdicom_overrides.messages import _get_msg, _receive_primitive, _send_msg, _storage_scp
from bridge.dimse.pynetdicom_overrides.negotiation import _copy_contexts, _set_uid_remembered
from bridge.dimse.pynetdicom_overrides.reads import _do_action, _read_pdu_data, _recv, awaiting_request, peer_name
from bridge.dimse.pynetdicom_overrides.retrieval import ORIGINAL, _retrieve_scp, answers_whole
from bridge.dimse.pynetdicom_overrides.waits import (
    _association_sleep,
    _dul_sleep,
    _kill,
    _waking_reactor,
    _WakingQueue,
)
from bridge.errors import StartError

__all__ = ["REQUIRED_VERSION", "answers_whole", "awaiting_request", "check_version", "install", "peer_name", "prepare"]

# The pynetdicom release whose internals the overrides were read against and tested with.
REQUIRED_VERSION = "3.0.4"


def check_version(installed: str) -> None:
    """Raise ``StartError`` unless ``installed`` is ``REQUIRED_VERSION``."""
    if installed != REQUIRED_VERSION:
        raise StartError(
            f"pynetdicom {installed} is installed, but dicom-bridge changes pynetdicom internals that were checked "
            f"against {REQUIRED_VERSION} only (another release may move what they replace, and receive or answer "
            f"wrongly); reinstall pynetdicom=={REQUIRED_VERSION}"
        )


def install(new_temp: Callable[[], Any], any_sop_class: bool, extra_storage_classes: Iterable[str] = ()) -> None:
    """Check pynetdicom's version, then set its switches and apply the overrides (see the
    module docstring). Once, at start, before any association.

    ``new_temp()``: a new file for an incoming data set, open for writing, with a ``name``
    (pynetdicom's chunked receive writes to it; the file may have a ``seal()``, called
    once the data set is complete, before anything reads it). ``any_sop_class``:
    accept any abstract syntax as storage; pynetdicom reads it on every association and
    every request, including those in progress, so it is set here once and a reload
    does not change it. ``extra_storage_classes``: private SOP classes to serve as
    storage; pynetdicom serves a request by the service class of its SOP Class UID, and
    aborts one whose class it does not know, so each is registered with it.
    """
    check_version(pynetdicom.__version__)
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.STORE_SEND_CHUNKED_DATASET = True
    _config.UNRESTRICTED_STORAGE_SERVICE = any_sop_class
    _config.LOG_HANDLER_LEVEL = "none"
    # pynetdicom decodes every C-FIND request identifier again and pretty-prints it, and
    # every response identifier, whether or not its logger would show them: ~10% of a
    # C-FIND's CPU. The bridge logs its own line per C-FIND, without patient data.
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    pynetdicom.dimse_messages.NamedTemporaryFile = lambda *_, **__: new_temp()  # type: ignore[assignment]
    for uid in extra_storage_classes:
        if uid_to_service_class(uid) is not StorageServiceClass:
            register_uid(uid, "BridgeStorage_" + uid.replace(".", "_"), StorageServiceClass)

    pynetdicom.dimse.DIMSEServiceProvider.get_msg = _get_msg  # type: ignore[method-assign]
    pynetdicom.association.Association.kill = _kill  # type: ignore[method-assign]
    pynetdicom.transport.deepcopy = _copy_contexts  # type: ignore[assignment]
    pynetdicom.dimse_messages.create_file_meta = _create_file_meta  # type: ignore[assignment]
    pynetdicom.service_class.encode = _identifier  # type: ignore[assignment]
    pynetdicom.dimse_messages.write_file_meta_info = _write_file_meta_info
    pynetdicom.transport.AssociationSocket.recv = _recv  # type: ignore[method-assign]
    pynetdicom.transport.AssociationSocket.send = sending._socket_send  # type: ignore[method-assign]
    pynetdicom.association.split_dataset = sending._split_dataset  # type: ignore[attr-defined]
    pynetdicom.dimse.DIMSEServiceProvider.send_msg = _send_msg  # type: ignore[method-assign]
    pynetdicom.service_class.StorageServiceClass.SCP = _storage_scp  # type: ignore[method-assign]
    qr = pynetdicom.service_class.QueryRetrieveServiceClass
    for name in ("_move_scp", "_get_scp"):
        if getattr(qr, name) is not _retrieve_scp:
            ORIGINAL[name] = getattr(qr, name)
    pynetdicom.service_class.QueryRetrieveServiceClass._move_scp = _retrieve_scp  # type: ignore[method-assign,assignment]
    pynetdicom.service_class.QueryRetrieveServiceClass._get_scp = _retrieve_scp  # type: ignore[method-assign,assignment]
    pynetdicom.dul.DULServiceProvider._read_pdu_data = _read_pdu_data  # type: ignore[method-assign]
    pynetdicom.fsm.StateMachine.do_action = _do_action  # type: ignore[method-assign]
    pynetdicom.dul.DULServiceProvider._bridge_aborted = False  # type: ignore[attr-defined]
    pynetdicom.dul.DULServiceProvider._bridge_data_limit = 0  # type: ignore[attr-defined]
    pynetdicom.dimse.DIMSEServiceProvider.receive_primitive = _receive_primitive  # type: ignore[method-assign]
    pynetdicom.pdu_items.set_uid = _set_uid_remembered  # type: ignore[attr-defined]
    pynetdicom.presentation.set_uid = _set_uid_remembered  # type: ignore[attr-defined]
    pynetdicom.association.time = types.SimpleNamespace(  # type: ignore[assignment]
        sleep=_association_sleep, time=time.time, monotonic=time.monotonic, perf_counter=time.perf_counter
    )
    pynetdicom.dul.time = types.SimpleNamespace(  # type: ignore[assignment]
        sleep=_dul_sleep, time=time.time, monotonic=time.monotonic, perf_counter=time.perf_counter
    )

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # pynetdicom.utils logs a traceback for every value of a PDU it cannot decode, then
    # raises; what catches it logs one line naming the peer (reads, messages). A hostile
    # peer would otherwise write a traceback per connection.
    logging.getLogger("pynetdicom.utils").setLevel(logging.CRITICAL)
    # pydicom checks every value it converts against its VR (a regular expression per
    # UID, date, name...) and logs a warning for each misfit: pynetdicom converts each UID
    # of an association request that way (a storage SCU proposes hundreds), and intake
    # each UID of each C-STORE command. The bridge checks what it relies on itself
    # (bridge.dataset.dicomfile.required_uids; pynetdicom its own UID check), and forwards
    # other values as they came: the checks bought only log noise.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


def prepare(assoc: Any, max_queued: int = 0, serve_inline: bool = False,
            on_refused: Callable[[Any, int, str], None] | None = None,
            serves: Callable[[Any], bool] | None = None) -> None:
    """Per association, from its ``EVT_CONN_OPEN``: a socket pair to wake the DUL's wait,
    and wake-ups for the association thread's wait (``waits.QUIET_WAIT``).

    An acceptor's DUL thread has not started yet; a requestor's is the one running the
    handler, between taking the A-ASSOCIATE request off its queue and sending it, so the
    queue it replaces is empty either way. ``max_queued`` bounds the outgoing queue (PDUs;
    0 = unbounded), for associations that send data sets read from files.
    ``serve_inline``: the network thread may serve C-STORE requests itself
    (``messages._serve_inline``); for the bridge's listener.
    Where the outgoing queue is unbounded, the listener's, messages are sent whole under
    a lock, for handlers that send from threads of their own (``messages._send_msg``);
    a put to a bounded queue waits for the network thread, which may have to send itself.
    ``on_refused(assoc, status, reason)``: told of each C-STORE request answered here,
    without its handler, because its command is wrong (``messages._refuse_store``).
    ``serves(primitive)``: whether a request other than C-STORE and C-CANCEL (which has no
    answer, PS3.7 9.3.2.3) has a handler; one that has none is aborted, not handed to
    pynetdicom's service class of its SOP Class UID, which would leave it unanswered (a
    response) or abort from within the handler. A response is taken, without asking,
    when it answers a request sent on the association (``messages._awaited``): handlers
    may send on their association, as C-GET and Storage Commitment do.
    """
    dul = assoc.dul
    if max_queued:  # an association the bridge requested: its data sets go out directly
        sending.enable(assoc)
    assoc._bridge_serve_inline = serve_inline
    # Message IDs of the requests sent where messages are checked, awaiting their final response.
    assoc._bridge_awaiting = set() if serves is not None else None
    assoc._bridge_on_refused = on_refused
    assoc._bridge_serves = serves
    assoc._bridge_send_lock = None if max_queued else threading.Lock()
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


def still_busy(assoc: Any) -> None:
    """Restart the association's network timeout: it is answering a request, not idle.

    pynetdicom restarts that timer only when a PDU arrives, and checks it between
    requests: a C-FIND (or C-MOVE) that answers for longer than ``listen.timeouts.network``
    while the requester waits, silent, would be aborted as soon as its last response went
    out. The services call this as they send responses, and when they end.
    """
    timer = getattr(assoc.dul, "_idle_timer", None)
    if timer is not None:
        timer.restart()
