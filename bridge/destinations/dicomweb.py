"""``type: dicomweb``: STOW-RS (PS3.18 10.5) to ``{url}/studies``, many instances per request.

The body streams from the spool files with a known Content-Length (``bridge.web.multipart``),
over the connection of a ``bridge.web.client.HttpClient``, which also renews credentials,
reconnects, and raises the upstream errors for what is about the server as a whole.
Each instance's outcome comes from the response body when it is DICOM JSON (or XML),
on every HTTP status: ReferencedSOPSequence (0008,1199) is done (or a warning with its
WarningReason), FailedSOPSequence (0008,1198) maps its FailureReason through
``bridge.dimse.statuses``; 0x0122 or 0x0124 for every instance of a batch suspends the
destination. The HTTP status decides only for the instances the body does not mention
(docs/delivery.md has the whole table):

- 2xx: done when there is no STOW-RS body to say otherwise (but 202 says some failed:
  retried); an instance a STOW-RS body leaves out is retried (Orthanc answers 200 with
  both sequences empty when its storage is full);
- 408, 429, 5xx, connection errors and timeouts: the destination is unavailable (backs
  off, honouring Retry-After; no row charged);
- 401 (after one refresh of the credentials), 403, 404 on the base URL, a redirect, a
  TLS verification failure: the destination is misconfigured (suspended);
- any other 4xx: a request of more than one instance is split in two and each half sent
  again, so one bad instance cannot take the others down with it; for one instance,
  409 goes through the ``duplicates`` policy (like FailureReason 0x0111) and any other
  status is permanent.

Orthanc answers 400 for a whole request when one part is unreadable while storing, and
listing, the others: the listed ones are done, the unreadable one is left alone and is
dead after its own request. An instance with a rule's modification is sent as its
modified copy, written first to a temporary file in the spool's ``incoming`` folder
(``bridge.destinations.sending``) so that its length is known.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from bridge.config import DicomwebDestination as DicomwebConfig
from bridge.destinations import sending
from bridge.dimse import statuses
from bridge.errors import UpstreamError, UpstreamMisconfigured
from bridge.model import Done, Outcome, Permanent, SpooledInstance, Transient, Warning
from bridge.web.client import HttpClient, HttpResponse
from bridge.web.multipart import FilePart, MultipartBody, content_type_params

LOGGER = logging.getLogger(__name__)

PROBE_READ_TIMEOUT = 10.0  # seconds a probe waits for an answer, at most
MAX_RESPONSE_BYTES = 16 << 20  # a STOW response lists UIDs: anything longer is not read
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
# JSON preferred; XML (PS3.19 Native DICOM Model) from servers that answer only that.
ACCEPT = "application/dicom+json, application/dicom+xml;q=0.5"


@dataclass
class _Item:
    """One instance of the batch as it goes out: the file sent and the UID it has there."""

    index: int
    path: Path
    size: int
    uid: str


@dataclass
class _Answer:
    response: HttpResponse  # read and closed
    what: str  # the status, and the start of a body that is not a STOW-RS response
    listed: dict[str, Outcome] | None  # None: no STOW-RS response
    failures: dict[str, int]  # FailureReason by SOP Instance UID


class DicomwebDestination:
    """Sends batches by STOW-RS over one keep-alive connection (each worker has its own)."""

    def __init__(self, name: str, settings: DicomwebConfig, temp_dir: Path) -> None:
        self.name = name
        self.settings = settings
        self.stow_url = f"{settings.url}/studies"
        self.temp_dir = temp_dir
        self.client = HttpClient(settings)

    def open(self) -> None:
        self.client.open()

    def close(self) -> None:
        self.client.close()

    def probe(self) -> bool:
        """Whether the server answers HTTP again: an OPTIONS request on the STOW-RS URL,
        which stores nothing and costs the server no query. Any answer but 408, 429 and
        5xx (what a proxy answers while the server behind it is down) counts, 401, 403
        and 404 included: the server is up, and the next delivery says whether it takes
        the bridge's credentials and URL (a refusal suspends the destination)."""
        try:
            with self.client.request("OPTIONS", self.stow_url, headers={"Accept": ACCEPT},
                                     read_timeout=PROBE_READ_TIMEOUT, retry=False) as response:
                return not (response.status in (408, 429) or response.status >= 500)
        except UpstreamError as exc:
            LOGGER.debug("%s: probe: %s", self.name, exc)
            return False

    # -- a batch -------------------------------------------------------------------------

    def send(self, batch: Sequence[SpooledInstance]) -> list[Outcome]:
        outcomes: dict[int, Outcome] = {}
        failures: dict[int, int] = {}  # FailureReason by index, for the instances the server failed
        items: list[_Item] = []
        with ExitStack() as files:  # modified copies, removed when the batch is over
            for index, instance in enumerate(batch):
                try:
                    out = files.enter_context(sending.outgoing(instance, self.temp_dir, f"stow-{self.name}-"))
                except sending.Unsendable as exc:
                    outcomes[index] = exc.outcome
                    continue
                # The body's length is announced before its first byte: the file must hold it.
                if instance.modify is None and out.size != instance.size:
                    outcomes[index] = Permanent(f"spool file has {out.size} bytes, not {instance.size}")
                    continue
                items.append(_Item(index, out.path, out.size, out.instance.sop_instance_uid))
            # A request carries each SOP Instance UID once; a later content of the same
            # UID goes in a later request, so that the answer cannot be mistaken.
            while items:
                first: dict[str, _Item] = {}
                for item in items:
                    first.setdefault(item.uid, item)
                now = list(first.values())
                items = [item for item in items if first[item.uid] is not item]
                self._store(now, outcomes, failures)
        sending.check_refusals(self.stow_url, len(batch), failures.values())
        return [outcomes[i] for i in range(len(batch))]

    def _store(self, items: list[_Item], outcomes: dict[int, Outcome], failures: dict[int, int]) -> None:
        """One STOW-RS request for ``items``; fills in their outcomes (splitting on a 4xx)."""
        answer = self._post(items)
        rest = []
        for item in items:
            if answer.listed is not None and item.uid in answer.listed:
                outcomes[item.index] = answer.listed[item.uid]
                if item.uid in answer.failures:
                    failures[item.index] = answer.failures[item.uid]
            else:
                rest.append(item)
        if not rest:
            return
        status, what = answer.response.status, answer.what
        if 200 <= status < 300:
            if answer.listed is not None:
                outcome: Outcome = Transient(f"{what}: the response does not list this instance")
            elif status != 202:  # 202: stored some, failed some, without saying which
                outcome = Done()
            else:
                outcome = Transient(f"{what} without a list of what was stored")
            for item in rest:
                outcomes[item.index] = outcome
            return
        answer.response.raise_for_upstream(what)  # what is about the server, not these instances
        if status == 404:
            raise UpstreamMisconfigured(f"{self.stow_url}: {what}: is url the DICOMweb base URL?")
        if len(rest) > 1:  # any other 4xx
            LOGGER.info("%s: %s for %d instances; sending them again in two halves", self.name, what, len(rest))
            half = len(rest) // 2
            self._store(rest[:half], outcomes, failures)
            self._store(rest[half:], outcomes, failures)
        elif status == 409:
            outcomes[rest[0].index] = statuses.outcome(0x0111, what, self.settings.duplicates)
        else:
            outcomes[rest[0].index] = Permanent(what)

    def _post(self, items: list[_Item]) -> _Answer:
        body = MultipartBody([FilePart(i.path, i.size) for i in items])
        started = time.monotonic()
        with self.client.request("POST", self.stow_url, body=body,
                                 headers={"Content-Type": body.content_type, "Accept": ACCEPT}) as response:
            LOGGER.debug("%s: STOW-RS of %d instances (%d bytes): HTTP %d in %.3f s", self.name, len(items),
                         len(body), response.status, time.monotonic() - started)
            content = response.read(MAX_RESPONSE_BYTES)
        failures: dict[str, int] = {}
        listed = stow_outcomes(content, response.headers.get("Content-Type", ""), self.settings.duplicates, failures)
        return _Answer(response, response.summary(content if listed is None else b""), listed, failures)


def stow_outcomes(content: bytes, content_type: str, duplicates: str = "supersede",
                  failures: dict[str, int] | None = None) -> dict[str, Outcome] | None:
    """Outcomes by SOP Instance UID from a STOW-RS response body in DICOM JSON (PS3.18
    F.2) or XML (PS3.19 Native DICOM Model); None when the body is neither. Orthanc
    leaves out the Content-Type of its error answers, so a body without one is tried.
    The FailureReason of each failed UID is added to ``failures``."""
    media = content_type_params(content_type)[0] if content_type else ""
    start = content.lstrip()[:1]
    dataset: Any = None
    try:
        if ("json" in media or not media) and start in (b"{", b"["):
            dataset = json.loads(content)
        elif ("xml" in media or not media) and start == b"<":
            dataset = _native_model(ElementTree.fromstring(content))
    except (ValueError, ElementTree.ParseError):
        return None
    if isinstance(dataset, list) and len(dataset) == 1:
        dataset = dataset[0]
    if not isinstance(dataset, dict) or not ({REFERENCED_SOP_SEQUENCE, FAILED_SOP_SEQUENCE} & set(dataset)):
        return None
    found: dict[str, Outcome] = {}
    for item in _items(dataset, REFERENCED_SOP_SEQUENCE):
        uid = _first(item, REFERENCED_SOP_INSTANCE_UID)
        if isinstance(uid, str):
            warning = _code(_first(item, WARNING_REASON))
            found[uid] = Done() if warning is None else Warning(f"WarningReason {statuses.describe(warning)}")
    for item in _items(dataset, FAILED_SOP_SEQUENCE):
        uid = _first(item, REFERENCED_SOP_INSTANCE_UID)
        if isinstance(uid, str):
            reason = _code(_first(item, FAILURE_REASON))
            if reason is None:
                found[uid] = Transient("listed in FailedSOPSequence without a FailureReason")
            else:
                found[uid] = statuses.outcome(reason, "STOW-RS FailedSOPSequence", duplicates)
                if failures is not None:
                    failures[uid] = reason
    return found


def _native_model(root: ElementTree.Element) -> dict[str, Any]:
    """The Native DICOM Model's attributes in the shape of DICOM JSON (what is read here:
    tags, values and sequence items)."""
    dataset: dict[str, Any] = {}
    for attribute in root.findall("DicomAttribute"):
        tag = (attribute.get("tag") or "").upper()
        items = [_native_model(item) for item in attribute.findall("Item")]
        values = [value.text or "" for value in attribute.findall("Value")]
        dataset[tag] = {"Value": items or values}
    return dataset


def _items(dataset: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    element = dataset.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return [v for v in values if isinstance(v, dict)] if isinstance(values, list) else []


def _first(item: dict[str, Any], tag: str) -> Any:
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


def _code(value: Any) -> int | None:
    """A US value; some servers write it as a decimal string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None
