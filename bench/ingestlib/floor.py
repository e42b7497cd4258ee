"""The durable floor: what writing and fsyncing the same bytes costs, without any DICOM."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from bridge.forward.spool import fsync_dir


def write_fsync(folder: Path, contents: Sequence[bytes]) -> float:
    """Seconds to make each of ``contents`` a durable file in ``folder``, one after another.

    Per file, as the bridge must before it may acknowledge that instance: write it,
    fsync the file, fsync the folder (so the new directory entry is durable too).
    """
    folder.mkdir(parents=True, exist_ok=True)
    fsync_dir(folder.parent)
    start = time.perf_counter()
    for number, data in enumerate(contents):
        fd = os.open(folder / f"{number:04d}.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(folder)
    return time.perf_counter() - start
