"""WADO-RS retrieval by a dicomweb source (bridge/sources/dicomweb.py ``retrieve``,
bridge/sources/wado.py): against Orthanc with its DICOMweb plugin for what a server
holds and gives back as stored, and against a small WADO-RS server (tests/fakewado.py)
for answers Orthanc cannot give (cut off, HTML error pages, parts not asked for, odd
pieces, a part of 200 MB).

What a caller sees: one ``Retrieved`` per reference, a file it owns or a reason, and
nothing left in the temporary folder but the files it was given.
"""

from __future__ import annotations

import io
import threading
import time
import tracemalloc
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from corpus import write_ct
from fakewado import FakeWado, multipart, related
from peers import Orthanc
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from bridge.config import DicomwebSource as DicomwebConfig
from bridge.errors import UpstreamMisconfigured, UpstreamUnavailable
from bridge.metrics import Metrics
from bridge.model import InstanceRef, Retrieved
from bridge.sources import wado
from bridge.sources.dicomweb import DicomwebSource

# pydicom's files in their own transfer syntaxes, put into one series.
MIXED = ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm",
         "MR_small_RLE.dcm", "JPEG-lossy.dcm"]


def source(url: str, temp_dir: Path, name: str = "web", metrics: Metrics | None = None,
           **settings: Any) -> DicomwebSource:
    config = DicomwebConfig.model_validate({"type": "dicomweb", "url": url, **settings})
    return DicomwebSource(name, config, metrics or Metrics(), temp_dir)


def collect(retrieved: Iterable[Retrieved | None]) -> tuple[dict[str, bytes], dict[str, str]]:
    """The bytes delivered (each file read, then removed as a caller does) and the
    failures, by SOP Instance UID."""
    files: dict[str, bytes] = {}
    failures: dict[str, str] = {}
    for item in retrieved:
        if item is None:
            continue
        uid = item.ref.sop_instance_uid
        assert uid not in files and uid not in failures, f"{uid} given twice"
        if item.path is not None:
            assert item.temporary and not item.failure
            files[uid] = item.path.read_bytes()
            item.path.unlink()
        else:
            failures[uid] = item.failure
    return files, failures


def leftovers(folder: Path) -> list[Path]:
    return sorted(folder.glob("*")) if folder.exists() else []


def ref(ds: Dataset) -> InstanceRef:
    return InstanceRef(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                       str(ds.SOPClassUID))


def part10(ds: Dataset) -> bytes:
    data = io.BytesIO()
    ds.save_as(data, enforce_file_format=True)
    return data.getvalue()


def wado_errors(metrics: Metrics, name: str = "web") -> float | None:
    return metrics.registry.get_sample_value("dicom_bridge_upstream_errors_total",
                                             {"source": name, "operation": "wado"})


def wado_requests(metrics: Metrics, name: str = "web") -> float:
    return metrics.registry.get_sample_value("dicom_bridge_upstream_request_seconds_count",
                                             {"source": name, "operation": "wado"}) or 0.0


# -- against Orthanc ---------------------------------------------------------------------------


class Pacs:
    """An Orthanc holding a series of mixed transfer syntaxes (``mixed``) and a CT series
    (``ct``), with the bytes it was given of each instance."""

    def __init__(self, orthanc: Orthanc) -> None:
        self.orthanc = orthanc
        self.url = orthanc.dicomweb
        self.stored: dict[str, bytes] = {}  # by SOP Instance UID
        self.mixed: list[InstanceRef] = []
        self.ct: list[InstanceRef] = []

    def post(self, ds: Dataset) -> InstanceRef:
        data = part10(ds)
        request = urllib.request.Request(self.orthanc.url + "/instances", data=data, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
        self.stored[str(ds.SOPInstanceUID)] = data
        return ref(ds)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacs]:
    workdir = tmp_path_factory.mktemp("wado")
    orthanc = Orthanc(workdir / "orthanc").start()
    try:
        pacs = Pacs(orthanc)
        study, series = generate_uid(), generate_uid()
        for n, name in enumerate(MIXED):
            ds = pydicom.dcmread(get_testdata_file(name))
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.PatientID, ds.InstanceNumber = "WADO-1", n + 1
            pacs.mixed.append(pacs.post(ds))
        series = generate_uid()
        for n in range(3):
            path = write_ct(workdir / "ct.dcm", study, series, n + 1, pydicom.dcmread(
                get_testdata_file("CT_small.dcm")).pixel_array)
            ds = pydicom.dcmread(path)
            ds.PatientID = "WADO-1"
            pacs.ct.append(pacs.post(ds))
        yield pacs
    finally:
        orthanc.stop()


def test_a_series_comes_back_as_stored_in_its_own_transfer_syntaxes(pacs: Pacs, tmp_path: Path) -> None:
    metrics = Metrics()
    files, failures = collect(source(pacs.url, tmp_path, metrics=metrics).retrieve(pacs.mixed))
    assert failures == {}
    assert sorted(files) == sorted(r.sop_instance_uid for r in pacs.mixed)
    for uid, data in files.items():
        assert data == pacs.stored[uid], uid  # byte for byte: not transcoded
    assert wado_requests(metrics) == 1  # the whole series in one request
    assert leftovers(tmp_path) == []


def test_each_file_is_handed_over_in_the_temporary_folder(pacs: Pacs, tmp_path: Path) -> None:
    folder = tmp_path / "spool" / "incoming"  # made when missing
    for item in source(pacs.url, folder, name="pacs-a").retrieve(pacs.ct[:2]):
        assert item is not None and item.path is not None
        assert item.path.parent == folder and item.path.name.startswith("retrieved-pacs-a-")
        assert item.path.suffix == ".dcm"
        assert pydicom.dcmread(item.path).SOPInstanceUID == item.ref.sop_instance_uid
        item.path.unlink()
    assert leftovers(folder) == []


def test_only_the_instances_asked_for_are_given(pacs: Pacs, tmp_path: Path) -> None:
    asked = [pacs.ct[0], pacs.ct[2], pacs.mixed[3]]
    files, failures = collect(source(pacs.url, tmp_path).retrieve(asked))
    assert failures == {}
    assert sorted(files) == sorted(r.sop_instance_uid for r in asked)
    assert all(files[uid] == pacs.stored[uid] for uid in files)
    assert leftovers(tmp_path) == []  # the rest of the CT series was removed


def test_a_missing_instance_fails_and_the_others_come(pacs: Pacs, tmp_path: Path) -> None:
    ct = pacs.ct[0]
    missing = InstanceRef(ct.study_uid, ct.series_uid, generate_uid(), ct.sop_class_uid)
    elsewhere = InstanceRef(ct.study_uid, generate_uid(), generate_uid(), ct.sop_class_uid)
    files, failures = collect(source(pacs.url, tmp_path).retrieve([ct, missing, pacs.ct[1], elsewhere]))
    assert sorted(files) == sorted([ct.sop_instance_uid, pacs.ct[1].sop_instance_uid])
    assert sorted(failures) == sorted([missing.sop_instance_uid, elsewhere.sop_instance_uid])
    for failure in failures.values():
        assert failure.startswith("source web: ") and "404" in failure, failure
    assert missing.sop_instance_uid in failures[missing.sop_instance_uid]
    assert leftovers(tmp_path) == []


def test_closed_early_leaves_only_what_was_handed_over(pacs: Pacs, tmp_path: Path) -> None:
    web = source(pacs.url, tmp_path)
    retrieval = web.retrieve(pacs.mixed)
    first = next(item for item in retrieval if item is not None)
    retrieval.close()
    assert first.path is not None and first.path.exists()
    assert leftovers(tmp_path) == [first.path]  # the caller's; nothing else
    first.path.unlink()
    files, _ = collect(web.retrieve(pacs.ct))  # the source still works (its client back in the pool)
    assert len(files) == 3


def test_several_retrievals_at_once(pacs: Pacs, tmp_path: Path) -> None:
    web = source(pacs.url, tmp_path)
    results: list[dict[str, bytes]] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            for _ in range(3):
                results.append(collect(web.retrieve(pacs.mixed + pacs.ct))[0])
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    web.close()
    assert not errors
    assert len(results) == 9
    assert all(r == {uid: pacs.stored[uid] for uid in r} and len(r) == 9 for r in results)


def test_orthanc_down_is_unavailable(tmp_path: Path) -> None:
    orthanc = Orthanc(tmp_path / "orthanc")  # configured, never started: nothing listens
    ct = InstanceRef("1.2.3", "1.2.3.4", "1.2.3.4.5", "1.2.840.10008.5.1.4.1.1.2")
    metrics = Metrics()
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable, match=r"^source web: .*(refused|Connection)"):
        collect(source(orthanc.dicomweb, tmp_path / "temp", metrics=metrics).retrieve([ct]))
    assert time.monotonic() - started < 5
    assert wado_errors(metrics) == 1
    assert leftovers(tmp_path / "temp") == []


# -- against a small WADO-RS server ------------------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeWado]:
    server = FakeWado().start()
    yield server
    server.stop()


@pytest.fixture
def cts(tmp_path: Path) -> list[tuple[InstanceRef, bytes]]:
    """Three CT instances of one series, as references and Part-10 bytes."""
    study, series = generate_uid(), generate_uid()
    pixels = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array
    out = []
    for n in range(3):
        path = write_ct(tmp_path / f"ct{n}.dcm", study, series, n + 1, pixels)
        out.append((ref(pydicom.dcmread(path)), path.read_bytes()))
        path.unlink()
    return out


def test_the_instances_are_asked_for_as_stored(fake: FakeWado, cts: list[tuple[InstanceRef, bytes]],
                                               tmp_path: Path) -> None:
    (one, data), (two, _), _ = cts
    fake.answer = lambda path: (200, related(), multipart([data]))
    collect(source(fake.url, tmp_path / "t").retrieve([one, two]))
    assert fake.seen() == [wado.series_path(one.study_uid, one.series_uid), wado.instance_path(two)]
    assert all(a == 'multipart/related; type="application/dicom"; transfer-syntax=*' for a in fake.accept)


def test_a_part_not_asked_for_is_removed(fake: FakeWado, cts: list[tuple[InstanceRef, bytes]],
                                         tmp_path: Path) -> None:
    (one, one_data), (two, two_data), (three, three_data) = cts

    def answer(path: str) -> tuple[int, dict[str, str], bytes]:
        if path == wado.series_path(one.study_uid, one.series_uid):
            return 200, related(), multipart([one_data, two_data])  # two was not asked for
        if path == wado.instance_path(three):
            return 200, related(), multipart([two_data])  # the wrong instance
        return 404, {}, b""

    fake.answer = answer
    files, failures = collect(source(fake.url, tmp_path).retrieve([one, three]))
    assert files == {one.sop_instance_uid: one_data}
    assert list(failures) == [three.sop_instance_uid]
    assert "not in the WADO-RS response" in failures[three.sop_instance_uid]
    assert two.sop_instance_uid in failures[three.sop_instance_uid]  # what came instead
    assert leftovers(tmp_path) == []


def test_an_answer_that_stops_in_a_part_times_out(fake: FakeWado, cts: list[tuple[InstanceRef, bytes]],
                                                  tmp_path: Path) -> None:
    (one, one_data), (two, two_data), _ = cts
    body = multipart([one_data, two_data])
    cut = body.index(two_data) + 1000
    fake.answer = lambda path: (200, related(), [body[:cut], 30.0, body[cut:]])
    retrieval = source(fake.url, tmp_path, retrieve_timeout="1s").retrieve([one, two])
    given: list[Retrieved] = []
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable, match=r"^source web: .*(timed out|[Tt]imeout)"):
        for item in retrieval:
            if item is not None:
                given.append(item)
    assert time.monotonic() - started < 4
    assert [(g.ref, g.path is not None) for g in given] == [(one, True)]  # what came before, handed over
    assert given[0].path is not None and given[0].path.read_bytes() == one_data
    given[0].path.unlink()
    assert leftovers(tmp_path) == []  # the part cut off was removed


def test_an_html_502_is_unavailable_with_its_text(fake: FakeWado, cts: list[tuple[InstanceRef, bytes]],
                                                  tmp_path: Path) -> None:
    page = b"<html><body><h1>502 Bad Gateway</h1>upstream PACS timed out</body></html>"
    fake.answer = lambda path: (502, {"Content-Type": "text/html"}, page)
    metrics = Metrics()
    with pytest.raises(UpstreamUnavailable, match=r"^source web: HTTP 502 Bad Gateway: <html>.*upstream PACS"):
        collect(source(fake.url, tmp_path, metrics=metrics).retrieve([cts[0][0]]))
    assert leftovers(tmp_path) == []
    assert wado_errors(metrics) == 1


def test_refused_credentials_are_misconfigured(fake: FakeWado, cts: list[tuple[InstanceRef, bytes]],
                                               tmp_path: Path) -> None:
    fake.answer = lambda path: (403, {"Content-Type": "text/plain"}, b"forbidden")
    with pytest.raises(UpstreamMisconfigured, match=r"^source web: HTTP 403"):
        collect(source(fake.url, tmp_path).retrieve([r for r, _ in cts]))


def test_answers_that_are_not_multipart(fake: FakeWado, cts: list[tuple[InstanceRef, bytes]],
                                        tmp_path: Path) -> None:
    (one, one_data), (two, _), (three, _) = cts

    def answer(path: str) -> tuple[int, dict[str, str], bytes]:
        if path == wado.instance_path(one):  # a single instance, not wrapped: taken
            return 200, {"Content-Type": "application/dicom"}, one_data
        if path == wado.instance_path(two):
            return 200, {"Content-Type": "text/html"}, b"<html>Login</html>"
        return 200, {"Content-Type": 'multipart/related; type="application/dicom"'}, multipart([])

    fake.answer = answer
    files, failures = collect(source(fake.url, tmp_path).retrieve([one]))
    assert files == {one.sop_instance_uid: one_data}
    _, failures = collect(source(fake.url, tmp_path).retrieve([two, three]))
    assert "HTTP 200 OK" in failures[two.sop_instance_uid] and "text/html" in failures[two.sop_instance_uid]
    assert "without a boundary" in failures[three.sop_instance_uid]
    assert leftovers(tmp_path) == []


def test_a_part_that_is_not_dicom_fails_its_instance(fake: FakeWado, cts: list[tuple[InstanceRef, bytes]],
                                                     tmp_path: Path) -> None:
    (one, one_data), _, _ = cts
    fake.answer = lambda path: (200, related(), multipart([one_data[:len(one_data) - 100]]))  # cut short
    _, failures = collect(source(fake.url, tmp_path).retrieve([one]))
    assert "truncated" in failures[one.sop_instance_uid]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("part_type", ["application/dicom; transfer-syntax=1.2.840.10008.1.2.1",
                                       "application/dicom"])  # the syntax read from the data set
def test_a_bare_data_set_becomes_a_part10_file(fake: FakeWado, cts: list[tuple[InstanceRef, bytes]],
                                               tmp_path: Path, part_type: str) -> None:
    (one, one_data), (two, two_data), _ = cts
    bare = {r.sop_instance_uid: data[132 + 12 + int.from_bytes(data[140:144], "little"):] for r, data in cts}
    fake.answer = lambda path: (200, related(), multipart(
        [bare[one.sop_instance_uid], bare[two.sop_instance_uid]], content_type=part_type))
    files, failures = collect(source(fake.url, tmp_path).retrieve([one, two]))
    assert failures == {}
    for r, original in ((one, one_data), (two, two_data)):
        ds = pydicom.dcmread(io.BytesIO(files[r.sop_instance_uid]))  # Part 10: no force needed
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert ds.file_meta.MediaStorageSOPInstanceUID == r.sop_instance_uid
        assert files[r.sop_instance_uid].endswith(bare[r.sop_instance_uid])  # the data set as sent
        assert ds.PixelData == pydicom.dcmread(io.BytesIO(original)).PixelData


def test_parts_cut_into_odd_pieces(fake: FakeWado, cts: list[tuple[InstanceRef, bytes]], tmp_path: Path) -> None:
    body = multipart([data for _, data in cts])
    sizes = [1, 2, 3, 5, 7, 11, 13, 17, 61, 127, 1021, 4099]
    pieces, at, n = [], 0, 0
    while at < len(body):
        size = sizes[n % len(sizes)]
        pieces.append(body[at:at + size])
        at, n = at + size, n + 1
    fake.answer = lambda path: (200, related(), pieces)
    files, failures = collect(source(fake.url, tmp_path).retrieve([r for r, _ in cts]))
    assert failures == {}
    assert files == {r.sop_instance_uid: data for r, data in cts}


def test_every_split_of_a_body_gives_the_same_parts(cts: list[tuple[InstanceRef, bytes]], tmp_path: Path) -> None:
    body = multipart([data for _, data in cts[:2]], boundary="b")
    boundaries = [i for i in range(len(body)) if body.startswith(b"\r\n--b", i)] + [0]
    for split in sorted({s + d for s in boundaries for d in range(-3, 10) if 0 < s + d < len(body)}):
        given = [p for p in wado.parts([body[:split], body[split:]], related("b")["Content-Type"], tmp_path, "x-")
                 if p is not None]
        assert [p.sop_instance_uid for p in given] == [r.sop_instance_uid for r, _ in cts[:2]], split
        for p, (_, data) in zip(given, cts[:2], strict=True):
            assert p.path is not None and p.path.read_bytes() == data
            p.path.unlink()


def test_a_slow_part_is_announced_while_it_arrives(fake: FakeWado, cts: list[tuple[InstanceRef, bytes]],
                                                   tmp_path: Path) -> None:
    (one, data), _, _ = cts
    body = multipart([data])
    step = len(body) // 10
    fake.answer = lambda path: (200, related(),
                                [x for i in range(0, len(body), step) for x in (body[i:i + step], 0.35)])
    items = list(source(fake.url, tmp_path).retrieve([one]))
    assert None in items[:-1]  # at work, before the instance came
    assert isinstance(items[-1], Retrieved) and items[-1].path is not None
    items[-1].path.unlink()


def test_a_large_part_is_streamed_not_held(fake: FakeWado, tmp_path: Path) -> None:
    """A part of 200 MB passes through the source without being held in memory."""
    size = 200 << 20
    head = write_ct(tmp_path / "big.dcm", generate_uid(), generate_uid(), 1, pydicom.dcmread(
        get_testdata_file("CT_small.dcm")).pixel_array)
    ds = pydicom.dcmread(head)
    ds.Rows, ds.Columns = 10240, 10240  # 10240 x 10240 x 2 bytes = 200 MiB
    ds.PixelData = b""
    header = part10(ds)[:-4]  # the Pixel Data element without its length and value
    assert header.endswith(b"\xe0\x7f\x10\x00OW\x00\x00")
    zeros = bytes(1 << 20)

    def body() -> Iterator[bytes]:
        yield b"--wado-boundary\r\nContent-Type: application/dicom\r\n\r\n" + header + size.to_bytes(4, "little")
        for _ in range(size >> 20):
            yield zeros
        yield b"\r\n--wado-boundary--\r\n"

    fake.answer = lambda path: (200, related(), body())
    wanted = ref(ds)
    tracemalloc.start()
    try:
        items = [item for item in source(fake.url, tmp_path / "t").retrieve([wanted]) if item is not None]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    (item,) = items
    assert item.path is not None and item.path.stat().st_size == len(header) + 4 + size
    item.path.unlink()
    assert peak < 50 << 20, f"{peak >> 20} MiB held"


def test_closed_while_a_part_arrives_removes_it(fake: FakeWado, cts: list[tuple[InstanceRef, bytes]],
                                                tmp_path: Path) -> None:
    (one, data), (two, _), _ = cts
    body = multipart([data])
    fake.answer = lambda path: (200, related(), [body[:5000], 2.5, body[5000:6000], 30.0, body[6000:]])
    web = source(fake.url, tmp_path)
    retrieval = web.retrieve([one, two])
    assert next(retrieval) is None  # at work: part of an instance written
    retrieval.close()
    assert leftovers(tmp_path) == []
    fake.answer = lambda path: (200, related(), multipart([data]))
    files, _ = collect(web.retrieve([one]))  # the source still works
    assert files == {one.sop_instance_uid: data}
