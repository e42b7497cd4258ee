"""C-STORE from DCMTK and pynetdicom to the daemon: statuses, and what arrives at its destinations."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pydicom
import pytest
from corpus import BROKEN, TEST_FILES, ct_series, data_set_bytes, with_uid, write_ct
from peers import echoscu, spool_data, storescu, wait_for
from pydicom.uid import generate_uid

# storescu proposes one syntax per context with these options (and uncompressed ones
# beside), so each file goes out in its own transfer syntax, unconverted.
PROPOSE = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def folder_config(out: Path, **extra) -> dict:
    config = {
        "ae_title": "BRIDGE",
        "destinations": {
            "out": {"type": "folder", "path": f"{out}/{{StudyInstanceUID}}/{{SeriesInstanceUID}}"},
            "archive": {"type": "archive"},
        },
        "rules": [{"name": "everything", "store": ["out", "archive"]}],
    }
    config.update(extra)
    return config


def dcm_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.dcm")) if folder.exists() else []


def assert_same_instance(received: Path, original: Path) -> None:
    a, b = pydicom.dcmread(received), pydicom.dcmread(original)
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        assert a[keyword].value == b[keyword].value, keyword
    assert a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID
    if "PixelData" in b:
        assert a.PixelData == b.PixelData


def test_every_transfer_syntax_reaches_folder_and_archive(tmp_path, corpus, bridge_factory):
    out = tmp_path / "out"
    bridge = bridge_factory(folder_config(out))
    by_syntax: dict[str, list[Path]] = defaultdict(list)
    for path in corpus:
        ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        if ts in PROPOSE:
            by_syntax[ts].append(path)
    assert len(by_syntax) >= 10, "the corpus should cover most transfer syntaxes"
    sent = []
    for ts, files in by_syntax.items():
        result = storescu(bridge.port, files, extra=["-R", PROPOSE[ts]])
        assert result.statuses == [0] * len(files), f"{ts}:\n{result.output[-2000:]}"
        sent += files

    wait_for(lambda: len(dcm_files(out)) == len(sent), 60, "the folder destination")
    archive = bridge.data_dir / "archive"
    wait_for(lambda: len(dcm_files(archive)) == len(sent), 60, "the archive")
    received = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in dcm_files(out)}
    archived = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in dcm_files(archive)}
    for original in sent:
        uid = pydicom.dcmread(original, stop_before_pixels=True).SOPInstanceUID
        assert_same_instance(received[uid], original)
        assert_same_instance(archived[uid], original)
    wait_for(lambda: bridge.queue_states() == {"done": 2 * len(sent)}, 30, "every row done")
    assert bridge.stop() == 0


def test_refused_instances_get_statuses_and_the_daemon_goes_on(tmp_path, series, bridge_factory, raw_scu):
    """Malformed data sets and bad UIDs: 0xC000, nothing written outside the data folder."""
    out = tmp_path / "out"
    bridge = bridge_factory(folder_config(out))
    bad = tmp_path / "bad"
    bad.mkdir()
    cases = {
        "dots": with_uid(series[0], bad / "dots.dcm", StudyInstanceUID="1.2.3/../../../../evil"),
        "slash": with_uid(series[1], bad / "slash.dcm", SeriesInstanceUID="1.2/3"),
        "nul": with_uid(series[2], bad / "nul.dcm", StudyInstanceUID="1.2.3\x00.4"),
        "long": with_uid(series[3], bad / "long.dcm", SeriesInstanceUID="1" * 100),
        "missing": with_uid(series[4], bad / "missing.dcm", StudyInstanceUID=""),
    }
    garbage = bad / "garbage.dcm"
    header = series[5].read_bytes()
    meta_end = 132 + 12 + int.from_bytes(header[140:144], "little")
    # a sequence of undefined length whose item runs past the end of the data set
    garbage.write_bytes(header[:meta_end] + b"\x08\x00\x16\x00SQ\x00\x00\xff\xff\xff\xff"
                        + b"\xfe\xff\x00\xe0\x10\x00\x00\x00" + b"\x01" * 5)

    raw_scu.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
    assoc = raw_scu.associate("127.0.0.1", bridge.port, ae_title="BRIDGE")
    assert assoc.is_established
    try:
        for name, path in cases.items():
            rsp = assoc.send_c_store(path)
            assert rsp.Status == 0xC000, name
            assert len(rsp.ErrorComment) <= 64
        rsp = assoc.send_c_store(garbage)
        assert rsp.Status == 0xC000
        assert "parse" in rsp.ErrorComment
        good = assoc.send_c_store(series[6])  # same association still serves
        assert good.Status == 0x0000
    finally:
        assoc.release()
    wait_for(lambda: len(dcm_files(out)) == 1, 30, "the good instance")
    assert not list(tmp_path.rglob("evil*"))
    assert storescu(bridge.port, series[7:]).statuses == [0, 0, 0]
    wait_for(lambda: not spool_data(bridge.data_dir), 30, "no data left in the spool")


def test_broken_pydicom_files_are_refused(tmp_path, bridge_factory, raw_scu):
    """pydicom's truncated files, sent as they are, are refused with 0xC000."""
    bridge = bridge_factory(folder_config(tmp_path / "out"))
    raw_scu.add_requested_context("1.2.840.10008.5.1.4.1.1.4", ["1.2.840.10008.1.2.1"])
    assoc = raw_scu.associate("127.0.0.1", bridge.port)
    try:
        truncated = TEST_FILES / "MR_truncated.dcm"
        assert "MR_truncated.dcm" in BROKEN
        rsp = assoc.send_c_store(truncated)
        assert rsp.Status == 0xC000
    finally:
        assoc.release()
    assert echoscu(bridge.port).returncode == 0


def test_sop_class_mismatch_is_a900(tmp_path, series, bridge_factory, raw_scu):
    bridge = bridge_factory(folder_config(tmp_path / "out"))
    mr = with_uid(series[0], tmp_path / "mr.dcm", SOPClassUID="1.2.840.10008.5.1.4.1.1.4")
    ds = pydicom.dcmread(mr)
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # the command says CT
    ds.save_as(mr, enforce_file_format=False)
    raw_scu.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
    assoc = raw_scu.associate("127.0.0.1", bridge.port)
    try:
        assert assoc.send_c_store(mr).Status == 0xA900
    finally:
        assoc.release()


def test_a_private_sop_class_in_extra_sop_classes_is_stored(tmp_path, series, bridge_factory, raw_scu):
    """pynetdicom aborted every C-STORE of a SOP class it did not know, accepted or not."""
    private = "1.2.826.0.1.3680043.9.7.1.1"
    bridge = bridge_factory(folder_config(tmp_path / "out", accept={"extra_sop_classes": [private]}))
    path = with_uid(series[0], tmp_path / "private.dcm", SOPClassUID=private)
    ds = pydicom.dcmread(path)
    ds.file_meta.MediaStorageSOPClassUID = private
    ds.save_as(path, enforce_file_format=False)
    raw_scu.add_requested_context(private, ["1.2.840.10008.1.2.1"])
    assoc = raw_scu.associate("127.0.0.1", bridge.port)
    try:
        assert assoc.is_established
        assert assoc.send_c_store(path).Status == 0x0000
    finally:
        assoc.release()
    wait_for(lambda: len(dcm_files(tmp_path / "out")) == 1, 30, "the private instance")


def test_supersede_keeps_the_newer_content(tmp_path, bridge_factory):
    out = tmp_path / "out"
    bridge = bridge_factory(folder_config(out))
    import numpy as np

    study, series_uid, sop = generate_uid(), generate_uid(), generate_uid()
    first = write_ct(tmp_path / "a.dcm", study, series_uid, 1, np.zeros((8, 8), np.uint16), sop)
    second = write_ct(tmp_path / "b.dcm", study, series_uid, 1, np.full((8, 8), 7, np.uint16), sop)
    assert storescu(bridge.port, [first]).statuses == [0]
    assert storescu(bridge.port, [second]).statuses == [0]
    assert storescu(bridge.port, [second]).statuses == [0]  # a harmless resend

    def only_the_newest(folder: Path) -> bool:
        files = dcm_files(folder)
        return len(files) == 1 and pydicom.dcmread(files[0]).PixelData == pydicom.dcmread(second).PixelData

    wait_for(lambda: only_the_newest(out), 30, "the newer content in the folder")
    wait_for(lambda: only_the_newest(bridge.data_dir / "archive"), 30, "the newer content in the archive")
    wait_for(lambda: bridge.queue_states().get("pending", 0) == 0, 30, "nothing left to deliver")
    assert only_the_newest(out) and only_the_newest(bridge.data_dir / "archive")


def test_generated_series_in_one_association(tmp_path, bridge_factory):
    out = tmp_path / "out"
    bridge = bridge_factory(folder_config(out))
    files = ct_series(tmp_path / "ct", 30)
    assert storescu(bridge.port, files).statuses == [0] * 30
    wait_for(lambda: len(dcm_files(out)) == 30, 30, "30 files in the folder")


def test_delivered_instances_leave_the_spool_and_their_files_are_reused(tmp_path, bridge_factory):
    """The second ten are received into the first ten's files, which were larger: each
    arrives exactly as sent, with nothing of the old content after it. (``ack:
    delivered``: each is delivered before its C-STORE is answered, so from the file as
    ingest left it.)"""
    out = tmp_path / "out"
    bridge = bridge_factory({"ae_title": "BRIDGE",
                             "destinations": {"out": {"type": "folder", "path": str(out)}},
                             "rules": [{"name": "all", "store": ["out"], "ack": "delivered"}]})
    spool = bridge.data_dir / "spool"
    first, second = ct_series(tmp_path / "a", 10, size=128), ct_series(tmp_path / "b", 10, size=64)
    for sent in (first, second):
        assert storescu(bridge.port, sent).statuses == [0] * 10
        wait_for(lambda: bridge.queue_states().get("pending", 0) == 0 and not spool_data(bridge.data_dir),
                 30, "every instance delivered")
        assert len(list((spool / "free").iterdir())) <= 10  # the second ten reused the first ten's files
    delivered = {pydicom.dcmread(p).SOPInstanceUID: p for p in dcm_files(out)}
    assert len(delivered) == 20
    for original in first + second:
        received = delivered[pydicom.dcmread(original).SOPInstanceUID]
        assert_same_instance(received, original)
        assert received.read_bytes().endswith(data_set_bytes(original))


def _data_set_bytes(path: Path) -> bytes:
    """What follows the File Meta Information (explicit VR little endian, its length
    given by (0002,0000))."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00"
    meta_end = 144 + int.from_bytes(data[140:144], "little")
    return data[meta_end:]


@pytest.mark.parametrize("max_pdu", [4096, 16384, 262144])
def test_data_sets_arrive_byte_for_byte_whatever_the_pdu_size(tmp_path, bridge_factory, raw_scu, max_pdu):
    """The network thread writes data set fragments straight from each PDU to the file
    (bridge.dimse.pynetdicom_overrides): small and large PDUs, DCMTK's and pynetdicom's
    fragmenting, all arrive as sent."""
    bridge = bridge_factory(folder_config(tmp_path / "out", listen={"max_pdu": max_pdu}))
    by_dcmtk = ct_series(tmp_path / "dcmtk", 3, size=300)
    send_pdu = str(min(max_pdu, 131072))
    assert storescu(bridge.port, by_dcmtk, extra=["--max-send-pdu", send_pdu]).statuses == [0, 0, 0]
    by_pynetdicom = ct_series(tmp_path / "pynetdicom", 2, size=300)
    raw_scu.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
    assoc = raw_scu.associate("127.0.0.1", bridge.port, ae_title="BRIDGE", max_pdu=max_pdu)
    try:
        assert [assoc.send_c_store(p).Status for p in by_pynetdicom] == [0, 0]
    finally:
        assoc.release()
    sent = by_dcmtk + by_pynetdicom
    archive = bridge.data_dir / "archive"
    wait_for(lambda: len(dcm_files(archive)) == len(sent), 30, "the archive")
    archived = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in dcm_files(archive)}
    for original in sent:
        uid = pydicom.dcmread(original, stop_before_pixels=True).SOPInstanceUID
        assert _data_set_bytes(archived[uid]) == _data_set_bytes(original), original.name
