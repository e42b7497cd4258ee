"""``type: archive``: the local archive, original Part-10 files plus an SQLite index.

Files are hard-linked from the spool (same file system, already fsynced), so keeping
an instance costs a directory entry, not a copy. An instance a rule modifies for the
archive is written as its modified copy instead (a link would be the original), filed
and indexed under the copy's values: UIDs, patient and study keys, size and hash.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from bridge.archive import ArchiveIndex
from bridge.config import ArchiveDestination as ArchiveConfig
from bridge.destinations.folder import FileDestination
from bridge.dicomfile import attributes, read_header
from bridge.errors import DestinationUnavailable, IntakeError
from bridge.model import SpooledInstance

LAYOUT = "{StudyInstanceUID}/{SeriesInstanceUID}"


class ArchiveDestination(FileDestination):
    link = True

    def __init__(self, name: str, config: ArchiveConfig, default_root: Path) -> None:
        root = Path(config.path) if config.path else default_root
        super().__init__(name, f"{root}/{LAYOUT}", "{SOPInstanceUID}.dcm", config.duplicates)
        self.root.mkdir(parents=True, exist_ok=True)
        self.index: ArchiveIndex | None = None

    def open(self) -> None:
        if self.index is None:
            self.index = ArchiveIndex(self.root / "index.sqlite")

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
                except IntakeError:
                    pass  # intake parsed it; only a file changed behind our back gets here
            entries.append((instance, path))
        assert self.index is not None, "open() comes before send()"
        try:
            self.index.add(entries)
        except Exception as exc:
            raise DestinationUnavailable(f"archive index: {exc}") from exc
