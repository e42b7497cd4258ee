"""``type: archive``: the local archive, original Part-10 files plus an SQLite index.

Files are hard-linked from the spool (same file system, already fsynced), so keeping
an instance costs a directory entry, not a copy. An instance a rule modifies for the
archive is written as its modified copy instead (a link would be the original), filed
and indexed under the copy's values: UIDs, patient and study keys, size and hash.

A full disk, or an index that cannot be opened or written, makes the archive
unavailable (``UpstreamUnavailable``: it backs off, its rows are not charged) until
it can be written again; it is never an error of the instances.
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

from bridge.archive.index import ArchiveIndex
from bridge.config import ArchiveDestination as ArchiveConfig
from bridge.dataset.dicomfile import attributes, read_header
from bridge.destinations.folder import FileDestination
from bridge.errors import InboundError, UpstreamUnavailable
from bridge.model import SpooledInstance

LAYOUT = "{StudyInstanceUID}/{SeriesInstanceUID}"


class ArchiveDestination(FileDestination):
    link = True

    def __init__(self, name: str, config: ArchiveConfig, default_root: Path) -> None:
        root = Path(config.path) if config.path else default_root
        super().__init__(name, f"{root}/{LAYOUT}", "{SOPInstanceUID}.dcm", config.duplicates)
        self.index: ArchiveIndex | None = None

    def open(self) -> None:
        if self.index is None:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                self.index = ArchiveIndex(self.root / "index.sqlite")
            except OSError as exc:
                raise UpstreamUnavailable(f"cannot create the archive {self.root}: {exc.strerror}") from exc
            except sqlite3.Error as exc:
                raise UpstreamUnavailable(f"archive index: {_reason(exc)}") from exc

    def close(self) -> None:
        if self.index is not None:
            self.index.close()
            self.index = None

    def after_batch(self, written: list[tuple[SpooledInstance, Path]]) -> None:
        entries = []
        for instance, path in written:
            if not instance.attributes:  # not read at intake (e.g. a row queued by an older version)
                try:
                    instance = replace(instance, attributes=attributes(read_header(path)))
                except InboundError:
                    pass  # intake parsed it; only a file changed behind our back gets here
            entries.append((instance, path))
        assert self.index is not None, "open() comes before send()"
        try:
            self.index.add(entries)
        except Exception as exc:
            raise UpstreamUnavailable(f"archive index: {_reason(exc)}") from exc

    def abandon(self, written: list[tuple[SpooledInstance, Path]]) -> None:
        """With ``keep-first``, a file left in the archive would make the batch's retry
        take it for a duplicate and never index it: remove what this batch placed (it
        placed only files that were not there). ``supersede`` places them again anyway."""
        if self.duplicates != "keep-first":
            return
        for _, path in written:
            try:
                path.unlink()
            except OSError:
                pass  # gone already, or unwritable: the retry's own error says why


def _reason(exc: BaseException) -> str:
    if getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL":
        return "out of space (database or disk is full)"
    return str(exc)
