"""The ``dimse`` source (bridge/sources/dimse.py): C-FIND forwarded to a remote PACS.

Orthanc is the PACS, loaded once per module with a few studies (several patients,
modalities and dates, names in several character sets); what the source answers is
compared with what a plain pynetdicom C-FIND straight to Orthanc answers, as decoded
text. Peers that fail (down, silent, answering a failure status, slow) are small
pynetdicom SCPs or a socket that never answers, on loopback.
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from corpus import TEST_FILES
from peers import Orthanc, free_port, storescu, wait_for
from pydicom.data import get_charset_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.dsutils import decode, encode

from bridge.config import DimseSource as DimseConfig
from bridge.config import Node
from bridge.dataset.query import PATIENT_ROOT_FIND, STUDY_ROOT_FIND, Query, parse
from bridge.errors import UpstreamError, UpstreamMisconfigured, UpstreamUnavailable
from bridge.metrics import Metrics
from bridge.model import InstanceRef
from bridge.sources.dimse import DimseSource

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


# -- the PACS and what it holds ---------------------------------------------------------


class Study:
    def __init__(self, patient_id: str, name: str, date: str) -> None:
        self.patient_id, self.name, self.date = patient_id, name, date
        self.uid = generate_uid()
        self.series: dict[str, str] = {}  # modality -> series UID
        self.instances: list[InstanceRef] = []


def _add(folder: Path, source: Path, study: Study, modality: str, number: int) -> Path:
    """A copy of ``source`` in ``study``, in its series of ``modality``, with a fresh SOP Instance UID."""
    ds = pydicom.dcmread(source)
    series_uid = study.series.setdefault(modality, generate_uid())
    values = {"PatientID": study.patient_id, "PatientName": study.name, "StudyDate": study.date,
              "StudyInstanceUID": study.uid, "SeriesInstanceUID": series_uid, "Modality": modality,
              "SOPInstanceUID": generate_uid(), "InstanceNumber": number, "StudyID": study.patient_id}
    return _save(folder, ds, study, values)


def _save(folder: Path, ds: Dataset, study: Study, values: dict[str, Any]) -> Path:
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    if not hasattr(ds, "file_meta"):
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    study.instances.append(InstanceRef(study.uid, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID))
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


class Holdings:
    """The studies the module's PACS holds: three patients of plain names (P1 with a CT
    and MR study, P2 an MR study, P3 an older CT study), and one patient per pydicom
    character set file (their names as pydicom decodes them)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        ct, mr = TEST_FILES / "CT_small.dcm", TEST_FILES / "MR_small.dcm"
        self.p1 = Study("P1", "Doe^John", "20240105")
        self.p2 = Study("P2", "Roe^Jane", "20240610")
        self.p3 = Study("P3", "Doe^Johanna", "20230301")
        self.files = [_add(folder, ct, self.p1, "CT", 1), _add(folder, ct, self.p1, "CT", 2),
                      _add(folder, mr, self.p1, "MR", 1), _add(folder, mr, self.p2, "MR", 1),
                      _add(folder, ct, self.p3, "CT", 1)]
        self.names: dict[str, Study] = {}  # charset file -> its study
        for name in ("chrFren.dcm", "chrGerm.dcm", "chrX1.dcm", "chrH31.dcm", "chrRuss.dcm"):
            ds = pydicom.dcmread(get_charset_files(name)[0])
            study = Study(ds.PatientID, str(ds.PatientName), "20220202")
            self.files.append(_save(folder, ds, study, {"StudyInstanceUID": study.uid, "StudyDate": study.date,
                                                        "SeriesInstanceUID": generate_uid(),
                                                        "SOPInstanceUID": generate_uid()}))
            self.names[name] = study


def _pacs(tmp: Path, holdings: Holdings, **extra: Any) -> Iterator[Orthanc]:
    orthanc = Orthanc(tmp, extra={"DicomAlwaysAllowFind": True, **extra}).start()
    try:
        sent = storescu(orthanc.dicom_port, holdings.files, called_ae=orthanc.aet)
        assert sent.returncode == 0 and sent.statuses == [0] * len(holdings.files), sent.output
        yield orthanc
    finally:
        orthanc.stop()


@pytest.fixture(scope="module")
def holdings(tmp_path_factory: pytest.TempPathFactory) -> Holdings:
    return Holdings(tmp_path_factory.mktemp("holdings"))


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, holdings: Holdings) -> Iterator[Orthanc]:
    """Orthanc as it comes: it answers C-FIND in Latin-1 (its DefaultEncoding), whatever we ask in."""
    yield from _pacs(tmp_path_factory.mktemp("pacs"), holdings)


@pytest.fixture(scope="module")
def utf8_pacs(tmp_path_factory: pytest.TempPathFactory, holdings: Holdings) -> Iterator[Orthanc]:
    """Orthanc answering in UTF-8: every name of the holdings survives its answers."""
    yield from _pacs(tmp_path_factory.mktemp("utf8-pacs"), holdings, DefaultEncoding="Utf8")


# -- the source, queries, and the answers compared ------------------------------------------


def source(port: int, ae_title: str = "ORTHANC", find_timeout: float = 5.0, charset: str = "ISO_IR 192",
           metrics: Metrics | None = None) -> DimseSource:
    node = Node(host="127.0.0.1", port=port, ae_title=ae_title, charset=charset)
    settings = DimseConfig(type="dimse", node="pacs", find_timeout=find_timeout)
    return DimseSource("pacs", settings, node, "BRIDGE", 60.0, metrics or Metrics(), Path(tempfile.gettempdir()))


def query(sop_class: str, charset: str = "ISO_IR 192", **keys: Any) -> Query:
    """The ``Query`` the C-FIND service reads from a requester's identifier: encoded in
    ``charset`` as a requester sends it, and decoded from those bytes as the listener
    receives it."""
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return parse(decode(BytesIO(encode(ds, False, True)), False, True), sop_class)


def direct(orthanc: Orthanc, q: Query) -> list[Dataset]:
    """What Orthanc answers the same identifier straight, decoded."""
    ae = AE(ae_title="DIRECT")
    ae.add_requested_context(q.sop_class, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet)
    assert assoc.is_established
    found = []
    try:
        for status, identifier in assoc.send_c_find(q.identifier, q.sop_class):
            if identifier is None:
                assert status.Status == 0x0000, status
                continue
            identifier.decode()
            found.append(identifier)
    finally:
        assoc.release()
    return found


def texts(records: list[Dataset]) -> list[dict[str, Any]]:
    """Records as decoded text (each value a str, or a tuple of them), in a stable order,
    Specific Character Set left out (answers may come in different sets)."""
    out = []
    for record in records:
        values: dict[str, Any] = {}
        for element in record:
            if element.keyword == "SpecificCharacterSet":
                continue
            value = element.value
            assert not isinstance(value, bytes), f"{element.keyword} not decoded: {value!r}"
            values[element.keyword] = tuple(str(v) for v in value) if element.VM > 1 else str(value or "")
        out.append(values)
    return sorted(out, key=repr)


def find(src: DimseSource, q: Query) -> list[dict[str, Any]]:
    return texts(list(src.find(q)))


# -- matches, at every level and root ---------------------------------------------------------


QUERIES: dict[str, Callable[[Holdings], tuple[str, dict[str, Any], int]]] = {
    # name: holdings -> (SOP class, keys, how many matches)
    "patient root, PATIENT, wildcard": lambda h: (PATIENT_ROOT_FIND, {
        "QueryRetrieveLevel": "PATIENT", "PatientName": "doe*", "PatientID": "", "PatientBirthDate": "",
        "NumberOfPatientRelatedStudies": ""}, 2),
    "patient root, STUDY": lambda h: (PATIENT_ROOT_FIND, {
        "QueryRetrieveLevel": "STUDY", "PatientID": "P1", "StudyInstanceUID": "", "StudyDate": "",
        "ModalitiesInStudy": "", "AccessionNumber": ""}, 1),
    "patient root, SERIES": lambda h: (PATIENT_ROOT_FIND, {
        "QueryRetrieveLevel": "SERIES", "PatientID": "P1", "StudyInstanceUID": h.p1.uid, "SeriesInstanceUID": "",
        "Modality": "", "SeriesNumber": ""}, 2),
    "patient root, IMAGE": lambda h: (PATIENT_ROOT_FIND, {
        "QueryRetrieveLevel": "IMAGE", "PatientID": "P1", "StudyInstanceUID": h.p1.uid,
        "SeriesInstanceUID": h.p1.series["CT"], "SOPInstanceUID": "", "SOPClassUID": "", "InstanceNumber": ""}, 2),
    "study root, STUDY, date range": lambda h: (STUDY_ROOT_FIND, {
        "QueryRetrieveLevel": "STUDY", "StudyDate": "20240101-20241231", "PatientName": "", "PatientID": "",
        "StudyInstanceUID": "", "ModalitiesInStudy": "", "NumberOfStudyRelatedInstances": ""}, 2),
    "study root, STUDY, modality list": lambda h: (STUDY_ROOT_FIND, {
        "QueryRetrieveLevel": "STUDY", "ModalitiesInStudy": ["CT", "MR"], "PatientName": "",
        "StudyInstanceUID": ""}, 3),
    "study root, SERIES": lambda h: (STUDY_ROOT_FIND, {
        "QueryRetrieveLevel": "SERIES", "StudyInstanceUID": h.p1.uid, "Modality": "MR", "SeriesInstanceUID": "",
        "NumberOfSeriesRelatedInstances": ""}, 1),
    "study root, IMAGE, UID list": lambda h: (STUDY_ROOT_FIND, {
        "QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": h.p1.uid, "SeriesInstanceUID": h.p1.series["CT"],
        "SOPInstanceUID": [i.sop_instance_uid for i in h.p1.instances[:2]], "SOPClassUID": ""}, 2),
    "study root, STUDY, Latin-1 request": lambda h: (STUDY_ROOT_FIND, {
        "SpecificCharacterSet": "ISO_IR 100", "QueryRetrieveLevel": "STUDY", "PatientName": "Buc^Jérôme",
        "StudyInstanceUID": ""}, 1),
}


@pytest.mark.parametrize("name", QUERIES)
def test_each_level_and_root_finds_what_orthanc_answers_straight(pacs: Orthanc, holdings: Holdings,
                                                                 name: str) -> None:
    sop_class, keys, count = QUERIES[name](holdings)
    requested_charset = keys.pop("SpecificCharacterSet", "ISO_IR 192")
    q = query(sop_class, requested_charset, **keys)
    found = find(source(pacs.dicom_port), q)
    assert len(found) == count, found
    assert found == texts(direct(pacs, q))


def test_values_come_as_decoded_text(pacs: Orthanc, holdings: Holdings) -> None:
    found = find(source(pacs.dicom_port), query(STUDY_ROOT_FIND, QueryRetrieveLevel="STUDY", PatientID="P1",
                                                PatientName="", StudyInstanceUID="", StudyDate="",
                                                ModalitiesInStudy=""))
    assert len(found) == 1
    assert found[0]["PatientName"] == "Doe^John" and found[0]["StudyDate"] == "20240105"
    assert found[0]["StudyInstanceUID"] == holdings.p1.uid
    assert sorted(found[0]["ModalitiesInStudy"]) == ["CT", "MR"]


# -- character sets -----------------------------------------------------------------------------


def test_an_answer_in_latin_1_to_a_utf_8_request_is_decoded(pacs: Orthanc, holdings: Holdings) -> None:
    # Orthanc answers in its DefaultEncoding (Latin-1): not the set the bridge asked in.
    q = query(STUDY_ROOT_FIND, QueryRetrieveLevel="STUDY", PatientName="*Rüdiger", StudyInstanceUID="")
    records = list(source(pacs.dicom_port).find(q))
    assert [r.SpecificCharacterSet for r in records] == ["ISO_IR 100"]
    assert texts(records) == [{"PatientName": "Äneas^Rüdiger", "QueryRetrieveLevel": "STUDY",
                               "RetrieveAETitle": "ORTHANC",
                               "StudyInstanceUID": holdings.names["chrGerm.dcm"].uid}]


@pytest.mark.parametrize("node_charset", ["ISO_IR 192", "ISO_IR 100", "ISO_IR 144", "\\ISO 2022 IR 87"])
@pytest.mark.parametrize("requested", ["ISO_IR 192", "the file's"])
@pytest.mark.parametrize(("file", "pattern"), [
    ("chrFren.dcm", "Buc^Jérôme"),  # ISO_IR 100
    ("chrGerm.dcm", "*Rüdiger"),  # ISO_IR 100
    ("chrGerm.dcm", "*R?diger"),  # a '?' for a letter of two bytes in UTF-8
    ("chrX1.dcm", "*?^小東"),
    ("chrRuss.dcm", "Люкceмбypг"),  # ISO_IR 144
    ("chrH31.dcm", "Yamada^Tarou=山田^太郎=やまだ^たろう"),  # ISO 2022 IR 87
    ("chrX1.dcm", "*王^小東"),  # ISO_IR 192
])
def test_names_in_other_character_sets_are_found_whatever_the_node_reads(
        utf8_pacs: Orthanc, holdings: Holdings, requested: str, node_charset: str, file: str, pattern: str) -> None:
    if requested == "the file's":
        requested = pydicom.dcmread(get_charset_files(file)[0])["SpecificCharacterSet"].value
        requested = requested if isinstance(requested, str) else "\\".join(requested)
    q = query(STUDY_ROOT_FIND, requested, QueryRetrieveLevel="STUDY", PatientName=pattern, StudyInstanceUID="")
    assert str(q.identifier.PatientName) == pattern
    expected = holdings.names[file]
    # What the node's set cannot hold is sent as a wildcard: the PACS answers more, never
    # fewer (the C-FIND service checks each answer again).
    assert {"PatientName": expected.name, "QueryRetrieveLevel": "STUDY", "RetrieveAETitle": "ORTHANC",
            "StudyInstanceUID": expected.uid} in find(source(utf8_pacs.dicom_port, charset=node_charset), q)


@pytest.mark.parametrize(("answered_in", "node_charset", "name"), [
    (None, "ISO_IR 192", "Buc^Jérôme"),  # no Specific Character Set: read in the node's
    (None, "ISO_IR 144", "Люкceмбypг"),
    ("\\ISO 2022 IR 87", "ISO_IR 192", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    ("ISO_IR 144", "ISO_IR 192", "Люкceмбypг"),
    ("GB18030", "ISO_IR 100", "Wang^XiaoDong=王^小东"),
])
def test_each_answer_is_read_in_its_own_character_set(answered_in: str | None, node_charset: str, name: str,
                                                      find_scp: FindScp) -> None:
    python_codec = {"ISO_IR 192": "utf-8", "ISO_IR 144": "iso8859_5"}

    def answer(event: evt.Event, scp: FindScp) -> Iterator[tuple[int, Dataset | None]]:
        found = Dataset()
        if answered_in is None:
            found.add_new(0x00100010, "PN", name.encode(python_codec[node_charset]))
        else:
            found.SpecificCharacterSet = answered_in.split("\\") if "\\" in answered_in else answered_in
            found.PatientName = name
        found.QueryRetrieveLevel = "STUDY"
        yield 0xFF00, found
        yield 0x0000, None

    with find_scp.serving(answer) as scp:
        assert texts(list(source(scp.port, charset=node_charset).find(study_query()))) == [
            {"PatientName": name, "QueryRetrieveLevel": "STUDY"}]


# -- locate ------------------------------------------------------------------------------------------


def test_locate_a_study_gives_every_instance_with_its_sop_class(pacs: Orthanc, holdings: Holdings) -> None:
    study = holdings.p1
    refs = list(source(pacs.dicom_port).locate(query(STUDY_ROOT_FIND, QueryRetrieveLevel="STUDY",
                                                     StudyInstanceUID=study.uid)))
    assert sorted(refs, key=repr) == sorted(study.instances, key=repr)
    assert {r.sop_class_uid for r in refs} == {CT_IMAGE, MR_IMAGE}


def test_locate_a_series(pacs: Orthanc, holdings: Holdings) -> None:
    study = holdings.p1
    refs = list(source(pacs.dicom_port).locate(query(STUDY_ROOT_FIND, QueryRetrieveLevel="SERIES",
                                                     StudyInstanceUID=study.uid,
                                                     SeriesInstanceUID=study.series["MR"])))
    assert refs == [i for i in study.instances if i.series_uid == study.series["MR"]]
    assert refs[0].sop_class_uid == MR_IMAGE


def test_locate_a_patient_in_patient_root(pacs: Orthanc, holdings: Holdings) -> None:
    refs = list(source(pacs.dicom_port).locate(query(PATIENT_ROOT_FIND, QueryRetrieveLevel="PATIENT",
                                                     PatientID="P1")))
    assert sorted(refs, key=repr) == sorted(holdings.p1.instances, key=repr)


def test_locate_by_a_name_in_another_character_set(pacs: Orthanc, holdings: Holdings) -> None:
    expected = holdings.names["chrFren.dcm"]
    refs = list(source(pacs.dicom_port, charset="ISO_IR 100").locate(query(
        STUDY_ROOT_FIND, QueryRetrieveLevel="STUDY", PatientName="Buc^Jérôme", StudyInstanceUID="")))
    assert refs == expected.instances and refs[0].sop_class_uid == SECONDARY_CAPTURE


# -- several finds at once ---------------------------------------------------------------------------


def test_finds_from_several_threads_at_once(pacs: Orthanc, holdings: Holdings) -> None:
    metrics = Metrics()
    src = source(pacs.dicom_port, metrics=metrics)
    studies = [holdings.p1, holdings.p2, holdings.p3] * 3
    results: dict[int, list[dict[str, Any]]] = {}

    def ask(i: int) -> None:
        results[i] = find(src, query(STUDY_ROOT_FIND, QueryRetrieveLevel="SERIES",
                                     StudyInstanceUID=studies[i].uid, SeriesInstanceUID=""))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(studies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i, study in enumerate(studies):
        assert sorted(r["SeriesInstanceUID"] for r in results[i]) == sorted(study.series.values())
    count = metrics.registry.get_sample_value("dicom_bridge_upstream_request_seconds_count",
                                              {"source": "pacs", "operation": "c-find"})
    assert count == len(studies)


# -- failures ---------------------------------------------------------------------------------------


Handler = Callable[[evt.Event, "FindScp"], Iterator[tuple[Any, Dataset | None]]]


class FindScp:
    """A pynetdicom Query/Retrieve FIND SCP on loopback. ``serving(handler)`` answers each
    C-FIND with ``handler(event, scp)`` and notes what it saw (``aborted``, ``cancelled``:
    by ``stopped``; ``ended``: the handler returned); ``release`` is set when the test
    ends, for handlers that wait, and the test ends only once every handler has."""

    def __init__(self, sop_classes: tuple[str, ...] = (PATIENT_ROOT_FIND, STUDY_ROOT_FIND)) -> None:
        self.ae = AE(ae_title="SCP")
        for uid in sop_classes:
            self.ae.add_supported_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.port = 0
        self._handler: Handler | None = None
        self._running = 0
        self._lock = threading.Lock()

    def start(self) -> FindScp:
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False,
                                           evt_handlers=[(evt.EVT_C_FIND, self._on_find)])
        self.port = int(self.server.server_address[1])
        return self

    def stop(self) -> None:
        self.server.shutdown()

    @contextmanager
    def serving(self, handler: Handler) -> Iterator[FindScp]:
        self.aborted, self.cancelled, self.ended, self.release = (threading.Event() for _ in range(4))
        self._handler = handler
        try:
            yield self
        finally:
            self.release.set()
            wait_for(lambda: self._running == 0, 5, "the SCP's C-FIND handlers to end")

    def _on_find(self, event: evt.Event) -> Iterator[tuple[Any, Dataset | None]]:
        assert self._handler is not None
        with self._lock:
            self._running += 1
        try:
            yield from self._handler(event, self)
        finally:
            self.ended.set()
            with self._lock:
                self._running -= 1

    def stopped(self, event: evt.Event) -> bool:
        """Whether the requester has cancelled the C-FIND or aborted the association (the
        handler runs in the association's thread, which would notice only after it)."""
        if event.is_cancelled:
            self.cancelled.set()
        if event.assoc.acse.is_aborted():
            self.aborted.set()
        return self.cancelled.is_set() or self.aborted.is_set()

    def wait(self, event: evt.Event) -> None:
        """Until the test ends, or the requester stops."""
        while not self.release.wait(0.02) and not self.stopped(event):
            pass


@pytest.fixture(scope="module")
def find_scp() -> Iterator[FindScp]:
    scp = FindScp().start()
    yield scp
    scp.stop()


def study_query() -> Query:
    return query(STUDY_ROOT_FIND, QueryRetrieveLevel="STUDY", StudyInstanceUID="", PatientName="")


def status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment
    return ds


def match(n: int) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = f"1.2.3.{n}"
    ds.PatientName = f"Patient^{n}"
    return ds


def upstream(metrics: Metrics, operation: str = "c-find", name: str = "dicom_bridge_upstream_errors_total") -> float:
    return metrics.registry.get_sample_value(name, {"source": "pacs", "operation": operation}) or 0.0


def test_the_pacs_down_fails_at_once() -> None:
    metrics = Metrics()
    started = time.monotonic()
    with pytest.raises(UpstreamUnavailable, match="source pacs: cannot connect"):
        list(source(free_port(), metrics=metrics).find(study_query()))
    assert time.monotonic() - started < 1.0
    assert upstream(metrics) == 1  # counted, and timed like any request
    assert upstream(metrics, name="dicom_bridge_upstream_request_seconds_count") == 1


def test_a_pacs_that_never_answers_the_association_fails_within_find_timeout() -> None:
    with socket.socket() as silent:  # listening: the kernel completes the TCP connection, nobody reads
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        started = time.monotonic()
        with pytest.raises(UpstreamUnavailable, match=r"source pacs: .* did not accept the association within 1s"):
            list(source(silent.getsockname()[1], find_timeout=1.0).find(study_query()))
        assert 0.9 < time.monotonic() - started < 2.5


def test_a_pacs_that_never_answers_the_c_find_fails_within_find_timeout(find_scp: FindScp) -> None:
    def silent(event: evt.Event, scp: FindScp) -> Iterator[tuple[int, Dataset | None]]:
        scp.wait(event)
        yield 0x0000, None

    with find_scp.serving(silent) as scp:
        started = time.monotonic()
        with pytest.raises(UpstreamUnavailable, match=r"source pacs: no answer within 1s \(node pacs"):
            list(source(scp.port, find_timeout=1.0).find(study_query()))
        assert 0.9 < time.monotonic() - started < 2.5
        wait_for(scp.aborted.is_set, 5, "the SCP to see the association aborted")


def test_a_pacs_that_stops_answering_after_a_match_fails_within_find_timeout(find_scp: FindScp) -> None:
    def stalls(event: evt.Event, scp: FindScp) -> Iterator[tuple[int, Dataset | None]]:
        yield 0xFF00, match(1)
        scp.wait(event)
        yield 0x0000, None

    with find_scp.serving(stalls) as scp:
        records = source(scp.port, find_timeout=1.0).find(study_query())
        assert str(next(records).PatientName) == "Patient^1"
        started = time.monotonic()
        with pytest.raises(UpstreamUnavailable, match=r"source pacs: no answer within 1s \(node pacs"):
            next(records)
        assert 0.9 < time.monotonic() - started < 2.5


def test_a_pacs_that_aborts_after_a_match_fails_at_once(find_scp: FindScp) -> None:
    def aborts(event: evt.Event, scp: FindScp) -> Iterator[tuple[int, Dataset | None]]:
        yield 0xFF00, match(1)
        event.assoc.abort()
        yield 0x0000, None

    with find_scp.serving(aborts) as scp:
        records = source(scp.port, find_timeout=5.0).find(study_query())
        assert str(next(records).PatientName) == "Patient^1"
        started = time.monotonic()
        with pytest.raises(UpstreamUnavailable, match="source pacs: association aborted"):
            next(records)
        assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(("code", "raised", "name"), [
    (0xC000, UpstreamError, "0xC000"),
    (0xC123, UpstreamError, "0xC123"),
    (0xA700, UpstreamUnavailable, "0xA700"),
    (0xA900, UpstreamMisconfigured, "0xA900"),
    (0x0122, UpstreamMisconfigured, r"0x0122 \(SOP class not supported\)"),
    (0xFE00, UpstreamError, r"0xFE00 \(cancelled\)"),
])
def test_a_failure_status_raises_with_the_status_and_comment(code: int, raised: type[Exception], name: str,
                                                            find_scp: FindScp) -> None:
    def fails(event: evt.Event, scp: FindScp) -> Iterator[tuple[Any, Dataset | None]]:
        yield 0xFF00, match(1)
        yield status(code, "index is corrupt"), None

    metrics = Metrics()
    with find_scp.serving(fails) as scp:
        records = source(scp.port, metrics=metrics).find(study_query())
        assert str(next(records).StudyInstanceUID) == "1.2.3.1"  # a match before the failure still comes
        with pytest.raises(raised, match=f"source pacs: the C-FIND failed with {name}: index is corrupt") as info:
            next(records)
    assert type(info.value) is raised  # 0xCxxx: neither unavailable (0xA700) nor misconfigured
    assert upstream(metrics) == 1


def test_pending_warnings_are_matches_and_a_warning_status_ends_well(find_scp: FindScp) -> None:
    def warns(event: evt.Event, scp: FindScp) -> Iterator[tuple[int, Dataset | None]]:
        yield 0xFF01, match(1)
        yield 0xFF00, match(2)
        yield 0xB000, None

    metrics = Metrics()
    with find_scp.serving(warns) as scp:
        found = source(scp.port, metrics=metrics).find(study_query())
        assert [str(r.StudyInstanceUID) for r in found] == ["1.2.3.1", "1.2.3.2"]
    assert upstream(metrics) == 0  # a warning is no error


def test_a_pacs_without_the_root_asked_for_is_misconfigured() -> None:
    def never(event: evt.Event, scp: FindScp) -> Iterator[tuple[int, Dataset | None]]:
        yield 0x0000, None

    scp = FindScp(sop_classes=(STUDY_ROOT_FIND,)).start()
    try:
        with scp.serving(never), pytest.raises(UpstreamMisconfigured, match="accepted none of the 1 presentation"):
            list(source(scp.port).find(query(PATIENT_ROOT_FIND, QueryRetrieveLevel="PATIENT", PatientID="")))
    finally:
        scp.stop()


# -- stopping early --------------------------------------------------------------------------------


def test_closing_after_the_first_match_cancels_at_once(find_scp: FindScp) -> None:
    sent: list[int] = []

    def slow(event: evt.Event, scp: FindScp) -> Iterator[tuple[int, Dataset | None]]:
        for n in range(1, 20):
            if scp.stopped(event):
                yield 0xFE00, None
                return
            sent.append(n)
            yield 0xFF00, match(n)
            time.sleep(0.5)  # the PACS at work
        yield 0x0000, None

    with find_scp.serving(slow) as scp:
        records = source(scp.port).find(study_query())
        assert str(next(records).StudyInstanceUID) == "1.2.3.1"
        started = time.monotonic()
        records.close()  # type: ignore[attr-defined]
        assert time.monotonic() - started < 0.4
        wait_for(lambda: scp.aborted.is_set() or scp.cancelled.is_set(), 5, "the SCP to see the C-CANCEL or abort")
        wait_for(scp.ended.is_set, 5, "the SCP's handler to stop")
        assert sent == [1]
