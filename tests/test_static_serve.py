"""bridge.static.serve and ``dicom-bridge serve-static``: a static tree of pydicom's test
files, read back over HTTP with dicomweb-client as a viewer would; and the same tree
served by Python's plain ``http.server`` as docs/static.md tells nginx users."""

from __future__ import annotations

import contextlib
import functools
import gzip
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import forkserver
import numpy as np
import pydicom
import pytest
import requests
import uvicorn
from dicomweb_client import DICOMwebClient
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import as_pixel_options, get_decoder
from pydicom.pixels.utils import get_nr_frames
from pydicom.uid import UID, generate_uid
from test_static_metadata import differences

from bridge.static.frames import frames
from bridge.static.metadata import PIXEL_TAGS
from bridge.static.serve import app
from bridge.static.tree import StaticTree

REPO = Path(__file__).resolve().parent.parent

# Four studies, one series per file. Syntaxes: explicit and implicit VR little endian,
# big endian (single and multi-frame), deflated, JPEG baseline (30 frames), JPEG-LS,
# JPEG 2000, RLE; a 1-bit segmentation; RT dose and plan; an SR.
STUDIES: dict[str, dict[str, Any]] = {
    "A": {"PatientName": "Doe^John", "PatientID": "P1", "StudyDate": "20200105", "AccessionNumber": "ACC1",
          "files": ["CT_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm"]},
    "B": {"PatientName": "DOE^JANE", "PatientID": "P2", "StudyDate": "20210310", "AccessionNumber": "ACC2",
          "files": ["rtdose.dcm", "rtdose_expb.dcm", "rtplan.dcm"]},
    "C": {"PatientName": "Smith^Anna", "PatientID": "P3", "StudyDate": "20221231", "AccessionNumber": "ACC3",
          "files": ["SC_rgb_jpeg_dcmtk.dcm", "examples_ybr_color.dcm", "MR_small_jpeg_ls_lossless.dcm",
                    "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm", "SC_rgb_rle_2frame.dcm"]},
    "D": {"PatientName": "Dobson^Bo", "PatientID": "P4", "StudyDate": "20230615", "AccessionNumber": "ACC4",
          "files": ["test-SR.dcm", "liver_1frame.dcm", "image_dfl.dcm"]},
}
ICC_PROFILE = bytes(range(256)) * 800  # 200 KiB: over the threshold, so bulk data


@dataclass
class Tree:
    root: Path
    url: str
    sources: dict[str, Path]  # SOP Instance UID -> source file
    uids: dict[str, tuple[str, str, str]]  # source file name -> (study, series, instance)
    studies: dict[str, str]  # "A".. -> Study Instance UID

    def client(self) -> DICOMwebClient:
        return DICOMwebClient(url=self.url)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(root: Path) -> Iterator[str]:
    """``app(root)`` on uvicorn in a thread, on a free loopback port."""
    server = uvicorn.Server(uvicorn.Config(app(root), host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


def build(dest: Path) -> tuple[Path, dict[str, Path], dict[str, tuple[str, str, str]], dict[str, str]]:
    sources: dict[str, Path] = {}
    uids: dict[str, tuple[str, str, str]] = {}
    studies: dict[str, str] = {}
    (dest / "files").mkdir(parents=True)
    for key, study in STUDIES.items():
        studies[key] = study_uid = generate_uid()
        for number, name in enumerate(study["files"], start=1):
            ds = pydicom.dcmread(get_testdata_file(name))
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, generate_uid(), generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SeriesNumber = number
            for keyword in ("PatientName", "PatientID", "StudyDate", "AccessionNumber"):
                setattr(ds, keyword, study[keyword])
            if name == "CT_small.dcm":
                ds.ICCProfile = ICC_PROFILE
            target = dest / "files" / name
            ds.save_as(target, enforce_file_format=True)
            sources[ds.SOPInstanceUID] = target
            uids[name] = (study_uid, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    root = dest / "tree"
    results = StaticTree(root).add(list(sources.values()))
    assert [r.status for r in results] == ["added"] * len(sources), [r.reason for r in results if r.reason]
    return root, sources, uids, studies


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], dict[str, Any], dict[str, str]]:
    return build(tmp_path_factory.mktemp("static"))


@pytest.fixture(scope="module")
def tree(built: Any) -> Iterator[Tree]:
    root, sources, uids, studies = built
    with serving(root) as url:
        yield Tree(root, url, sources, uids, studies)


def study_uids(answers: list[dict[str, Any]]) -> set[str]:
    return {a["0020000D"]["Value"][0] for a in answers}


def keys(tree: Tree, *names: str) -> set[str]:
    return {tree.studies[n] for n in names}


# -- searches ------------------------------------------------------------------------------

def test_study_search_lists_every_study_with_its_counts(tree: Tree) -> None:
    found = tree.client().search_for_studies()
    assert study_uids(found) == set(tree.studies.values())
    by_uid = {a["0020000D"]["Value"][0]: a for a in found}
    for key, study in STUDIES.items():
        answer = by_uid[tree.studies[key]]
        assert answer["00201208"]["Value"] == [len(study["files"])]
        assert answer["00201206"]["Value"] == [len(study["files"])]
        assert answer["00100020"]["Value"] == [study["PatientID"]]


def test_series_and_instance_searches(tree: Tree) -> None:
    client = tree.client()
    study = tree.studies["C"]
    series = client.search_for_series(study)
    assert [s["00200011"]["Value"][0] for s in series] == list(range(1, 7))  # by Series Number
    study_uid, series_uid, sop_uid = tree.uids["examples_ybr_color.dcm"]
    [instance] = client.search_for_instances(study_uid, series_uid)
    assert instance["00080018"]["Value"] == [sop_uid]
    assert instance["00280008"]["Value"] == [30]


@pytest.mark.parametrize(("filters", "expected"), [
    ({"PatientName": "doe*"}, "AB"),  # case-insensitive
    ({"PatientName": "Do?son^*"}, "D"),
    ({"PatientName": "*^J*"}, "AB"),
    ({"PatientName": "*"}, "ABCD"),
    ({"StudyDate": "20210101-"}, "BCD"),
    ({"StudyDate": "-20201231"}, "A"),
    ({"StudyDate": "20210101-20221231"}, "BC"),
    ({"StudyDate": "20221231"}, "C"),
    ({"PatientID": "P3"}, "C"),
    ({"00100020": "P4"}, "D"),  # a tag as the key
    ({"AccessionNumber": "ACC2"}, "B"),
    ({"ModalitiesInStudy": "SR"}, "D"),
    ({"ModalitiesInStudy": "CT,RTPLAN"}, "AB"),
    ({"PatientName": "doe*", "StudyDate": "20210101-"}, "B"),
    ({"PatientID": "nobody"}, ""),
])
def test_study_search_filters(tree: Tree, filters: dict[str, str], expected: str) -> None:
    found = tree.client().search_for_studies(search_filters=filters)
    assert study_uids(found) == keys(tree, *expected)


def test_study_search_by_a_list_of_uids(tree: Tree) -> None:
    wanted = f"{tree.studies['A']},{tree.studies['C']}"
    assert study_uids(tree.client().search_for_studies(search_filters={"StudyInstanceUID": wanted})) == keys(
        tree, "A", "C")
    one = tree.client().search_for_studies(search_filters={"StudyInstanceUID": tree.studies["B"]})
    assert study_uids(one) == keys(tree, "B")


def test_limit_and_offset_page_through_the_studies(tree: Tree) -> None:
    client = tree.client()
    everything = [a["0020000D"]["Value"][0] for a in client.search_for_studies()]
    pages = [[a["0020000D"]["Value"][0] for a in client.search_for_studies(limit=2, offset=offset)]
             for offset in (0, 2, 4)]
    assert pages == [everything[0:2], everything[2:4], []]
    filtered = client.search_for_studies(search_filters={"PatientName": "D*"}, limit=1, offset=1)
    assert len(filtered) == 1 and study_uids(filtered) <= keys(tree, "A", "B", "D")


def test_series_search_filters(tree: Tree) -> None:
    client = tree.client()
    study = tree.studies["C"]
    mr = client.search_for_series(study, search_filters={"Modality": "MR"})
    assert {s["0020000E"]["Value"][0] for s in mr} == {
        tree.uids[n][1] for n in ("MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm")}
    series_uid = tree.uids["MR_small_RLE.dcm"][1]
    [one] = client.search_for_series(study, search_filters={"SeriesInstanceUID": series_uid})
    assert one["0020000E"]["Value"] == [series_uid]
    assert one["00201209"]["Value"] == [1]


def test_unsupported_query_keys_are_ignored_with_a_warning(tree: Tree) -> None:
    response = requests.get(f"{tree.url}/studies", params={"InstitutionName": "X", "includefield": "all",
                                                           "fuzzymatching": "true"})
    assert response.status_code == 200
    assert study_uids(response.json()) == set(tree.studies.values())
    assert "InstitutionName" in response.headers["Warning"]


# -- metadata ------------------------------------------------------------------------------

def from_json(obj: dict[str, Any]) -> Dataset:
    return Dataset.from_json(obj, bulk_data_uri_handler=lambda tag, vr, uri: b"")


def bulk_tags(obj: dict[str, Any]) -> frozenset[int]:
    return frozenset(int(k, 16) for k, a in obj.items() if "BulkDataURI" in a)


def test_series_metadata_converts_back_to_the_sources_values(tree: Tree) -> None:
    client = tree.client()
    for name, (study, series, sop) in tree.uids.items():
        [obj] = client.retrieve_series_metadata(study, series)
        assert obj["00080018"]["Value"] == [sop]
        source = pydicom.dcmread(tree.sources[sop])
        assert differences(source, from_json(obj), skip=bulk_tags(obj) | PIXEL_TAGS) == [], name
        if "PixelData" in source:
            assert obj["7FE00010"]["BulkDataURI"] == f"./instances/{sop}/frames"


def test_instance_metadata_converts_back_to_the_sources_values(tree: Tree) -> None:
    client = tree.client()
    for name, (study, series, sop) in tree.uids.items():
        obj = client.retrieve_instance_metadata(study, series, sop)
        source = pydicom.dcmread(tree.sources[sop])
        assert differences(source, from_json(obj), skip=bulk_tags(obj) | PIXEL_TAGS) == [], name


def test_bulk_data_uris_resolve_to_the_value(tree: Tree) -> None:
    study, series, sop = tree.uids["CT_small.dcm"]
    base = f"{tree.url}/studies/{study}/series/{series}/metadata"
    [obj] = tree.client().retrieve_series_metadata(study, series)
    uri = obj["00282000"]["BulkDataURI"]
    assert uri.startswith("../../bulkdata/")
    response = requests.get(urljoin(base, uri))
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith('multipart/related; type="application/octet-stream"')
    assert tree.client().retrieve_bulkdata(urljoin(base, uri)) == [ICC_PROFILE]


def test_study_metadata_joins_the_series_with_uris_relative_to_the_study(tree: Tree) -> None:
    study = tree.studies["A"]
    response = requests.get(f"{tree.url}/studies/{study}/metadata")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/dicom+json"
    found = response.json()
    assert {o["00080018"]["Value"][0] for o in found} == {tree.uids[n][2] for n in STUDIES["A"]["files"]}
    base = f"{tree.url}/studies/{study}/metadata"
    for obj in found:
        frames_url = urljoin(base, obj["7FE00010"]["BulkDataURI"])
        assert requests.get(frames_url + "/1").status_code == 200
    ct = next(o for o in found if o["00080018"]["Value"] == [tree.uids["CT_small.dcm"][2]])
    assert requests.get(urljoin(base, ct["00282000"]["BulkDataURI"])).status_code == 200


# -- frames --------------------------------------------------------------------------------

def pydicom_frames_match(source: Path, served: list[bytes]) -> None:
    """Encapsulated: pydicom's own frames, byte for byte. Native (the served frames are
    explicit VR little endian): decoded, pydicom's pixels of the source."""
    ds = pydicom.dcmread(source)
    count = get_nr_frames(ds)
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_encapsulated:
        assert served == list(generate_frames(ds.PixelData, number_of_frames=count))
        return
    expected = list(ds.pixel_array) if count > 1 else [ds.pixel_array]
    options: dict[str, Any] = as_pixel_options(ds, number_of_frames=1, pixel_keyword="PixelData")
    options["transfer_syntax_uid"] = UID("1.2.840.10008.1.2.1")
    decoder = get_decoder(UID("1.2.840.10008.1.2.1"))
    for frame, pixels in zip(served, expected, strict=True):
        array, _ = decoder.as_array(frame, **options)
        assert np.array_equal(array, pixels)


def test_every_frame_is_the_sources_frame(tree: Tree) -> None:
    client = tree.client()
    checked = 0
    for name, (study, series, sop) in tree.uids.items():
        expected = [f.data for f in frames(tree.sources[sop])]
        if not expected:
            continue
        numbers = list(range(1, len(expected) + 1))
        together = client.retrieve_instance_frames(study, series, sop, frame_numbers=numbers)
        one_by_one = [client.retrieve_instance_frames(study, series, sop, frame_numbers=[n])[0] for n in numbers]
        assert together == expected, name
        assert one_by_one == expected, name
        pydicom_frames_match(tree.sources[sop], together)
        checked += len(expected)
    assert checked >= 60


def test_frames_carry_their_type_and_boundary(tree: Tree) -> None:
    study, series, sop = tree.uids["MR_small_jp2klossless.dcm"]
    url = f"{tree.url}/studies/{study}/series/{series}/instances/{sop}/frames/1"
    response = requests.get(url)
    media_type, boundary = response.headers["Content-Type"].split("; boundary=")
    assert media_type == 'multipart/related; type="image/jp2"'
    assert response.content.startswith(f"--{boundary}\r\n".encode())
    assert "Content-Encoding" not in response.headers  # N.mht: stored as is
    study, series, sop = tree.uids["rtdose.dcm"]
    url = f"{tree.url}/studies/{study}/series/{series}/instances/{sop}/frames/3,1,3"
    response = requests.get(url)
    assert response.headers["Content-Type"].startswith('multipart/related; type="application/octet-stream"; ')
    parts = tree.client().retrieve_instance_frames(study, series, sop, frame_numbers=[3, 1, 3])
    expected = [f.data for f in frames(tree.sources[sop])]
    assert parts == [expected[2], expected[0], expected[2]]


# -- encodings -----------------------------------------------------------------------------

def test_gzip_is_sent_as_stored_to_clients_that_accept_it(tree: Tree) -> None:
    study, series, _ = tree.uids["CT_small.dcm"]
    url = f"{tree.url}/studies/{study}/series/{series}/metadata"
    response = requests.get(url, headers={"Accept-Encoding": "gzip"}, stream=True)
    raw = response.raw.read(decode_content=False)
    assert response.headers["Content-Encoding"] == "gzip"
    assert raw == (tree.root / "studies" / study / "series" / series / "metadata.gz").read_bytes()


@pytest.mark.parametrize("accept", ["identity", "gzip;q=0", "br"])
def test_clients_without_gzip_get_plain_json(tree: Tree, accept: str) -> None:
    study, series, sop = tree.uids["CT_small.dcm"]
    for path in ("/studies", "/studies?PatientName=d*", f"/studies/{study}/series",
                 f"/studies/{study}/series/{series}/metadata"):
        response = requests.get(tree.url + path, headers={"Accept-Encoding": accept}, stream=True)
        raw = response.raw.read(decode_content=False)
        assert response.status_code == 200, path
        assert "Content-Encoding" not in response.headers, path
        assert response.headers["Content-Type"] == "application/dicom+json"
        assert isinstance(json.loads(raw), list), path
    url = f"{tree.url}/studies/{study}/series/{series}/instances/{sop}/frames/1"
    response = requests.get(url, headers={"Accept-Encoding": "identity"}, stream=True)
    raw = response.raw.read(decode_content=False)
    assert "Content-Encoding" not in response.headers
    assert next(frames(tree.sources[sop])).data in raw


# -- failures ------------------------------------------------------------------------------

UNKNOWN = "1.2.3.4.5.6.7.8.9"


@pytest.mark.parametrize("path", [
    f"/studies/{UNKNOWN}/series",
    f"/studies/{UNKNOWN}/metadata",
    "/studies/{S}/series/" + UNKNOWN + "/metadata",
    "/studies/{S}/series/" + UNKNOWN + "/instances",
    "/studies/{S}/series/{X}/instances/" + UNKNOWN + "/metadata",
    "/studies/{S}/series/{X}/instances/{I}/frames/2",
    "/studies/{S}/series/{X}/instances/{I}/frames/1,2",
    "/studies/{S}/bulkdata/aa/bb/cccc",
    "/studies/{S}/series/{X}/instances/{I}",  # no Part-10 files in a static tree
    "/.lock",  # the writer's own files
    "/studies/{S}/series/{X}/instances/{I}/.source.sha256",
    "/studies/{S}/series/{X}/.metadata.gz.0a1b2c3d.tmp",
    "/nothing",
])
def test_unknown_resources_are_404(tree: Tree, path: str) -> None:
    study, series, sop = tree.uids["CT_small.dcm"]
    response = requests.get(tree.url + path.format(S=study, X=series, I=sop))
    assert response.status_code == 404
    assert response.json()["message"]


@pytest.mark.parametrize("path", [
    "/studies?limit=abc",
    "/studies?offset=-1",
    "/studies?StudyDate=20200101-20190101",
    "/studies?StudyDate=2020",
    "/studies?StudyDate=20201340",
    "/studies?StudyInstanceUID=1.2.abc",
    "/studies?NoSuchKeyword=1",
    "/studies/{S}/series?SeriesNumber=one",
    "/studies/not-a-uid/series",
    "/studies/{S}/series/1..2/metadata",
    "/studies/{S}/series/{X}/instances/{I}/frames/0",
    "/studies/{S}/series/{X}/instances/{I}/frames/a",
    "/studies/{S}/series/{X}/instances/{I}/frames/1,,2",
    "/studies/{S}/bulkdata/AA/bb/cc",
    "/studies/../../../etc/passwd",
    "/studies/{S}/series/../../../../etc/passwd",
    "/studies/%2e%2e/%2e%2e/etc/passwd",
    "/studies/{S}/series/..%2f..%2f..%2fetc/metadata",
])
def test_bad_requests_are_400_with_a_message(tree: Tree, path: str) -> None:
    study, series, sop = tree.uids["CT_small.dcm"]
    host, port = tree.url.removeprefix("http://").split(":")
    # http.client sends the path as written: requests would remove the dot segments.
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("GET", path.format(S=study, X=series, I=sop))
    response = connection.getresponse()
    body = response.read()
    connection.close()
    assert response.status == 400, body
    assert response.getheader("Content-Type") == "application/json"
    assert json.loads(body)["message"]
    assert b"Traceback" not in body and b"root:" not in body


def test_a_broken_file_answers_500_with_an_id_and_logs_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root, _, uids, _ = build(tmp_path)
    study, _, _ = uids["CT_small.dcm"]
    (root / "studies" / study / "series" / "index.json.gz").write_bytes(b"not gzip at all")
    with serving(root) as url:
        response = requests.get(f"{url}/studies/{study}/series?Modality=CT")
    assert response.status_code == 500
    ident = response.json()["id"]
    assert "Traceback" not in response.text and "gzip" not in response.text
    assert any(ident in r.getMessage() and r.exc_info for r in caplog.records)


def test_an_empty_tree_has_no_studies(tmp_path: Path) -> None:
    with serving(tmp_path) as url:
        response = requests.get(f"{url}/studies")
    assert response.status_code == 200 and response.json() == []


# -- the command ---------------------------------------------------------------------------

def test_serve_static_command_serves_the_tree(built: Any) -> None:
    root, _, uids, studies = built
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bridge", "serve-static", str(root), "--listen",
                             f"127.0.0.1:{port}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client = DICOMwebClient(url=f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 20
        while True:
            try:
                found = client.search_for_studies()
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, "serve-static did not start"
                time.sleep(0.1)
        assert study_uids(found) == set(studies.values())
        study, series, sop = uids["SC_rgb_jpeg_dcmtk.dcm"]
        assert client.retrieve_instance_frames(study, series, sop, [1]) == [f.data for f in frames(
            root.parent / "files" / "SC_rgb_jpeg_dcmtk.dcm")]
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=10)
    assert b'"GET /studies HTTP/1.1" 200' in output


def test_serve_static_refuses_a_missing_folder(tmp_path: Path) -> None:
    result = forkserver.run(["serve-static", str(tmp_path / "none")], timeout=30)
    assert result.returncode == 2 and "not a folder" in result.stderr


# -- a plain static file server ------------------------------------------------------------

def plain_handler() -> type[SimpleHTTPRequestHandler]:
    """The ``http.server`` handler docs/static.md gives as the mapping a plain web server
    needs (nginx users' rules), run as the page prints it, so the two cannot drift."""
    text = (REPO / "docs" / "static.md").read_text()
    section = text[text.index("## Serving a tree with a plain web server"):]
    code = section[section.index("```python\n") + len("```python\n"):]
    code = code[:code.index("```")].split("\nThreadingHTTPServer(")[0]  # all but the line that serves forever
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/static.md", "exec"), namespace)
    handler: type[SimpleHTTPRequestHandler] = namespace["StaticTreeHandler"]

    class Quiet(handler):  # type: ignore[valid-type,misc]
        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Quiet


def test_a_plain_file_server_answers_study_search_and_series_metadata(built: Any) -> None:
    root, sources, uids, studies = built
    study, series, sop = uids["MR_small_bigendian.dcm"]
    temporary = root / "studies" / study / "series" / series / ".metadata.gz.0a1b2c3d.tmp"
    handler = functools.partial(plain_handler(), directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = DICOMwebClient(url=f"http://127.0.0.1:{server.server_port}")
        assert study_uids(client.search_for_studies()) == set(studies.values())
        assert len(client.search_for_series(study)) == 3
        [obj] = client.retrieve_series_metadata(study, series)
        source = pydicom.dcmread(sources[sop])
        assert differences(source, from_json(obj), skip=bulk_tags(obj) | PIXEL_TAGS) == []
        stored = gzip.decompress((root / "studies" / study / "series" / series / "metadata.gz").read_bytes())
        assert [obj] == json.loads(stored)
        # Nothing but the mapped files: not the writer's own, not a folder's listing.
        url = f"http://127.0.0.1:{server.server_port}"
        instance = f"/studies/{study}/series/{series}/instances/{sop}"
        temporary.write_bytes(b"half a file")
        for path in ("/.lock", f"{instance}/.source.sha256", f"/studies/{study}/series/{series}/{temporary.name}",
                     instance, f"{instance}/frames", f"/studies/{study}/series/{series}/metadata.gz"):
            response = requests.get(url + path)
            assert response.status_code == 404, path
            assert "Content-Encoding" not in response.headers, path
    finally:
        temporary.unlink(missing_ok=True)
        server.shutdown()
        server.server_close()
        thread.join(10)
