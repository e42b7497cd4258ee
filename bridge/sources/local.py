"""``local``: queries answered from the local archive's index (``bridge.archive.index``),
and retrievals from the archive's own files.

Each ``find`` and ``locate`` reads through a read-only connection of its own, opened
when it starts and closed when it ends or is closed early (a C-CANCEL): queries never
wait for each other, and the archive's writes never wait for a query (WAL: a reader's
snapshot does not block the writer). What one query answers is the index as it was when
the query began. An index that does not exist yet (nothing archived yet) answers no
matches, truly; one that cannot be read answers ``UpstreamUnavailable`` with the reason,
as does a page that takes longer than the source's ``find_timeout``. Each read of the
index is timed in ``dicom_bridge_upstream_request_seconds{source="local",
operation="index"}``, and each that fails counts in ``dicom_bridge_upstream_errors``.

A record carries the attributes the query names (matching and return keys) that the
index keeps or computes at its level and the levels above (ModalitiesInStudy, the Number
of ... Related counts), an attribute the instances did not have as an empty element;
and the unique keys of its level and those above (IssuerOfPatientID with PatientID).
Text is as intake decoded it; person names are ``PersonName``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import TypeVar

from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.valuerep import IS, PersonName

from bridge.archive.index import ArchiveIndex, IndexTimeout
from bridge.archive.matching import COLUMNS, COMPUTED
from bridge.config.sources import FIND_TIMEOUT, LOCAL
from bridge.dataset.query import Query
from bridge.errors import UpstreamUnavailable
from bridge.metrics import Metrics
from bridge.model import InstanceRef, Retrieved

# (tag, VR) of each attribute a record may carry, looked up once.
_ELEMENTS = {keyword: (int(Tag(keyword)), dictionary_VR(keyword)) for keyword in (*COLUMNS, *COMPUTED)}

T = TypeVar("T")


class LocalSource:
    """The archive's index at ``index_path`` (``<archive>/index.sqlite``)."""

    name = LOCAL

    def __init__(self, index_path: Path, metrics: Metrics, find_timeout: float = FIND_TIMEOUT) -> None:
        self.index_path = index_path
        self.metrics = metrics
        self.find_timeout = find_timeout
        metrics.add_source(self.name, ("index",))

    def find(self, query: Query) -> Iterator[Dataset]:
        """The records at ``query.level`` that the index matches, as they are read."""
        names = {k.keyword for k in query.keys}  # what was asked for (with the unique keys)
        with closing(self._pages(lambda index: index.find(query.level, query.matching, names))) as pages:
            for page in pages:
                for row in page:
                    yield _record(row)

    def locate(self, query: Query) -> Iterator[InstanceRef]:
        """Every instance of the records ``query`` names at its level (keys of that level
        and above), with its SOP Class UID: by study, series and SOP Instance UID."""
        with closing(self._pages(lambda index: index.locate(query.level, query.matching))) as pages:
            for page in pages:
                for study, series, sop_instance, sop_class in page:
                    yield InstanceRef(study, series, sop_instance, sop_class)

    def retrieve(self, refs: Sequence[InstanceRef]) -> Iterator[Retrieved]:
        """The archive's own files, as they are (never temporary: the caller only reads
        them). An instance the index no longer has, or whose file is gone, is a failure
        with the reason."""
        if not refs:
            return
        if not self.index_path.exists():
            for ref in refs:
                yield Retrieved(ref, failure="the archive holds nothing yet")
            return
        index = self._open()
        try:
            for ref in refs:
                started = time.monotonic()
                try:
                    row = index.instance(ref.sop_instance_uid)
                except sqlite3.Error as exc:
                    self._failed()
                    raise UpstreamUnavailable(f"source {self.name}: cannot read the archive index: {exc}") from exc
                finally:
                    self.metrics.upstream_latency.labels(self.name, "index").observe(time.monotonic() - started)
                if row is None:
                    yield Retrieved(ref, failure="not in the archive (removed since it was located)")
                elif not Path(row["path"]).is_file():
                    yield Retrieved(ref, failure=f"the archive's file {row['path']} is missing")
                else:
                    yield Retrieved(ref, path=Path(row["path"]), temporary=False)
        finally:
            index.close()

    def close(self) -> None:
        """Nothing to release: each query closes its own connection."""

    def _pages(self, pages_of: Callable[[ArchiveIndex], Generator[list[T], None, None]]
               ) -> Generator[list[T], None, None]:
        """The pages ``pages_of`` reads from the index, each timed; the connection closed
        however the caller stops (a generator closed early runs the ``finally``)."""
        if not self.index_path.exists():
            return  # nothing archived yet
        index = self._open()
        pages = pages_of(index)
        try:
            while True:
                started = time.monotonic()
                try:
                    page = next(pages, None)
                except IndexTimeout as exc:
                    self._failed()
                    raise UpstreamUnavailable(f"source {self.name}: {exc}") from exc
                except sqlite3.Error as exc:
                    self._failed()
                    raise UpstreamUnavailable(f"source {self.name}: cannot read the archive index: {exc}") from exc
                finally:
                    self.metrics.upstream_latency.labels(self.name, "index").observe(time.monotonic() - started)
                if page is None:
                    return
                yield page
        finally:
            pages.close()
            index.close()

    def _failed(self) -> None:
        self.metrics.upstream_errors.labels(self.name, "index").inc()

    def _open(self) -> ArchiveIndex:
        try:
            return ArchiveIndex(self.index_path, readonly=True, timeout=self.find_timeout)
        except (sqlite3.Error, OSError) as exc:
            self._failed()
            raise UpstreamUnavailable(
                f"source {self.name}: cannot open the archive index {self.index_path}: {exc}") from exc


def _record(row: dict[str, str | int | None]) -> Dataset:
    """A row of the index as a data set: text as stored, person names as ``PersonName``,
    numbers (IS) as ``IS`` where they are numbers, multi-valued attributes as lists,
    empty values as empty elements."""
    ds = Dataset()
    for keyword, stored in row.items():
        tag, vr = _ELEMENTS[keyword]
        value: object = stored
        if stored is None or stored == "":
            value = None
        elif vr == "PN":
            value = PersonName(str(stored))
        elif vr == "IS":
            value = _number(stored)
        elif isinstance(stored, str) and "\\" in stored:
            value = stored.split("\\")
        # The values were read and checked by intake: pydicom's conversion and validation of
        # each would be most of the cost of a record.
        ds.add(DataElement(tag, vr, value, already_converted=True, validation_mode=config.IGNORE))
    return ds


def _number(value: str | int) -> IS | str:
    try:
        return IS(value)
    except (ValueError, TypeError):
        return str(value)  # as stored, if it is not a number
