"""``type: dimse``: C-STORE to a node of the configuration (the bridge as Storage SCU).

One association is kept open across batches; the runner closes it after ``idle_close``
without work, and each worker (``workers`` > 1) has its own destination, hence its own
association.

Presentation contexts (PS3.8 9.3.2.2, at most 128 per association): for each SOP class
of the batch, one context per transfer syntax its files are in, each proposing that
syntax alone (so that the peer accepts or refuses each one), plus explicit and implicit
VR little endian in contexts of their own, plus Verification (which tells a peer that
knows us but not a SOP class from one that accepts nothing), plus, as room allows, the
common storage classes in little endian. An instance whose SOP class
or syntax was not proposed on the open association gets a new one, proposing what the
rest of the batch needs first and what the old one had as room allows, so a batch of
more SOP classes than fit goes out over consecutive associations, in order.

An instance with a rule's modification goes out as its modified copy (``bridge.routing.modify``),
written to a temporary file first. An instance goes out in its own syntax when the peer
accepted it, read from the spool (or copy) file in PDU-sized pieces (pynetdicom's
``STORE_SEND_CHUNKED_DATASET``, set by ``bridge.dimse.pynetdicom_overrides.install``);
otherwise it is converted exactly (``bridge.dimse.transcode``) into a temporary file on the
spool's file system, sent, and the copy removed. What cannot be converted exactly is
``Permanent`` with the reason.

Statuses become outcomes in ``bridge.dimse.statuses``; 0x0122 or 0x0124 for every instance of
a batch suspends the destination (``bridge.destinations.sending``, which also writes the
modified copies). Association failures are raised by ``bridge.dimse.scu``.
Losing the association during a C-STORE (no response within the node's DIMSE timeout,
an A-ABORT, a closed connection) makes the destination unavailable: the batch goes back
to the queue uncharged, and instances already stored are sent again later (a harmless
resend). An association kept from an earlier batch may have been closed by the peer in
the meantime: when its first C-STORE finds it gone, the instance is tried once more on a
new association before the destination is called unavailable.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.association import Association
from pynetdicom.presentation import build_context

from bridge.config import DimseDestination as DimseConfig
from bridge.config import Node
from bridge.destinations import sending
from bridge.dimse import scu, statuses, transcode
from bridge.errors import UpstreamMisconfigured, UpstreamUnavailable
from bridge.model import Outcome, Permanent, SpooledInstance

LOGGER = logging.getLogger(__name__)

EXPLICIT, IMPLICIT = transcode.LITTLE_ENDIAN


class _AssociationLost(Exception):
    pass


class DimseDestination:
    def __init__(self, name: str, settings: DimseConfig, node: Node, calling_ae: str, temp_dir: Path) -> None:
        self.name = name
        self.settings = settings
        # pynetdicom's own idle timer only backs up the runner's idle_close.
        self.peer = scu.Peer(settings.node, node, calling_ae, network_timeout=settings.idle_close + 60.0)
        self._temp_dir = temp_dir
        self._assoc: Association | None = None
        self._proposed: dict[str, list[str]] = {}  # SOP class -> syntaxes proposed on the association
        self._accepted: dict[str, set[str]] = {}  # SOP class -> syntaxes the peer accepted
        self._message_id = 0
        # The association was kept from an earlier batch and has answered nothing since.
        self._untried = False
        # (SOP class, syntax) pairs expected later, proposed after those of the batch as
        # room allows: a C-MOVE knows what it located before it has the files.
        self.expected: list[tuple[str, str]] = []
        # A C-MOVE's sub-operations carry the Move Originator AE Title and Message ID.
        self.originator: tuple[str, int] | None = None

    # -- the Destination protocol ------------------------------------------------------

    def open(self) -> None:
        if self._assoc is not None and not self._assoc.is_established:
            self._forget()  # the peer closed it while idle

    def close(self) -> None:
        if self._assoc is not None:
            scu.release(self._assoc)
        self._forget()

    def probe(self) -> bool:
        """Whether the node answers again: an association proposing Verification alone,
        and a C-ECHO on it (PS3.7 9.1.5). Any answer but a transient rejection counts; a
        permanent rejection, or Verification refused, is for a delivery to find and
        report (it suspends the destination). A node that refuses the TCP connection is
        not asked further: pynetdicom would log two errors for it at every probe."""
        node = self.peer.node
        try:
            socket.create_connection((node.host, node.port), timeout=node.timeouts.connect).close()
        except OSError:
            return False
        try:
            assoc = self.peer.associate([build_context(scu.VERIFICATION, [EXPLICIT, IMPLICIT])])
        except UpstreamUnavailable:
            return False
        except UpstreamMisconfigured:
            return True
        try:
            assoc.send_c_echo()
        finally:
            scu.release(assoc)
        return True

    def send(self, batch: Sequence[SpooledInstance]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        answered: list[int] = []
        self._untried = self._assoc is not None
        for i in range(len(batch)):
            outcome, status = self.store(batch[i], batch[i + 1:])
            outcomes.append(outcome)
            if status is not None:
                answered.append(status)
        sending.check_refusals(str(self.peer), len(batch), answered)
        return outcomes

    def store(self, instance: SpooledInstance, rest: Sequence[SpooledInstance] = ()) -> tuple[Outcome, int | None]:
        """C-STORE one instance (``rest`` comes next: proposed with it when a new association
        is needed); its outcome, and the peer's status when it answered. Raises
        ``UpstreamUnavailable`` when the association is lost or cannot be made."""
        try:
            with sending.outgoing(instance, self._temp_dir, f"modified-{self.name}-") as out:
                # A modified copy keeps the original's transfer syntax; its UIDs are its own.
                return self._send(out.instance, out.path, rest)
        except sending.Unsendable as exc:
            return exc.outcome, None

    # -- one instance ------------------------------------------------------------------

    def _send(self, instance: SpooledInstance, source: Path,
              rest: Sequence[SpooledInstance]) -> tuple[Outcome, int | None]:
        """C-STORE ``source`` (the file of ``instance``); ``rest`` of the batch comes next."""
        syntax = instance.transfer_syntax
        for attempt in (1, 2):
            if not self._covers(instance.sop_class_uid, syntax):
                self._associate([instance, *rest])
            chosen = self._choose(instance, syntax)
            if isinstance(chosen, Permanent):
                return chosen, None
            try:
                status, comment = self._c_store(source, syntax, chosen)
            except _AssociationLost as exc:
                retry = attempt == 1 and self._untried
                self._forget()
                if retry:
                    LOGGER.info("%s: the association kept from before is gone (%s); opening a new one", self.name,
                                exc)
                    continue
                raise UpstreamUnavailable(f"{self.peer}: {exc}") from None
            except transcode.NotConvertible as exc:
                return Permanent(f"cannot convert to a syntax {self.peer.called_ae} accepts: {exc.reason}"), None
            except OSError as exc:
                raise UpstreamUnavailable(f"cannot write a converted copy to {self._temp_dir}: "
                                          f"{exc.strerror or exc}") from exc
            return statuses.outcome(status, comment, self.settings.duplicates), status
        raise AssertionError("unreachable")

    def _choose(self, instance: SpooledInstance, syntax: str) -> str | Permanent:
        """The syntax to send ``instance`` in over the open association, or why there is none."""
        return choose_syntax(self._accepted.get(instance.sop_class_uid, set()), instance.sop_class_uid, syntax,
                             self.peer.called_ae)

    def _c_store(self, source: Path, own: str, syntax: str) -> tuple[int, str]:
        """Send ``source`` (in syntax ``own``) in ``syntax``, converting a temporary copy when
        they differ; the status and error comment of the response."""
        assert self._assoc is not None
        copy: Path | None = None
        try:
            if syntax != own:
                copy = self._temporary("converted-")
                transcode.convert(source, copy, syntax)
                LOGGER.debug("%s: sending %s converted to %s", self.name, source.name, UID(syntax).name)
            self._message_id = self._message_id % 0xFFFF + 1
            started = time.monotonic()
            try:
                originator_aet, originator_id = self.originator or (None, None)
                rsp: Dataset = self._assoc.send_c_store(copy or source, msg_id=self._message_id,
                                                        originator_aet=originator_aet, originator_id=originator_id)
            except RuntimeError as exc:  # not established (any more)
                raise _AssociationLost(str(exc)) from None
            if "Status" not in rsp:
                waited = time.monotonic() - started
                if waited >= self.peer.node.timeouts.dimse:
                    raise _AssociationLost(f"no C-STORE response within {self.peer.node.timeouts.dimse:g}s")
                raise _AssociationLost("the association ended during a C-STORE (aborted, or the connection closed)")
            self._untried = False
            return int(rsp.Status), str(rsp.get("ErrorComment", "") or "")
        finally:
            if copy is not None:
                copy.unlink(missing_ok=True)

    def _temporary(self, prefix: str) -> Path:
        # On the spool's file system, in the folder a restart empties (bridge.forward.spool).
        self._temp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{prefix}{self.name}-", suffix=".dcm", dir=self._temp_dir)
        os.close(fd)
        return Path(name)

    # -- the association ---------------------------------------------------------------

    def _covers(self, sop_class: str, syntax: str) -> bool:
        return self._assoc is not None and self._assoc.is_established and syntax in self._proposed.get(sop_class, ())

    def _associate(self, remaining: Sequence[SpooledInstance]) -> None:
        if self._assoc is not None:
            scu.release(self._assoc)
            self._forget()
        needed = [(i.sop_class_uid, i.transfer_syntax) for i in remaining] + self.expected
        proposal = plan(needed, self._proposed)
        contexts = [build_context(scu.VERIFICATION, [EXPLICIT, IMPLICIT])]
        contexts += [build_context(sop_class, [syntax]) for sop_class, syntaxes in proposal.items()
                     for syntax in syntaxes]
        assoc = self.peer.associate(contexts)
        self._assoc, self._proposed, self._untried = assoc, proposal, False
        self._accepted = {}
        for cx in assoc.accepted_contexts:
            self._accepted.setdefault(str(cx.abstract_syntax), set()).update(str(ts) for ts in cx.transfer_syntax)

    def _forget(self) -> None:
        self._assoc, self._proposed, self._accepted, self._untried = None, {}, {}, False


def choose_syntax(accepted: set[str], sop_class_uid: str, syntax: str, peer: str) -> str | Permanent:
    """The syntax to send an instance of ``sop_class_uid`` in ``syntax`` in, when ``peer``
    accepted ``accepted`` for its SOP class: its own, else explicit or implicit VR little
    endian if it converts to it exactly (``bridge.dimse.transcode``); or why there is none."""
    if syntax in accepted:
        return syntax
    sop_class = transcode.name(sop_class_uid)
    if not accepted:
        return Permanent(f"{peer} does not accept {sop_class}: it refused every presentation context proposed "
                         "for it")
    targets = [ts for ts in (EXPLICIT, IMPLICIT) if ts in accepted]
    if not targets:
        offered = ", ".join(sorted(transcode.name(ts) for ts in accepted))
        return Permanent(f"{peer} accepts {sop_class} only in {offered}, and {transcode.name(syntax)} is not "
                         "converted to those")
    if reason := transcode.problem(syntax, targets[0]):
        return Permanent(f"{peer} does not accept {transcode.name(syntax)} for {sop_class}, and {reason}")
    return targets[0]


def plan(needed: Iterable[tuple[str, str]], previous: dict[str, list[str]],
         limit: int = scu.MAX_CONTEXTS - 1) -> dict[str, list[str]]:
    """The syntaxes to propose per SOP class, one presentation context each, at most ``limit``.

    ``needed`` yields (SOP class, syntax) in the order instances will be sent: what comes
    first is proposed first. Each SOP class also gets explicit and implicit VR little
    endian. What ``previous`` proposed, then ``COMMON_SOP_CLASSES``, are added as room
    allows, so batches that alternate between SOP classes do not make the association
    change every time.
    """
    proposal: dict[str, list[str]] = {}
    used = 0

    def add(sop_class: str, syntax: str) -> None:
        nonlocal used
        syntaxes = proposal.get(sop_class, [EXPLICIT, IMPLICIT])
        if syntax in syntaxes and sop_class in proposal:
            return
        cost = (0 if sop_class in proposal else 2) + (0 if syntax in syntaxes else 1)
        if used + cost > limit:
            return
        if syntax not in syntaxes:
            syntaxes.insert(len(syntaxes) - 2, syntax)
        proposal[sop_class] = syntaxes
        used += cost

    for sop_class, syntax in needed:
        add(sop_class, syntax)
    for sop_class, syntaxes in previous.items():
        for syntax in syntaxes:
            add(sop_class, syntax)
    for sop_class in COMMON_SOP_CLASSES:
        add(sop_class, EXPLICIT)
    return proposal


# Proposed on every association as room allows (in explicit and implicit VR little
# endian), so that a stream of mixed modalities does not need a new association each
# time a batch brings a SOP class the open one lacks.
COMMON_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",       # CT Image
    "1.2.840.10008.5.1.4.1.1.2.1",     # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.4",       # MR Image
    "1.2.840.10008.5.1.4.1.1.4.1",     # Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.6.1",     # Ultrasound Image
    "1.2.840.10008.5.1.4.1.1.3.1",     # Ultrasound Multi-frame Image
    "1.2.840.10008.5.1.4.1.1.1",       # Computed Radiography Image
    "1.2.840.10008.5.1.4.1.1.1.1",     # Digital X-Ray Image - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.2",     # Digital Mammography X-Ray Image - For Presentation
    "1.2.840.10008.5.1.4.1.1.7",       # Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.12.1",    # X-Ray Angiographic Image
    "1.2.840.10008.5.1.4.1.1.20",      # Nuclear Medicine Image
    "1.2.840.10008.5.1.4.1.1.128",     # Positron Emission Tomography Image
    "1.2.840.10008.5.1.4.1.1.481.1",   # RT Image
    "1.2.840.10008.5.1.4.1.1.88.22",   # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.11.1",    # Grayscale Softcopy Presentation State
)
