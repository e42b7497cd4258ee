"""bench/push and bench/pull: ``dicom-bridge dicomweb push`` and ``pull`` against
dicomweb-client's own ``store_instances`` (in batches) and ``iter_series``, on one
Orthanc, in one run (issue 20).

Each side is a new process, timed from its start to its exit, its peak resident memory
taken from os.wait4's rusage (ru_maxrss); --repeat rounds, interleaved, the order turned
every round. Before each push the study is deleted from Orthanc (REST API), so both sides
store the series afresh; for pull, Orthanc holds the series once and each side writes
into an empty folder.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import requests

from ingestlib.orthanc import Orthanc, orthanc_missing
from ingestlib.peers import BenchError
from ingestlib.series import cached_series

BENCH = Path(__file__).resolve().parent.parent
REPO = BENCH.parent
CACHE = BENCH / ".data"

STORE = """\
import sys
from pathlib import Path
import pydicom
from dicomweb_client.api import DICOMwebClient
url, folder, batch = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
client = DICOMwebClient(url)
files = sorted(folder.glob("*.dcm"))
for start in range(0, len(files), batch):
    client.store_instances([pydicom.dcmread(p) for p in files[start:start + batch]])
"""
ITER = """\
import sys
from pathlib import Path
from dicomweb_client.api import DICOMwebClient
url, study, series, out = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
client = DICOMwebClient(url)
for n, ds in enumerate(client.iter_series(study, series)):
    ds.save_as(out / f"file{n:06d}.dcm", enforce_file_format=True)
"""


@dataclass
class Side:
    name: str
    command: list[str]
    times: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)


def timed(command: list[str], output: Path, log: Path) -> tuple[float, int]:
    """Run ``command`` (``OUT`` replaced by ``output``, emptied first); seconds, start to
    exit, and peak RSS in bytes. ``BenchError`` unless it exits 0."""
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    args = [str(output) if a == "OUT" else a for a in command]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise BenchError(f"{' '.join(args)}: exit {code}\n{log.read_text()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024  # kilobytes on Linux


def delete_study(orthanc: Orthanc, study: str) -> None:
    found = requests.post(f"{orthanc.url}/tools/lookup", data=study, timeout=30).json()
    for item in found:
        if item.get("Type") == "Study":
            requests.delete(f"{orthanc.url}/studies/{item['ID']}", timeout=60).raise_for_status()


def main(kind: str, doc: str) -> int:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each (default 3)")
    parser.add_argument("--instances", type=int, default=200, help="instances of the series (default 200)")
    parser.add_argument("--batch", type=int, default=50, help="instances per STOW-RS request (push; default 50)")
    parser.add_argument("--workdir", type=Path, help="where Orthanc and outputs live (default: a temp folder)")
    args = parser.parse_args()
    if missing := orthanc_missing():
        print(f"benchmark skipped: missing {', '.join(missing)}", file=sys.stderr)
        return 1
    files = cached_series(CACHE, args.instances)
    folder = files[0].parent
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    size = sum(p.stat().st_size for p in files)
    python = sys.executable
    root = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=args.workdir))
    try:
        with Orthanc(root / "orthanc") as orthanc:
            url = orthanc.dicomweb
            before: Callable[[], None]
            if kind == "push":
                sides = [Side("dicomweb-client store_instances", [python, "-c", STORE, url, str(folder),
                                                                  str(args.batch)]),
                         Side("dicom-bridge dicomweb push", [python, "-m", "bridge", "dicomweb", "push",
                                                             str(folder), "--url", url, "--batch", str(args.batch),
                                                             "--parallel", "1"])]

                def before() -> None:
                    delete_study(orthanc, study)
            else:
                timed([python, "-m", "bridge", "dicomweb", "push", str(folder), "--url", url], root / "seed",
                      root / "seed.log")
                sides = [Side("dicomweb-client iter_series", [python, "-c", ITER, url, study, series, "OUT"]),
                         Side("dicom-bridge dicomweb pull", [python, "-m", "bridge", "dicomweb", "pull", "--study",
                                                             study, "--series", series, "--url", url,
                                                             "--no-study-folder", "-o", "OUT"])]

                def before() -> None:
                    pass
            for n in range(args.repeat):
                for side in sides if n % 2 == 0 else sides[::-1]:
                    before()
                    output = root / "out"
                    if kind == "pull":  # the command refuses an existing series folder
                        shutil.rmtree(output, ignore_errors=True)
                    seconds, peak = timed(side.command, output, root / "log")
                    if kind == "push" and orthanc.instances() != args.instances:
                        raise BenchError(f"{side.name}: Orthanc holds {orthanc.instances()} instances")
                    if kind == "pull":
                        got = sum(1 for p in output.rglob("*.dcm"))
                        if got != args.instances:
                            raise BenchError(f"{side.name}: {got} files written")
                    side.times.append(seconds)
                    side.peaks.append(peak)
                print(f"  round {n + 1}/{args.repeat}: "
                      + ", ".join(f"{s.name} {s.times[-1]:.2f} s" for s in sides), flush=True)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = statistics.median(sides[0].times)
    print(f"\n{kind}: {args.instances} CT instances (512x512, 16-bit, {size / 2**20:.0f} MB) over DICOMweb to a "
          f"local Orthanc, a new process each, start to exit, medians of {args.repeat}")
    print(f"  {'':34} {'seconds':>8} {'inst/s':>7} {'ratio':>6} {'peak RSS':>9}")
    for side in sides:
        t = statistics.median(side.times)
        print(f"  {side.name:34} {t:8.2f} {args.instances / t:7.0f} {t / base:6.2f} "
              f"{max(side.peaks) / 2**20:6.0f} MB   ({', '.join(f'{x:.2f}' for x in side.times)})")
    return 0
