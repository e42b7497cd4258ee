"""Test data: pydicom's bundled files, given fresh UIDs, and generated series.

pydicom's test files are real and varied (many SOP classes, every transfer syntax)
but 41 of 78 share a SOP Instance UID with another file, and some lack UIDs or are
truncated. Positive tests use copies with fresh Study/Series/SOP Instance UIDs;
negative tests use the broken files as they are.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

# The optional `codecs` extra (pyproject.toml): pixel decoders for JPEG, JPEG 2000 and
# JPEG-LS. Without it compressed pixels cannot be converted, and a test that needs them
# says so instead of waiting out its deadline.
_CODECS_MISSING = [m for m in ("pylibjpeg", "libjpeg", "openjpeg", "jpeg_ls") if importlib.util.find_spec(m) is None]
needs_codecs = pytest.mark.skipif(bool(_CODECS_MISSING), reason="needs the codecs extra (pip install -e '.[codecs]'): "
                                  f"{', '.join(_CODECS_MISSING)} not installed")

TEST_FILES = Path(os.path.dirname(get_testdata_file("CT_small.dcm")))

# Files pydicom ships to exercise broken input: no meta, truncated. Files whose data set
# lacks SOP Class/Instance UID (e.g. SC_rgb_jpeg.dcm) are filtered out by ``_usable``.
BROKEN = ["MR_truncated.dcm", "rtplan_truncated.dcm", "no_meta.dcm", "ExplVR_BigEndNoMeta.dcm",
          "ExplVR_LitEndNoMeta.dcm", "meta_missing_tsyntax.dcm", "no_meta_group_length.dcm"]


def _usable(path: Path) -> Dataset | None:
    """The data set if it is a complete Part-10 image or document with every required UID."""
    if path.name in BROKEN:
        return None
    try:
        ds = pydicom.dcmread(path)
        ds.get("PixelData")  # reads to the end: truncated files fail here
        ts = ds.file_meta.TransferSyntaxUID
    except Exception:
        return None
    if not all(ds.get(k) for k in ("SOPClassUID", "SOPInstanceUID")) or not ts:
        return None
    if ds.original_encoding[0] != ts.is_implicit_VR:  # e.g. an implicit VR data set labelled explicit
        return None
    return ds


def fresh_copies(dest: Path) -> list[Path]:
    """Every usable pydicom test file, copied into ``dest`` with fresh UIDs, syntax kept."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for path in sorted(TEST_FILES.glob("*.dcm")):
        ds = _usable(path)
        if ds is None:
            continue
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        target = dest / path.name
        try:
            ds.save_as(target, enforce_file_format=True)
        except Exception:
            target.unlink(missing_ok=True)
            continue
        out.append(target)
    return out


def ct_series(dest: Path, count: int, size: int = 64, study_uid: str | None = None) -> list[Path]:
    """A generated CT series: ``count`` images of ``size`` x ``size`` 16-bit pixels."""
    dest.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    rng = np.random.default_rng(len(str(dest)))
    out = []
    for n in range(count):
        out.append(write_ct(dest / f"ct{n:04d}.dcm", study_uid, series_uid, n + 1,
                            rng.integers(0, 4096, (size, size), dtype=np.uint16)))
    return out


def write_ct(path: Path, study_uid: str, series_uid: str, number: int, pixels: np.ndarray,
             sop_instance_uid: str | None = None) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = sop_instance_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = "Test^Patient"
    ds.PatientID = "PID-TEST"
    ds.AccessionNumber = "ACC1"
    ds.StudyDate = "20261122"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def data_set_bytes(path: Path) -> bytes:
    """A Part-10 file without its preamble and File Meta (which a receiver writes anew)."""
    with open(path, "rb") as f:
        pydicom.filereader.read_preamble(f, False)
        pydicom.filereader._read_file_meta_info(f)
        return f.read()


def with_uid(source: Path, target: Path, **values: str) -> Path:
    """A copy of ``source`` with the given top-level values set (e.g. a bad SOPInstanceUID)."""
    ds = pydicom.dcmread(source)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
        if keyword == "SOPInstanceUID":
            ds.file_meta.MediaStorageSOPInstanceUID = value
    ds.save_as(target, enforce_file_format=False)
    return target
