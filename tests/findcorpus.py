"""The studies C-FIND is tested on: generated ones (several patients, modalities, dates,
series and instances) and pydicom's character set files (names in Latin-1, Greek,
Hebrew, Cyrillic, Arabic, UTF-8, GB18030, Japanese and Korean ISO 2022), every file
with fresh UIDs (pydicom's files share theirs) and a patient ID of its own.

What each study holds is kept in ``FindCorpus`` so that queries can name real UIDs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
}

PATIENTS = {  # PatientID: (PatientName, PatientBirthDate, PatientSex)
    "P001": ("ADAMS^ANNA", "19700101", "F"),
    "P002": ("ALLEN^BOB", "19800202", "M"),
    "P003": ("BAKER^CAROL", "19900303", "F"),
    "P004": ("BROWN^DAN", "19600404", "M"),
}

# (key, PatientID, StudyDate, AccessionNumber, StudyDescription, series), each series
# (Modality, SeriesDescription, SeriesDate, number of instances).
STUDIES = [
    ("s1", "P001", "20190315", "A1001", "CHEST CT", [("CT", "AX LUNG", "20190315", 3)]),
    ("s2", "P001", "20200610", "A1002", "HEAD MR", [("MR", "AX T1", "20200610", 2), ("MR", "AX T2", "20200610", 2)]),
    ("s3", "P002", "20201231", "A1003", "ABDOMEN",
     [("CT", "AX ABD", "20201231", 2), ("MR", "COR LIVER", "20210102", 1)]),
    ("s4", "P002", "20210101", "A1004", "THYROID US", [("US", "THYROID", "20210101", 2)]),
    ("s5", "P003", "20211231", "A1005", "CHEST DX", [("DX", "PA", "20211231", 1)]),
    ("s6", "P003", "20220105", "A1006", "SPINE CT", [("CT", "SAG SPINE", "20220105", 2)]),
    ("s7", "P004", "20230707", "A1007", "KNEE MR", [("MR", "SAG PD", "20230707", 2)]),
    ("s8", "P004", "20200101", "A1008", "HAND CR", [("CR", "HAND", "20200101", 1)]),
]

# What every Orthanc of the C-FIND tests runs with. ``DefaultEncoding: Utf8``: Orthanc
# 1.10 keeps in its index only the characters its default encoding can hold (with the
# default, Latin-1, Greek, Hebrew, Cyrillic and CJK names come back empty or as ``^``),
# so it could not be the reference for them. ``QidoCaseSensitive: false``: its QIDO-RS
# then matches person names regardless of case, as its C-FIND does (and the bridge,
# docs/conformance.md); with the plugin's default, a QIDO-RS source would miss
# ``adams*`` for ``ADAMS^ANNA`` where Orthanc's C-FIND finds it, a difference between
# Orthanc's two interfaces, not the bridge's doing.
ORTHANC_FIND = {
    "DicomAlwaysAllowFind": True,
    "DefaultEncoding": "Utf8",
    "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "QidoCaseSensitive": False},
}

# pydicom's character set files that both Orthanc 1.10 and pydicom read alike. Left
# out: chrH32 (ISO 2022 IR 13 + IR 87) and chrJapMultiExplicitIR6 (ISO 2022 IR 6 +
# IR 87), whose names Orthanc 1.10 decodes wrongly (half-width katakana and the escape
# sequences kept as text), so Orthanc cannot be the reference for them; chrSQEncoding*,
# which have no SOP Instance UID.
CHARSET_FILES = ["chrArab", "chrFren", "chrFrenMulti", "chrGerm", "chrGreek", "chrH31", "chrHbrw", "chrI2",
                 "chrJapMulti", "chrKoreanMulti", "chrRuss", "chrX1", "chrX2"]
# Decoded wrongly by Orthanc (above): stored in the bridge only, checked against pydicom.
ORTHANC_MISREADS = ["chrH32", "chrJapMultiExplicitIR6"]


@dataclass
class Series:
    uid: str
    modality: str
    description: str
    instances: list[str] = field(default_factory=list)  # SOP Instance UIDs, InstanceNumber 1, 2, ...


@dataclass
class Study:
    uid: str
    patient_id: str
    patient_name: str  # decoded
    date: str
    accession: str
    series: list[Series] = field(default_factory=list)


@dataclass
class FindCorpus:
    files: list[Path]  # every instance, for storescu
    studies: dict[str, Study]  # by key: s1..s8, and the charset files' names (chrGreek, ...)

    def instances(self) -> int:
        return sum(len(s.instances) for st in self.studies.values() for s in st.series)


def _instance(path: Path, study: Study, series: Series, number: int, birth: str, sex: str,
              description: str, series_number: int, series_date: str) -> Path:
    sop_class = UID(SOP_CLASSES[series.modality])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study.uid
    ds.SeriesInstanceUID = series.uid
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = birth
    ds.PatientSex = sex
    ds.StudyDate = study.date
    ds.StudyTime = "101500"
    ds.AccessionNumber = study.accession
    ds.StudyID = study.accession[-3:]
    ds.StudyDescription = description
    ds.ReferringPhysicianName = "REFERRER^RITA"
    ds.Modality = series.modality
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series.description
    ds.SeriesDate = series_date
    ds.SeriesTime = f"1{series_number}0000"
    ds.InstanceNumber = number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = np.full((8, 8), number, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    series.instances.append(str(ds.SOPInstanceUID))
    return path


def _charset_copy(source: Path, target: Path, n: int) -> tuple[Path, Study]:
    """pydicom's ``source`` with fresh UIDs, a patient ID of its own, a study date and an
    accession number (most of these files have none), its name and character set kept."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = f"CS-{source.stem}"
    ds.StudyDate = f"201801{n + 1:02d}"
    ds.AccessionNumber = f"CS{n + 1:03d}"
    ds.InstanceNumber = 1
    ds.save_as(target, enforce_file_format=True)
    decoded = pydicom.dcmread(target)
    decoded.decode()
    study = Study(str(ds.StudyInstanceUID), ds.PatientID, str(decoded.PatientName), ds.StudyDate, ds.AccessionNumber,
                  [Series(str(ds.SeriesInstanceUID), str(ds.Modality), "", [str(ds.SOPInstanceUID)])])
    return target, study


def charset_file(name: str) -> Path:
    return next(Path(p) for p in get_charset_files() if Path(p).stem == name)


def find_corpus(dest: Path, charset_names: list[str] = CHARSET_FILES, generated: bool = True) -> FindCorpus:
    """Write the generated studies (unless not ``generated``) and the copies of
    ``charset_names`` into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    studies: dict[str, Study] = {}
    for key, patient_id, date, accession, description, series_list in STUDIES if generated else []:
        name, birth, sex = PATIENTS[patient_id]
        study = Study(generate_uid(), patient_id, name, date, accession)
        studies[key] = study
        for number, (modality, series_description, series_date, count) in enumerate(series_list, start=1):
            series = Series(generate_uid(), modality, series_description)
            study.series.append(series)
            for i in range(1, count + 1):
                files.append(_instance(dest / f"{key}-{number}-{i}.dcm", study, series, i, birth, sex, description,
                                       number, series_date))
    for n, name in enumerate(charset_names):
        path, study = _charset_copy(charset_file(name), dest / f"{name}.dcm", n)
        files.append(path)
        studies[name] = study
    return FindCorpus(files, studies)


def tiny_studies(dest: Path, count: int, patient_id: str = "MANY", name: str = "MANY^STUDIES",
                 date: str = "20240101") -> list[Path]:
    """``count`` one-instance studies of one patient (for queries with many matches)."""
    dest.mkdir(parents=True, exist_ok=True)
    files = []
    for n in range(count):
        study = Study(generate_uid(), patient_id, name, date, f"M{n:05d}")
        series = Series(generate_uid(), "CT", "MANY")
        study.series.append(series)
        files.append(_instance(dest / f"many-{n:05d}.dcm", study, series, 1, "20000101", "O", "MANY", 1, date))
    return files
