"""``dicom-bridge convert``: files and folders into a static DICOMweb tree, run as a user
runs it (a subprocess), its summary, exit status and peak memory."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import forkserver
import numpy as np
from corpus import ct_series, with_uid, write_ct
from peers import REPO, on_a_terminal
from pydicom.uid import generate_uid

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def convert(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return forkserver.run(["convert", *map(str, args)], env=ENV, timeout=timeout)


def gz(path: Path) -> Any:
    return json.loads(gzip.decompress(path.read_bytes()))


def test_folders_recursive_summary_and_failures(tmp_path: Path) -> None:
    study = generate_uid()
    inputs = tmp_path / "in"
    ct_series(inputs / "a", 3, study_uid=study)
    ct_series(inputs / "deeper" / "b", 2, study_uid=study)
    single = ct_series(tmp_path / "single", 1)[0]
    (inputs / "README.txt").write_text("not DICOM")
    bad = with_uid(single, inputs / "bad.dcm", SOPInstanceUID="1.2.x")
    out = tmp_path / "tree"

    result = convert(inputs, single, "-o", out)
    assert result.returncode == 1, result.stderr
    assert result.stdout.strip() == "6 instances added, 0 unchanged, 2 studies, 1 errors, 1 skipped (not DICOM)"
    assert f"{bad}: failed: invalid SOPInstanceUID '1.2.x'" in result.stderr
    assert f"{inputs / 'README.txt'}: skipped: not DICOM" in result.stderr
    assert "Traceback" not in result.stderr
    [query] = gz(out / "studies" / study / "index.json.gz")
    assert query["00201208"]["Value"] == [5]
    assert len(gz(out / "studies" / "index.json.gz")) == 2

    bad.unlink()
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    again = convert(inputs, single, "-o", out)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "0 instances added, 6 unchanged, 2 studies, 0 errors, 1 skipped (not DICOM)"
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == before


def test_missing_input_and_no_progress_bar_off_a_terminal(tmp_path: Path) -> None:
    [one] = ct_series(tmp_path / "ct", 1)
    result = convert(one, tmp_path / "nothere", "-o", tmp_path / "tree")
    assert result.returncode == 1
    assert f"{tmp_path / 'nothere'}: no such file or folder" in result.stderr
    assert "file/s" not in result.stderr and "%|" not in result.stderr
    assert result.stdout.startswith("1 instances added")


def test_a_large_folder_converts_in_bounded_memory(tmp_path: Path) -> None:
    """About 300 MB of input (300 CT images of 1 MB, one series) under 250 MB peak RSS."""
    inputs = tmp_path / "big"
    inputs.mkdir()
    study, series = generate_uid(), generate_uid()
    rng = np.random.default_rng(7)
    base = rng.integers(0, 4096, (1024, 512), dtype=np.uint16)
    for n in range(300):
        write_ct(inputs / f"{n:04d}.dcm", study, series, n + 1, np.roll(base, n, axis=0))
    size = sum(p.stat().st_size for p in inputs.iterdir())
    assert size > 300 * 1000 * 1000
    proc = subprocess.Popen([sys.executable, "-m", "bridge", "convert", str(inputs), "-o", str(tmp_path / "tree")],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the largest child's so far
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read() if proc.stderr else ""
    assert proc.stdout is not None and proc.stdout.read().decode().startswith("300 instances added")
    peak_mb = usage.ru_maxrss / 1024
    assert peak_mb < 250, f"peak RSS {peak_mb:.0f} MB"
    metadata = gz(tmp_path / "tree" / "studies" / study / "series" / series / "metadata.gz")
    assert len(metadata) == 300


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    files = ct_series(tmp_path / "ct", 3)
    code, shown, _ = on_a_terminal(["convert", *map(str, files), "-o", str(tmp_path / "t")], env=ENV)
    assert code == 0
    assert b"3/3" in shown and b"100%" in shown
