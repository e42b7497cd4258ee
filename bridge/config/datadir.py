"""The layout of ``data_dir``: the one place that names what lives where in it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataDir:
    """The folders and files under ``data_dir`` (README.md, "Data directory"). They must
    share one file system: a received file is taken into the spool by a rename, and the
    archive hard-links spooled files."""

    root: Path

    @property
    def spool(self) -> Path:
        """Spooled instances, in shards ``00`` to ``ff`` (``bridge.forward.spool``)."""
        return self.root / "spool"

    @property
    def incoming(self) -> Path:
        """Files being received or copied in, and the copies destinations write for one
        send; what is left there is removed at start."""
        return self.spool / "incoming"

    @property
    def free(self) -> Path:
        """Delivered spool files kept for the next instances to be written into."""
        return self.spool / "free"

    @property
    def queue(self) -> Path:
        """The delivery queue's SQLite database."""
        return self.root / "queue.sqlite"

    @property
    def archive(self) -> Path:
        """The ``archive`` destination's files and index, unless it names a ``path``."""
        return self.root / "archive"
