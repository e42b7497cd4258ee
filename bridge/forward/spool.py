"""The spool: durable Part-10 files waiting for their destinations.

Layout under ``<data_dir>/spool`` (``bridge.config.DataDir`` names the folders):
``incoming/`` holds files still being received (pynetdicom writes C-STORE data sets
there, on the same file system, so taking a file into the spool is a rename); ``00``..
``ff`` hold spooled files named by the daemon, never by the dataset; ``free/`` holds
delivered files kept for the next instances to be written into (see ``Spool.recycle``).
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import logging
import os
import secrets
import shutil
import sys
import tempfile
import threading
import weakref
from concurrent import futures
from pathlib import Path
from typing import IO, Any

from bridge.config.datadir import DataDir

LOGGER = logging.getLogger(__name__)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A file's data and what reading it back needs (its size, its blocks), without its
# timestamps: a recycled file overwritten in place to the same length costs no inode
# write. (macOS has no fdatasync.)
_datasync = getattr(os, "fdatasync", os.fsync)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _datasync(fd)
    finally:
        os.close(fd)


def _sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux), which the os module does not offer; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Have the kernel start writing the file's dirty pages to the disk now, without
    waiting for them (``sync_file_range(SYNC_FILE_RANGE_WRITE)``: no flush, no promise
    of durability). Intake calls it when an instance is complete: the disk writes it
    while the header is parsed and hashed, and the fsync that makes it durable then
    waits for what is left. Only a hint: a no-op where the call is missing or fails."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# SHA-256 of what intake receives. An instance's last (or only) lot is hashed by the
# thread that takes the file into the spool, while the disk writes the file (its
# writeback started when the message was complete, see HashingTempFile.seal); larger
# instances hand each full lot of ``HASH_LOT`` bytes to this thread meanwhile, so
# hashing a 2 GB multi-frame does not hold up its receipt. hashlib releases the GIL on
# large buffers. A thread hop for every instance or fragment costs more than it saves
# once the cores are busy (docs/performance.md).
_HASHER = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
HASH_LOT = 8 << 20


class HashingTempFile:
    """A NamedTemporaryFile that hashes what is written to it.

    pynetdicom writes a received C-STORE data set through this object (see
    ``bridge.dimse.listener``), so the content hash costs no second read of the file. The
    chunks written must not change afterwards: they are hashed later, in lots
    (pynetdicom writes ``bytes``; the P-DATA fast path in ``bridge.dimse.pynetdicom_overrides``
    views of received PDU buffers that nothing writes to again).

    Writing never raises: a write that fails (a full disk, an I/O error) is remembered
    (``write_error``), and the file written no further and emptied at once, giving back
    its space. pynetdicom goes on receiving the message into it, so the association
    stays in step, and intake answers the complete C-STORE with 0xA700 and removes the
    file (an exception would reach pynetdicom's network thread, which aborts the
    association). pynetdicom flushes through ``.file``, which is this object for that.
    """

    _open: weakref.WeakValueDictionary[str, HashingTempFile] = weakref.WeakValueDictionary()
    _hashed: futures.Future[None] | None = None
    error: OSError | None = None  # the first write that failed

    def __init__(self, directory: Path, suffix: str = ".dcm", reuse: str | None = None) -> None:
        """A new file in ``directory``; or, with ``reuse``, that existing file's path (a
        file the spool recycled), written over from its start: ``seal`` cuts what it held
        beyond the new content."""
        self._stale = 0  # bytes of the recycled file's old content, until sealed
        self._sealed = False
        if reuse is None:
            self._file: IO[bytes] = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed by pynetdicom
                delete=False, mode="wb", suffix=suffix, dir=directory
            )
            self.name = self._file.name
            buffered = self._file.file  # type: ignore[attr-defined]
        else:
            # Not truncated on opening: its blocks are written over, not freed and
            # allocated again (see Spool.recycle).
            self._file = buffered = open(reuse, "r+b")  # noqa: SIM115 - closed by pynetdicom
            self.name = reuse
            self._stale = os.fstat(self._file.fileno()).st_size
        self._write = buffered.write  # the raw file's, not the wrapper's (one Python call less)
        self._flush = buffered.flush
        self.digest = hashlib.sha256()
        self._lot: list[bytes] = []
        self._lot_bytes = 0
        HashingTempFile._open[self.name] = self

    def write(self, data: bytes) -> int:
        self._lot.append(data)
        self._lot_bytes += len(data)
        if self._lot_bytes >= HASH_LOT:
            self._hand_over()
        try:
            return self._write(data)
        except OSError as exc:
            self._failed(exc)
            return len(data)

    @property
    def file(self) -> HashingTempFile:
        """pynetdicom flushes through ``file.flush()``: through ``flush``, which catches
        errors. (A property: an attribute would make a cycle, freed only by the collector.)"""
        return self

    def flush(self) -> None:
        try:
            self._flush()
        except OSError as exc:
            self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        """A write failed: remember why, write and hash nothing more, and empty the file
        so that what it held is free for other instances now, not when the message ends."""
        if self.error is None:
            self.error = exc
        self.write = len  # type: ignore[method-assign,assignment]  # "written", and dropped
        self.flush = _nothing  # type: ignore[method-assign]
        self._lot, self._lot_bytes, self._stale = [], 0, 0
        try:
            os.ftruncate(self._file.fileno(), 0)
        except (OSError, ValueError):
            pass  # closed already, or cannot be cut: intake removes it all the same

    @classmethod
    def write_error(cls, path: Path) -> OSError | None:
        """Why writing to ``path`` through this class failed, if it did (a dict look-up)."""
        writer = cls._open.get(str(path))
        return writer.error if writer else None

    @classmethod
    def unwritable(cls, path: str, exc: OSError) -> HashingTempFile:
        """A file that could not even be created (``exc``): everything written to it is
        dropped and ``write_error(path)`` says why, so the C-STORE that would have been
        received into it is answered like one whose write failed."""
        self = cls.__new__(cls)
        self._file = io.BytesIO()  # no descriptor: _failed has nothing to empty
        self.name = path
        self._sealed = True
        self.digest = hashlib.sha256()
        self._failed(exc)
        HashingTempFile._open[path] = self
        return self

    def _hand_over(self) -> None:
        if self._lot:
            if self._hashed is not None:
                # One lot hashing, one gathering: a receiver faster than the hash waits
                # here rather than holding ever more of the instance in memory.
                self._hashed.result()
            self._hashed = _HASHER.submit(_update_all, self.digest, self._lot)
            self._lot, self._lot_bytes = [], 0

    def _finish(self) -> None:
        """Hash what is left, here, after the lots handed over (in order)."""
        if self._hashed is not None:
            self._hashed.result()
            self._hashed = None
        if self._lot:
            _update_all(self.digest, self._lot)
            self._lot, self._lot_bytes = [], 0

    def hexdigest(self) -> str:
        """SHA-256 of everything written so far."""
        self._finish()
        return self.digest.hexdigest()

    def seal(self) -> None:
        """Everything is written: flush, cut a recycled file's old content beyond it, and
        start the disk writing it (``start_writeback``). Intake calls this when a message
        is complete (``bridge.dimse.pynetdicom_overrides``), before anything reads the file;
        ``close`` calls it too."""
        if self._sealed:
            return
        self._sealed = True
        self.flush()
        if self.error is not None:
            return
        if self._stale:
            end = self._file.tell()
            if end < self._stale:
                try:
                    os.ftruncate(self._file.fileno(), end)
                except OSError as exc:
                    self._failed(exc)
                    return
            self._stale = 0
        start_writeback(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self.seal()
        try:
            self._file.close()  # closed even when its last flush fails
        except OSError as exc:
            if self.error is None:
                self.error = exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    @classmethod
    def hash_of(cls, path: Path) -> str | None:
        """The hash of what has been written to ``path`` through this class, if it was."""
        writer = cls._open.get(str(path))
        return writer.hexdigest() if writer else None


def _nothing() -> None:
    pass


def _update_all(digest: Any, chunks: list[bytes]) -> None:
    for chunk in chunks:
        digest.update(chunk)


# Delivered files kept in ``free/`` for new instances, at most. Each instance's file would
# otherwise be created on receipt and removed on delivery: on ext4 without a journal,
# creating a file scans past every inode freed in the last minutes (for the bridge and
# for a PACS writing beside it), and on any file system an inode reused costs less than
# one freed and allocated again (docs/performance.md).
# PostgreSQL recycles its WAL segments for the same reason.
FREE_MAX = 256
# Of those, files whose blocks are kept (their old content, never read again, is written
# over by the next instance): at most this many bytes in all; the others are emptied.
# Blocks written over cost no allocation on receipt, no freeing (a discard, on a file
# system mounted with it) on delivery, and their fdatasync no metadata write
# (docs/performance.md has the figures).
RETAIN_BYTES = 64 << 20


class Spool:
    def __init__(self, data_dir: DataDir) -> None:
        self.root = data_dir.spool
        self._root = str(self.root)
        self.incoming = data_dir.incoming
        self.free = data_dir.free
        self._incoming, self._free_dir = str(self.incoming), str(self.free)
        # (name, bytes kept) of the files in free/ (only the daemon's Spool, after open())
        self._free: list[tuple[str, int]] = []
        self._retained = 0  # the sum of those bytes
        self._free_lock = threading.Lock()

    def open(self) -> None:
        """Create the layout; remove what aborted associations left in ``incoming``."""
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.free.mkdir(exist_ok=True)
        for shard in range(256):
            (self.root / f"{shard:02x}").mkdir(exist_ok=True)
        fsync_dir(self.root)
        leftovers = list(self.incoming.iterdir())
        for path in leftovers:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)  # not ours to have made, but in our folder
            else:
                path.unlink(missing_ok=True)
        if leftovers:
            LOGGER.info("removed %d partial file(s) left by interrupted associations", len(leftovers))
        # Only plain files with no other name are reused: never a symbolic link, which
        # would be written through, nor a file another name links to. A crash between the
        # renames that move a file out of free/ and into a shard can leave its old name
        # in free/ beside its new one (on a file system without a journal, once fsck has
        # counted the links), and writing into it would overwrite a spooled instance.
        free: list[tuple[str, int]] = []
        linked: list[tuple[str, int]] = []
        for entry in os.scandir(self.free):
            if entry.is_file(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                (free if st.st_nlink == 1 else linked).append((entry.name, st.st_size))
        free.sort()
        for name, _ in linked + free[FREE_MAX:]:
            os.unlink(os.path.join(self._free_dir, name))
        if linked:
            LOGGER.warning("spool/free: %d file(s) had another name as well (left by a crash); their names in "
                           "free/ were removed, the files kept", len(linked))
        kept, retained = [], 0
        for name, size in free[:FREE_MAX]:
            if retained + size > RETAIN_BYTES:
                os.truncate(os.path.join(self._free_dir, name), 0)
                size = 0
            kept.append((name, size))
            retained += size
        with self._free_lock:
            self._free, self._retained = kept, retained

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def new_temp(self) -> HashingTempFile:
        """A file in ``incoming/`` to receive an instance: a recycled one if there is one."""
        with self._free_lock:
            name, size = self._free.pop() if self._free else (None, 0)
            self._retained -= size
        if name is not None:
            path = os.path.join(self._incoming, name)
            try:
                os.rename(os.path.join(self._free_dir, name), path)
                return HashingTempFile(self.incoming, reuse=path)
            except OSError as exc:  # removed or made unwritable behind our back: a new file instead
                if not isinstance(exc, FileNotFoundError):
                    LOGGER.warning("cannot reuse spool file %s: %s", name, exc.strerror)
                    self.discard(Path(path))
        try:
            return HashingTempFile(self.incoming)
        except OSError as exc:  # no inode, no room in the folder, no file descriptor
            return HashingTempFile.unwritable(os.path.join(self._incoming, f"unwritable-{secrets.token_hex(8)}.dcm"),
                                              exc)

    def give_back(self) -> int:
        """The disk is full: empty the files kept in ``free/`` with their blocks, so the
        space they hold goes to new instances. Returns the bytes given back."""
        given = 0
        with self._free_lock:
            for n, (name, size) in enumerate(self._free):
                if size:
                    try:
                        os.truncate(os.path.join(self._free_dir, name), 0)
                    except OSError:
                        continue
                    self._free[n] = (name, 0)
                    self._retained -= size
                    given += size
        if given:
            LOGGER.warning("spool full: gave back %d bytes kept in spool/free for reuse", given)
        return given

    def recycle(self, path: Path) -> None:
        """No row needs ``path`` any more: move it into ``free/`` for a new instance to
        be written over, keeping its blocks while ``RETAIN_BYTES`` allows (else emptied),
        or remove it when ``free/`` is full. A file with other links (a destination's
        hard link into its folder) is only unlinked: reusing it would change the link."""
        name = os.path.basename(path)
        retained = 0  # bytes reserved in RETAIN_BYTES for this file
        try:
            st = os.stat(path)
            with self._free_lock:
                keep = len(self._free) < FREE_MAX and st.st_nlink == 1
                if keep and self._retained + st.st_size <= RETAIN_BYTES:
                    retained = st.st_size  # reserved now: two files recycled at once cannot both overrun
                    self._retained += retained
            if not keep:
                os.unlink(path)
                return
            target = os.path.join(self._free_dir, name)
            os.rename(path, target)  # out of the shard first: a shard never shows an emptied instance
            if not retained:
                os.truncate(target, 0)
        except OSError as exc:
            with self._free_lock:
                self._retained -= retained
            if not isinstance(exc, FileNotFoundError):
                LOGGER.warning("cannot recycle spool file %s: %s", name, exc.strerror)
                self.discard(path)
                self.discard(Path(os.path.join(self._free_dir, name)))
            return
        with self._free_lock:
            self._free.append((name, retained))

    def take(self, path: Path, sync_folder: bool = True) -> Path:
        """Make a complete file durable in the spool: fsync it, rename it in, fsync the folder.

        ``path`` must be on the spool's file system (``incoming/``). Returns the new path.
        With ``sync_folder=False`` the caller fsyncs ``target.parent`` itself: intake runs
        that fsync beside the queue's commit.
        """
        name = secrets.token_hex(16)
        target = Path(os.path.join(self._root, name[:2], name + ".dcm"))  # pathlib's / is ~10 us each
        fsync_file(path)
        os.rename(path, target)
        if sync_folder:
            fsync_dir(target.parent)
        return target

    def discard(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            LOGGER.warning("cannot remove spool file %s: %s", path.name, exc.strerror)

    def files(self) -> list[Path]:
        return [p for shard in self.root.glob("[0-9a-f][0-9a-f]") for p in shard.iterdir()]
