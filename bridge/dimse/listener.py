"""The DIMSE listener: association policy, socket tuning, pynetdicom's AE and server, the
bounds on pending connections, each association's snapshot of the configuration and
rules, drain, reload and stop.

What it serves are the services handed to ``start``, one module each (``verification``
and ``store`` beside this one; ``find``, ``move`` and ``get`` in ``bridge.qr``): each adds
its presentation contexts to the AE, answers one pynetdicom event, and decides its own
statuses (``Service``). The daemon lists them.

pynetdicom's switches and the overrides made for speed and against hostile peers are
set once, at start, by ``bridge.dimse.pynetdicom_overrides.install``.

Association accept/reject decisions use pynetdicom's public ``EVT_REQUESTED`` hook:
a handler may send the A-ASSOCIATE-RJ itself, and pynetdicom then skips negotiation.
The limit on associations is checked there too (pynetdicom's counts every connection,
asked for or not); connections that have not yet asked for one are bounded apart, at
accept (``_AssociationServer``), and have ``listen.timeouts.association_request`` to ask.
"""

from __future__ import annotations

import errno
import fnmatch
import ipaddress
import itertools
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.transport import ThreadedAssociationServer

from bridge.config import Config
from bridge.dimse import pynetdicom_overrides, transcode
from bridge.errors import StartError
from bridge.forward.spool import Spool
from bridge.metrics import Metrics
from bridge.routing.rules import RuleSet

LOGGER = logging.getLogger(__name__)

_UNLIMITED = 1_000_000

# A-ASSOCIATE-RJ (result, source, reason) per docs/conformance.md
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_PEER = (0x01, 0x01, 0x01)
REJECT_BUSY = (0x02, 0x03, 0x02)

_REJECT_REASONS = {
    (0x01, 0x01, 0x01): "peer address not allowed",
    (0x01, 0x01, 0x03): "calling AE title not allowed",
    (0x01, 0x01, 0x07): "called AE title not recognised",
    (0x02, 0x03, 0x02): "too many associations",
}


def transfer_syntax_preference(uid: str) -> tuple[int, int, int, int]:
    """Sort key for the syntaxes we accept; pynetdicom takes the first of our list that a
    context offers. Lossless before lossy, explicit before implicit VR, little before big
    endian; among lossless syntaxes, the compressed ones first (a modality that offers a
    compressed syntax next to uncompressed ones usually holds the image compressed, and
    taking it as it is spares the modality a conversion it may not be able to make)."""
    u = UID(uid)
    lossless = not u.is_compressed or ("Lossless" in u.name and "Lossy" not in u.name)
    form = 0 if u.is_compressed else (2 if u.is_deflated else 1)
    return (0 if lossless else 1, 1 if u.is_implicit_VR else 0, 0 if u.is_little_endian else 1, form)


TRANSFER_SYNTAXES = sorted((str(u) for u in AllTransferSyntaxes), key=transfer_syntax_preference)


@dataclass
class AssociationState:
    """What the listener knows of one association, handed to its services with each request."""

    label: str  # A<n>, the name of its threads
    config: Config  # the configuration and rules it started with: a reload applies to
    rules: RuleSet  # associations that start after it, never to one in progress
    calling_ae: str = ""
    called_ae: str = ""
    peer: str = ""
    stored: int = 0  # C-STOREs answered 0x0000
    failed: int = 0  # C-STOREs answered with an error status
    started: float = 0.0


class Service(Protocol):
    """A DIMSE service the listener provides (a module of ``bridge.dimse`` each).

    ``add_contexts`` adds its presentation contexts to the listener's AE, once, before
    any association; ``handle`` answers ``event`` (pynetdicom's, for each request of it)
    as pynetdicom's handler of that event returns; ``serves`` says whether a DIMSE
    message (its primitive) is a request of this service. A message no service claims
    is aborted (``pynetdicom_overrides.prepare``), never handed to pynetdicom's service
    classes, which would leave it unanswered. The seam takes some messages before it
    asks: C-STORE and C-CANCEL requests, and the responses to requests a handler sent on
    the association itself (a C-GET's C-STORE sub-operations, an N-EVENT-REPORT), which
    go to the ``send_*()`` call waiting for them. A service with ``answers_whole = True``
    (C-MOVE, C-GET) sends every response of its request itself
    (``pynetdicom_overrides.retrieval``).
    """

    event: evt.InterventionEvent

    def add_contexts(self, ae: AE, config: Config) -> None: ...

    def serves(self, primitive: Any) -> bool: ...

    def handle(self, event: evt.Event, association: AssociationState) -> Any: ...


def bind_failure(settings: str, host: str, port: int, exc: OSError) -> str:
    """Why a listening socket cannot be bound, with the address and the likely cause."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lead = f"cannot listen on {address} ({settings})"
    if exc.errno == errno.EADDRINUSE:
        return (f"{lead}: address already in use: another dicom-bridge or a PACS is probably listening there "
                f"(`ss -ltnp 'sport = :{port}'` shows which process); stop it or choose another port")
    if exc.errno == errno.EACCES:
        return (f"{lead}: permission denied: a port below 1024 needs root or CAP_NET_BIND_SERVICE "
                "(see AmbientCapabilities in systemd/dicom-bridge.service), or choose a port above 1023")
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{lead}: {host} is not an address of this machine"
    return f"{lead}: {exc.strerror or exc}"


def _set_io_timeout(sock: socket.socket, seconds: float) -> None:
    """SO_RCVTIMEO and SO_SNDTIMEO: the socket stays blocking for Python (no poll() before
    each call, as ``settimeout`` would add), but no single call waits longer."""
    whole = int(seconds)
    timeval = struct.pack("@ll", whole, int((seconds - whole) * 1_000_000))
    for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
        sock.setsockopt(socket.SOL_SOCKET, option, timeval)


class _AssociationServer(ThreadedAssociationServer):
    """pynetdicom's server, with a listen backlog for bursts of modalities (socketserver's
    default is 5: 300 simultaneous connects took 47 s to be accepted) and a bound on the
    connections that have not yet asked for an association (``Listener._may_connect``)."""

    request_queue_size = 128
    listener: Listener

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self.listener._may_connect(client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.listener._handed_over()


class Listener:
    """The DIMSE listener: associations, and the services handed to ``start``."""

    def __init__(self, config: Config, metrics: Metrics, spool: Spool) -> None:
        self.config = config
        self.rules = ruleset(config)
        self.metrics = metrics
        self.spool = spool  # where pynetdicom writes the data sets it receives
        self.services: Sequence[Service] = ()  # set by start()
        self.on_finished: Callable[[], None] = lambda: None  # an association that stored something ended
        self._ids = itertools.count(1)
        self._states: dict[int, AssociationState] = {}
        self._server: Any = None
        self._serving = False
        # Connections accepted whose handling thread has not ended yet; after that, a
        # connection is pending until its association request (_pending()).
        self._accepting = 0
        self._accepting_lock = threading.Lock()
        self._handling = threading.local()
        self._opening: set[Any] = set()  # their association threads, started or about to be
        self._closed_at_once, self._closed_logged = 0, float("-inf")
        self.ae = self._build_ae()

    # -- set-up ------------------------------------------------------------------------

    def _build_ae(self) -> AE:
        cfg = self.config
        ae = AE(ae_title=cfg.ae_title)
        # pynetdicom counts every connection as an association, asked for or not: the
        # listener keeps its own limits instead (_may_connect, _on_requested).
        ae.maximum_associations = _UNLIMITED
        ae.maximum_pdu_size = cfg.listen.max_pdu
        ae.acse_timeout = cfg.listen.timeouts.acse
        ae.dimse_timeout = cfg.listen.timeouts.dimse
        # pynetdicom has one "network" timer: no PDU for this long ends the association.
        ae.network_timeout = min(cfg.listen.timeouts.network, cfg.listen.timeouts.idle)
        return ae

    def bind(self) -> None:
        """Bind and listen, without serving: the daemon does this before it writes
        anything, so an address in use fails the start at once, naming it. Connections
        that arrive before ``start`` wait in the listen backlog: none is served before
        the spool, the queue and the services are ready."""
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]
        listen = self.config.listen
        try:
            # AE.start_server(block=False) with the bridge's server class, served from
            # start(); built directly, as AE.make_server would, because the services'
            # presentation contexts are added only then.
            server = _AssociationServer(self.ae, (listen.host, listen.port), self.config.ae_title, [],
                                        evt_handlers=handlers)
        except OSError as exc:
            raise StartError(bind_failure("listen.host, listen.port", listen.host, listen.port, exc)) from exc
        server.listener = self
        self.ae._servers.append(server)  # AE.shutdown() and the server's shutdown() look for it there
        self._server = server

    def start(self, services: Sequence[Service], on_finished: Callable[[], None] | None = None) -> None:
        """Serve ``services`` (bound first if ``bind`` was not called). ``on_finished``:
        an association that stored something has ended."""
        self.on_finished = on_finished or (lambda: None)
        if self._server is None:
            self.bind()
        self.services = services
        for service in services:
            service.add_contexts(self.ae, self.config)
            self._server.bind(service.event, self._handler(service))
        # An association takes the server's contexts when it is requested: none was yet.
        self._server.contexts = self.ae.supported_contexts
        threading.Thread(target=self._server.serve_forever, name="AcceptorServer", daemon=True).start()
        self._serving = True
        LOGGER.info("listening on %s:%d as %s", self.config.listen.host, self.port, self.config.ae_title)

    @property
    def serving(self) -> bool:
        """Whether associations are accepted now (between ``start`` and ``stop_accepting``)."""
        return self._serving and self._server is not None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server else self.config.listen.port

    def stop_accepting(self) -> None:
        if self._server is not None:
            if self._serving:
                self._server.shutdown()  # waits for serve_forever, which never ran otherwise
            else:
                self._server.server_close()
                self.ae._servers.remove(self._server)
            self._server, self._serving = None, False

    def active(self) -> int:
        return len([a for a in self.ae.active_associations if a.is_acceptor])

    def drain(self, deadline: float) -> None:
        """Wait for associations to end until ``deadline`` (monotonic); abort the rest."""
        while self.active() and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self.ae.active_associations:
            LOGGER.warning("aborting association %s at shutdown", assoc.name)
            assoc.abort()

    def reload(self, config: Config) -> None:
        """New rules apply to associations that start after this."""
        self.config = config
        self.rules = ruleset(config)

    # -- connections and association limits ----------------------------------------------

    def _pending(self) -> int:
        """Open connections that have not (yet) sent an A-ASSOCIATE-RQ."""
        waiting = [a for a in self.ae.active_associations
                   if pynetdicom_overrides.awaiting_request(a) and a not in self._opening]
        return self._accepting + len(waiting)

    def _may_connect(self, address: Any) -> bool:
        """In the server's thread, for each new connection: within
        ``listen.max_pending_connections``, or closed at once."""
        limit = self.config.listen.max_pending_connections
        with self._accepting_lock:
            if self._pending() < limit:
                self._accepting += 1
                return True
        self.metrics.associations.labels("refused").inc()
        now = time.monotonic()
        self._closed_at_once += 1
        if now - self._closed_logged >= 10:  # one line per burst, not one per connection
            LOGGER.warning("connection from %s closed at once (%d in all): %d connections are waiting to ask for an "
                           "association (listen.max_pending_connections)", address[0] if address else "?",
                           self._closed_at_once, limit)
            self._closed_logged = now
        return False

    def _handed_over(self) -> None:
        """The thread that handled a new connection ends: its association thread, if it
        got that far (``_on_conn_open``), is running, and from now on ``_pending`` finds it
        among the associations rather than in ``_accepting`` (never in both, never in
        neither: both change under the lock that ``_may_connect`` counts under)."""
        assoc = getattr(self._handling, "assoc", None)
        self._handling.assoc = None
        with self._accepting_lock:
            self._accepting -= 1
            self._opening.discard(assoc)

    def _associations(self, own: Any) -> int:
        """Associations asked for and still going, other than ``own``."""
        return len([a for a in self.ae.active_associations
                    if a is not own and a.is_acceptor and a.requestor.primitive is not None
                    and not (a.is_rejected or a.is_aborted or a.is_released)])

    # -- association events ------------------------------------------------------------

    def _on_conn_open(self, event: evt.Event) -> None:
        # Counted in _accepting until the thread handling the connection ends (_handed_over).
        with self._accepting_lock:
            self._opening.add(event.assoc)
        self._handling.assoc = event.assoc
        timeouts = self.config.listen.timeouts
        # pynetdicom never sets TCP_NODELAY; without it each response waits ~40 ms for Nagle.
        sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # pynetdicom's timers run between PDUs, in the thread that reads them: a peer
            # that stopped in the middle of one would hold that thread in recv(), and the
            # association's slot, for ever. The kernel ends such a wait (or a send to a
            # peer that reads nothing) after timeouts.network: the call fails and
            # pynetdicom closes the association.
            _set_io_timeout(sock, min(timeouts.association_request, timeouts.network))
        # Until its A-ASSOCIATE-RQ: ARTIM, and the association thread's wait for it
        # (pynetdicom takes both from acse_timeout), restored in _on_requested.
        event.assoc.acse_timeout = timeouts.association_request
        pynetdicom_overrides.prepare(event.assoc, serve_inline=True, on_refused=self._on_refused,
                                     serves=self._serves)

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        config_timeouts = self.config.listen.timeouts
        label = f"A{next(self._ids)}"
        # The thread names: every log line of this association carries it, from either of
        # its threads (the network thread serves C-STOREs itself: bridge.dimse.pynetdicom_overrides).
        assoc.name = label
        assoc.dul.name = label
        assoc.acse_timeout = config_timeouts.acse
        sock = assoc.dul.socket.socket if assoc.dul.socket else None
        if sock is not None:
            _set_io_timeout(sock, config_timeouts.network)
        rq = assoc.requestor
        primitive = cast(A_ASSOCIATE, rq.primitive)
        calling, called = primitive.calling_ae_title.strip(), primitive.called_ae_title.strip()
        peer = str(rq.address)
        config, rules = self.config, self.rules
        self._states[id(assoc)] = AssociationState(label, config, rules, calling, called, peer,
                                                   started=time.monotonic())
        accept = config.accept
        reject = None
        if accept.hosts is not None and not _in_networks(peer, accept.hosts):
            reject = REJECT_PEER
        elif accept.calling_ae is not None and not any(fnmatch.fnmatchcase(calling, p) for p in accept.calling_ae):
            reject = REJECT_CALLING_AE
        elif accept.check_called_ae and called != config.ae_title and called not in move_destinations(config):
            reject = REJECT_CALLED_AE
        elif self._associations(assoc) >= config.listen.max_associations:
            reject = REJECT_BUSY
        if reject:
            # As pynetdicom's own negotiation does: send, notify, then wait for the DUL
            # to deliver the A-ASSOCIATE-RJ before the connection is closed.
            assoc.acse.send_reject(*reject)
            evt.trigger(assoc, evt.EVT_REJECTED, {})
            assoc.kill()
            return
        _prefer_sendable(assoc)

    def _on_rejected(self, event: evt.Event) -> None:
        state = self._states.pop(id(event.assoc), None)
        rj = event.assoc.acceptor.primitive
        rsd = cast(tuple[int, int, int], (rj.result, rj.result_source, rj.diagnostic) if rj else (0, 0, 0))
        reason = _REJECT_REASONS.get(rsd, "rejected")
        self.metrics.associations.labels("rejected").inc()
        LOGGER.info(
            "rejected association from %s at %s: %s (A-ASSOCIATE-RJ %d/%d/%d)",
            state.calling_ae if state else "?", state.peer if state else "?", reason, *rsd,
        )

    def _on_established(self, event: evt.Event) -> None:
        state = self._states.get(id(event.assoc))
        self.metrics.associations.labels("accepted").inc()
        self.metrics.active_associations.inc()
        accepted = len(event.assoc.accepted_contexts)
        LOGGER.info("association from %s at %s to %s accepted (%d contexts)",
                    state.calling_ae if state else "?", state.peer if state else "?",
                    event.assoc.acceptor.primitive.called_ae_title.strip() if event.assoc.acceptor.primitive else "",
                    accepted)

    def _on_closed(self, event: evt.Event) -> None:
        # A message cut off by the end of the association (an abort, the peer gone, a
        # timeout): its half-received file goes now, not at the next start. (pynetdicom
        # keeps the message being received on its DIMSE provider; a complete one has left.)
        partial = getattr(getattr(event.assoc.dimse, "message", None), "_data_set_path", None)
        if partial is not None:
            self.spool.discard(Path(partial))
        state = self._states.pop(id(event.assoc), None)
        if state is None:
            return
        self.metrics.active_associations.dec()
        how = "released" if event.event is evt.EVT_RELEASED else "aborted"
        LOGGER.info("association %s after %.1fs: %d stored, %d refused",
                    how, time.monotonic() - state.started, state.stored, state.failed)
        if state.stored:
            self.on_finished()

    def _on_refused(self, assoc: Any, status: int, reason: str) -> None:
        """A C-STORE request refused before it reached the store service (its command is
        wrong: bridge.dimse.pynetdicom_overrides logs it with the peer's address and answers it)."""
        self.metrics.dimse_requests.labels("C-STORE", f"0x{status:04X}").inc()
        state = self._states.get(id(assoc))
        if state is not None:
            state.failed += 1

    # -- services ----------------------------------------------------------------------

    def _serves(self, primitive: Any) -> bool:
        return any(service.serves(primitive) for service in self.services)

    def _handler(self, service: Service) -> Callable[[evt.Event], Any]:
        """pynetdicom's handler of ``service.event``: the service, with its association's state."""

        def handler(event: evt.Event) -> Any:
            state = self._states.get(id(event.assoc)) or AssociationState("?", self.config, self.rules)
            return service.handle(event, state)

        if getattr(service, "answers_whole", False):
            pynetdicom_overrides.answers_whole(handler)
        return handler


def move_destinations(config: Config) -> set[str]:
    """The AE titles the ``dimse`` sources that retrieve with ``c-move`` have their nodes
    C-MOVE to (``move_destination_ae``, else ``ae_title``): the listener answers to them too."""
    return {s.move_destination_ae or config.ae_title for s in config.sources.values()
            if s.type == "dimse" and s.retrieve == "c-move"}


# What the bridge can send any instance in: its own syntax, when the peer took it, else
# converted to one of these.
SENDABLE = transcode.LITTLE_ENDIAN


def _prefer_sendable(assoc: Any) -> None:
    """For the storage SOP classes a requester proposes to take the SCP role for (a C-GET
    requester, PS3.7 D.3.3.4), accept explicit, else implicit VR little endian before the
    compressed syntaxes the intake list puts first: the bridge sends there (C-GET
    sub-operations), one syntax per SOP class, and can convert any instance to those,
    not to a compressed syntax. Only this association's copy of the contexts changes;
    a requester without role selection negotiates as before."""
    roles = getattr(assoc.requestor, "role_selection", None) or {}
    takes_scp = {str(uid) for uid, item in roles.items() if item.scp_role}
    if not takes_scp:
        return
    for cx in assoc.acceptor.supported_contexts:
        if str(cx.abstract_syntax) in takes_scp:
            syntaxes = [str(ts) for ts in cx.transfer_syntax]
            preferred = [ts for ts in SENDABLE if ts in syntaxes]
            cx.transfer_syntax = preferred + [ts for ts in syntaxes if ts not in preferred]


def ruleset(config: Config) -> RuleSet:
    rules = config.rules if isinstance(config.rules, list) else []
    return RuleSet(rules, {name: d.priority for name, d in config.destinations.items()})


def _in_networks(address: str, networks: list[Any]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)

