"""The spool: the hash intake takes while it receives (bridge.forward.spool.HashingTempFile), and
the files it recycles."""

from __future__ import annotations

import errno
import hashlib
import os
import sys
from io import BytesIO
from pathlib import Path

import pytest
from peers import fill

from bridge.config import DataDir
from bridge.forward.spool import FREE_MAX, HASH_LOT, RETAIN_BYTES, HashingTempFile, Spool


def spooled(spool: Spool, data: bytes) -> Path:
    """A file received into ``spool`` and taken into it, as intake does."""
    temp = spool.new_temp()
    temp.write(data)
    temp.close()
    return spool.take(Path(temp.name))


def files_with_data(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.stat().st_size]


def test_a_recycled_file_leaves_the_shards_and_receives_the_next_instance(tmp_path: Path) -> None:
    spool = Spool(DataDir(tmp_path))
    spool.open()
    first = spooled(spool, b"first instance" * 1000)
    inode = first.stat().st_ino
    spool.recycle(first)
    assert not first.exists()
    assert spool.files() == []
    assert [p.stat().st_ino for p in spool.free.iterdir()] == [inode]

    second = spooled(spool, b"second")
    assert second.read_bytes() == b"second"  # nothing of the longer first after it
    assert second.stat().st_ino == inode  # the same file, not a new one
    assert list(spool.free.iterdir()) == []
    spool.recycle(second)
    assert spooled(spool, b"third, longer than the second").read_bytes() == b"third, longer than the second"


def test_a_recycled_file_is_sealed_before_it_is_closed(tmp_path: Path) -> None:
    """Intake reads a received file while it is still open: ``seal`` cuts the old content."""
    spool = Spool(DataDir(tmp_path))
    spool.open()
    spool.recycle(spooled(spool, b"an old, long instance"))
    temp = spool.new_temp()
    temp.write(b"new")
    temp.seal()
    assert Path(temp.name).read_bytes() == b"new"
    assert HashingTempFile.hash_of(Path(temp.name)) == hashlib.sha256(b"new").hexdigest()
    temp.close()


def test_the_blocks_kept_in_free_are_bounded(tmp_path: Path) -> None:
    """Delivered files keep their blocks for the next instances up to RETAIN_BYTES in
    all; beyond it they are emptied, and a restart holds to the same bound."""
    spool = Spool(DataDir(tmp_path))
    spool.open()
    size = RETAIN_BYTES // 3 + 1
    for path in [spooled(spool, bytes(size)) for _ in range(4)]:
        spool.recycle(path)
    sizes = sorted(p.stat().st_size for p in spool.free.iterdir())
    assert sizes == [0, 0, size, size]
    assert sum(sizes) <= RETAIN_BYTES

    for path in spool.free.iterdir():
        with open(path, "r+b") as f:  # as if a crash had left them all full
            f.truncate(size)
    again = Spool(DataDir(tmp_path))
    again.open()
    assert sorted(p.stat().st_size for p in again.free.iterdir()) == [0, 0, size, size]


def test_a_file_linked_elsewhere_is_unlinked_not_emptied(tmp_path: Path) -> None:
    """The archive and folder destinations hard-link spool files: recycling one must not
    empty what they hold."""
    spool = Spool(DataDir(tmp_path))
    spool.open()
    path = spooled(spool, b"archived instance")
    link = tmp_path / "archive.dcm"
    os.link(path, link)
    spool.recycle(path)
    assert not path.exists()
    assert link.read_bytes() == b"archived instance"
    assert list(spool.free.iterdir()) == []


def test_the_free_files_are_bounded_and_kept_across_restarts(tmp_path: Path) -> None:
    spool = Spool(DataDir(tmp_path))
    spool.open()
    for path in [spooled(spool, b"x") for _ in range(FREE_MAX + 5)]:
        spool.recycle(path)
    assert len(list(spool.free.iterdir())) == FREE_MAX
    (spool.incoming / "partial.dcm").write_bytes(b"half an instance")

    again = Spool(DataDir(tmp_path))
    again.open()
    assert list(again.incoming.iterdir()) == []
    assert len(list(again.free.iterdir())) == FREE_MAX
    assert spooled(again, b"y").read_bytes() == b"y"
    assert len(list(again.free.iterdir())) == FREE_MAX - 1


def test_a_free_file_removed_behind_the_spools_back_is_replaced(tmp_path: Path) -> None:
    spool = Spool(DataDir(tmp_path))
    spool.open()
    spool.recycle(spooled(spool, b"x"))
    for path in spool.free.iterdir():
        path.unlink()  # an administrator cleaning up
    assert spooled(spool, b"new").read_bytes() == b"new"


def test_a_free_file_that_cannot_be_written_is_replaced(tmp_path: Path) -> None:
    spool = Spool(DataDir(tmp_path))
    spool.open()
    spool.recycle(spooled(spool, b"x"))
    for path in spool.free.iterdir():
        path.unlink()
        path.mkdir()  # not a file any more: opening it fails
    assert spooled(spool, b"new").read_bytes() == b"new"
    again = Spool(DataDir(tmp_path))
    again.open()  # what is left of it in incoming/ does not stop a restart
    assert list(again.incoming.iterdir()) == []


@pytest.mark.parametrize("sizes", [[0], [100], [HASH_LOT - 1, 1], [3 << 20, HASH_LOT + 5, 1, HASH_LOT, 7]],
                         ids=["empty", "small", "one-lot", "lots-handed-over"])
def test_the_hash_is_that_of_the_file_however_it_was_written(tmp_path: Path, sizes: list[int]) -> None:
    writer = HashingTempFile(tmp_path)
    for size in sizes:
        writer.write(os.urandom(size))
    writer.file.flush()
    path = Path(writer.name)
    assert HashingTempFile.hash_of(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    writer.close()


def test_only_plain_files_in_free_are_reused(tmp_path: Path) -> None:
    """A link put in free/ would be written through: it is left alone."""
    outside = tmp_path / "elsewhere.txt"
    outside.write_bytes(b"not the spool's")
    (tmp_path / "spool" / "free").mkdir(parents=True)
    (tmp_path / "spool" / "free" / "link.dcm").symlink_to(outside)
    spool = Spool(DataDir(tmp_path))
    spool.open()
    assert spooled(spool, b"instance").read_bytes() == b"instance"
    assert outside.read_bytes() == b"not the spool's"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_writeback_is_started_through_the_real_call_and_changes_nothing(tmp_path: Path) -> None:
    from bridge.forward.spool import _SYNC_FILE_RANGE, _SYNC_FILE_RANGE_WRITE, start_writeback

    path = tmp_path / "instance.dcm"
    data = os.urandom(300_000)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        fd = f.fileno()
        assert _SYNC_FILE_RANGE is not None
        assert _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) == 0  # the binding is right
        start_writeback(fd)
    assert path.read_bytes() == data
    start_writeback(fd)  # a closed descriptor: only a hint, nothing raised


def test_a_free_name_left_beside_a_spooled_file_is_not_written_into(tmp_path: Path) -> None:
    """After a crash, a file moved out of free/ into a shard can still be named in free/
    as well: a restart must not write the next instance into the spooled one."""
    spool = Spool(DataDir(tmp_path))
    spool.open()
    kept = spooled(spool, b"acknowledged instance")
    os.link(kept, spool.free / kept.name)  # its old name, left by the crash
    again = Spool(DataDir(tmp_path))
    again.open()
    assert list(again.free.iterdir()) == []
    assert spooled(again, b"the next instance").read_bytes() == b"the next instance"
    assert kept.read_bytes() == b"acknowledged instance"


@pytest.mark.parametrize("recycled", [False, True], ids=["new-file", "recycled-file"])
def test_pynetdicoms_own_receive_path_survives_a_full_disk(tmp_path: Path, tmpfs_factory, monkeypatch,
                                                            recycled: bool) -> None:
    """A C-STORE data set written by pynetdicom's ``decode_msg`` (the path beside the bridge's
    fast path) onto a really full disk: no exception reaches pynetdicom, the message is
    still decoded to its end, the error is known, the file is emptied at once; the next
    instance is written whole once space is back."""
    import pynetdicom.dimse_messages as dm
    from pydicom.uid import ImplicitVRLittleEndian, generate_uid
    from pynetdicom import _config
    from pynetdicom.dimse_primitives import C_STORE

    from bridge.dimse.pynetdicom_overrides import encoders

    disk = tmpfs_factory("disk", "2m")
    spool = Spool(DataDir(disk))
    spool.open()
    if recycled:
        spool.recycle(spooled(spool, b"\1" * 4096))
    monkeypatch.setattr(dm, "NamedTemporaryFile", lambda *_, **__: spool.new_temp())
    monkeypatch.setattr(dm, "create_file_meta", encoders._create_file_meta)
    monkeypatch.setattr(dm, "write_file_meta_info", encoders._write_file_meta_info)
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", True)
    accepted = type("Context", (), {"transfer_syntax": [ImplicitVRLittleEndian]})()
    assoc = type("Association", (), {"_accepted_cx": {1: accepted}})()

    def receive(size: int) -> tuple[Path, HashingTempFile]:
        request = C_STORE()
        request.MessageID = 1
        request.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        request.AffectedSOPInstanceUID = generate_uid()
        request.DataSet = BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00" + b"\0" * size)
        message = dm.C_STORE_RQ()
        message.primitive_to_message(request)
        received = dm.DIMSEMessage()
        ends = [received.decode_msg(p, assoc) for p in message.encode_msg(1, 16384)]
        assert ends[-1] and not any(ends[:-1])  # decoded to its end: the association stays in step
        (path,) = spool.incoming.iterdir()
        file = received._data_set_file  # as pynetdicom hands it to the C-STORE handler
        file.seal()
        return path, file

    filler = fill(disk, 256 << 10)
    path, file = receive(1 << 20)
    error = HashingTempFile.write_error(path)
    assert error is not None and error.errno == errno.ENOSPC
    assert path.stat().st_size == 0  # its space given back before the message ended
    file.close()  # no exception either
    path.unlink()

    filler.unlink()
    path, file = receive(1 << 20)
    file.close()
    assert HashingTempFile.write_error(path) is None
    assert path.stat().st_size > 1 << 20


def test_a_file_that_cannot_be_created_takes_the_message_and_says_why(tmp_path: Path, tmpfs_factory) -> None:
    """No inode left for the incoming file (a full disk too): receiving into it raises
    nothing, and the error is known when the message is complete."""
    disk = tmpfs_factory("disk", "4m,nr_inodes=320")
    spool = Spool(DataDir(disk))
    spool.open()
    n = 0
    with pytest.raises(OSError) as full:
        while n < 1000:
            (disk / f"inode{n}").touch()
            n += 1
    assert full.value.errno == errno.ENOSPC
    temp = spool.new_temp()
    temp.write(b"\0" * 132)
    temp.file.flush()
    temp.seal()
    temp.close()
    path = Path(temp.name)
    error = HashingTempFile.write_error(path)
    assert error is not None and error.errno == errno.ENOSPC
    assert not path.exists() and path.parent == spool.incoming
    (disk / "inode0").unlink()
    temp = spool.new_temp()
    temp.write(b"\1" * 132)
    temp.close()
    assert HashingTempFile.write_error(Path(temp.name)) is None
    assert Path(temp.name).read_bytes() == b"\1" * 132
