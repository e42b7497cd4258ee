"""The header reader of C-STORE and watched files gives what pydicom's reader gives, on every file
pydicom ships, and on headers longer than the bytes it reads at once."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pytest
from corpus import BROKEN, ct_series
from pydicom import dcmread

from bridge.dataset import dicomfile
from bridge.errors import InboundError, Truncated

TEST_FILES = sorted(p for p in (Path(pydicom.__file__).parent / "data" / "test_files").rglob("*") if p.is_file())


def _pydicom(path: Path) -> tuple[object, int]:
    with open(path, "rb") as f:
        try:
            ds = dcmread(f, stop_before_pixels=True, defer_size=16 * 1024)
        except Exception as exc:
            return type(exc), -1
        return ds, f.tell()


def test_the_fast_reader_takes_most_of_pydicoms_files() -> None:
    taken = 0
    for path in TEST_FILES:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            taken += dicomfile.read_plain_part10(f) is not None
    assert taken > len(TEST_FILES) * 0.8


def _same_header(mine: object, ref: object) -> None:
    assert list(mine.file_meta.keys()) == list(ref.file_meta.keys())  # type: ignore[attr-defined]
    assert list(mine.keys()) == list(ref.keys())  # type: ignore[attr-defined]
    for tag in ref.keys():  # type: ignore[attr-defined]
        try:
            expected = str(ref[tag].value)  # type: ignore[index]
        except Exception:
            continue  # a value pydicom cannot convert either way
        assert str(mine[tag].value) == expected, f"{tag}"  # type: ignore[index]


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_read_header_reads_what_pydicom_reads(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mine = dicomfile.read_header(path)
        except InboundError:
            # refused: only what pydicom cannot read either, or a file cut short
            ref, _ = _pydicom(path)
            assert isinstance(ref, type) or path.name in BROKEN, f"refused {path.name}, which pydicom reads"
            return
        ref, _ = _pydicom(path)
        assert not isinstance(ref, type), f"pydicom fails ({ref}) where read_header does not"
        _same_header(mine, ref)


@pytest.mark.parametrize("filler", [(100, 1000), (1, 40_000), (3, 30_000)], ids=["many", "one-deferred", "three"])
def test_a_header_longer_than_the_first_read_is_read_whole(tmp_path: Path, filler: tuple[int, int]) -> None:
    """Headers of 40 to 100 KB (long private values) against 64 KB read at once; cut
    anywhere in their Pixel Data, the files are refused."""
    count, size = filler
    path = ct_series(tmp_path, 1, size=128)[0]
    ds = dcmread(path)
    block = ds.private_block(0x0011, "BRIDGE TEST", create=True)
    for n in range(count):
        block.add_new(n, "OB" if size > 1024 else "LT", bytes(size) if size > 1024 else "x" * size)
    ds.save_as(path, enforce_file_format=True)
    ref, stop = _pydicom(path)
    assert stop > 40_000
    _same_header(dicomfile.read_header(path), ref)
    whole = path.read_bytes()
    for cut in (stop + 4, stop + 6, stop + 8, stop + 100, len(whole) - 1):
        path.write_bytes(whole[:cut])
        with pytest.raises(InboundError):
            dicomfile.read_header(path)


def test_a_file_cut_in_pixel_data_within_the_first_read_is_refused(tmp_path: Path) -> None:
    path = ct_series(tmp_path, 1, size=64)[0]  # 8 KB of pixels: the whole file in one read
    whole = path.read_bytes()
    ref, stop = _pydicom(path)
    _same_header(dicomfile.read_header(path), ref)
    for cut in (stop + 4, stop + 7, stop + 10, stop + 12, len(whole) - 2):  # from within its tag's header
        path.write_bytes(whole[:cut])
        with pytest.raises(InboundError):
            dicomfile.read_header(path)


def test_a_file_cut_in_its_header_is_refused_as_cut_there(tmp_path: Path) -> None:
    """Cut within an element's value or header, before Pixel Data: the reason says so
    (it said "truncated in Pixel Data"), or the file was taken as complete."""
    path = ct_series(tmp_path, 1, size=16)[0]
    whole = path.read_bytes()
    pixel_data = whole.index(b"\xe0\x7f\x10\x00")
    meta_end = 144 + int.from_bytes(whole[140:144], "little")
    reasons = {}
    for cut in (meta_end - 20, meta_end + 3, meta_end + 30, pixel_data - 5, pixel_data - 1, pixel_data + 2):
        path.write_bytes(whole[:cut])
        with pytest.raises(Truncated) as refused:
            dicomfile.read_header(path)
        reasons[cut] = str(refused.value)
    assert reasons[meta_end - 20] == "data set is truncated in its File Meta Information"
    for cut in (meta_end + 3, meta_end + 30, pixel_data - 5, pixel_data - 1, pixel_data + 2):
        assert reasons[cut].startswith("data set is truncated in its header"), (cut, reasons[cut])
    path.write_bytes(whole[:pixel_data + 6])
    with pytest.raises(Truncated, match="truncated in Pixel Data"):
        dicomfile.read_header(path)


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_the_header_is_the_one_pydicom_reads(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open(path, "rb") as f:
            try:
                mine = dicomfile.read_plain_part10(f)
            except Exception:
                assert isinstance(_pydicom(path)[0], type), "the fast reader fails where pydicom does not"
                return
            where = f.tell()
        if mine is None:
            return  # left to pydicom
        ref, ref_where = _pydicom(path)
        assert not isinstance(ref, type), f"pydicom fails ({ref}) where the fast reader does not"
        assert where == ref_where
        assert mine.original_encoding == ref.original_encoding
        assert list(mine.file_meta.keys()) == list(ref.file_meta.keys())
        for tag in ref.file_meta.keys():
            assert str(mine.file_meta[tag].value) == str(ref.file_meta[tag].value)
        assert list(mine.keys()) == list(ref.keys())
        for tag in ref.keys():
            try:
                expected = str(ref[tag].value)
            except Exception:
                continue  # a value pydicom cannot convert either way
            assert str(mine[tag].value) == expected, f"{tag}"


def test_the_index_keywords_are_read_from_the_header_decoded(tmp_path: Path) -> None:
    """What intake gives the archive's index: every keyword the file has, as text decoded by
    its Specific Character Set (multi-valued joined by backslashes), none it lacks."""
    from pydicom.data import get_charset_files

    ds = dcmread(get_charset_files("chrH31.dcm")[0])
    ds.SeriesDate, ds.SeriesTime = "20240105", "101530.5"
    ds.PerformedProcedureStepStartDate, ds.PerformedProcedureStepStartTime = "20240105", "1015"
    ds.InstanceNumber = 7
    ds.save_as(tmp_path / "h31.dcm")
    found = dicomfile.attributes(dicomfile.read_header(tmp_path / "h31.dcm"))
    assert found["PatientName"] == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert {k: found[k] for k in ("SeriesDate", "SeriesTime", "PerformedProcedureStepStartDate",
                                  "PerformedProcedureStepStartTime", "InstanceNumber")} == {
        "SeriesDate": "20240105", "SeriesTime": "101530.5", "PerformedProcedureStepStartDate": "20240105",
        "PerformedProcedureStepStartTime": "1015", "InstanceNumber": "7"}
    assert set(found) <= set(dicomfile.INDEX_KEYWORDS)
    assert all(found.values()) and "IssuerOfPatientID" not in found
