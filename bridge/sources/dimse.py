"""``type: dimse``: a C-FIND forwarded to a node of the configuration (the bridge as a
Query/Retrieve FIND SCU, PS3.4 C.4.1), and instances retrieved from it by C-GET or C-MOVE
(``bridge.sources.dimse_retrieve``).

Each ``find`` and ``locate`` opens an association of its own (``bridge.dimse.scu``:
TCP_NODELAY, association failures as upstream errors), proposing the query's root in
explicit and implicit VR little endian, sends one C-FIND and yields each match as its
pending response arrives. Nothing is kept between finds, so several C-FINDs may use
one source at once, from any threads. Every wait on the node is bounded by the
source's ``find_timeout``: the TCP connect and the A-ASSOCIATE-AC (the node's
``connect`` and ``acse`` timeouts, or ``find_timeout`` if shorter) and each C-FIND
response (``find_timeout``, not the node's ``dimse`` timeout, which is sized for
C-STOREs of large images).

How the C-FIND ends:

| the node | what happens |
| --- | --- |
| 0xFF00, 0xFF01 | a match, yielded |
| 0x0000, or a warning (0x0001, 0xBxxx) | the end; the association is released |
| 0xA7xx out of resources | ``UpstreamUnavailable`` |
| 0x0122 SOP class not supported, 0x0124 not authorised, 0xA9xx identifier does not match | ``UpstreamMisconfigured`` |
| 0xCxxx unable to process, 0xFE00 cancelled, any other status | ``UpstreamError`` |
| no response within ``find_timeout``, an A-ABORT, a closed connection, an invalid response | ``UpstreamUnavailable`` |
| a match whose identifier cannot be decoded | ``UpstreamError`` |

Each error's message begins with the source and what went wrong (a status with its
ErrorComment), then names the node: the C-FIND's ErrorComment keeps 64 characters. Each
C-FIND is timed in ``dicom_bridge_upstream_request_seconds{operation="c-find"}`` (its
association included), and each that raises is counted in
``dicom_bridge_upstream_errors{operation="c-find"}``.
Whoever iterates may stop early (``close()`` on the generator: a C-CANCEL, a cap): a
C-CANCEL for the C-FIND goes to the node and the association is aborted at once, no
further response read.

Character sets. The identifier is forwarded in the node's ``charset`` (the set the PACS
was configured to read; UTF-8 by default), re-encoded from the decoded query, whatever
set the requester used. Characters that set cannot hold become ``*``, a wildcard: the
node may answer more, never fewer, and the C-FIND service checks every answer against
the query as asked. (Not ``?``: a PACS may take it for one byte rather than one
character, as Orthanc 1.10 does in UTF-8, and miss a name whose character took two bytes.) Answers are decoded by
their own Specific Character Set (a PACS answers in its own: Orthanc in its
``DefaultEncoding``); an answer without one is read in the node's ``charset`` (ASCII,
the default repertoire, reads the same in every set the bridge accepts).
"""

from __future__ import annotations

import copy
import logging
import re
import time
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.valuerep import PersonName
from pynetdicom.association import Association
from pynetdicom.presentation import build_context
from pynetdicom.status import code_to_category

from bridge.config import DimseSource as DimseConfig
from bridge.config import Node
from bridge.dataset import charset
from bridge.dataset.query import PATIENT_ROOT_FIND, STUDY_ROOT_FIND, Query
from bridge.dimse import scu
from bridge.errors import UpstreamError, UpstreamMisconfigured, UpstreamUnavailable
from bridge.metrics import Metrics
from bridge.model import InstanceRef, Retrieved
from bridge.sources.dimse_retrieve import Retrieval

LOGGER = logging.getLogger(__name__)

MESSAGE_ID = 1  # one C-FIND per association
# What ``locate`` asks for: an instance's place in the hierarchy and its SOP class.
LOCATE_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")

_Responses = Generator[tuple[Dataset, Dataset | None], None, None]  # pynetdicom's send_c_find

_NAMES = {
    0x0122: "SOP class not supported",
    0x0124: "not authorised",
    0xFE00: "cancelled",
}


class DimseSource:
    """C-FIND to ``node``, as ``calling_ae``, each wait bounded by ``settings.find_timeout``."""

    def __init__(self, name: str, settings: DimseConfig, node: Node, calling_ae: str, network_timeout: float,
                 metrics: Metrics, temp_dir: Path) -> None:
        self.name = name
        self.settings = settings
        self.temp_dir = temp_dir  # where retrieved instances are written (bridge.sources.temp_dir)
        self.metrics = metrics
        self.charset = node.charset
        wait = settings.find_timeout
        # The node's timeouts as a C-FIND needs them: its dimse timeout (each C-STORE's
        # response, minutes) becomes find_timeout, and no other wait may be longer.
        timeouts = node.timeouts.model_copy(update={
            "connect": min(node.timeouts.connect, wait), "acse": min(node.timeouts.acse, wait), "dimse": wait,
        })
        self.peer = scu.Peer(settings.node, node.model_copy(update={"timeouts": timeouts}), calling_ae,
                             network_timeout)
        # A retrieval's waits: the connect and A-ASSOCIATE-AC, then the next PDU (the
        # association's network timer), each at most retrieve_timeout (bridge.sources.dimse_retrieve).
        wait = settings.retrieve_timeout
        timeouts = node.timeouts.model_copy(update={
            "connect": min(node.timeouts.connect, wait), "acse": min(node.timeouts.acse, wait), "dimse": wait,
        })
        self.retrieve_peer = scu.Peer(settings.node, node.model_copy(update={"timeouts": timeouts}), calling_ae, wait)
        self.calling_ae = calling_ae  # the Move Originator of its C-MOVEs, and their default destination
        metrics.add_source(name, ("c-find", settings.retrieve))

    def __repr__(self) -> str:
        return f"DimseSource({self.name!r}, {self.peer})"

    # -- the Source protocol -------------------------------------------------------------

    def find(self, query: Query) -> Iterator[Dataset]:
        """The node's matches for ``query``, at its level and root, as they arrive."""
        return self._c_find(self._forwarded(query.identifier), query.sop_class)

    def locate(self, query: Query) -> Iterator[InstanceRef]:
        """The instances ``query`` names: one IMAGE-level C-FIND (Study Root, or Patient Root
        for a Patient Root query at PATIENT level) carrying the query's matching keys, and
        asking for each instance's UIDs and SOP class (empty when the node has none)."""
        identifier = Dataset()
        for key in query.matching:
            identifier.add(copy.deepcopy(query.identifier[key.tag]))
        if "SpecificCharacterSet" in query.identifier:
            identifier.SpecificCharacterSet = query.identifier.SpecificCharacterSet
        identifier.QueryRetrieveLevel = "IMAGE"
        for keyword in LOCATE_KEYS:
            if keyword not in identifier:
                setattr(identifier, keyword, "")
        sop_class = PATIENT_ROOT_FIND if query.root == "patient" and query.level == "PATIENT" else STUDY_ROOT_FIND
        return self._refs(self._c_find(self._forwarded(identifier), sop_class))

    def retrieve(self, refs: Sequence[InstanceRef]) -> Iterator[Retrieved | None]:
        """``refs`` fetched from the node by C-GET or C-MOVE (``settings.retrieve``), each
        yielded as soon as its file is complete (``bridge.sources.dimse_retrieve``)."""
        return Retrieval(self, refs).run()

    def close(self) -> None:
        """Nothing to close: each C-FIND's association ends with it."""

    # -- one C-FIND ----------------------------------------------------------------------

    def _forwarded(self, identifier: Dataset) -> Dataset:
        """A copy of ``identifier`` (decoded) in the node's character set, each '?' of a text
        value sent as '*', and so each character the set cannot hold (``charset.fit``
        writes a '?' for it)."""
        forwarded = copy.deepcopy(identifier)
        replaced = charset.fit(forwarded, self.charset)
        if replaced:
            LOGGER.warning("source %s: characters %s cannot hold sent as '*' (a wildcard) in %s", self.name,
                           self.charset, ", ".join(replaced))
        for element in forwarded:
            if element.VR in charset.TEXT_VRS and element.value:
                element.value = _widened(element.value)
        return forwarded

    def _c_find(self, identifier: Dataset, sop_class: str) -> Generator[Dataset, None, None]:
        """Each match of one C-FIND of ``identifier`` under ``sop_class``, decoded. Timed,
        and counted when it fails (raises)."""
        started = time.monotonic()
        try:
            yield from self._c_find_on(self._associate(sop_class), identifier, sop_class)
        except UpstreamError:
            self.metrics.upstream_errors.labels(self.name, "c-find").inc()
            raise
        finally:
            self.metrics.upstream_latency.labels(self.name, "c-find").observe(time.monotonic() - started)

    def _associate(self, sop_class: str) -> Association:
        try:
            return self.peer.associate([build_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])])
        except UpstreamError as exc:  # the same kind, naming the source
            raise type(exc)(f"source {self.name}: {exc.reason}") from None

    def _c_find_on(self, assoc: Association, identifier: Dataset, sop_class: str) -> Generator[Dataset, None, None]:
        """``_c_find`` on ``assoc``: released when the node ended the C-FIND, else cancelled and aborted."""
        responses: _Responses | None = None
        ended = False  # the node sent its final response
        try:
            sent = responses = cast(_Responses, assoc.send_c_find(identifier, sop_class, msg_id=MESSAGE_ID))
            asked = time.monotonic()
            for status, found in sent:
                code = status.get("Status")
                if code is None:  # pynetdicom: no response within dimse_timeout, or the association is gone
                    raise self._lost(time.monotonic() - asked)
                if code_to_category(code) != "Pending":
                    ended = True
                    self._end(code, status)
                    return
                if found is None:
                    raise UpstreamError(f"source {self.name}: a match (0x{code:04X}) that cannot be decoded "
                                        f"({self.peer})")
                yield self._decoded(found)
                asked = time.monotonic()
            raise self._lost(time.monotonic() - asked)  # pynetdicom's responses ended without a final status
        finally:
            if responses is not None:
                responses.close()  # pynetdicom's generator may hold its AE's lock
            if ended:
                scu.release(assoc)
            else:
                self._cancel(assoc, sop_class if responses is not None else None)

    def _decoded(self, found: Dataset) -> Dataset:
        """``found`` with its text as str, read in its own Specific Character Set, else the node's."""
        try:
            if not found.get("SpecificCharacterSet"):
                terms = charset.terms(self.charset)
                found.SpecificCharacterSet = terms if len(terms) > 1 else terms[0]
            found.decode()
        except Exception as exc:
            raise UpstreamError(f"source {self.name}: a match that cannot be decoded: {exc} ({self.peer})") from None
        return found

    def _end(self, code: int, status: Dataset) -> None:
        """Return for a final status that ends the C-FIND well; raise for the others."""
        if code == 0x0000:
            return
        category = code_to_category(code)
        comment = str(status.get("ErrorComment", "") or "").strip()
        what = f"0x{code:04X}" + (f" ({_NAMES[code]})" if code in _NAMES else "") + (f": {comment}" if comment else "")
        if category == "Warning":
            LOGGER.warning("source %s: the C-FIND ended with the warning %s (%s)", self.name, what, self.peer)
            return
        reason = f"source {self.name}: the C-FIND failed with {what} ({self.peer})"
        if code & 0xFF00 == 0xA700:
            raise UpstreamUnavailable(reason)
        if code in (0x0122, 0x0124) or code & 0xFF00 == 0xA900:
            raise UpstreamMisconfigured(reason)
        raise UpstreamError(reason)

    def _lost(self, waited: float) -> UpstreamUnavailable:
        timeout = self.settings.find_timeout
        if waited >= timeout * 0.95:
            return UpstreamUnavailable(f"source {self.name}: no answer within {timeout:g}s ({self.peer})")
        return UpstreamUnavailable(f"source {self.name}: association aborted, connection closed, or a wrong "
                                   f"response ({self.peer})")

    def _cancel(self, assoc: Association, sop_class: str | None) -> None:
        """Stop the node's work at once: a C-CANCEL for the C-FIND sent under ``sop_class``
        (PS3.7 9.3.2.3; None: none was sent), then A-ABORT, without reading what the node
        may still send."""
        if sop_class is not None and assoc.is_established:
            try:
                assoc.send_c_cancel(MESSAGE_ID, query_model=sop_class)
            except Exception:  # the connection may be gone already: the abort below is what matters
                LOGGER.debug("source %s: sending C-CANCEL failed", self.name, exc_info=True)
        try:
            assoc.abort()
        except Exception:
            LOGGER.debug("source %s: aborting the association failed", self.name, exc_info=True)

    def _refs(self, records: Generator[Dataset, None, None]) -> Iterator[InstanceRef]:
        try:
            for record in records:
                sop_instance = str(record.get("SOPInstanceUID", "") or "")
                if not sop_instance:
                    self.metrics.upstream_errors.labels(self.name, "c-find").inc()
                    raise UpstreamError(f"source {self.name}: an IMAGE-level match without SOP Instance UID "
                                        f"({self.peer})")
                yield InstanceRef(study_uid=str(record.get("StudyInstanceUID", "") or ""),
                                  series_uid=str(record.get("SeriesInstanceUID", "") or ""),
                                  sop_instance_uid=sop_instance,
                                  sop_class_uid=str(record.get("SOPClassUID", "") or ""))
        finally:
            records.close()


def _widened(value: Any) -> Any:
    """A text value with each '?' as '*'. A '?' may stand for a character beyond ASCII,
    several bytes in UTF-8: a PACS that matches '?' to one byte of what it holds (Orthanc
    1.10 does, whatever the set it is asked in) would miss it. '*' matches more, never
    fewer."""
    if isinstance(value, MultiValue | list):
        return [_widened(v) for v in value]
    text = str(value)
    if "?" not in text:
        return value
    text = re.sub(r"\*+", "*", text.replace("?", "*"))
    return PersonName(text) if isinstance(value, PersonName) else text
