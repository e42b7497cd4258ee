#!/usr/bin/env python3
"""Static tree benchmark: `dicom-bridge convert` of a CT series into a static DICOMweb
tree, against the floor of reading and writing the same files with pydicom (issue 18).

The 200-instance CT series of bench/ingest (512x512, 12 of 16 bits, about 0.5 MB each,
generated once under bench/.data) is, in each round:

  floor    read with pydicom.dcmread and written with save_as into an empty folder, every
           file, by a new Python process (what any converter must at least do);
  convert  `python3 -m bridge convert SERIES -o TREE` into an empty folder (metadata,
           gzipped frames, the query files);
  convert --recompress SYNTAX (with --recompress): the same, frames in SYNTAX.

Each is a new process, timed from its start to its exit, its peak resident memory taken
from os.wait4's rusage (ru_maxrss); --repeat rounds, interleaved, the order turned every
round. Printed: medians, instances per second, each convert's time over the floor's, the
tree's size over the input's (bytes of the files), and the peak RSS. OHIF's converters
(dicomp10-to-dicomweb, static-wado) publish no instances-per-second figure that can be
checked offline, so the floor stands in for one.

    python3 bench/static [--repeat 3] [--instances 200] [--recompress jpeg-ls]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
REPO = BENCH.parent
sys.path[:0] = [str(BENCH), str(REPO)]

from ingestlib.series import cached_series  # noqa: E402

CACHE = BENCH / ".data"
FLOOR = """\
import sys
from pathlib import Path
import pydicom
source, target = Path(sys.argv[1]), Path(sys.argv[2])
for path in sorted(source.glob("*.dcm")):
    pydicom.dcmread(path).save_as(target / path.name, enforce_file_format=True)
"""


class BenchError(Exception):
    pass


@dataclass
class Side:
    name: str
    command: list[str]
    check: str = ""
    times: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    size: int = 0


def timed(command: list[str], output: Path, log: Path) -> tuple[float, int]:
    """Run ``command`` (``OUT`` replaced by ``output``, emptied first); its seconds, start to
    exit, and its peak RSS in bytes. ``BenchError`` unless it exits 0."""
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    args = [str(output) if a == "OUT" else a for a in command]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(args)}: exit {proc.returncode}\n{log.read_text()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024  # kilobytes on Linux


def size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each (default 3)")
    parser.add_argument("--instances", type=int, default=200, help="instances of the series (default 200)")
    parser.add_argument("--recompress", metavar="SYNTAX", help="also convert with --recompress SYNTAX "
                        "(jpeg-ls, rle, jpeg2000-lossless)")
    parser.add_argument("--workdir", type=Path, help="where outputs are written (default: a temp folder)")
    args = parser.parse_args()
    files = cached_series(CACHE, args.instances)
    series = files[0].parent
    input_size = sum(p.stat().st_size for p in files)
    python = sys.executable
    added = f"{args.instances} instances added, 0 unchanged, 1 studies, 0 errors"
    sides = [Side("floor (pydicom read + write)", [python, "-c", FLOOR, str(series), "OUT"]),
             Side("convert", [python, "-m", "bridge", "convert", str(series), "-o", "OUT"], added)]
    if args.recompress:
        sides.append(Side(f"convert --recompress {args.recompress}",
                          [python, "-m", "bridge", "convert", "--recompress", args.recompress, str(series),
                           "-o", "OUT"], added))
    root = Path(tempfile.mkdtemp(prefix="static-", dir=args.workdir))
    try:
        for n in range(args.repeat):
            for side in sides if n % 2 == 0 else sides[::-1]:
                output, log = root / "out", root / "log"
                seconds, peak = timed(side.command, output, log)
                if side.check and side.check not in log.read_text():
                    raise BenchError(f"{side.name}: expected {side.check!r}, got:\n{log.read_text()[-2000:]}")
                side.times.append(seconds)
                side.peaks.append(peak)
                side.size = size_of(output)
            print(f"  round {n + 1}/{args.repeat}: "
                  + ", ".join(f"{s.name.split(' (')[0]} {s.times[-1]:.2f} s" for s in sides), flush=True)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)

    floor = statistics.median(sides[0].times)
    print(f"\n{args.instances} CT instances (512x512, 16-bit, {input_size / 2**20:.0f} MB), a new process each, "
          f"start to exit, medians of {args.repeat}")
    print(f"  {'':38} {'seconds':>8} {'inst/s':>7} {'/ floor':>8} {'output / input':>15} {'peak RSS':>9}")
    for side in sides:
        t = statistics.median(side.times)
        print(f"  {side.name:38} {t:8.2f} {args.instances / t:7.0f} {t / floor:8.2f} "
              f"{side.size / input_size:15.2f} {max(side.peaks) / 2**20:6.0f} MB   "
              f"({', '.join(f'{x:.2f}' for x in side.times)})")
    print("  OHIF's static-wado and dicomp10-to-dicomweb publish no instances-per-second figure that can be "
          "checked offline: the floor is the comparison.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
