#!/usr/bin/env python3
"""C-MOVE benchmark: what moving a series through the bridge (from Orthanc's WADO-RS)
costs a requester, against Orthanc's own C-MOVE (issue 17).

The 200-instance CT series of bench/ingest (512x512, about 0.5 MB each) is loaded into
one Orthanc (DICOMweb plugin on, one storescu association; timed and printed, no part
of a ratio). The requester is DCMTK's movescu, a new process each time (its start is
paid alike on both sides); the move destination is one DCMTK storescp (AE STORESCP,
writing every instance to a folder, no fsync); Orthanc, storescp and movescu run with
TCP_NODELAY=1:

  direct  movescu -S to Orthanc's DIMSE port, STUDY level: Orthanc C-STOREs the series
          to storescp (its DicomModalities name STORESCP);
  bridge  the same movescu to dicom-bridge, which locates the series by QIDO-RS and
          fetches it by WADO-RS from the same Orthanc (a `dicomweb` source,
          `retrieve: [web]`), and C-STOREs it to the same storescp (a `nodes` entry).

Each is timed from movescu's start to its exit, --repeat times, interleaved, the order
swapped every round; the medians and their ratio bridge / direct (goal 1.3 or lower)
are printed. Each run must end with Success and leave every instance in storescp's
folder (emptied before each run), or the benchmark is void.

--rss: then a fresh bridge moves a study of --rss-instances (default 2,000) of the same
CT images, loaded into Orthanc apart, to the same storescp; its peak resident memory
(VmHWM of its process, from start to the end of the move) is printed (goal under
300 MB), with what it was before the move.

    python3 bench/move [--repeat 5] [--instances 200] [--rss] [--rss-instances 2000] [--no-warm]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

from ingestlib import peers  # noqa: E402
from ingestlib.orthanc import Orthanc, orthanc_missing  # noqa: E402
from ingestlib.peers import BenchError, Bridge, StoreSCP  # noqa: E402
from ingestlib.series import cached_series, write_series  # noqa: E402
from ingestlib.warm import warm_memory  # noqa: E402

CACHE = BENCH / ".data"
DESTINATION = "STORESCP"
_FINAL = re.compile(r"Received Final Move Response(?: \(([^)]*)\))?")


# -- the series -----------------------------------------------------------------------


def study_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def rss_study(count: int) -> Path:
    """A folder of ``count`` CT instances of one study, generated once under bench/.data
    (its own study: the 200 of the timed runs are another)."""
    folder = CACHE / f"move-rss-{count}-v1"
    if folder.is_dir() and sum(1 for _ in folder.glob("*.dcm")) == count:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = CACHE / f".{folder.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    print(f"generating {count} CT instances into {folder} (once) ...", flush=True)
    write_series(partial, count)
    partial.rename(folder)
    return folder


def load(orthanc: Orthanc, folder: Path, count: int) -> float:
    """storescu the folder into Orthanc in one association; seconds until Orthanc holds
    ``count`` more instances."""
    before = orthanc.instances()
    started = time.perf_counter()
    proc = subprocess.run([peers.dcmtk("storescu"), "-aet", "BENCH", "-aec", orthanc.ae_title, "+sd", "+r",
                           "127.0.0.1", str(orthanc.dicom_port), str(folder)],
                          env=peers.dcmtk_env(), capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise BenchError(f"storescu to Orthanc: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    peers.wait_for(lambda: orthanc.instances() >= before + count, 600, f"Orthanc to hold {count} more instances")
    return time.perf_counter() - started


# -- the requester --------------------------------------------------------------------


def move(port: int, called_ae: str, study: str, destination: StoreSCP, expected: int) -> float:
    """One movescu of ``study`` to storescp; its seconds, start to exit. ``BenchError``
    unless it ended with Success and storescp holds ``expected`` files."""
    for path in destination.folder.iterdir():
        path.unlink()
    args = [peers.dcmtk("movescu"), "-v", "-S", "-aet", "BENCHMOVE", "-aec", called_ae, "-aem", DESTINATION,
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(port)]
    started = time.perf_counter()
    proc = subprocess.run(args, env=peers.dcmtk_env(), capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - started
    output = proc.stdout + proc.stderr
    final = _FINAL.findall(output)
    if proc.returncode != 0 or final != ["Success"]:
        tail = "\n".join(output.splitlines()[-15:])
        raise BenchError(f"movescu to {called_ae}: exit {proc.returncode}, final {final or 'none'}\n{tail}")
    held = destination.received()
    if held != expected:
        raise BenchError(f"movescu to {called_ae}: storescp holds {held} files, expected {expected}")
    return seconds


@dataclass
class Side:
    name: str
    port: int
    called_ae: str
    times: list[float] = field(default_factory=list)


def vm_hwm(pid: int) -> int:
    """A process's peak resident set size (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmHWM in /proc/{pid}/status")


def orthanc_settings(destination: StoreSCP) -> dict[str, Any]:
    return {"DicomModalities": {DESTINATION: [DESTINATION, "127.0.0.1", destination.port]},
            "DicomAlwaysAllowMove": True}


def bridge_config(orthanc: Orthanc, destination: StoreSCP) -> dict[str, Any]:
    return {"nodes": {DESTINATION: {"host": "127.0.0.1", "port": destination.port}},
            "sources": {"web": {"type": "dicomweb", "url": orthanc.dicomweb}},
            "rules": [{"name": "move", "retrieve": ["web"]}]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="timed moves per side (default 5)")
    parser.add_argument("--instances", type=int, default=200, help="instances of the moved series (default 200)")
    parser.add_argument("--rss", action="store_true", help="also measure the bridge's peak RSS on a big move")
    parser.add_argument("--rss-instances", type=int, default=2000, help="instances of that move (default 2000)")
    parser.add_argument("--workdir", type=Path, help="where peers keep their files (default: a temp folder)")
    parser.add_argument("--no-warm", action="store_true",
                        help="skip touching the free memory first (see ingestlib/warm.py)")
    args = parser.parse_args()
    missing = [t for t in ("storescu", "storescp", "echoscu", "movescu") if not Path(peers.dcmtk(t)).exists()]
    missing += orthanc_missing()
    if missing:
        print(f"missing: {', '.join(missing)} (apt-get install -y dcmtk orthanc orthanc-dicomweb)", file=sys.stderr)
        return 2
    files = cached_series(CACHE, args.instances)
    study = study_uid(files[0])
    big = rss_study(args.rss_instances) if args.rss else None
    if not args.no_warm:
        warmed, took = warm_memory()
        print(f"touched {warmed >> 20} MB of free memory first, in {took:.1f} s (--no-warm to skip)", flush=True)
    root = Path(tempfile.mkdtemp(prefix="move-", dir=args.workdir))
    rss: tuple[int, int, float] | None = None
    try:
        with StoreSCP(root / "received", root / "storescp.log") as destination, \
                Orthanc(root / "orthanc", extra=orthanc_settings(destination)) as orthanc:
            seconds = load(orthanc, files[0].parent, args.instances)
            print(f"loaded {args.instances} instances into Orthanc in {seconds:.1f} s "
                  f"({args.instances / seconds:.0f} instances/s, storescu, one association)", flush=True)
            with Bridge(root / "bridge", config=bridge_config(orthanc, destination)) as bridge:
                direct = Side("direct", orthanc.dicom_port, orthanc.ae_title)
                bridged = Side("bridge", bridge.port, peers.BRIDGE_AE)
                for side in (direct, bridged):  # warm-up, not counted: caches, the first WADO-RS session
                    move(side.port, side.called_ae, study, destination, args.instances)
                for n in range(args.repeat):
                    for side in (direct, bridged) if n % 2 == 0 else (bridged, direct):
                        side.times.append(move(side.port, side.called_ae, study, destination, args.instances))
                    print(f"  round {n + 1}/{args.repeat}: direct {direct.times[-1]:.2f} s, "
                          f"bridge {bridged.times[-1]:.2f} s", flush=True)
            if big is not None:
                seconds = load(orthanc, big, args.rss_instances)
                print(f"loaded {args.rss_instances} more instances into Orthanc in {seconds:.1f} s", flush=True)
                with Bridge(root / "bridge-rss", config=bridge_config(orthanc, destination)) as bridge:
                    assert bridge.proc is not None
                    before = vm_hwm(bridge.proc.pid)
                    took = move(bridge.port, peers.BRIDGE_AE, study_uid(next(big.glob("*.dcm"))), destination,
                                args.rss_instances)
                    rss = (before, vm_hwm(bridge.proc.pid), took)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)

    d, b = statistics.median(direct.times), statistics.median(bridged.times)
    print(f"\nC-MOVE of a {args.instances}-instance series (512x512 CT) to storescp, movescu start to exit, "
          f"medians of {args.repeat}")
    print(f"  movescu -> Orthanc (its own C-MOVE)           {d:6.2f} s  "
          f"({', '.join(f'{t:.2f}' for t in direct.times)})")
    print(f"  movescu -> bridge -> Orthanc (QIDO/WADO-RS)   {b:6.2f} s  "
          f"({', '.join(f'{t:.2f}' for t in bridged.times)})")
    print(f"  bridge / direct = {b / d:5.2f}  (goal 1.3 or lower)")
    if rss is not None:
        before, peak, took = rss
        print(f"\nbridge peak RSS (VmHWM) moving {args.rss_instances} instances: {peak / 2**20:.0f} MB "
              f"(after start: {before / 2**20:.0f} MB; the move took {took:.1f} s)  (goal under 300 MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
