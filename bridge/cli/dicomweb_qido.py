"""The QIDO-RS searches of ``dicom-bridge dicomweb``: a series' study, a study's series,
a series' instances, each value read from DICOM JSON (PS3.18 F.2)."""

from __future__ import annotations

import json
from typing import Any

from bridge.cli.dicomweb_peer import RetryingClient
from bridge.errors import UpstreamMisconfigured
from bridge.sources import qido

QIDO_ACCEPT = "application/dicom+json, application/json;q=0.9"
MAX_QIDO_BYTES = 256 << 20
STUDY_UID, SERIES_UID, SOP_UID, INSTANCE_NUMBER, SERIES_NUMBER = (
    "0020000D", "0020000E", "00080018", "00200013", "00200011")


def search(client: RetryingClient, path: str, params: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The results of a QIDO-RS search ``path`` (under the base URL); none for 204 and for
    404 on a path under ``/studies/{uid}`` (no such study)."""
    url = client.url + path
    with client.request("GET", url, params=params, headers={"Accept": QIDO_ACCEPT}) as response:
        content = response.read(MAX_QIDO_BYTES) if response.status != 204 else b""
        if response.status == 204 or (response.status == 404 and path.startswith("/studies/")):
            return []
        response.raise_for_upstream(response.summary(content))
        if not 200 <= response.status < 300:
            raise UpstreamMisconfigured(f"{url}: {response.summary(content)}")
    if not content.strip():
        return []
    try:
        results = json.loads(content)
    except ValueError:
        raise UpstreamMisconfigured(f"{url}: the answer is not JSON") from None
    if not isinstance(results, list):
        raise UpstreamMisconfigured(f"{url}: the answer is not a list of results")
    return [r for r in results if isinstance(r, dict)]


def value(item: dict[str, Any], tag: str) -> Any:
    return qido.first_value(item, tag)


def number(item: dict[str, Any], tag: str) -> float:
    """An IS value (a number or, from some servers, a string) for sorting; missing ones last."""
    try:
        return float(str(value(item, tag)).strip())
    except ValueError:
        return float("inf")


def study_of(client: RetryingClient, series: str) -> str | None:
    found = search(client, "/series", {"SeriesInstanceUID": series, "includefield": STUDY_UID})
    uids = [value(item, STUDY_UID) for item in found if value(item, SERIES_UID) in (series, None)]
    return next((str(uid) for uid in uids if uid), None)


def series_of(client: RetryingClient, study: str) -> list[str]:
    """The study's series, by SeriesNumber."""
    found = search(client, f"/studies/{study}/series", {"includefield": SERIES_NUMBER})

    found.sort(key=lambda item: (number(item, SERIES_NUMBER), str(value(item, SERIES_UID))))
    return [str(value(item, SERIES_UID)) for item in found if value(item, SERIES_UID)]
