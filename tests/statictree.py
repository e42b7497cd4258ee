"""A minimal static DICOMweb tree writer for the server's tests, following
../shared/reference/static-dicomweb.md exactly, until bridge/static/tree.py replaces it.

``write_tree(root, paths)`` writes every instance of ``paths`` under ``root/studies/``
at once (no incremental update, no atomic renames: nothing serves the tree while it is
written).
"""

from __future__ import annotations

import gzip
import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Any

import pydicom

from bridge.static.frames import OCTET_STREAM, frames, multipart_frame, new_boundary
from bridge.static.metadata import dumps, query_object, to_json

JsonObject = dict[str, dict[str, Any]]


def write_tree(root: Path, paths: list[Path], *, threshold: int = 128 * 1024) -> Path:
    studies: dict[str, dict[str, list[tuple[pydicom.Dataset, Path]]]] = defaultdict(lambda: defaultdict(list))
    for path in paths:
        ds = pydicom.dcmread(path)
        studies[ds.StudyInstanceUID][ds.SeriesInstanceUID].append((ds, path))
    study_objects = []
    for study_uid, series in studies.items():
        study_dir = root / "studies" / study_uid
        series_objects = []
        modalities: set[str] = set()
        for series_uid, instances in series.items():
            series_dir = study_dir / "series" / series_uid
            instances.sort(key=lambda item: int(item[0].get("InstanceNumber") or 0))
            series_metadata, instance_objects = [], []
            for ds, path in instances:
                instance_dir = series_dir / "instances" / ds.SOPInstanceUID
                instance_metadata = to_json(ds, _Bulk(study_dir, "../../../../"), threshold, pixel_uri="./frames")
                _gz(instance_dir / "metadata.gz", [instance_metadata])
                series_metadata.append(to_json(ds, _Bulk(study_dir, "../../"), threshold,
                                               pixel_uri=f"./instances/{ds.SOPInstanceUID}/frames"))
                instance_objects.append(query_object(ds, "INSTANCE"))
                _write_frames(instance_dir / "frames", path)
            _gz(series_dir / "metadata.gz", series_metadata)
            _gz(series_dir / "instances" / "index.json.gz", instance_objects)
            first = instances[0][0]
            series_object = _sorted(query_object(first, "SERIES") | {
                "00201209": {"vr": "IS", "Value": [len(instances)]},
            })
            _gz(series_dir / "series-singleton.json.gz", [series_object])
            series_objects.append((int(first.get("SeriesNumber") or 0), series_object))
            if first.get("Modality"):
                modalities.add(str(first.Modality))
        series_objects.sort(key=lambda item: item[0])
        _gz(study_dir / "series" / "index.json.gz", [o for _, o in series_objects])
        first = next(iter(series.values()))[0][0]
        study_object = _sorted(query_object(first, "STUDY") | {
            "00080061": {"vr": "CS", "Value": sorted(modalities)},
            "00201206": {"vr": "IS", "Value": [len(series)]},
            "00201208": {"vr": "IS", "Value": [sum(len(i) for i in series.values())]},
        })
        _gz(study_dir / "index.json.gz", [study_object])
        study_objects.append(study_object)
    _gz(root / "studies" / "index.json.gz", study_objects)
    return root


class _Bulk:
    """Bulk data in ``studies/S/bulkdata/aa/bb/REST.mht.gz``, named by its sha256; the
    URI relative to the metadata file that names it."""

    def __init__(self, study_dir: Path, up: str) -> None:
        self.study_dir, self.up = study_dir, up

    def __call__(self, tag: int, value: bytes, vr: str) -> str:
        digest = hashlib.sha256(value).hexdigest()
        relative = f"bulkdata/{digest[:2]}/{digest[2:4]}/{digest[4:]}"
        boundary = new_boundary()
        body = (f"--{boundary}\r\nContent-Type: {OCTET_STREAM}\r\n\r\n".encode("ascii") + value
                + f"\r\n--{boundary}--\r\n".encode("ascii"))
        _gz_bytes(self.study_dir / f"{relative}.mht.gz", body)
        return self.up + relative


def _write_frames(folder: Path, path: Path) -> None:
    for frame in frames(path):
        body = multipart_frame(frame, new_boundary())
        if frame.content_type == OCTET_STREAM:
            _gz_bytes(folder / f"{frame.number}.mht.gz", body)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{frame.number}.mht").write_bytes(body)


def _sorted(obj: JsonObject) -> JsonObject:
    return dict(sorted(obj.items()))


def _gz(path: Path, obj: Any) -> None:
    _gz_bytes(path, dumps(obj))


def _gz_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data))
