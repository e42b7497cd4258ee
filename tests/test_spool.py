"""The hash intake takes while it receives (bridge.spool.HashingTempFile)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from bridge.spool import HASH_LOT, HashingTempFile


@pytest.mark.parametrize("sizes", [[0], [100], [HASH_LOT - 1, 1], [3 << 20, HASH_LOT + 5, 1, HASH_LOT, 7]],
                         ids=["empty", "small", "one-lot", "lots-handed-over"])
def test_the_hash_is_that_of_the_file_however_it_was_written(tmp_path: Path, sizes: list[int]) -> None:
    writer = HashingTempFile(tmp_path)
    for size in sizes:
        writer.write(os.urandom(size))
    writer.file.flush()
    path = Path(writer.name)
    assert HashingTempFile.hash_of(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    writer.close()
