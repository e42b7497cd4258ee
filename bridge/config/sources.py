"""Where queries and retrievals are answered from: one model per source type
(``dicomweb``: QIDO-RS, ``dimse``: a node of the configuration), on the settings every
source has. The local archive is the built-in source ``local``: it is configured as the
one ``type: archive`` destination, not here."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from bridge.config.nodes import HttpPeer
from bridge.config.values import AETitle, Duration, Model

# The name of the built-in source, the local archive's index.
LOCAL = "local"
# A source's find_timeout unless it says otherwise (``local`` has no settings: this one).
FIND_TIMEOUT = 20.0
# A source's retrieve_timeout unless it says otherwise (``local``: this one).
RETRIEVE_TIMEOUT = 60.0


class SourceBase(Model):
    # A requester waits for each C-FIND response only as long as its own DIMSE timeout
    # (often 30 to 60 s): a source must answer, or fail with a status, before that.
    find_timeout: Duration = Field(FIND_TIMEOUT, gt=0, le=600, description="the longest a C-FIND waits for each answer "
                                   "of this source (a QIDO-RS page, a C-FIND response) before it fails")
    # A C-MOVE or C-GET fetches while the requester waits for pending responses, which the
    # service sends as instances arrive: each wait for the next byte of an upstream answer
    # is bounded by this, not the whole retrieval.
    retrieve_timeout: Duration = Field(RETRIEVE_TIMEOUT, gt=0, le=3600, description="the longest a C-MOVE or C-GET "
                                       "waits for the next part of an answer of this source (a WADO-RS response's "
                                       "next bytes, a C-STORE sub-operation) before it gives up on the rest")


class DicomwebSource(SourceBase, HttpPeer):
    """QIDO-RS (PS3.18 10.6) against ``{url}``, with the same HTTP client, authentication,
    TLS and timeouts as a ``dicomweb`` destination."""

    type: Literal["dicomweb"]
    page_size: int = Field(1000, ge=1, le=100_000, description="matches asked for per QIDO-RS request "
                           "(limit); the next page is asked for until the source has no more")


class DimseSource(SourceBase):
    """C-FIND forwarded to a DIMSE peer named in ``nodes``."""

    type: Literal["dimse"]
    node: str = Field(description="the name of a node in `nodes`")
    retrieve: Literal["c-move", "c-get"] = Field("c-move", description="how instances are fetched from the node: "
                                                 "C-MOVE to the bridge itself (under move_destination_ae), or C-GET "
                                                 "on the bridge's own association")
    move_destination_ae: AETitle | None = Field(None, description="the AE title the node C-MOVEs to (the node must "
                                                "know it, at the bridge's listen address); default: ae_title")


SourceConfig = Annotated[DicomwebSource | DimseSource, Field(discriminator="type")]
