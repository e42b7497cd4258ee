"""What the queue does when SQLite fails under it: a write lock held too long by another
connection (``dicom-bridge queue``, a backup), an error in the middle of a transaction."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from peers import REPO

# Run in a child process under strace: whether a commit reaches the disk is a question of
# which system calls SQLite makes, not of any setting the queue holds.
_LOCKED_THEN_DURABLE = textwrap.dedent("""
    import os, sqlite3, sys
    sys.path.insert(0, os.getcwd())  # this worktree's bridge
    from datetime import UTC, datetime
    from pathlib import Path
    from bridge.model import SpooledInstance
    from bridge.forward.queue import Queue, Route

    path = Path(sys.argv[1])
    queue = Queue(path, busy_timeout=0.05)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # holds the write lock past the busy timeout
    try:
        queue.claim("out", 10, 1 << 20)  # a claim's commit is not durable: it fails in BEGIN
    except sqlite3.OperationalError as exc:
        print("claim failed:", exc)
    else:
        sys.exit("the claim did not fail")
    other.execute("ROLLBACK")
    instance = SpooledInstance(
        spool_path=Path("/spool/1.dcm"), size=1, sha256="a" * 64, sop_class_uid="1.2", sop_instance_uid="1.2.3",
        study_uid="1.2.3.1", series_uid="1.2.3.2", transfer_syntax="1.2.840.10008.1.2.1", calling_ae="CT",
        called_ae="BRIDGE", peer="127.0.0.1", received_at=datetime.now(UTC))
    os.access("/MARK-durable-commit-starts", os.F_OK)
    queue.enqueue(instance, [Route("out")])  # intake's commit: on disk when it returns
    os.access("/MARK-durable-commit-ends", os.F_OK)
""")


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to see the fsyncs")
def test_a_failed_begin_leaves_the_next_durable_commit_durable(tmp_path: Path) -> None:
    """A non-durable transaction (a claim) whose BEGIN fails must not leave the connection
    without its fsyncs: the next commit of intake is still synced to disk before it returns."""
    script = tmp_path / "locked.py"
    script.write_text(_LOCKED_THEN_DURABLE)
    trace = tmp_path / "trace"
    result = subprocess.run(
        ["strace", "-f", "-y", "-o", str(trace), "-e", "trace=fsync,fdatasync,access,faccessat,faccessat2",
         sys.executable, str(script), str(tmp_path / "queue.sqlite")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    if "ptrace" in result.stderr and result.returncode != 0:
        pytest.skip(f"strace cannot trace here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "claim failed: database is locked" in result.stdout
    lines = trace.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "MARK-durable-commit-starts" in line)
    end = next(i for i, line in enumerate(lines) if "MARK-durable-commit-ends" in line)
    synced = [line for line in lines[start:end] if "sync(" in line and "queue.sqlite-wal" in line]
    assert synced, "the commit did not sync the WAL:\n" + "\n".join(lines[start:end])

