"""Where stored instances go: one model per destination type (``folder``, ``archive``,
``dimse``, ``dicomweb``, ``static``), on the settings every destination has (workers, batches,
duplicates, retry, probes)."""

from __future__ import annotations

import re
import string
from typing import Annotated, Literal, get_args

from pydantic import Field, field_validator
from pydicom.datadict import keyword_dict

from bridge.config.errors import hint
from bridge.config.nodes import HttpPeer
from bridge.config.units import parse_size
from bridge.config.values import ByteSize, Duration, Model

# The lossless syntaxes a static tree's frames may be written in (bridge.static.recompress).
Recompress = Literal["jpeg-ls", "rle", "jpeg2000-lossless"]
RECOMPRESS_SYNTAXES: tuple[str, ...] = get_args(Recompress)

# The first path segments the daemon's HTTP server answers itself (bridge.api.app).
RESERVED_HTTP_PATHS = ("api", "metrics", "healthz", "readyz", "version", "docs", "redoc", "openapi.json")


class RetryOverride(Model):
    initial: Duration | None = None
    max: Duration | None = None
    max_attempts: int | None = Field(None, ge=1)
    max_age: Duration | None = None


class Batch(Model):
    max_instances: int = Field(50, ge=1, description="instances per send")
    max_bytes: ByteSize = Field(parse_size("64MiB"), ge=1, description="bytes per send")
    linger: Duration = Field(0.0, description="after a quiet spell, wait this long for more before sending")


def _local_batch() -> Batch:
    # Local destinations are not waited for by anyone, and batching them keeps their
    # queue commits (each an fsync) from competing with intake's, image by image.
    return Batch(linger=0.25)


Duplicates = Literal["supersede", "keep-first", "keep-both"]


class DestinationBase(Model):
    workers: int = Field(1, ge=1, le=64, description="concurrent sends")
    duplicates: Duplicates = Field(
        "supersede",
        description="the same SOP Instance UID with new content: supersede, keep-first or keep-both",
    )
    priority: int = Field(0, description="higher is claimed first")
    batch: Batch = Field(default_factory=Batch)
    retry: RetryOverride = Field(default_factory=RetryOverride)
    idle_close: Duration = Field(60.0, description="close connections after this long without work")
    probe_every: Duration = Field(5.0, ge=0, description="while backing off, ask the destination this often "
                                  "whether it answers again (C-ECHO, HTTP OPTIONS, a file written); 0: never")


class FolderDestination(DestinationBase):
    """Part-10 files under a path template of tags: ``/srv/{StudyInstanceUID}/{SeriesInstanceUID}``."""

    type: Literal["folder"]
    batch: Batch = Field(default_factory=_local_batch)
    path: str = Field(description="folder template; {Keyword} is replaced by the sanitised tag value")
    filename: str = Field("{SOPInstanceUID}.dcm", description="file name template")

    @field_validator("path", "filename")
    @classmethod
    def _keywords(cls, value: str) -> str:
        try:
            names = [name for _, name, spec, _ in string.Formatter().parse(value) if name is not None]
        except ValueError as exc:
            raise ValueError(f"bad template: {exc}") from None
        unknown = [n for n in names if not n or keyword_dict.get(n) is None]
        if unknown:
            hints = "".join(hint(n, list(keyword_dict)) for n in unknown[:1])
            raise ValueError(f"unknown DICOM keyword {unknown[0]!r} in template{hints}")
        return value


class ArchiveDestination(DestinationBase):
    """The local archive: original Part-10 files plus an SQLite index (the `local` source)."""

    type: Literal["archive"]
    batch: Batch = Field(default_factory=_local_batch)
    path: str | None = Field(None, description="defaults to <data_dir>/archive")

    @field_validator("duplicates")
    @classmethod
    def _one_per_uid(cls, value: str) -> str:
        if value == "keep-both":
            raise ValueError("the archive keeps one instance per SOP Instance UID: use supersede or keep-first")
        return value


class DimseDestination(DestinationBase):
    """C-STORE to a DIMSE peer named in ``nodes``."""

    type: Literal["dimse"]
    node: str = Field(description="the name of a node in `nodes`")


class DicomwebDestination(DestinationBase, HttpPeer):
    """STOW-RS to ``{url}/studies``, many instances per request."""

    type: Literal["dicomweb"]


class StaticDestination(DestinationBase):
    """A static DICOMweb tree under ``path`` (docs/static.md), for web viewers."""

    type: Literal["static"]
    batch: Batch = Field(default_factory=_local_batch)
    path: str = Field(description="the tree's root folder")
    recompress: Recompress | None = Field(
        None, description="write native and lossless JPEG 2000 frames in this lossless syntax (docs/static.md)")
    serve: str | None = Field(
        None, description="serve the tree read-only at this path of the daemon's HTTP server, e.g. /static/viewer "
                          "(absent: not served; 'dicom-bridge serve-static' serves any tree)")

    @field_validator("serve")
    @classmethod
    def _url_path(cls, value: str | None) -> str | None:
        if value is None:
            return None
        path = value.rstrip("/")
        if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", path) or any(s in (".", "..") for s in path.split("/")):
            raise ValueError(f"{value!r} is not a URL path: /name[/name...], of letters, digits and . _ ~ -")
        if path.split("/")[1] in RESERVED_HTTP_PATHS:
            raise ValueError(f"{value!r}: /{path.split('/')[1]} is the daemon's own "
                             f"(taken: {', '.join('/' + p for p in RESERVED_HTTP_PATHS)})")
        return path

    @field_validator("duplicates")
    @classmethod
    def _one_per_uid(cls, value: str) -> str:
        if value == "keep-both":
            raise ValueError("a static tree holds one instance per SOP Instance UID: use supersede or keep-first")
        return value


DestinationConfig = Annotated[
    FolderDestination | ArchiveDestination | DimseDestination | DicomwebDestination | StaticDestination,
    Field(discriminator="type"),
]
