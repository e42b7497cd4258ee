"""Modifications: the copy a destination receives, changed; the spooled original, never.

Unit tests apply modifications to pydicom's real files (fresh UIDs) in every encoding
the splice must respect; the end-to-end test sends files with DCMTK's storescu to a
daemon whose rules modify what a folder and the archive receive.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from corpus import ct_series, data_set_bytes, with_uid, write_ct
from peers import spool_data, storescu, wait_for
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from bridge.config import ArchiveDestination as ArchiveConfig
from bridge.config import ConfigError, Modification, validate
from bridge.dataset.dicomfile import attributes, read_header
from bridge.destinations.archive import ArchiveDestination
from bridge.errors import ModificationError
from bridge.model import Done, Permanent, SpooledInstance
from bridge.routing.modify import prepare, write_modified

SYNTAXES = {
    "CT_small.dcm": "1.2.840.10008.1.2.1",  # explicit VR little endian
    "MR_small_implicit.dcm": "1.2.840.10008.1.2",
    "MR_small_bigendian.dcm": "1.2.840.10008.1.2.2",
    "JPEG-lossy.dcm": "1.2.840.10008.1.2.4.51",  # encapsulated
    "image_dfl.dcm": "1.2.840.10008.1.2.1.99",  # deflated: rewritten whole
}

EVERY_OPERATION = {
    "copy": {"OtherPatientIDs": "PatientID"},
    "replace": {"PatientName": {"pattern": r"^(\w+)\^(\w+)$", "with": r"\2^\1"}},
    "set": {"InstitutionName": "Research", "ImageType": ["DERIVED", "SECONDARY"], "StudyDescription": None,
            "SeriesNumber": 77},
    "remove": ["PatientBirthDate", "(0008,0090)"],  # ReferringPhysicianName, by tag
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def header(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def pixel_tail(path: Path) -> bytes:
    """The file's bytes from the Pixel Data tag to the end."""
    with open(path, "rb") as f:
        pydicom.dcmread(f, stop_before_pixels=True)
        return f.read()


def modified(source: Path, target: Path, **raw: object) -> Dataset:
    before = sha256(source)
    copy = write_modified(source, Modification.model_validate(raw), target)
    assert sha256(source) == before, "the original must never change"
    assert copy.size == target.stat().st_size
    return pydicom.dcmread(target)


@pytest.fixture
def files(corpus: list[Path]) -> dict[str, Path]:
    return {p.name: p for p in corpus if p.name in SYNTAXES}


@pytest.mark.parametrize("name", SYNTAXES)
def test_every_operation_changes_the_header_and_nothing_else(tmp_path, files, name):
    source = files[name]
    original = pydicom.dcmread(source)
    out = modified(source, tmp_path / "out.dcm", **EVERY_OPERATION)

    assert out.file_meta.TransferSyntaxUID == SYNTAXES[name] == original.file_meta.TransferSyntaxUID
    assert out.OtherPatientIDs == original.PatientID
    assert str(out.PatientName) == re.sub(r"^(\w+)\^(\w+)$", r"\2^\1", str(original.PatientName))
    assert out.InstitutionName == "Research"
    assert out.ImageType == ["DERIVED", "SECONDARY"]
    assert "StudyDescription" in out and out.StudyDescription == ""
    assert out.SeriesNumber == 77
    assert "PatientBirthDate" not in out and "ReferringPhysicianName" not in out
    changed = {"OtherPatientIDs", "PatientName", "InstitutionName", "ImageType", "StudyDescription", "SeriesNumber",
               "PatientBirthDate", "ReferringPhysicianName"}
    for element in original:
        if element.keyword not in changed:
            assert out[element.tag].value == element.value, element.keyword
    assert out.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    if original.file_meta.TransferSyntaxUID.is_deflated:
        assert out.PixelData == original.PixelData
    else:
        assert pixel_tail(tmp_path / "out.dcm") == pixel_tail(source)
        assert pixel_tail(source)[:4] in (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")


def test_replace_applies_to_each_value_with_groups(tmp_path, files):
    source = with_uid(files["CT_small.dcm"], tmp_path / "in.dcm", StudyID="", ImageType=["ORIGINAL", "PRIMARY"])
    out = modified(source, tmp_path / "out.dcm", replace={
        "ImageType": {"pattern": r"^(\w)(\w*)$", "with": r"\2\1"},
        "StudyID": {"pattern": "^$", "with": "NONE"},  # an empty element is one empty value
        "PatientComments": {"pattern": "^$", "with": "NONE"},  # an absent one is left absent
    })
    assert out.ImageType == ["RIGINALO", "RIMARYP"]
    assert out.StudyID == "NONE"
    assert "PatientComments" not in out


def test_copy_gives_the_target_its_own_vr(tmp_path, files):
    source = files["CT_small.dcm"]
    original = header(source)
    out = modified(source, tmp_path / "out.dcm", copy={
        "StudyID": "AccessionNumber",  # SH to SH
        "OtherPatientNames": "PatientName",  # PN to PN
        "ImageComments": "SeriesNumber",  # IS to LT
        "PatientComments": "PatientMotherBirthName",  # absent: the target is left as it is
    })
    assert out.StudyID == original.AccessionNumber
    assert str(out.OtherPatientNames) == str(original.PatientName)
    assert out["ImageComments"].VR == "LT" and out.ImageComments == str(original.SeriesNumber)
    assert "PatientComments" not in out


def test_text_is_encoded_in_the_data_sets_character_set(tmp_path):
    german = with_uid(Path(get_charset_files("chrGerm.dcm")[0]), tmp_path / "germ.dcm",
                      SOPInstanceUID=generate_uid())
    assert header(german).SpecificCharacterSet == "ISO_IR 100"
    out = modified(german, tmp_path / "latin1.dcm", set={"PatientName": "Müller^Jürgen"})
    assert str(out.PatientName) == "Müller^Jürgen"
    assert "Müller^Jürgen".encode("latin-1") in (tmp_path / "latin1.dcm").read_bytes()

    # a new character set re-encodes every text value in it
    out = modified(german, tmp_path / "utf8.dcm", set={"SpecificCharacterSet": "ISO_IR 192"})
    assert str(out.PatientName) == str(header(german).PatientName) == "Äneas^Rüdiger"
    assert "Äneas^Rüdiger".encode() in (tmp_path / "utf8.dcm").read_bytes()

    plain = ct_series(tmp_path / "ct", 1)[0]  # no Specific Character Set: ASCII only
    with pytest.raises(ModificationError) as caught:
        modified(plain, tmp_path / "ascii.dcm", set={"PatientName": "Müller^Jürgen"})
    assert caught.value.keyword == "PatientName"
    assert "cannot be encoded in the default repertoire" in str(caught.value)


def test_a_new_sop_instance_uid_goes_into_the_file_meta_too(tmp_path, files):
    uid = generate_uid()
    out = modified(files["MR_small_implicit.dcm"], tmp_path / "out.dcm", set={"SOPInstanceUID": uid})
    assert out.SOPInstanceUID == out.file_meta.MediaStorageSOPInstanceUID == uid


@pytest.mark.parametrize(("raw", "keyword", "reason"), [
    ({"replace": {"StudyDate": {"pattern": r"^(\d{4})(\d\d)(\d\d)$", "with": r"\1-\2-\3"}}},
     "StudyDate", "Invalid value for VR DA"),
    ({"copy": {"AccessionNumber": "SOPInstanceUID"}}, "AccessionNumber", "exceeds the maximum length of 16"),
    ({"replace": {"SOPInstanceUID": {"pattern": r"\.", "with": "x"}}}, "SOPInstanceUID", "Invalid value for VR UI"),
    ({"remove": ["StudyInstanceUID"]}, "StudyInstanceUID", "missing in the modified copy"),
    ({"replace": {"PixelSpacing": {"pattern": ".*", "with": "wide"}}}, "PixelSpacing", "Invalid value for VR DS"),
])
def test_a_change_the_data_cannot_take_names_the_keyword(tmp_path, files, raw, keyword, reason):
    source = files["CT_small.dcm"]
    before = sha256(source)
    with pytest.raises(ModificationError) as caught:
        prepare(source, Modification.model_validate(raw))
    assert caught.value.keyword == keyword
    assert reason in str(caught.value)
    assert sha256(source) == before


def test_the_configuration_refuses_modifications_that_can_never_work(tmp_path):
    def errors(modify: dict) -> list[str]:
        with pytest.raises(ConfigError) as caught:
            validate({"destinations": {"a": {"type": "folder", "path": str(tmp_path / "a")}},
                      "rules": [{"name": "r", "store": ["a"], "modify": {"a": modify}}]}, base=tmp_path)
        return caught.value.errors

    assert errors({"set": {"(0009,1010)": "x"}, "copy": {"PixelData": "PatientID"},
                   "remove": ["TransferSyntaxUID"], "replace": {"PatientName": {"pattern": "(a)", "with": r"\2"}}}) == [
        "rules[0].modify.a.copy.PixelData: Pixel Data is never modified",
        "rules[0].modify.a.replace.PatientName: with: invalid group reference 2 at position 1",
        "rules[0].modify.a.set.(0009,1010): a private element has no VR in the dictionary: it can be replaced or "
        "removed, not set",
        "rules[0].modify.a.remove[0]: File Meta elements are kept as received",
    ]
    assert errors({"set": {"StudyDate": "2024-01-01", "AccessionNumber": "x" * 17, "Rows": "many",
                           "PatientName": "fine"}}) == [
        "rules[0].modify.a.set: StudyDate: Invalid value for VR DA: '2024-01-01'; AccessionNumber: The value length "
        "(17) exceeds the maximum length of 16 allowed for VR SH; Rows: 'many' is not an integer",
    ]


def test_elements_after_pixel_data_can_be_changed_too(tmp_path):
    source = ct_series(tmp_path / "ct", 1)[0]
    ds = pydicom.dcmread(source)
    ds.add_new(0x7FE10010, "LO", "VENDOR")  # a private block after Pixel Data
    ds.add_new(0x7FE11001, "LO", "trailing")
    ds.save_as(source, enforce_file_format=True)
    out = modified(source, tmp_path / "out.dcm", remove=["(7FE1,1001)"], set={"InstitutionName": "X"})
    assert 0x7FE11001 not in out and out[0x7FE10010].value == "VENDOR"
    assert out.PixelData == ds.PixelData and out.InstitutionName == "X"


def test_pixel_data_is_never_held_in_memory(tmp_path):
    series = tmp_path / "big"
    series.mkdir()
    rng = __import__("numpy").random.default_rng(1)
    source = write_ct(series / "big.dcm", generate_uid(), generate_uid(), 1,
                      rng.integers(0, 4096, (4096, 4096), dtype="uint16"))  # 32 MiB of pixels
    modification = Modification.model_validate(EVERY_OPERATION)
    tracemalloc.start()
    try:
        write_modified(source, modification, tmp_path / "out.dcm")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak} bytes"
    assert pixel_tail(tmp_path / "out.dcm") == pixel_tail(source)


def spooled(path: Path, modify: dict | None = None) -> SpooledInstance:
    ds = read_header(path)
    return SpooledInstance(
        spool_path=path, size=path.stat().st_size, sha256=sha256(path), sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID, study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
        transfer_syntax=ds.file_meta.TransferSyntaxUID, calling_ae="CT1", called_ae="BRIDGE", peer="127.0.0.1",
        received_at=datetime.now(UTC), patient_id=str(ds.PatientID), attributes=attributes(ds),
        modify=Modification.model_validate(modify) if modify is not None else None,
    )


def test_the_archive_links_originals_and_writes_modified_copies(tmp_path):
    spool = ct_series(tmp_path / "spool", 3)
    archive = ArchiveDestination("archive", ArchiveConfig(type="archive"), tmp_path / "archive")
    archive.open()
    try:
        outcomes = archive.send([
            spooled(spool[0]),
            spooled(spool[1], {"set": {"PatientName": "Renamed^Patient", "StudyInstanceUID": "1.2.3.4"}}),
            spooled(spool[2], {"set": {"PatientName": "Ærø"}}),  # no character set: cannot be encoded
        ])
    finally:
        archive.close()
    assert outcomes[:2] == [Done(), Done()]
    assert outcomes[2] == Permanent("modify: PatientName: 'Ærø' cannot be encoded in the default repertoire "
                                    "(no Specific Character Set)")
    first, second = header(spool[0]), header(spool[1])
    linked = tmp_path / "archive" / first.StudyInstanceUID / first.SeriesInstanceUID / f"{first.SOPInstanceUID}.dcm"
    assert linked.stat().st_nlink == 2  # the spool file's inode
    copy = tmp_path / "archive" / "1.2.3.4" / second.SeriesInstanceUID / f"{second.SOPInstanceUID}.dcm"
    assert copy.stat().st_nlink == 1 and spool[1].stat().st_nlink == 1
    assert str(header(copy).PatientName) == "Renamed^Patient"
    db = sqlite3.connect(tmp_path / "archive" / "index.sqlite")
    try:
        names = dict(db.execute("SELECT p.patient_name, st.study_uid FROM patients p"
                                " JOIN studies st USING (patient_key)").fetchall())
        row = db.execute("SELECT size, sha256, path FROM instances WHERE path = ?", (str(copy),)).fetchone()
    finally:
        db.close()
    assert names["Renamed^Patient"] == "1.2.3.4"
    assert row == (copy.stat().st_size, sha256(copy), str(copy))


def test_rules_modify_what_a_folder_and_the_archive_receive_and_nothing_else(tmp_path, bridge_factory):
    out = tmp_path / "out"
    sent = ct_series(tmp_path / "ct", 3)
    sent.append(with_uid(Path(get_charset_files("chrGerm.dcm")[0]), tmp_path / "germ.dcm",
                         StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(),
                         SOPInstanceUID=generate_uid()))
    # "RESEARCH-" and this StudyID make 17 characters, one more than SH holds: only this
    # instance's copy for `research` fails
    bad = with_uid(sent[0], tmp_path / "bad.dcm", SOPInstanceUID=generate_uid(), StudyID="12345678")
    sent.append(bad)
    bridge = bridge_factory({
        "destinations": {
            "research": {"type": "folder", "path": f"{out}/research/{{PatientID}}"},
            "archive": {"type": "archive"},
            "plain": {"type": "folder", "path": f"{out}/plain"},
        },
        "rules": [{
            "name": "everything", "store": ["research", "archive", "plain"],
            "modify": {
                "research": {"set": {"PatientID": "PSEUDO-1", "PatientName": "Research^Subject"},
                             "remove": ["PatientBirthDate"],
                             "replace": {"StudyID": {"pattern": "^(.+)$", "with": r"RESEARCH-\1"}}},
                "archive": {"set": {"PatientName": "Archived^Name"}, "copy": {"OtherPatientIDs": "PatientID"}},
            },
        }],
    })
    assert storescu(bridge.port, sent).statuses == [0] * len(sent)
    wait_for(lambda: bridge.queue_states() == {"done": 3 * len(sent) - 1, "dead": 1}, 60, "every row delivered")

    every = bridge.queue_rows()
    rows = [(r["destination"], r["sop_instance_uid"], r["sha256"], r["last_error"]) for r in every
            if r["state"] == "dead"]
    hashes = {r["sop_instance_uid"]: r["sha256"] for r in every}
    assert len(rows) == 1
    destination, uid, content_hash, reason = rows[0]
    assert (destination, uid) == ("research", header(bad).SOPInstanceUID)
    assert "StudyID" in reason and "exceeds the maximum length of 16" in reason
    # its spool file is kept for a retry, and is still what was received (the others leave
    # the spool just after their rows are marked done)
    spooled_files = wait_for(lambda: files if len(files := spool_data(bridge.data_dir)) == 1 else None,
                             30, "only the dead row's file left in the spool")
    assert [sha256(p) for p in spooled_files] == [content_hash]

    for original in sent:
        uid = header(original).SOPInstanceUID
        plain = out / "plain" / f"{uid}.dcm"
        assert sha256(plain) == hashes[uid], "the unmodified destination gets the spooled bytes"
        assert data_set_bytes(plain) == data_set_bytes(original), "which are the data set as sent"
        archived = next((bridge.data_dir / "archive").rglob(f"{uid}.dcm"))
        kept = pydicom.dcmread(archived)
        assert str(kept.PatientName) == "Archived^Name" and kept.OtherPatientIDs == header(original).PatientID
        assert pixel_tail(archived) == pixel_tail(original)
        if original == bad:
            assert not list(out.joinpath("research").rglob(f"{uid}.dcm"))
            continue
        research = out / "research" / "PSEUDO-1" / f"{uid}.dcm"  # the path shows the copy's PatientID
        copy = pydicom.dcmread(research)
        assert (copy.PatientID, str(copy.PatientName)) == ("PSEUDO-1", "Research^Subject")
        assert "PatientBirthDate" not in copy
        assert pixel_tail(research) == pixel_tail(original)
    assert not (out / "research" / "PID-TEST").exists()

    index = sqlite3.connect(bridge.data_dir / "archive" / "index.sqlite")
    try:
        names = {row[0] for row in index.execute("SELECT patient_name FROM patients")}
        sizes = index.execute("SELECT path, size, sha256 FROM instances").fetchall()
    finally:
        index.close()
    assert names == {"Archived^Name"}
    for path, size, digest in sizes:
        assert (Path(path).stat().st_size, sha256(Path(path))) == (size, digest)
    assert bridge.stop() == 0
