"""The benchmark's CT series: generated once, cached under ``bench/.data/`` (git-ignored)."""

from __future__ import annotations

import os
import random
import shutil
from datetime import datetime
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROWS = COLUMNS = 512
BITS_STORED = 12
# Bump when the generated content changes, so stale caches are rebuilt.
FORMAT_VERSION = 1


def cached_series(cache_root: Path, count: int) -> list[Path]:
    """The series' files, in instance order; generated on first use.

    Generation writes into a temporary folder renamed into place at the end, so an
    interrupted run never leaves a half-made cache behind.
    """
    folder = cache_root / f"ct-{ROWS}x{COLUMNS}-{count}-v{FORMAT_VERSION}"
    if not folder.is_dir():
        cache_root.mkdir(parents=True, exist_ok=True)
        partial = cache_root / f".{folder.name}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        print(f"generating {count} CT instances into {folder} (once) ...", flush=True)
        write_series(partial, count)
        partial.rename(folder)
    files = sorted(folder.glob("*.dcm"))
    if len(files) != count:
        raise SystemExit(f"{folder} holds {len(files)} files, not {count}: delete it and rerun")
    return files


def write_series(folder: Path, count: int) -> None:
    """Write ``count`` instances of one new CT series (fresh UIDs) into ``folder``."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    pixels = PixelSource()
    for number in range(1, count + 1):
        ds = ct_instance(study, series, frame, number, pixels.image(number))
        ds.save_as(folder / f"{number:04d}.dcm", enforce_file_format=True)


def ct_instance(study: str, series: str, frame: str, number: int, pixel_data: bytes) -> Dataset:
    """One CT Image Storage instance, explicit VR little endian, 512x512, 12 of 16 bits."""
    sop_instance = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    now = datetime.now()
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_instance
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = "BENCH0001"
    ds.Modality = "CT"
    ds.Manufacturer = "dicom-bridge bench"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "ingest benchmark"
    ds.SeriesDescription = f"{ROWS}x{COLUMNS} synthetic"
    ds.PatientName = "Bench^Ingest"
    ds.PatientID = "BENCH-INGEST"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "1.0"
    ds.KVP = "120"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [-250.0, -250.0, -1.0 * number]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = frame
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = -1.0 * number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ROWS
    ds.Columns = COLUMNS
    ds.PixelSpacing = [0.9765625, 0.9765625]
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.PixelData = pixel_data
    ds["PixelData"].VR = "OW"
    return ds


class PixelSource:
    """Random-ish 12-bit pixel data, different for every image.

    With numpy: fresh random values per image. Without: one random buffer, rotated by a
    different (even) offset per image, so images still differ.
    """

    def __init__(self, seed: int = 20261122) -> None:
        self.size = ROWS * COLUMNS
        try:
            import numpy
        except ImportError:
            self._rng = None
            rng = random.Random(seed)
            values = [rng.randrange(1 << BITS_STORED) for _ in range(self.size)]
            self._base = b"".join(v.to_bytes(2, "little") for v in values)
        else:
            self._rng = numpy.random.default_rng(seed)

    def image(self, number: int) -> bytes:
        if self._rng is not None:
            import numpy

            values = self._rng.integers(0, 1 << BITS_STORED, self.size, dtype=numpy.uint16)
            return values.astype("<u2").tobytes()
        offset = (number * 7919 * 2) % len(self._base)
        return self._base[offset:] + self._base[:offset]


def large_multiframe(path: Path, megabytes: int) -> Path:
    """One Multi-frame Grayscale Word SC instance of about ``megabytes`` MB, written in
    chunks (the pixel data never sits in memory); reused when it already exists."""
    import struct

    from pydicom.uid import MultiFrameGrayscaleWordSecondaryCaptureImageStorage as SOP_CLASS

    frame_bytes = ROWS * COLUMNS * 2
    frames = max(1, megabytes * 1024 * 1024 // frame_bytes)
    if path.exists() and path.stat().st_size > frames * frame_bytes:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Bench^Large", "BENCH-LARGE", "OT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns, ds.NumberOfFrames = ROWS, COLUMNS, frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, BITS_STORED, BITS_STORED - 1, 0
    partial = path.with_suffix(".partial")
    ds.save_as(partial, enforce_file_format=True)
    frame = random.Random(1).randbytes(frame_bytes)
    with open(partial, "ab") as f:
        f.write(struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"OW", frames * frame_bytes))  # Pixel Data, OW
        for _ in range(frames):
            f.write(frame)
    partial.rename(path)
    return path
