"""Where queries and retrievals are answered from: one model per source type
(``dicomweb``: QIDO-RS, ``dimse``: a node of the configuration), on the settings every
source has. The local archive is the built-in source ``local``: it is configured as the
one ``type: archive`` destination, not here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from bridge.config.nodes import HttpPeer
from bridge.config.values import AETitle, Duration, Model, resolve
from bridge.dataset.uids import is_valid_uid

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


EXPLICIT_LE = "1.2.840.10008.1.2.1"  # servers decompress only when it is offered (docs/reference: rad69)
IMPLICIT_LE = "1.2.840.10008.1.2"


class Rad69Source(SourceBase, HttpPeer):
    """IHE XDS-I.b RAD-69 (Retrieve Imaging Document Set) from an Imaging Document Source
    at ``{url}``, with the HTTP client of the DICOMweb peers (TLS with client
    certificates, authentication, timeouts). RAD-69 cannot query: ``locate`` names the
    source that turns a C-MOVE's or C-GET's identifier into UIDs."""

    type: Literal["rad69"]
    repository_unique_id: str = Field(description="the XDS RepositoryUniqueId every DocumentRequest names "
                                      "(one repository per source)")
    home_community_id: str | None = Field(None, description="the HomeCommunityId each DocumentRequest names "
                                          "(only for an Initiating Imaging Gateway)")
    transfer_syntaxes: list[str] = Field([EXPLICIT_LE, IMPLICIT_LE], min_length=1, description="the transfer "
                                         "syntaxes offered, in order of preference; explicit VR little endian "
                                         "must be among them")
    packaging: Literal["mtom", "plain"] = Field("mtom", description="how the request is sent: MTOM/XOP "
                                                "multipart (the spec) or a plain application/soap+xml body")
    saml_assertion_file: Path | None = Field(None, description="a file holding a SAML assertion (XML), sent in "
                                             "a wsse:Security header")
    batch_size: int = Field(100, ge=1, le=10_000, description="documents asked for per request, at most")
    parallel: int = Field(2, ge=1, le=32, description="requests in flight at once")
    locate: str = Field(description="the source (dicomweb, dimse or local) that locates the instances to retrieve")

    @field_validator("transfer_syntaxes")
    @classmethod
    def _syntaxes(cls, value: list[str]) -> list[str]:
        bad = [uid for uid in value if not is_valid_uid(uid)]
        if bad:
            raise ValueError(f"not a UID: {', '.join(map(repr, bad))}")
        if EXPLICIT_LE not in value:
            raise ValueError(f"explicit VR little endian ({EXPLICIT_LE}) must be offered: servers decompress only "
                             "to a syntax that is")
        return list(dict.fromkeys(value))

    @field_validator("repository_unique_id", "home_community_id")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value.strip() if value is not None else None

    def resolve_paths(self, base: Path) -> None:
        super().resolve_paths(base)
        if self.saml_assertion_file is not None:
            self.saml_assertion_file = resolve(base, self.saml_assertion_file)


SourceConfig = Annotated[DicomwebSource | DimseSource | Rad69Source, Field(discriminator="type")]
