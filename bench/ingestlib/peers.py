"""The peers of the benchmark, as subprocesses on loopback: DCMTK tools and the bridge.

DCMTK tools are taken from /usr/bin explicitly: pynetdicom installs Python scripts with
the same names (storescu, echoscu, ...) earlier on PATH. Every DCMTK tool runs with
TCP_NODELAY=1 in its environment; without it each DIMSE message waits ~40 ms (Nagle).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DCMTK_DIR = Path("/usr/bin")
REPO = Path(__file__).resolve().parents[2]
BRIDGE_AE = "BRIDGE"


class BenchError(RuntimeError):
    """A peer misbehaved: the measurement is void."""


# -- plumbing ------------------------------------------------------------------------


def dcmtk(tool: str) -> str:
    return str(DCMTK_DIR / tool)


def dcmtk_missing() -> list[str]:
    """The DCMTK tools the benchmark needs that are not installed."""
    return [t for t in ("storescu", "storescp", "echoscu") if not (DCMTK_DIR / t).exists()]


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    """A free loopback port (bind port 0, let the kernel choose)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; ``BenchError`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def echo(port: int, called_ae: str = "ANY-SCP") -> bool:
    """Whether a C-ECHO to ``port`` succeeds."""
    proc = subprocess.run(
        [dcmtk("echoscu"), "-aet", "BENCH", "-aec", called_ae, "127.0.0.1", str(port)],
        env=dcmtk_env(), capture_output=True, timeout=30,
    )
    return proc.returncode == 0


def count_files(folder: Path, pattern: str = "*") -> int:
    return sum(1 for p in folder.glob(pattern) if p.is_file()) if folder.is_dir() else 0


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 60) -> int | None:
    """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code after SIGTERM
    (None when it had to be killed)."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


# -- storescu ------------------------------------------------------------------------

_RESPONSE = re.compile(r"Received Store Response \(([^)]*)\)")


@dataclass
class StoreRun:
    seconds: float  # wall time of the storescu process
    returncode: int
    statuses: list[str]  # storescu's text of each C-STORE response status, in order
    output: str

    def check(self, expected: int, target: str) -> None:
        """``BenchError`` unless storescu exited 0 and got Success for every instance."""
        successes = self.statuses.count("Success")
        if self.returncode != 0 or successes != expected:
            others = sorted(set(self.statuses) - {"Success"})
            tail = "\n".join(self.output.splitlines()[-15:])
            raise BenchError(
                f"storescu to {target}: exit {self.returncode}, {successes}/{expected} Success"
                f"{' (other statuses: ' + ', '.join(others) + ')' if others else ''}\n{tail}"
            )


def storescu(port: int, files: Sequence[Path], called_ae: str) -> StoreRun:
    """Send ``files`` over one association and time it (process start to exit)."""
    args = [dcmtk("storescu"), "-v", "-aet", "BENCH", "-aec", called_ae, "127.0.0.1", str(port),
            *map(str, files)]
    start = time.perf_counter()
    proc = subprocess.run(args, env=dcmtk_env(), capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    return StoreRun(seconds, proc.returncode, _RESPONSE.findall(output), output)


# -- storescp ------------------------------------------------------------------------


class StoreSCP:
    """DCMTK storescp writing every instance into ``folder`` (its default: no fsync)."""

    def __init__(self, folder: Path, log: Path) -> None:
        self.folder = folder
        self.log = log
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [dcmtk("storescp"), "--output-directory", str(self.folder), str(self.port)],
                env=dcmtk_env(), stdout=log, stderr=subprocess.STDOUT,
            )
        wait_for(self._ready, 30, "storescp to answer C-ECHO", interval=0.05)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise BenchError(f"storescp exited with {self.proc.returncode}: {self.log.read_text()}")
        return echo(self.port)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=10)

    def received(self) -> int:
        return count_files(self.folder)


# -- the bridge ----------------------------------------------------------------------


def bridge_config(workdir: Path, port: int, deliver: bool = True) -> dict[str, Any]:
    """One archive destination; with ``deliver=False`` it lingers an hour before its first
    batch, so the run measures intake alone, with no delivery competing for the GIL."""
    archive: dict[str, Any] = {"type": "archive"}
    if not deliver:
        archive["batch"] = {"linger": "1h"}
    return {
        "ae_title": BRIDGE_AE,
        "listen": {"host": "127.0.0.1", "port": port},
        "data_dir": str(workdir / "data"),
        "spool": {"min_free": "64MiB"},
        "destinations": {"archive": archive},
        "rules": [{"name": "all", "store": ["archive"]}],
    }


class Bridge:
    """``python3 -m bridge run --config CFG`` as a subprocess, optionally under a profiler.

    ``profile_to``: write a thread-aware cProfile of the daemon there, timed by
    ``clock`` (see ``ingestlib.threadprof``; plain ``python3 -m cProfile`` sees only the
    main thread, which just sleeps in ``serve_forever``).
    """

    def __init__(self, workdir: Path, profile_to: Path | None = None, clock: str = "wall",
                 deliver: bool = True, config: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.config = bridge_config(workdir, self.port, deliver)
        if config is not None:  # other destinations and rules (bench/forward)
            self.config.update(config)
        self.config_path = workdir / "bridge.yaml"
        self.log = workdir / "bridge.log"
        self.profile_to = profile_to
        self.clock = clock
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None

    @property
    def archive(self) -> Path:
        return Path(self.config["data_dir"]) / "archive"

    def command(self) -> list[str]:
        run = ["-m", "bridge", "run", "--config", str(self.config_path)]
        if self.profile_to is None:
            return [sys.executable, *run]
        return [sys.executable, "-m", "ingestlib.threadprof", "--clock", self.clock,
                "-o", str(self.profile_to), *run]

    def __enter__(self) -> Bridge:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "bench")])}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.command(), cwd=REPO, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
        wait_for(self._ready, 60, "the bridge to answer C-ECHO", interval=0.1)
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise BenchError(f"the bridge exited with {self.proc.returncode}:\n{self.tail()}")
        return echo(self.port, BRIDGE_AE)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.exit_code = stop_process(self.proc, timeout=90)

    def archived(self) -> int:
        """Instances delivered to the archive: ``archive/<study>/<series>/<sop>.dcm``."""
        return count_files(self.archive, "*/*/*.dcm")

    def wait_archived(self, expected: int, timeout: float = 300) -> None:
        try:
            wait_for(lambda: self.archived() >= expected, timeout, "delivery", interval=0.2)
        except BenchError:
            raise BenchError(f"only {self.archived()}/{expected} instances reached {self.archive} "
                             f"within {timeout:.0f}s:\n{self.tail()}") from None

    def queued(self) -> int:
        """Rows in the bridge's queue (each a durably acknowledged instance)."""
        import sqlite3

        db = sqlite3.connect(self.workdir / "data" / "queue.sqlite", timeout=30)
        try:
            return int(db.execute("SELECT count(*) FROM queue").fetchone()[0])
        finally:
            db.close()

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])
