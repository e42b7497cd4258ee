#!/usr/bin/env python3
"""RAD-69 benchmark: the `rad69` source retrieving a series from an Imaging Document
Source, per-series requests against batches in parallel, and against the `dicomweb`
source's WADO-RS retrieve of the same series from Orthanc (issue 19).

The 200-instance CT series of bench/ingest (512x512, about 0.5 MB each, generated once
under bench/.data) is held by two servers, each a process of its own:

  the fake Imaging Document Source of the tests (tests/fakeids.py: Python's
  ThreadingHTTPServer, MTOM answers of the Part-10 files as stored), mode ``ok``;
  Orthanc with its DICOMweb plugin (tests/peers.py, TCP_NODELAY=1), loaded with one
  storescu association (timed and printed, no part of a comparison).

Three variants retrieve the whole series, each by calling the source's
``retrieve(refs)`` directly (refs built from the files' study, series, SOP instance and
SOP class UIDs), each Retrieved checked (no failure; the file's size that of the
original, within 1 KB for Orthanc, which rewrites the file meta group) and its temporary file removed as it arrives:

  rad69 per series   batch_size 1000, parallel 1: one request, one MTOM answer;
  rad69 50 x 4       batch_size 50, parallel 4: four requests of 50, all in flight;
  WADO-RS            the dicomweb source: one series retrieve from Orthanc.

Each is a new Python process (the source built, the refs read, then the retrieve timed
from its call to its last item); its peak resident memory is read from os.wait4's
rusage (ru_maxrss), and its own VmHWM just before the retrieve is reported alongside.
The server's CPU time (utime + stime from /proc/PID/stat, all its threads) during each
run is read too: the fake is pure Python, and a server near one core's worth of CPU
per second of wall time is the limit, not the client. One warm-up run each, then
--repeat rounds, the order turned every round; medians printed.

    python3 bench/rad69 [--repeat 3] [--instances 200] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
REPO = BENCH.parent
TESTS = REPO / "tests"
sys.path[:0] = [str(BENCH), str(REPO), str(TESTS)]

from ingestlib.series import cached_series  # noqa: E402

CACHE = BENCH / ".data"
REPOSITORY = "1.3.6.1.4.1.21367.13.80.110"  # the fake's default RepositoryUniqueId
TICK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A peer or a variant misbehaved: the measurement is void."""


# -- the fake, in a process of its own -------------------------------------------------


def serve_fake(folder: Path) -> int:
    """Hold the series' files and answer RAD-69 until stdin closes; the URL on stdout."""
    from fakeids import FakeImagingDocumentSource

    ids = FakeImagingDocumentSource(repository_unique_id=REPOSITORY)
    ids.hold(sorted(folder.glob("*.dcm"))).start()
    print(ids.url, flush=True)
    sys.stdin.read()
    ids.stop()
    return 0


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU time, all its threads (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime: fields 14 and 15


# -- one retrieve, in a process of its own ---------------------------------------------


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def client(spec_path: Path) -> int:
    """Retrieve the refs of ``spec_path`` with the source it names; JSON on stdout."""
    import resource

    from bridge.config.sources import DicomwebSource as DicomwebConfig
    from bridge.config.sources import Rad69Source as Rad69Config
    from bridge.metrics import Metrics
    from bridge.model import InstanceRef, Source
    from bridge.sources.dicomweb import DicomwebSource
    from bridge.sources.rad69 import Rad69Source

    spec = json.loads(spec_path.read_text())
    temp_dir = Path(spec["temp_dir"])
    refs = [InstanceRef(*r) for r in spec["refs"]]
    sizes: dict[str, int] = spec["sizes"]
    metrics = Metrics()
    source: Any
    if spec["kind"] == "rad69":
        settings = Rad69Config.model_validate({"type": "rad69", "url": spec["url"], "repository_unique_id": REPOSITORY,
                                               "batch_size": spec["batch_size"], "parallel": spec["parallel"],
                                               "locate": "none"})
        source = Rad69Source("ids", settings, cast(Source, _NoLocate()), metrics, temp_dir)
    else:
        source = DicomwebSource("web", DicomwebConfig.model_validate({"type": "dicomweb", "url": spec["url"]}),
                                metrics, temp_dir)
    before = vm_hwm()
    failures: list[str] = []
    got = 0
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    for item in source.retrieve(refs):
        if item is None:
            continue
        if item.path is None:
            failures.append(f"{item.ref.sop_instance_uid}: {item.failure}")
            continue
        size = item.path.stat().st_size
        item.path.unlink()
        slack = 0 if spec["kind"] == "rad69" else 1024  # Orthanc rewrites the file meta group
        if abs(size - sizes[item.ref.sop_instance_uid]) > slack:
            failures.append(f"{item.ref.sop_instance_uid}: {size} bytes, the original has "
                            f"{sizes[item.ref.sop_instance_uid]}")
        got += 1
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    source.close()
    print(json.dumps({"seconds": seconds, "got": got, "failures": failures[:5], "hwm_before": before,
                      "cpu": after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime}))
    return 0


class _NoLocate:
    """The rad69 source's ``locate:`` source: the benchmark gives refs, it locates nothing."""

    def locate(self, query: object) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass


# -- the parent ------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    spec: dict[str, Any]
    server_pid: int
    times: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)
    before: list[int] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)


def run(variant: Variant, root: Path, expected: int) -> tuple[float, int, int, float, float]:
    """One retrieve by a new process: seconds, peak RSS, VmHWM before the retrieve, its CPU
    seconds during the retrieve, and the server's CPU seconds meanwhile."""
    temp_dir = root / "temp"
    shutil.rmtree(temp_dir, ignore_errors=True)
    spec_path = root / "spec.json"
    spec_path.write_text(json.dumps({**variant.spec, "temp_dir": str(temp_dir)}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = root / "client.log"
    with open(log, "w") as err:
        server_before = cpu_seconds(variant.server_pid)
        proc = subprocess.Popen([sys.executable, str(HERE), "--client", str(spec_path)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        server = cpu_seconds(variant.server_pid) - server_before
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise BenchError(f"{variant.name}: exit {code}\n{log.read_text()[-2000:]}")
    result = json.loads(out)
    if result["failures"] or result["got"] != expected:
        raise BenchError(f"{variant.name}: {result['got']} of {expected} instances; {result['failures']}")
    left = list(temp_dir.iterdir()) if temp_dir.exists() else []
    if left:
        raise BenchError(f"{variant.name}: left {len(left)} files in its temporary folder")
    # server CPU over the whole process's life, not only the retrieve: close enough, as
    # neither server works while the client starts
    return result["seconds"], usage.ru_maxrss * 1024, result["hwm_before"], result["cpu"], server


def load_orthanc(orthanc: Any, folder: Path, count: int) -> float:
    from peers import dcmtk, dcmtk_env, wait_for

    started = time.perf_counter()
    proc = subprocess.run([dcmtk("storescu"), "-aet", "BENCH", "-aec", orthanc.aet, "+sd", "+r", "127.0.0.1",
                           str(orthanc.dicom_port), str(folder)], env=dcmtk_env(), capture_output=True, text=True,
                          timeout=3600)
    if proc.returncode != 0:
        raise BenchError(f"storescu to Orthanc: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    wait_for(lambda: orthanc.count() >= count, 600, f"Orthanc to hold {count} instances")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each variant (default 3)")
    parser.add_argument("--instances", type=int, default=200, help="instances of the series (default 200)")
    parser.add_argument("--workdir", type=Path, help="where peers keep their files (default: a temp folder)")
    parser.add_argument("--serve-fake", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--client", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fake:
        return serve_fake(args.serve_fake)
    if args.client:
        return client(args.client)

    from peers import ORTHANC, ORTHANC_DICOMWEB, Orthanc, dcmtk

    missing = [str(p) for p in (ORTHANC, ORTHANC_DICOMWEB) if not Path(p).exists()]
    try:
        dcmtk("storescu")
    except FileNotFoundError:
        missing.append("storescu")
    if missing:
        print(f"missing: {', '.join(missing)} (apt-get install -y dcmtk orthanc orthanc-dicomweb)", file=sys.stderr)
        return 2
    import pydicom

    files = cached_series(CACHE, args.instances)
    folder = files[0].parent
    refs, sizes = [], {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        refs.append([str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                     str(ds.SOPClassUID)])
        sizes[str(ds.SOPInstanceUID)] = path.stat().st_size
    total = sum(sizes.values())
    root = Path(tempfile.mkdtemp(prefix="rad69-", dir=args.workdir))
    fake = subprocess.Popen([sys.executable, str(HERE), "--serve-fake", str(folder)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    orthanc = Orthanc(root / "orthanc")
    try:
        assert fake.stdout is not None
        fake_url = fake.stdout.readline().strip()
        if not fake_url:
            raise BenchError(f"the fake Imaging Document Source did not start (exit {fake.wait()})")
        orthanc.start()
        assert orthanc.proc is not None
        seconds = load_orthanc(orthanc, folder, args.instances)
        print(f"loaded {args.instances} instances into Orthanc in {seconds:.1f} s (storescu, one association)",
              flush=True)
        common = {"refs": refs, "sizes": sizes}
        variants = [
            Variant("rad69, per series (1000 x 1)",
                    {**common, "kind": "rad69", "url": fake_url, "batch_size": 1000, "parallel": 1}, fake.pid),
            Variant("rad69, batches of 50 x 4", {**common, "kind": "rad69", "url": fake_url, "batch_size": 50,
                                                 "parallel": 4}, fake.pid),
            Variant("WADO-RS from Orthanc", {**common, "kind": "dicomweb", "url": orthanc.dicomweb},
                    orthanc.proc.pid),
        ]
        for variant in variants:  # warm-up, not counted: the page cache, Orthanc's
            run(variant, root, args.instances)
        for n in range(args.repeat):
            for variant in variants if n % 2 == 0 else variants[::-1]:
                seconds, peak, before, cpu, server = run(variant, root, args.instances)
                variant.times.append(seconds)
                variant.peaks.append(peak)
                variant.before.append(before)
                variant.cpu.append(cpu)
                variant.server_cpu.append(server)
            print(f"  round {n + 1}/{args.repeat}: "
                  + ", ".join(f"{v.name.split(',')[-1].split(' (')[0].strip()} {v.times[-1]:.2f} s"
                              for v in variants), flush=True)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if fake.stdin is not None:
            fake.stdin.close()
        try:
            fake.wait(10)
        except subprocess.TimeoutExpired:
            fake.kill()
        orthanc.stop()
        shutil.rmtree(root, ignore_errors=True)

    print(f"\nretrieve(refs) of a {args.instances}-instance series (512x512 CT, {total / 2**20:.0f} MB), "
          f"each file removed as it arrives, a new process each, medians of {args.repeat} "
          f"({os.cpu_count()} CPUs)")
    print(f"  {'':30} {'seconds':>7} {'inst/s':>7} {'MB/s':>6} {'peak RSS':>9} {'(before)':>9} "
          f"{'client CPU':>10} {'server CPU':>10} {'srv CPU/wall':>12}")
    for v in variants:
        t, server = statistics.median(v.times), statistics.median(v.server_cpu)
        print(f"  {v.name:30} {t:7.2f} {args.instances / t:7.0f} {total / 2**20 / t:6.0f} "
              f"{statistics.median(v.peaks) / 2**20:6.0f} MB {statistics.median(v.before) / 2**20:6.0f} MB "
              f"{statistics.median(v.cpu):8.2f} s {server:8.2f} s {server / t:12.2f}   "
              f"({', '.join(f'{x:.2f}' for x in v.times)})")
    print("  server CPU: the fake's (Python) for rad69, Orthanc's for WADO-RS, during the client's whole run; "
          "srv CPU/wall near 1.0 means the pure-Python fake, one core under the GIL, sets the pace")
    return 0


if __name__ == "__main__":
    sys.exit(main())
