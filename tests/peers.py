"""Real peers for the tests: DCMTK tools and the daemon itself, as subprocesses on loopback.

DCMTK tools are taken from /usr/bin: pynetdicom installs Python scripts with the same
names (storescu, echoscu, ...) that come earlier on a virtualenv's PATH. Every DCMTK
tool gets TCP_NODELAY=1 (DCMTK leaves Nagle on otherwise: ~40 ms per message).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import forkserver
import yaml

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dcmtk(tool: str) -> str:
    for folder in ("/usr/bin", "/usr/local/bin"):
        path = Path(folder) / tool
        if path.exists():
            return str(path)
    found = shutil.which(tool)
    if not found:
        raise FileNotFoundError(f"DCMTK {tool} is not installed (apt-get install dcmtk)")
    return found


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def run_dcmtk(tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk(tool), *args], env=dcmtk_env(), capture_output=True, text=True, timeout=timeout
    )


def spool_data(data_dir: Path) -> list[Path]:
    """Files in the bridge's spool that hold instances: its shards and ``incoming/``, not
    ``spool/free/`` (files kept for reuse, which no row needs)."""
    spool = data_dir / "spool"
    return sorted(p for p in spool.glob("*/*") if p.parent.name != "free" and p.is_file())


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def fill(disk: Path, leave: int) -> Path:
    """Write a filler file on ``disk`` until only about ``leave`` bytes are free."""
    filler = disk / "filler"
    st = os.statvfs(disk)
    with open(filler, "ab") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


@dataclass
class StoreResult:
    returncode: int
    statuses: list[int]  # one DIMSE status per C-STORE response, in order
    output: str


_STATUS = re.compile(r"Received Store Response \((.*)\)")
# How DCMTK's storescu -v names the statuses it knows (dcmnet's DU_cstoreStatusString).
_STATUS_NAMES = {
    "Success": 0x0000,
    "Refused: OutOfResources": 0xA700,
    "Refused: SOPClassNotSupported": 0x0122,
    "Error: CannotUnderstand": 0xC000,
    "Error: DataSetDoesNotMatchSOPClass": 0xA900,
    "Warning: CoercionOfDataElements": 0xB000,
    "Warning: DataSetDoesNotMatchSOPClass": 0xB007,
    "Warning: ElementsDiscarded": 0xB006,
}


def _status(text: str) -> int:
    if text in _STATUS_NAMES:
        return _STATUS_NAMES[text]
    if m := re.search(r"0x([0-9a-fA-F]+)", text):
        return int(m.group(1), 16)
    raise AssertionError(f"unknown storescu status text: {text!r}")


def storescu(port: int, files: Sequence[Path], calling_ae: str = "STORESCU", called_ae: str = "ANY-SCP",
             extra: Sequence[str] = (), timeout: float = 300) -> StoreResult:
    """Send ``files`` in one association; return the status of every response."""
    args = ["-v", "--no-halt", "-aet", calling_ae, "-aec", called_ae, *extra, "127.0.0.1", str(port), *map(str, files)]
    proc = run_dcmtk("storescu", *args, timeout=timeout)
    output = proc.stdout + proc.stderr
    statuses = []
    for line in output.splitlines():
        if m := _STATUS.search(line):
            statuses.append(_status(m.group(1)))
    return StoreResult(proc.returncode, statuses, output)


def echoscu(port: int, calling_ae: str = "ECHOSCU", called_ae: str = "ANY-SCP",
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return run_dcmtk("echoscu", "-v", "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port),
                     timeout=timeout)


class StoreSCP:
    """DCMTK ``storescp`` as a remote PACS: receives into ``folder``, logs verbosely.

    ``options`` go to storescp as they are, e.g. ``+xa`` (accept every syntax it knows),
    ``+xi`` (implicit VR little endian only) or ``--refuse`` (reject every association).
    """

    def __init__(self, workdir: Path, *options: str, aet: str = "STORESCP") -> None:
        self.folder = workdir / "received"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.aet = aet
        self.options = options
        self.log_path = workdir / "storescp.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> StoreSCP:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "-v", "-aet", self.aet, "-od", str(self.folder), *self.options, str(self.port)],
            env=dcmtk_env(), stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()

        def listening() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"storescp exited with {self.proc.returncode}:\n{self.log()}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, timeout, "storescp to listen", interval=0.05)
        return self

    def stop(self, timeout: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def associations(self) -> int:
        """Associations storescp has acknowledged so far."""
        return self.log().count("Association Acknowledged")


class Bridge:
    """The daemon as a subprocess (``forkserver``), with a YAML config written for it."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = config.setdefault("listen", {}).setdefault("port", free_port())
        config["listen"].setdefault("host", "127.0.0.1")
        config.setdefault("data_dir", str(workdir / "data"))
        config.setdefault("spool", {}).setdefault("min_free", "16MiB")
        self.config = config
        self.config_path = workdir / "config.yaml"
        self.log_path = workdir / "bridge.log"
        self.write_config()
        self.proc: Any = None  # a forkserver.BridgeProcess, or a subprocess.Popen
        self._log_from = 0  # where log() starts reading (skip_log)

    @property
    def data_dir(self) -> Path:
        return Path(self.config["data_dir"])

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config))

    def start(self, timeout: float = 30) -> Bridge:
        with open(self.log_path, "ab") as log:
            self.proc = forkserver.spawn(["run", "--config", str(self.config_path)], stdout=log,
                                         stderr=subprocess.STDOUT)

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"bridge exited with {self.proc.returncode}:\n{self.log()}")
            result = echoscu(self.port, timeout=10)
            # a rejection is an answer too: the listener is up (tests of allow-lists)
            return result.returncode == 0 or "Association Rejected" in result.stdout + result.stderr

        wait_for(ready, timeout, "the bridge to answer C-ECHO", interval=0.1)
        return self

    def log(self) -> str:
        """What the daemon has logged (since ``skip_log``)."""
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(self._log_from)
            return f.read().decode(errors="replace")

    def skip_log(self) -> None:
        """``log()`` leaves out what was logged so far: a test of a daemon that earlier
        tests used reads only its own lines."""
        self._log_from = self.log_path.stat().st_size if self.log_path.exists() else 0

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"bridge did not stop within {timeout}s after SIGTERM:\n{self.log()}") from None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def _queue(self) -> Any:
        """The daemon's queue, opened beside it as ``dicom-bridge queue`` opens it."""
        from bridge.forward.queue import Queue

        return Queue(self.data_dir / "queue.sqlite", busy_timeout=10)

    def queue_states(self) -> dict[str, int]:
        """Rows by state, read from the daemon's queue database."""
        queue = self._queue()
        try:
            states: dict[str, int] = {}
            for (_, state), count in queue.counts().items():
                states[state] = states.get(state, 0) + count
            return states
        finally:
            queue.close()

    def queue_rows(self, destination: str | None = None) -> list[dict[str, Any]]:
        """Queue rows (of one destination, or all) in arrival order, as dicts of the row's
        fields and its instance's."""
        queue = self._queue()
        try:
            rows = queue.rows(destination, limit=1_000_000)
        finally:
            queue.close()
        return [{**vars(row.instance), **{k: v for k, v in vars(row).items() if k != "instance"}} for row in rows]

    def destination_state(self, name: str) -> tuple[str, str]:
        """(state, reason) the daemon published for a destination; ('', '') before it did."""
        queue = self._queue()
        try:
            found = queue.destination_states().get(name)
        finally:
            queue.close()
        return (found["state"], found["reason"] or "") if found else ("", "")

ORTHANC = "/usr/sbin/Orthanc"
ORTHANC_DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class Orthanc:
    """A private Orthanc with its DICOMweb plugin, on free ports, its storage in ``workdir``.

    Orthanc 1.10 cannot bind its HTTP or DICOM server to loopback only (no bind address
    setting before 1.11): it listens on every interface, so ``RemoteAccessAllowed: false``
    keeps other hosts out of its REST API. ``users`` turns HTTP basic authentication on;
    ``lua`` is the text of a Lua script (e.g. an ``IncomingHttpRequestFilter``).
    """

    def __init__(self, workdir: Path, users: dict[str, str] | None = None, lua: str | None = None,
                 aet: str = "ORTHANC", extra: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.headers = headers or {}  # sent with every REST request of the tests (e.g. a bearer token)
        workdir.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.aet = aet
        self.users = users
        config: dict[str, Any] = {
            "Name": f"test-{self.http_port}",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(users),
            "RegisteredUsers": users or {},
            "Plugins": [ORTHANC_DICOMWEB],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StorageCompression": False,
            "SaveJobs": False,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
        }
        if lua is not None:
            (workdir / "filter.lua").write_text(lua)
            config["LuaScripts"] = [str(workdir / "filter.lua")]
        config.update(extra or {})
        self.config_path = workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.log_path = workdir / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, timeout: float = 60) -> Orthanc:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen([ORTHANC, str(self.config_path)], cwd=self.workdir, env=dcmtk_env(),
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"Orthanc exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.get("/system", timeout=2)
            except urllib.error.HTTPError:
                return True  # an answer all the same (e.g. a Lua filter's 403)
            except OSError:
                return False
            return True

        wait_for(ready, timeout, "Orthanc to answer /system", interval=0.1)
        return self

    def stop(self) -> None:
        """SIGKILL: nothing of a test's Orthanc is kept, and a clean stop takes seconds."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _open(self, path: str, timeout: float) -> Any:
        request = urllib.request.Request(self.url + path, headers=self.headers)
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        return urllib.request.urlopen(request, timeout=timeout)

    def get(self, path: str, timeout: float = 30) -> Any:
        """JSON from Orthanc's REST API (as the first registered user, if any)."""
        with self._open(path, timeout) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str, timeout: float = 60) -> bytes:
        with self._open(path, timeout) as response:
            return bytes(response.read())

    def instance_uids(self) -> dict[str, str]:
        """SOP Instance UID -> Orthanc's id of every instance it holds."""
        found = {}
        for orthanc_id in self.get("/instances"):
            tags = self.get(f"/instances/{orthanc_id}/simplified-tags")
            found[tags["SOPInstanceUID"]] = orthanc_id
        return found

    def count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])


def on_a_terminal(args: Sequence[str], env: dict[str, str] | None = None,
                  timeout: float = 60) -> tuple[int, bytes, str]:
    """``python -m bridge *args`` with its standard error on a terminal 100 columns wide
    (a new pty has none, and tqdm draws nothing in 0 columns), as a user runs it: its exit
    status, what the terminal showed, and its standard output."""
    import fcntl
    import pty
    import struct
    import sys
    import termios

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "bridge", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the child has closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    assert proc.stdout is not None
    output = proc.stdout.read().decode()
    return proc.wait(timeout), shown, output
