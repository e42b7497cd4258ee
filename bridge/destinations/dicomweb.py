"""``type: dicomweb``: STOW-RS (PS3.18 10.5) to ``{url}/studies``, many instances per request.

The body streams from the spool files with a known Content-Length (``bridge.web.multipart``).
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
modified copy, written first to a temporary file in the spool's ``incoming`` folder so
that its length is known.
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from xml.etree import ElementTree

import requests
from requests.adapters import HTTPAdapter

from bridge.config import DicomwebDestination as DicomwebConfig
from bridge.dimse import statuses
from bridge.errors import UpstreamMisconfigured, UpstreamUnavailable
from bridge.model import Done, Outcome, Permanent, SpooledInstance, Transient, Warning
from bridge.web import auth as httpauth
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
    status: int
    reason: str
    retry_after: float | None
    listed: dict[str, Outcome] | None = field(default=None)  # None: no DICOM JSON STOW response
    detail: str = ""
    refused: set[str] = field(default_factory=set)  # listed with 0x0122 or 0x0124


class DicomwebDestination:
    """Sends batches by STOW-RS over one keep-alive connection (each worker has its own)."""

    def __init__(self, name: str, settings: DicomwebConfig, temp_dir: Path) -> None:
        self.name = name
        self.settings = settings
        self.stow_url = f"{settings.url}/studies"
        self.temp_dir = temp_dir
        self._session: requests.Session | None = None
        self._auth: httpauth.Auth = httpauth.NoAuth()
        tls = settings.tls
        self._verify: bool | str = str(tls.ca_bundle) if tls.verify and tls.ca_bundle else tls.verify
        self._cert: str | tuple[str, str] | None = None
        if tls.client_cert is not None:
            self._cert = (str(tls.client_cert), str(tls.client_key)) if tls.client_key else str(tls.client_cert)

    def open(self) -> None:
        if self._session is not None:
            return
        self._auth = httpauth.build(self.settings.auth, self.settings.timeouts, self._verify)
        session = requests.Session()
        # One connection per worker, kept alive between batches; no retries by urllib3:
        # a failed POST is retried here, with a fresh body, or left to the runner.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.headers["User-Agent"] = "dicom-bridge"
        # The environment (HTTPS_PROXY, NO_PROXY) is read once here: requests reads it, and
        # looks for a .netrc, on every request otherwise (a millisecond of Python each).
        session.trust_env = False
        session.proxies = requests.utils.get_environ_proxies(self.stow_url)
        self._session = session

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def probe(self) -> bool:
        """Whether the server answers HTTP again: an OPTIONS request on the STOW-RS URL,
        which stores nothing and costs the server no query. Any answer but 408, 429 and
        5xx (what a proxy answers while the server behind it is down) counts, 401, 403
        and 404 included: the server is up, and the next delivery says whether it takes
        the bridge's credentials and URL (a refusal suspends the destination)."""
        self.open()
        assert self._session is not None
        try:
            response = self._session.options(
                self.stow_url, headers={"Accept": ACCEPT, **self._auth.headers()}, allow_redirects=False,
                timeout=(self.settings.timeouts.connect, min(self.settings.timeouts.read, PROBE_READ_TIMEOUT)),
                verify=self._verify, cert=self._cert,
            )
        except (requests.RequestException, OSError) as exc:
            LOGGER.debug("%s: probe: %s", self.name, _describe(exc))
            return False
        response.close()
        return not (response.status_code in (408, 429) or response.status_code >= 500)

    # -- a batch -------------------------------------------------------------------------

    def send(self, batch: Sequence[SpooledInstance]) -> list[Outcome]:
        outcomes: dict[int, Outcome] = {}
        refused: set[int] = set()  # indices the server refused with 0x0122 or 0x0124
        items: list[_Item] = []
        temporary: list[Path] = []
        try:
            for index, instance in enumerate(batch):
                item = self._item(index, instance, temporary)
                if isinstance(item, _Item):
                    items.append(item)
                else:
                    outcomes[index] = item
            # A request carries each SOP Instance UID once; a later content of the same
            # UID goes in a later request, so that the answer cannot be mistaken.
            while items:
                first: dict[str, _Item] = {}
                for item in items:
                    first.setdefault(item.uid, item)
                now = list(first.values())
                items = [item for item in items if first[item.uid] is not item]
                self._store(now, outcomes, refused)
        finally:
            for path in temporary:
                path.unlink(missing_ok=True)
        if batch and len(refused) == len(batch):  # the server's policy, not these instances
            said = outcomes[0]
            raise UpstreamMisconfigured(f"{self.stow_url} refused every instance of a batch of {len(batch)}"
                                        + (f" ({said.reason})" if isinstance(said, Permanent) else ""))
        return [outcomes[i] for i in range(len(batch))]

    def _item(self, index: int, instance: SpooledInstance, temporary: list[Path]) -> _Item | Outcome:
        try:
            size = instance.spool_path.stat().st_size
        except FileNotFoundError:
            return Permanent("spool file is missing")
        if instance.modify is None:
            if size != instance.size:
                return Permanent(f"spool file has {size} bytes, not {instance.size}")
            return _Item(index, instance.spool_path, size, instance.sop_instance_uid)
        # The copy's length must be known before the body starts: write it out first.
        # (bridge.routing.modify, which makes copies for every destination type, is loaded by the
        # first instance a rule modifies.)
        from bridge.routing.modify import ModificationError, write_modified

        self.temp_dir.mkdir(parents=True, exist_ok=True)
        path = self.temp_dir / f"stow-{self.name}-{instance.spool_path.stem}-{index}.dcm"
        temporary.append(path)
        try:
            copy = write_modified(instance.spool_path, instance.modify, path)
        except ModificationError as exc:
            return Permanent(f"modify: {exc}")
        except FileNotFoundError:
            return Permanent("spool file is missing")
        except OSError as exc:
            raise UpstreamUnavailable(f"cannot write the modified copy to {self.temp_dir}: {exc.strerror}") from exc
        return _Item(index, path, copy.size, copy.describe(instance).sop_instance_uid)

    def _store(self, items: list[_Item], outcomes: dict[int, Outcome], refused: set[int]) -> None:
        """One STOW-RS request for ``items``; fills in their outcomes (splitting on a 4xx)."""
        answer = self._post(items)
        rest = []
        for item in items:
            if answer.listed is not None and item.uid in answer.listed:
                outcomes[item.index] = answer.listed[item.uid]
                if item.uid in answer.refused:
                    refused.add(item.index)
            else:
                rest.append(item)
        if not rest:
            return
        status, what = answer.status, f"HTTP {answer.status} {answer.reason}".rstrip() + answer.detail
        if 200 <= status < 300:
            if answer.listed is not None:
                outcome: Outcome = Transient(f"{what}: the response does not list this instance")
            elif status != 202:  # 202: stored some, failed some, without saying which
                outcome = Done()
            else:
                outcome = Transient(f"{what} without a list of what was stored")
            for item in rest:
                outcomes[item.index] = outcome
        elif status in (408, 429) or status >= 500:
            raise UpstreamUnavailable(f"{self.stow_url}: {what}", answer.retry_after)
        elif status in (401, 403, 407):
            raise UpstreamMisconfigured(f"{self.stow_url}: {what}"
                                        + (" (after renewing the credentials)" if status == 401 else ""))
        elif status == 404:
            raise UpstreamMisconfigured(f"{self.stow_url}: {what}: is url the DICOMweb base URL?")
        elif 300 <= status < 400:
            raise UpstreamMisconfigured(f"{self.stow_url}: {what}: redirected; set url to where it points")
        elif 400 <= status < 500 and len(rest) > 1:
            LOGGER.info("%s: %s for %d instances; sending them again in two halves", self.name, what, len(rest))
            half = len(rest) // 2
            self._store(rest[:half], outcomes, refused)
            self._store(rest[half:], outcomes, refused)
        elif status == 409:
            outcomes[rest[0].index] = statuses.outcome(0x0111, what, self.settings.duplicates)
        elif 400 <= status < 500:
            outcomes[rest[0].index] = Permanent(what)
        else:
            raise UpstreamUnavailable(f"{self.stow_url}: unexpected {what}")

    # -- one request -----------------------------------------------------------------------

    def _post(self, items: list[_Item]) -> _Answer:
        """POST the items; after a 401, once more with renewed credentials, and after a
        dropped connection (a keep-alive the server had closed), once more at once."""
        refreshed = reconnected = False
        while True:
            try:
                response = self._request(items)
            except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                if isinstance(exc, requests.exceptions.SSLError):
                    raise self._tls_error(exc) from None
                if reconnected or isinstance(exc, requests.exceptions.ConnectTimeout):
                    raise UpstreamUnavailable(f"{self.stow_url}: {_describe(exc)}") from None
                reconnected = True
                continue
            except requests.RequestException as exc:  # timeouts, and what the server's answer breaks
                raise UpstreamUnavailable(f"{self.stow_url}: {_describe(exc)}") from None
            except OSError as exc:  # requests' own: a client certificate or CA bundle it cannot find
                raise UpstreamMisconfigured(f"{self.stow_url}: {exc}") from None
            if response.status_code == 401 and not refreshed:
                response.close()
                refreshed = True
                if self._auth.refresh():
                    continue
            return self._answer(response)

    def _request(self, items: list[_Item]) -> requests.Response:
        self.open()
        assert self._session is not None
        body = MultipartBody([FilePart(i.path, i.size) for i in items])
        headers = {"Content-Type": body.content_type, "Accept": ACCEPT, **self._auth.headers()}
        started = time.monotonic()
        response = self._session.post(
            # an iterable of bytearrays, which requests and urllib3 send like bytes
            self.stow_url, data=cast(Iterable[bytes], body), headers=headers, stream=True, allow_redirects=False,
            timeout=(self.settings.timeouts.connect, self.settings.timeouts.read),
            verify=self._verify, cert=self._cert,
        )
        LOGGER.debug("%s: STOW-RS of %d instances (%d bytes): HTTP %d in %.3f s", self.name, len(items),
                     len(body), response.status_code, time.monotonic() - started)
        return response

    def _answer(self, response: requests.Response) -> _Answer:
        try:
            content = _read_capped(response)
        except requests.RequestException as exc:
            raise UpstreamUnavailable(f"{self.stow_url}: reading the answer: {_describe(exc)}") from None
        finally:
            response.close()
        refused: set[str] = set()
        listed = stow_outcomes(content, response.headers.get("Content-Type", ""), self.settings.duplicates, refused)
        detail = ""
        if listed is None and response.status_code >= 300 and content:
            text = " ".join(content[:200].decode("utf-8", "replace").split())
            detail = f": {text}" if text.isprintable() else ""
        return _Answer(response.status_code, response.reason or "", _retry_after(response.headers.get("Retry-After")),
                       listed=listed, detail=detail, refused=refused)

    def _tls_error(self, exc: Exception) -> UpstreamMisconfigured | UpstreamUnavailable:
        text = str(exc)
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text or "hostname" in text:
            return UpstreamMisconfigured(f"{self.stow_url}: TLS verification failed: {_describe(exc)}")
        if any(alert in text.lower() for alert in _CLIENT_CERTIFICATE_ALERTS):
            return UpstreamMisconfigured(f"{self.stow_url}: the server refused our TLS client certificate "
                                         f"(or its absence): {_describe(exc)}")
        return UpstreamUnavailable(f"{self.stow_url}: TLS: {_describe(exc)}")


# TLS alerts by which a server refuses the client's certificate, or its absence (RFC 8446 6.2).
_CLIENT_CERTIFICATE_ALERTS = ("alert certificate required", "alert bad certificate", "alert unknown ca",
                              "alert certificate unknown", "alert certificate expired", "alert certificate revoked")


def stow_outcomes(content: bytes, content_type: str, duplicates: str = "supersede",
                  refused: set[str] | None = None) -> dict[str, Outcome] | None:
    """Outcomes by SOP Instance UID from a STOW-RS response body in DICOM JSON (PS3.18
    F.2) or XML (PS3.19 Native DICOM Model); None when the body is neither. Orthanc
    leaves out the Content-Type of its error answers, so a body without one is tried.
    The UIDs failed with 0x0122 or 0x0124 are added to ``refused``."""
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
                if refused is not None and statuses.classify(reason) is statuses.Kind.REFUSED:
                    refused.add(uid)
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


def _read_capped(response: requests.Response) -> bytes:
    pieces, total = [], 0
    for piece in response.iter_content(64 * 1024):
        pieces.append(piece)
        total += len(piece)
        if total >= MAX_RESPONSE_BYTES:
            break
    return b"".join(pieces)


def _retry_after(value: str | None) -> float | None:
    """Retry-After (RFC 9110 10.2.3): seconds, or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _describe(exc: Exception) -> str:
    """A requests error in one line, without the noise of urllib3's nesting: the reason
    urllib3 gives (``Caused by NewConnectionError("...: Connection refused")``) unquoted,
    without the connection object's repr in front of it."""
    text = str(exc)
    for marker in ("Caused by ", "(Caused by "):
        if marker in text:
            text = text.split(marker, 1)[1].rstrip(")")
    if quoted := re.fullmatch(r"\w+\(([\"'])(.*)\1\)?", text, re.DOTALL):
        text = quoted.group(2)
    text = re.sub(r"^\w+\(host=[^)]*\): ", "", text)
    return f"{type(exc).__name__}: {' '.join(text.split())}"
