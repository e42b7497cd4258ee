"""Run a module under cProfile in *every* thread, and save the merged statistics.

``python3 -m cProfile`` profiles only the thread that starts it; the bridge's work
happens in pynetdicom's association and DUL threads and in delivery workers. This
wraps ``threading.Thread._bootstrap_inner`` so that each thread gets its own profiler,
then merges them when the module returns (SIGTERM ends the bridge normally)::

    python3 -m ingestlib.threadprof -o OUT.prof -m bridge run --config CFG

Besides ``OUT.prof`` (all threads), it writes ``OUT.prof.<role>`` per kind of thread
(``Association``, ``DULServiceProvider``, ``main``, or the thread name without its
trailing number), so one can look at the intake path alone. ``--clock wall`` (default)
counts elapsed time, ``time.sleep`` and waiting for the GIL included (what a waiting
modality sees); ``--clock cpu`` counts each thread's own CPU time (what the work costs).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import re
import runpy
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

_profiles: list[tuple[threading.Thread, cProfile.Profile]] = []
_lock = threading.Lock()
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def _install(clock: Callable[[], float]) -> None:
    original = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

    def bootstrap_inner(self: threading.Thread) -> None:
        profile = cProfile.Profile(clock)
        with _lock:
            _profiles.append((self, profile))
        profile.enable()
        try:
            original(self)
        finally:
            profile.disable()

    threading.Thread._bootstrap_inner = bootstrap_inner  # type: ignore[attr-defined]


def role(thread: threading.Thread) -> str:
    kind = type(thread).__name__
    if kind != "Thread":
        return kind
    return re.sub(r"[-_]?\d+$", "", thread.name.split(" ")[0]) or "Thread"


def save(main: cProfile.Profile, out: Path) -> None:
    """Merge the finished threads' profiles into ``out`` and ``out.<role>``."""
    groups: dict[str, list[cProfile.Profile]] = defaultdict(list)
    groups["main"].append(main)
    skipped = 0
    with _lock:
        for thread, profile in _profiles:
            if thread.is_alive():  # its profiler is still running: not safe to read
                skipped += 1
                continue
            groups[role(thread)].append(profile)
    every: pstats.Stats | None = None
    for name, profiles in groups.items():
        stats = pstats.Stats(profiles[0])
        for profile in profiles[1:]:
            stats.add(profile)
        stats.dump_stats(f"{out}.{name}")
        every = stats if every is None else every.add(stats)
    assert every is not None
    every.dump_stats(str(out))
    kinds = ", ".join(f"{name} x{len(profiles)}" for name, profiles in groups.items())
    left_out = f"; {skipped} thread(s) still running, left out" if skipped else ""
    print(f"threadprof: wrote {out} ({kinds}{left_out})", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--clock", choices=CLOCKS, default="wall",
                        help="wall: elapsed, sleeps and GIL waits included; cpu: thread CPU time")
    parser.add_argument("-m", dest="module", required=True)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args()
    sys.argv = [options.module, *options.args]
    _install(CLOCKS[options.clock])
    main_profile = cProfile.Profile(CLOCKS[options.clock])
    main_profile.enable()
    try:
        runpy.run_module(options.module, run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
    finally:
        main_profile.disable()
        save(main_profile, options.output)


if __name__ == "__main__":
    main()
