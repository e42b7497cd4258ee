"""Peers and data for the C-MOVE and C-GET tests (issue 17): a study of mixed SOP
classes and transfer syntaxes, move destinations (DCMTK ``storescp``), Orthanc as the
remote PACS that knows the bridge, and a small DICOMweb server whose WADO-RS can be
told to lose instances or answer slowly.

**What "unchanged" means.** A receiver writes its own File Meta Information, so what is
compared is the data set after it (``corpus.data_set_bytes``), received with
``storescp +B`` (bit-preserving: the data set written as it came off the wire). DCMTK
re-encodes a data set the first time it sends it (group lengths dropped, odd lengths
padded, ...), so Orthanc's own C-STORE of pydicom's files would differ from them even
with no bridge in between. ``mixed_study`` therefore passes each file once through
DCMTK (``storescu`` to a ``storescp +B``) and keeps what arrived: a fixed point, which
DCMTK sends again byte for byte (``test_orthanc_moves_the_reference`` checks it).
Orthanc gets the files through its REST API, which stores them as they are; the
bridge's archive through ``storescu``. Every path then has one reference: the study's
files.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import fakehttp
import numpy as np
import pydicom
from corpus import TEST_FILES, data_set_bytes, write_ct
from peers import Orthanc, StoreSCP, free_port, storescu
from pydicom.uid import generate_uid

# storescu options that propose one transfer syntax (with -R: only the SOP classes of
# the files), so each file goes out in its own syntax, unconverted.
PROPOSE = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.5": "-xr",
}
UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}

# pydicom's files in the study, by series: SOP classes CT, MR, US, SC, RT Plan and SR;
# every lossless syntax Orthanc and DCMTK both carry (explicit and implicit little
# endian, explicit big endian, RLE, JPEG lossless, JPEG-LS lossless, JPEG 2000 lossless).
SERIES = {
    "CT": ["CT_small.dcm"],
    "MR": ["MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
           "MR_small_jp2klossless.dcm"],
    "US": ["ExplVR_BigEnd.dcm"],
    "SC": ["SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm"],
    "RTPLAN": ["rtplan.dcm"],
    "SR": ["test-SR.dcm"],
}
PATIENT_ID = "RETRIEVE-1"
PATIENT_NAME = "RETRIEVE^MIXED"


@dataclass(frozen=True)
class Instance:
    path: Path
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    series: str  # the SERIES key it belongs to

    @property
    def compressed(self) -> bool:
        return self.transfer_syntax not in UNCOMPRESSED


@dataclass
class Study:
    uid: str
    patient_id: str
    instances: list[Instance]

    @property
    def files(self) -> list[Path]:
        return [i.path for i in self.instances]

    def by_uid(self) -> dict[str, Instance]:
        return {i.sop_instance_uid: i for i in self.instances}

    def series_uid(self, name: str) -> str:
        return next(i.series_uid for i in self.instances if i.series == name)

    def in_series(self, name: str) -> list[Instance]:
        return [i for i in self.instances if i.series == name]


def instance_of(path: Path, series: str = "") -> Instance:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return Instance(path, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                    str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID), series)


def mixed_study(folder: Path) -> Study:
    """``SERIES`` as one study of one patient, fresh UIDs, each file passed once through
    DCMTK (the module's docstring says why): ``folder/study/<name>``."""
    raw = folder / "raw"
    raw.mkdir(parents=True)
    study_uid = generate_uid()
    written: list[tuple[Path, str]] = []
    for series, names in SERIES.items():
        series_uid = generate_uid()
        for number, name in enumerate(names, 1):
            ds = pydicom.dcmread(TEST_FILES / name)
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.PatientID = PATIENT_ID
            ds.PatientName = PATIENT_NAME
            ds.InstanceNumber = number
            ds.save_as(raw / name, enforce_file_format=True)
            written.append((raw / name, series))
    normaliser = StoreSCP(folder / "dcmtk", "+xa", "+B", aet="NORMALISE").start()
    try:
        store_each_in_its_syntax(normaliser.port, [p for p, _ in written], called_ae="NORMALISE")
    finally:
        normaliser.stop()
    received = {instance_of(p).sop_instance_uid: p for p in normaliser.files()}
    out = folder / "study"
    out.mkdir()
    instances = []
    for path, series in written:
        uid = instance_of(path).sop_instance_uid
        target = out / path.name
        shutil.copyfile(received[uid], target)
        instances.append(instance_of(target, series))
    return Study(study_uid, PATIENT_ID, instances)


def ct_instances(folder: Path, count: int, size: int = 16) -> Study:
    """``count`` small CT images (``size`` x ``size``) of one series of one study."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    pixels = np.arange(size * size, dtype=np.uint16).reshape(size, size)
    paths = [write_ct(folder / f"ct{n:05d}.dcm", study_uid, series_uid, n + 1, pixels) for n in range(count)]
    return Study(study_uid, "PID-TEST", [instance_of(p, "CT") for p in paths])


def store_each_in_its_syntax(port: int, files: Sequence[Path], called_ae: str = "ANY-SCP",
                             calling_ae: str = "STORESCU") -> None:
    """storescu every file in its own transfer syntax (one association per syntax)."""
    by_syntax: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        by_syntax[instance_of(path).transfer_syntax].append(path)
    for syntax, group in by_syntax.items():
        result = storescu(port, group, called_ae=called_ae, calling_ae=calling_ae, extra=["-R", PROPOSE[syntax]])
        assert result.statuses == [0] * len(group), f"{syntax}:\n{result.output[-3000:]}"


# -- Orthanc as the remote PACS ------------------------------------------------------------


def orthanc_settings(modalities: dict[str, int]) -> dict[str, Any]:
    """Orthanc's configuration for retrieval: it moves to the AE titles of
    ``modalities`` (AE title -> port on 127.0.0.1: the bridge, for a ``dimse`` source
    with ``retrieve: c-move``, and move destinations), and answers C-MOVE and C-GET of
    any requester."""
    return {
        "DicomModalities": {aet: [aet, "127.0.0.1", port] for aet, port in modalities.items()},
        "DicomAlwaysAllowMove": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowFind": True,
    }


def upload(orthanc: Orthanc, files: Iterable[Path]) -> None:
    """POST each file to Orthanc's REST API: stored as it is, byte for byte."""
    for path in files:
        request = urllib.request.Request(orthanc.url + "/instances", data=path.read_bytes(), method="POST",
                                         headers={"Content-Type": "application/dicom", **orthanc.headers})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        assert answer.get("Status") in ("Success", "AlreadyStored"), answer


# -- move destinations -----------------------------------------------------------------------


class MoveDestination(StoreSCP):
    """DCMTK ``storescp`` as a C-MOVE destination: bit-preserving (``+B``), every file
    under a unique name (``+uf``: an instance sent twice is two files), and ``+xa``
    (every syntax it knows) unless ``plain`` (uncompressed syntaxes only)."""

    def __init__(self, workdir: Path, aet: str, plain: bool = False, *options: str) -> None:
        super().__init__(workdir, "+B", "+uf", *(() if plain else ("+xa",)), *options, aet=aet)

    def clear(self) -> None:
        for path in self.files():
            path.unlink()

    def received(self) -> dict[str, list[Path]]:
        """SOP Instance UID -> the files that arrived with it."""
        return received(self.files())


def received(files: Iterable[Path]) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        found[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)].append(path)
    return dict(found)


# -- comparisons -------------------------------------------------------------------------------


def transfer_syntax(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def assert_unchanged(path: Path, reference: Instance) -> None:
    """The data set arrived in the reference's syntax, byte for byte."""
    assert transfer_syntax(path) == reference.transfer_syntax, reference.path.name
    assert data_set_bytes(path) == data_set_bytes(reference.path), f"{reference.path.name}: data set changed"


# Value representations compared as decoded values; the binary ones change with the byte
# order, and group 0028 with decompression (e.g. a planar configuration).
_BINARY_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "UN"}


def assert_same_pixels(path: Path, reference: Instance) -> None:
    """The instance arrived in an uncompressed syntax (converted, or as it was) with the
    same decoded pixels and the same attributes, compared as decoded values."""
    got, want = pydicom.dcmread(path), pydicom.dcmread(reference.path)
    assert str(got.file_meta.TransferSyntaxUID) in UNCOMPRESSED, reference.path.name
    for element in want:
        if element.tag.group in (0x0002, 0x0028) or element.VR in _BINARY_VRS or element.keyword == "PixelData":
            continue
        assert element.tag in got, f"{reference.path.name}: {element.keyword or element.tag} lost"
        assert got[element.tag].value == element.value, f"{reference.path.name}: {element.keyword or element.tag}"
    if "PixelData" in want:
        assert np.array_equal(got.pixel_array, want.pixel_array), f"{reference.path.name}: pixels differ"


def assert_arrived(found: dict[str, list[Path]], expected: Sequence[Instance], convert: bool = False) -> None:
    """Each of ``expected`` arrived once, nothing else; unchanged, or with ``convert``
    unchanged when its syntax was kept and with the same pixels when it was not."""
    assert sorted(found) == sorted(i.sop_instance_uid for i in expected), \
        f"arrived {len(found)}, expected {len(expected)}: " \
        f"missing {sorted(i.path.name for i in expected if i.sop_instance_uid not in found)}"
    twice = [uid for uid, paths in found.items() if len(paths) > 1]
    assert not twice, f"arrived more than once: {twice}"
    for instance in expected:
        (path,) = found[instance.sop_instance_uid]
        if convert and transfer_syntax(path) != instance.transfer_syntax:
            assert_same_pixels(path, instance)
        else:
            assert_unchanged(path, instance)


def vm_hwm(pid: int) -> int:
    """A process's peak resident set size (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


# -- a DICOMweb server that can lose instances -------------------------------------------------


@dataclass
class WadoRequest:
    path: str
    params: dict[str, list[str]]
    at: float  # time.monotonic() when it arrived


# Instance-level attributes the fake answers QIDO-RS with (tag -> keyword and VR).
_QIDO_TAGS = {
    "00100020": ("PatientID", "LO"),
    "00100010": ("PatientName", "PN"),
    "0020000D": ("StudyInstanceUID", "UI"),
    "0020000E": ("SeriesInstanceUID", "UI"),
    "00080018": ("SOPInstanceUID", "UI"),
    "00080016": ("SOPClassUID", "UI"),
    "00080060": ("Modality", "CS"),
    "00200013": ("InstanceNumber", "IS"),
}
_NOT_MATCHING = {"includefield", "limit", "offset", "fuzzymatching"}


@dataclass
class FakeDicomweb:
    """QIDO-RS and WADO-RS over a set of Part-10 files, on 127.0.0.1, in a thread.

    QIDO-RS (``/studies``, ``/series``, ``/instances`` and their nested forms) lists
    every file it holds; WADO-RS (a study, a series or an instance, as
    multipart/related application/dicom, the file as it is) leaves out the instances
    in ``missing`` (an instance asked for alone: 404), and sends one part every
    ``delay`` seconds at most, whatever the number of requests at once (the parts of
    all requests wait their turn). Every request is recorded.
    """

    port: int = field(default_factory=free_port)
    missing: set[str] = field(default_factory=set)
    delay: float = 0.0
    requests: list[WadoRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._files: dict[str, tuple[Instance, dict[str, str]]] = {}
        self._lock = threading.Lock()
        self._pace = threading.Lock()  # one part at a time when slow
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def hold(self, study: Study) -> None:
        for instance in study.instances:
            ds = pydicom.dcmread(instance.path, stop_before_pixels=True)
            values = {tag: str(ds.get(keyword, "") or "") for tag, (keyword, _) in _QIDO_TAGS.items()}
            self._files[instance.sop_instance_uid] = (instance, values)

    def reset(self, missing: Iterable[str] = (), delay: float = 0.0) -> None:
        with self._lock:
            self.missing = set(missing)
            self.delay = delay
            self.requests = []

    def seen(self) -> list[WadoRequest]:
        with self._lock:
            return list(self.requests)

    def wado_requests(self) -> list[WadoRequest]:
        """The WADO-RS requests (not QIDO-RS searches)."""
        return [r for r in self.seen() if not r.path.rstrip("/").endswith(("/studies", "/series", "/instances"))]

    def start(self) -> FakeDicomweb:
        fake = self

        def get(handler: BaseHTTPRequestHandler) -> None:
            parts = urlsplit(handler.path)
            request = WadoRequest(parts.path, parse_qs(parts.query, keep_blank_values=True), time.monotonic())
            with fake._lock:
                fake.requests.append(request)
            fake._answer(handler, request)

        self._server = fakehttp.serve(self.port, get, "fakedicomweb")
        return self

    def stop(self) -> None:
        fakehttp.close(self._server)

    # -- answers ------------------------------------------------------------------------------

    def _answer(self, handler: BaseHTTPRequestHandler, request: WadoRequest) -> None:
        path = request.path.split("/dicom-web", 1)[-1].strip("/").split("/")
        named = dict(zip(path[0::2], path[1::2], strict=False))  # studies -> uid, series -> uid, ...
        resource = path[-1] if len(path) % 2 else None  # a search's resource, or None for a retrieval
        if resource in ("studies", "series", "instances"):
            self._search(handler, resource, named, request.params)
        elif resource is None and path and path[0] == "studies":
            self._retrieve(handler, named)
        else:
            self._send(handler, 404, b"", "text/plain")

    def _matching(self, named: dict[str, str], params: dict[str, list[str]]) -> list[dict[str, str]]:
        wanted: list[tuple[str, list[str]]] = []
        for name, uid in named.items():
            wanted.append(({"studies": "0020000D", "series": "0020000E", "instances": "00080018"}[name], [uid]))
        for name, values in params.items():
            if name in _NOT_MATCHING:
                continue
            tag = name.upper() if name.upper() in _QIDO_TAGS else next(
                (t for t, (k, _) in _QIDO_TAGS.items() if k == name), None)
            if tag is None:
                continue  # a key it cannot match: every file matches it
            wanted.append((tag, [v for value in values for v in value.replace("\\", ",").split(",")]))
        return [values for _, values in self._files.values()
                if all(any(fnmatch.fnmatchcase(values[tag], pattern) for pattern in patterns)
                       for tag, patterns in wanted)]

    def _search(self, handler: BaseHTTPRequestHandler, resource: str, named: dict[str, str],
                params: dict[str, list[str]]) -> None:
        found = self._matching(named, params)
        unique = {"studies": "0020000D", "series": "0020000E", "instances": "00080018"}[resource]
        records: dict[str, dict[str, Any]] = {}
        for values in found:
            records.setdefault(values[unique], {
                tag: ({"vr": vr, "Value": [{"Alphabetic": values[tag]} if vr == "PN" else
                                           int(values[tag]) if vr == "IS" else values[tag]]}
                      if values[tag] else {"vr": vr})
                for tag, (_, vr) in _QIDO_TAGS.items()
                if resource == "instances" or tag not in ("00080018", "00080016", "00200013")})
        offset = int(params.get("offset", ["0"])[0])
        limit = int(params.get("limit", [str(len(records))])[0])
        page = list(records.values())[offset:offset + limit]
        self._send(handler, 200, json.dumps(page).encode(), "application/dicom+json")

    def _retrieve(self, handler: BaseHTTPRequestHandler, named: dict[str, str]) -> None:
        with self._lock:
            missing, delay = set(self.missing), self.delay
        found = [self._files[v["00080018"]][0] for v in self._matching(named, {})]
        present = [i for i in found if i.sop_instance_uid not in missing]
        if not present:
            self._send(handler, 404, b"", "text/plain")
            return
        boundary = "fake-wado-boundary"
        handler.send_response(200)
        handler.send_header("Content-Type", f'multipart/related; type="application/dicom"; boundary={boundary}')
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        try:
            for instance in present:
                if delay:
                    with self._pace:  # a slow server, on purpose
                        time.sleep(delay)
                part = (f"--{boundary}\r\nContent-Type: application/dicom; "
                        f"transfer-syntax={instance.transfer_syntax}\r\n\r\n").encode()
                _chunk(handler, part + instance.path.read_bytes() + b"\r\n")
            _chunk(handler, f"--{boundary}--\r\n".encode())
            _chunk(handler, b"")
        except OSError:
            pass  # the bridge hung up (a C-CANCEL)

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)


def _chunk(handler: BaseHTTPRequestHandler, data: bytes) -> None:
    handler.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
    handler.wfile.flush()
