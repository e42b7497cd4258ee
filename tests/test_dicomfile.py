"""Intake's header reader gives what pydicom's reader gives, on every file pydicom ships."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmread

from bridge import dicomfile

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
            taken += dicomfile._read_plain_part10(f) is not None
    assert taken > len(TEST_FILES) * 0.8


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_the_header_is_the_one_pydicom_reads(path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open(path, "rb") as f:
            try:
                mine = dicomfile._read_plain_part10(f)
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
