"""``python -m bridge ...`` for the tests, forked from a process that has imported it already.

Every daemon a test starts and every command it runs is a process of its own, as a user
runs it; but starting Python and importing the bridge (pydicom, pynetdicom, FastAPI)
takes about a second, and the tests start a few hundred. So one server process imports
``bridge.cli.main`` and ``bridge.daemon`` once, and forks a child for each: the child
takes the request's standard input, output and error (file descriptors passed over a
Unix socket), its working directory and environment, and runs ``bridge/__main__.py`` as
``python -m bridge`` does: the same ``main()``, the same exit status, the same signals
(the child's dispositions are reset to a fresh interpreter's). The server holds no
thread, no socket but its own and no open file of the bridge's when it forks.

What differs from an exec: the imports happened before the environment was set, so a
module that read the environment when imported would see the server's (none of the
bridge's does); and the child's parent is the server, so ``BridgeProcess`` stands in for
``subprocess.Popen`` (``pid``, ``poll``, ``wait``, ``send_signal``, ``terminate``,
``kill``, ``returncode``). A few tests still exec ``python -m bridge`` themselves (the
embedded default, the systemd protocol, the pynetdicom version check), so the real
start-up stays covered; ``BRIDGE_TESTS_EXEC=1`` makes every one an exec.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
EXEC = os.environ.get("BRIDGE_TESTS_EXEC", "") not in ("", "0")

_FileLike = int | IO[Any] | None


class BridgeProcess:
    """A forked ``python -m bridge``: what the tests use of ``subprocess.Popen``."""

    def __init__(self, args: Sequence[str], pid: int, answer: socket.socket) -> None:
        self.args = list(args)
        self.pid = pid
        self.returncode: int | None = None
        self._answer = answer  # the server writes the exit status here, then closes it

    def _read_status(self, timeout: float | None) -> bool:
        if self.returncode is not None:
            return True
        self._answer.settimeout(timeout)
        try:
            data = self._answer.recv(64)
        except (TimeoutError, BlockingIOError):
            return False
        self._answer.close()
        if not data:
            raise RuntimeError(f"the fork server went away before bridge process {self.pid} ended")
        self.returncode = int(data.decode())
        return True

    def poll(self) -> int | None:
        self._read_status(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._read_status(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # ended and reaped: its pid may be another's by now
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass  # ended just now

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _fd(target: _FileLike, default: int) -> tuple[int, bool]:
    """A file descriptor for ``target`` (and whether it was opened here, to close)."""
    if target is None:
        return default, False
    if target == subprocess.DEVNULL:
        return os.open(os.devnull, os.O_RDWR), True
    if isinstance(target, int):
        return target, False
    return target.fileno(), False


def spawn(args: Sequence[str], cwd: Path | str = REPO, env: dict[str, str] | None = None,
          stdin: _FileLike = None, stdout: _FileLike = None, stderr: _FileLike = None) -> Any:
    """``python -m bridge *args`` as a process of its own, started; a ``BridgeProcess``
    (a ``subprocess.Popen`` with ``BRIDGE_TESTS_EXEC``). ``stdin``, ``stdout`` and
    ``stderr``: None (this process's), ``subprocess.DEVNULL``, a file descriptor or an
    open file; ``stderr`` may be ``subprocess.STDOUT``."""
    if EXEC:
        return subprocess.Popen([sys.executable, "-m", "bridge", *args], cwd=cwd, env=env, stdin=stdin,
                                stdout=stdout, stderr=stderr)
    opened: list[int] = []
    fds = []
    for target, default in ((stdin, 0), (stdout, 1)):
        fd, mine = _fd(target, default)
        fds.append(fd)
        if mine:
            opened.append(fd)
    if stderr == subprocess.STDOUT:
        fds.append(fds[1])
    else:
        fd, mine = _fd(stderr, 2)
        fds.append(fd)
        if mine:
            opened.append(fd)
    try:
        return _server().spawn(args, str(cwd), dict(os.environ if env is None else env), fds)
    finally:
        for fd in opened:
            os.close(fd)


def run(args: Sequence[str], cwd: Path | str = REPO, env: dict[str, str] | None = None,
        stdin: _FileLike = None, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m bridge *args`` to its end, its output captured as text: what
    ``subprocess.run(..., capture_output=True, text=True)`` returns."""
    if EXEC:
        return subprocess.run([sys.executable, "-m", "bridge", *args], cwd=cwd, env=env, stdin=stdin,
                              capture_output=True, text=True, timeout=timeout)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = spawn(args, cwd, env, stdin, out_w, err_w)
    finally:
        os.close(out_w)
        os.close(err_w)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    deadline = None if timeout is None else time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        for fd in chunks:
            selector.register(fd, selectors.EVENT_READ)
        try:
            while selector.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    proc.kill()
                    proc.wait()
                    raise subprocess.TimeoutExpired(proc.args, timeout or 0)
                for key, _ in selector.select(left):
                    data = os.read(key.fd, 65536)
                    if data:
                        chunks[key.fd].append(data)
                    else:
                        selector.unregister(key.fd)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                code = proc.wait(left)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise
        finally:
            os.close(out_r)
            os.close(err_r)
    return subprocess.CompletedProcess(["python", "-m", "bridge", *args], code,
                                       _text(b"".join(chunks[out_r])), _text(b"".join(chunks[err_r])))


def _text(data: bytes) -> str:
    """As ``text=True`` decodes: the locale's encoding, universal newlines."""
    return data.decode(errors="strict").replace("\r\n", "\n").replace("\r", "\n")


# -- the client's side of the server ------------------------------------------------------------


class _Server:
    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="bridge-fork-", dir="/tmp")  # sun_path: 108 bytes at most
        self.path = os.path.join(self.folder, "socket")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                                   f"import forkserver; forkserver.serve({self.path!r})"],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not os.path.exists(self.path):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the fork server exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("the fork server did not start within 60 s")
            time.sleep(0.01)

    def spawn(self, args: Sequence[str], cwd: str, env: dict[str, str], fds: list[int]) -> BridgeProcess:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        conn.connect(self.path)
        request = json.dumps({"args": list(args), "cwd": cwd, "env": env}).encode()
        socket.send_fds(conn, [request], fds)
        answer = conn.recv(64)
        if not answer:
            conn.close()
            raise RuntimeError("the fork server did not start the process")
        return BridgeProcess(args, int(answer.decode()), conn)

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the server ends when its standard input does
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for name in os.listdir(self.folder):
            os.unlink(os.path.join(self.folder, name))
        os.rmdir(self.folder)


_started: _Server | None = None
_starting = threading.Lock()


def _server() -> _Server:
    global _started
    with _starting:
        if _started is None or _started.proc.poll() is not None:
            _started = _Server()
            atexit.register(_started.stop)
        return _started


# -- the server ---------------------------------------------------------------------------------


def serve(path: str) -> None:
    """Import the bridge, then fork a ``python -m bridge`` for each request on ``path``,
    and answer each with its pid, then its exit status; end when standard input does."""
    import bridge.cli.main  # noqa: F401 - what every command imports
    import bridge.daemon  # noqa: F401 - and what ``run`` imports besides

    assert threading.active_count() == 1, "a thread in the fork server: forking it would copy its locks"
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path + ".new")
    listener.listen(64)
    os.rename(path + ".new", path)  # the client waits for the name: listening by then
    children: dict[int, socket.socket] = {}
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    selector.register(0, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fd == 0:
                if not os.read(0, 4096):
                    return
            elif key.fd == wake_r:
                os.read(wake_r, 4096)
            else:
                conn, _ = listener.accept()
                try:
                    message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
                except OSError:
                    conn.close()
                    continue
                if len(fds) != 3:
                    for fd in fds:
                        os.close(fd)
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    _child(json.loads(message), fds, [listener.fileno(), wake_r, wake_w, selector.fileno(),
                                                      conn.fileno(), *(c.fileno() for c in children.values())])
                for fd in fds:
                    os.close(fd)
                conn.sendall(str(pid).encode())
                children[pid] = conn
        while children:  # reap whatever ended
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(str(os.waitstatus_to_exitcode(status)).encode())
                except OSError:
                    pass  # the test went away without waiting
                conn.close()


def _child(request: dict[str, Any], fds: list[int], server_fds: list[int]) -> None:
    """In the forked child: become ``python -m bridge *args``; never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        for fd in server_fds:
            os.close(fd)
        # stdin, stdout, stderr: dup2 through fresh copies, since one may already be 0, 1 or 2
        copies = [os.dup(fd) for fd in fds]
        for fd in set(fds):
            os.close(fd)
        for target, fd in enumerate(copies):
            os.dup2(fd, target)
        for fd in copies:
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["-m", *request["args"]]
        code = _run_main()
    finally:
        os._exit(code)


def _run_main() -> int:
    """``bridge/__main__.py`` run as ``python -m bridge`` runs it, and the interpreter's
    exit: its status, non-daemon threads waited for, atexit functions, streams flushed."""
    import runpy
    import traceback

    try:
        runpy.run_module("bridge", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    threading._shutdown()  # type: ignore[attr-defined] - as the interpreter does at exit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    return code & 0xFF if code >= 0 else code

