"""StaticTree: instances written into a static DICOMweb tree, read back from the files as
a web server would serve them (the layout of ../shared/reference/static-dicomweb.md)."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import posixpath
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from corpus import ct_series, fresh_copies, with_uid, write_ct
from pydicom.uid import generate_uid

from bridge.static.frames import frames
from bridge.static.tree import StaticTree
from bridge.web.multipart import read_parts


def gz(path: Path) -> Any:
    return json.loads(gzip.decompress(path.read_bytes()))


def value(obj: dict[str, Any], tag: str) -> Any:
    return (obj.get(tag, {}).get("Value") or [None])[0]


def instance_folder(root: Path, path: Path) -> Path:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return (root / "studies" / ds.StudyInstanceUID / "series" / ds.SeriesInstanceUID / "instances"
            / ds.SOPInstanceUID)


def snapshot(root: Path) -> dict[Path, tuple[int, bytes]]:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


def frame_part(path: Path) -> tuple[dict[str, str], bytes]:
    body = path.read_bytes()
    if path.suffix == ".gz":
        body = gzip.decompress(body)
    boundary = body.split(b"\r\n", 1)[0][2:].decode("ascii")
    parts = read_parts([body], boundary)
    assert len(parts) == 1
    return {k.lower(): v for k, v in parts[0].headers.items()}, parts[0].body


def with_private_blob(source: Path, target: Path, blob: bytes) -> Path:
    ds = pydicom.dcmread(source)
    block = ds.private_block(0x0011, "BRIDGE TEST", create=True)
    block.add_new(0x01, "OB", blob)
    ds.save_as(target, enforce_file_format=True)
    return target


def multiframe(path: Path, study: str, series: str, sop: str, count: int) -> Path:
    write_ct(path, study, series, 1, np.zeros((8, 8), np.uint16), sop_instance_uid=sop)
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = count
    ds.PixelData = np.arange(count * 64, dtype="<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return fresh_copies(tmp_path_factory.mktemp("corpus"))


def test_layout_metadata_and_frames(tmp_path: Path, corpus_files: list[Path]) -> None:
    series = ct_series(tmp_path / "ct", 3)
    blob = bytes(range(256)) * 20
    bulky = with_private_blob(series[0], tmp_path / "bulky.dcm", blob)
    root = tmp_path / "tree"
    inputs = [*corpus_files, *series[1:], bulky]
    results = StaticTree(root).add(inputs)
    assert len(results) == len(inputs)
    added = [r for r in results if r.status == "added"]
    assert len(added) >= len(inputs) - 2, [(r.path.name, r.reason) for r in results if r.status != "added"]

    for result in added:
        folder = instance_folder(root, result.path)
        [meta] = gz(folder / "metadata.gz")
        ds = pydicom.dcmread(result.path, stop_before_pixels=True)
        assert value(meta, "00083002") == ds.file_meta.TransferSyntaxUID
        assert list(meta) == sorted(meta)
        expected = list(frames(result.path))
        if expected:
            pixel = next(meta[k] for k in ("7FE00008", "7FE00009", "7FE00010") if k in meta)
            assert pixel["BulkDataURI"] == "./frames"
        stored = sorted((folder / "frames").glob("*.mht*")) if expected else []
        assert len(stored) == len(expected)
        for frame in expected:
            native = frame.content_type == "application/octet-stream"
            target = folder / "frames" / (f"{frame.number}.mht.gz" if native else f"{frame.number}.mht")
            headers, body = frame_part(target)
            assert headers["content-type"] == f"{frame.content_type};transfer-syntax={frame.transfer_syntax}"
            assert body == frame.data

        # The series metadata: every instance, URIs relative to the series' URL.
        series_folder = folder.parent.parent
        entries = {value(m, "00080018"): m for m in gz(series_folder / "metadata.gz")}
        in_series = entries[result.sop_instance_uid]
        if expected:
            pixel_keys = [k for k in ("7FE00008", "7FE00009", "7FE00010") if k in in_series]
            assert in_series[pixel_keys[0]]["BulkDataURI"] == f"./instances/{result.sop_instance_uid}/frames"
        for name in ("series-singleton.json.gz", "instances/index.json.gz"):
            assert (series_folder / name).is_file()
        study_folder = series_folder.parent.parent
        assert (study_folder / "index.json.gz").is_file() and (study_folder / "series/index.json.gz").is_file()

    # Bulk data: a relative URI resolving, from either metadata URL, to one file holding the value.
    folder = instance_folder(root, bulky)
    [meta] = gz(folder / "metadata.gz")
    blob_key = next(k for k, v in meta.items() if k.startswith("0011") and "BulkDataURI" in v)
    uri = meta[blob_key]["BulkDataURI"]
    assert uri.startswith("../../../../bulkdata/")
    url = "/" + str(folder.relative_to(root)) + "/metadata"
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(url), uri))
    bulk_file = root / (resolved.lstrip("/") + ".mht.gz")
    headers, body = frame_part(bulk_file)
    assert body == blob and headers["content-type"] == "application/octet-stream"
    series_url = "/" + str(folder.parent.parent.relative_to(root)) + "/metadata"
    [in_series] = [m for m in gz(folder.parent.parent / "metadata.gz") if blob_key in m]
    series_uri = in_series[blob_key]["BulkDataURI"]
    assert series_uri.startswith("../../bulkdata/")
    assert posixpath.normpath(posixpath.join(posixpath.dirname(series_url), series_uri)) == resolved

    studies = gz(root / "studies" / "index.json.gz")
    assert len(studies) == len({r.study_uid for r in added})
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_reconvert_changes_nothing(tmp_path: Path, corpus_files: list[Path]) -> None:
    root = tmp_path / "tree"
    tree = StaticTree(root)
    inputs = [*corpus_files[:20], *ct_series(tmp_path / "ct", 4)]
    first = tree.add(inputs)
    before = snapshot(root)
    again = StaticTree(root).add(inputs)
    assert [r.status for r in again] == ["unchanged" if r.status == "added" else r.status for r in first]
    assert snapshot(root) == before


def test_adding_instances_updates_counts(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    tree = StaticTree(root)
    study = generate_uid()
    first = ct_series(tmp_path / "a", 3, study_uid=study)
    assert {r.status for r in tree.add(first)} == {"added"}
    [query] = gz(root / "studies" / study / "index.json.gz")
    assert (value(query, "00201206"), value(query, "00201208")) == (1, 3)

    second = ct_series(tmp_path / "b", 4, study_uid=study)
    for number, path in enumerate(second):  # a series numbered 2, of MR
        ds = pydicom.dcmread(path)
        ds.SeriesNumber, ds.Modality, ds.InstanceNumber = 2, "MR", 4 - number
        ds.save_as(path)
    other = ct_series(tmp_path / "c", 2)
    assert {r.status for r in tree.add([*second, *other])} == {"added"}
    [query] = gz(root / "studies" / study / "index.json.gz")
    assert (value(query, "00201206"), value(query, "00201208")) == (2, 7)
    assert query["00080061"]["Value"] == ["CT", "MR"]
    series = gz(root / "studies" / study / "series" / "index.json.gz")
    assert [value(s, "00200011") for s in series] == [1, 2]
    assert [value(s, "00201209") for s in series] == [3, 4]
    series_uid = value(series[1], "0020000E")
    instances = gz(root / "studies" / study / "series" / series_uid / "instances" / "index.json.gz")
    assert [value(i, "00200013") for i in instances] == [1, 2, 3, 4]
    metadata = gz(root / "studies" / study / "series" / series_uid / "metadata.gz")
    assert [value(m, "00200013") for m in metadata] == [1, 2, 3, 4]
    assert len(gz(root / "studies" / "index.json.gz")) == 2


def test_replaced_instance_loses_stale_frames(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    uids = generate_uid(), generate_uid(), generate_uid()
    three = multiframe(tmp_path / "three.dcm", *uids, count=3)
    tree = StaticTree(root)
    assert tree.add([three])[0].status == "added"
    folder = instance_folder(root, three)
    assert sorted(p.name for p in (folder / "frames").iterdir()) == ["1.mht.gz", "2.mht.gz", "3.mht.gz"]
    one = multiframe(tmp_path / "one.dcm", *uids, count=1)
    assert tree.add([one])[0].status == "added"
    assert sorted(p.name for p in (folder / "frames").iterdir()) == ["1.mht.gz"]
    assert frame_part(folder / "frames" / "1.mht.gz")[1] == next(frames(one)).data
    [meta] = gz(folder.parent.parent / "metadata.gz")
    assert value(meta, "00280008") == 1


def test_bad_uids_and_non_dicom_are_refused(tmp_path: Path) -> None:
    [good] = ct_series(tmp_path / "ct", 1)
    bad = [
        with_uid(good, tmp_path / "dots.dcm", SOPInstanceUID="../../../escape"),
        with_uid(good, tmp_path / "letters.dcm", StudyInstanceUID="1.2.abc"),
        with_uid(good, tmp_path / "long.dcm", SeriesInstanceUID="1." + "2" * 80),
    ]
    junk = tmp_path / "notes.txt"
    junk.write_text("not DICOM")
    root = tmp_path / "tree"
    results = StaticTree(root).add([*bad, junk, tmp_path / "gone.dcm"])
    assert [r.status for r in results] == ["failed", "failed", "failed", "skipped", "failed"]
    assert "invalid SOPInstanceUID" in results[0].reason
    assert "invalid StudyInstanceUID" in results[1].reason
    assert "invalid SeriesInstanceUID" in results[2].reason
    assert "not DICOM" in results[3].reason
    assert "unreadable" in results[4].reason
    assert not (root / "studies").exists() or not any((root / "studies").iterdir())
    assert not (tmp_path / "escape").exists()


def _add_in_process(root: str, paths: list[str]) -> None:
    tree = StaticTree(Path(root))
    for start in range(0, len(paths), 3):
        results = tree.add([Path(p) for p in paths[start:start + 3]])
        assert {r.status for r in results} == {"added"}


def test_concurrent_adds_from_two_processes_end_consistent(tmp_path: Path) -> None:
    study = generate_uid()
    a = ct_series(tmp_path / "a", 15, study_uid=study)
    b = ct_series(tmp_path / "b", 15, study_uid=study)
    shared = ct_series(tmp_path / "shared", 12, study_uid=study)  # one series both write into
    root = tmp_path / "tree"
    ctx = multiprocessing.get_context("spawn")
    jobs = [ctx.Process(target=_add_in_process, args=(str(root), [str(p) for p in files]))
            for files in ([*a, *shared[::2]], [*b, *shared[1::2]])]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(120)
        assert job.exitcode == 0
    [query] = gz(root / "studies" / study / "index.json.gz")
    assert (value(query, "00201206"), value(query, "00201208")) == (3, 42)
    series = gz(root / "studies" / study / "series" / "index.json.gz")
    assert sorted(value(s, "00201209") for s in series) == [12, 15, 15]
    for entry in series:
        folder = root / "studies" / study / "series" / value(entry, "0020000E")
        assert len(gz(folder / "metadata.gz")) == value(entry, "00201209")
        assert len(gz(folder / "instances" / "index.json.gz")) == value(entry, "00201209")
    assert [value(s, "0020000D") for s in gz(root / "studies" / "index.json.gz")] == [study]
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]
