"""C-FIND through the bridge gives what the source itself gives (issue 16).

One Orthanc (its DICOMweb plugin on) holds generated studies of several patients,
modalities and dates, and pydicom's character set files; one bridge asks it through each
kind of source, chosen by the requester's AE title:

  WEBQ    the ``dicomweb`` source: QIDO-RS on Orthanc;
  PACSQ   the ``dimse`` source: C-FIND to Orthanc's DICOM port;
  LOCALQ  ``local``: the bridge's own archive, after ``storescu`` of the same files;
  PAGEDQ  a ``dicomweb`` source on the same Orthanc with ``page_size: 3``;
  MERGEQ  the ``dimse`` and the ``dicomweb`` sources in one rule: every match twice,
          answered once.

DCMTK ``findscu`` asks the same query of the bridge and straight of Orthanc; the answers
are compared as sets of (the level's unique key, the decoded values of the keys asked
for). Keys Orthanc adds without being asked are not compared; the bridge's own rule on
what a response carries is checked on every bridge answer (``assert_shape``).

Orthanc runs with the settings of ``findcorpus.ORTHANC_FIND`` (UTF-8 in its index,
case-insensitive QIDO-RS), which say why.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from findcorpus import ORTHANC_FIND, ORTHANC_MISREADS, FindCorpus, find_corpus
from findscu import ALWAYS, UNIQUE, UTF8, FindResult, findscu, keywords, matches, text, unique_values
from peers import Bridge, Orthanc, storescu, wait_for

BRIDGE_AE = "FINDBRIDGE"
SOURCES = {"web": "WEBQ", "pacs": "PACSQ", "local": "LOCALQ", "pacs+web": "MERGEQ"}

def find_config(orthanc: Orthanc, **more: Any) -> dict[str, Any]:
    """The bridge of these tests: the embedded default's archive (the ``local`` source)
    and a source of each kind on ``orthanc``, one ``find`` rule per requester."""
    config: dict[str, Any] = {
        "ae_title": BRIDGE_AE,
        "nodes": {
            "ORTHANC": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port},
            "LATIN": {"ae_title": "LATINWS", "host": "127.0.0.1", "port": 104, "charset": "ISO_IR 100"},
            "JAPAN": {"ae_title": "JAPANWS", "host": "127.0.0.1", "port": 104, "charset": "\\ISO 2022 IR 87"},
        },
        "destinations": {"archive": {"type": "archive"}},
        "sources": {
            "web": {"type": "dicomweb", "url": orthanc.dicomweb},
            "pacs": {"type": "dimse", "node": "ORTHANC"},
            "paged": {"type": "dicomweb", "url": orthanc.dicomweb, "page_size": 3},
        },
        "rules": [
            {"name": "keep", "store": ["archive"]},
            {"name": "web", "when": {"calling_ae": ["WEBQ", "LATINWS", "JAPANWS"]}, "find": ["web"]},
            {"name": "pacs", "when": {"calling_ae": "PACSQ"}, "find": ["pacs"]},
            {"name": "local", "when": {"calling_ae": "LOCALQ"}, "find": ["local"]},
            {"name": "paged", "when": {"calling_ae": "PAGEDQ"}, "find": ["paged"]},
            {"name": "merged", "when": {"calling_ae": "MERGEQ"}, "find": ["pacs", "web"]},
        ],
    }
    config.update(more)
    return config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> FindCorpus:
    return find_corpus(tmp_path_factory.mktemp("find-corpus"))


@pytest.fixture(scope="module")
def misread(tmp_path_factory: pytest.TempPathFactory) -> FindCorpus:
    """The character set files Orthanc decodes wrongly: for the bridge's archive only."""
    return find_corpus(tmp_path_factory.mktemp("find-misread"), charset_names=ORTHANC_MISREADS, generated=False)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, corpus: FindCorpus):
    server = Orthanc(tmp_path_factory.mktemp("find-orthanc"), extra=ORTHANC_FIND).start()
    try:
        result = storescu(server.dicom_port, corpus.files, called_ae=server.aet)
        assert result.statuses == [0] * len(corpus.files), result.output[-3000:]
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory, orthanc: Orthanc, corpus: FindCorpus, misread: FindCorpus):
    daemon = Bridge(tmp_path_factory.mktemp("find-bridge"), find_config(orthanc)).start()
    try:
        files = corpus.files + misread.files
        result = storescu(daemon.port, files, calling_ae="STORESCU")
        assert result.statuses == [0] * len(files), result.output[-3000:]
        wait_for(lambda: daemon.queue_states() == {"done": len(files)}, 60, "the archive to hold every instance")
        yield daemon
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()


# -- the queries --------------------------------------------------------------------------


@dataclass(frozen=True)
class Q:
    name: str
    level: str
    keys: Callable[[FindCorpus], list[str]]
    expected: Callable[[FindCorpus], set[str]]  # the unique keys of the matches, from what was loaded
    roots: tuple[str, ...] = ("study", "patient")
    # Patient Root below STUDY level: the PatientID the query is made within
    patient: Callable[[FindCorpus], str] | None = None

    def args(self, corpus: FindCorpus, root: str) -> list[str]:
        keys = self.keys(corpus)
        if root == "patient" and self.patient is not None:
            keys = [f"PatientID={self.patient(corpus)}", *keys]
        names = keywords(keys)
        assert len(names) == len(set(names)), f"{self.name}: a key given twice (findscu keeps the last)"
        if UNIQUE[self.level] not in names:  # a requester asks for the unique key (PS3.4 C.4.1.2.1.1)
            keys = [*keys, UNIQUE[self.level]]
        return keys


def encoded(specific_character_set: str, name: str, codec: str) -> list[str]:
    """findscu keys asking for ``name`` in another character set than UTF-8: its bytes in
    that set, handed to findscu as they are (``os.fsdecode``: the command line's bytes)."""
    return [f"SpecificCharacterSet={specific_character_set}", os.fsdecode(b"PatientName=" + name.encode(codec))]


def studies(c: FindCorpus, *keys: str) -> set[str]:
    return {c.studies[k].uid for k in keys}


def study_uids(c: FindCorpus, where: Callable[[Any], bool]) -> set[str]:
    return {s.uid for s in c.studies.values() if where(s)}


def series_uids(c: FindCorpus, where: Callable[[Any, Any], bool]) -> set[str]:
    return {se.uid for st in c.studies.values() for se in st.series if where(st, se)}


def charset_keys(c: FindCorpus) -> list[str]:
    return [k for k in c.studies if k.startswith("chr")]


QUERIES = [
    # PATIENT level: Patient Root only
    Q("patient-exact", "PATIENT", lambda c: ["PatientID=P002", "PatientName", "PatientBirthDate", "PatientSex"],
      lambda c: {"P002"}, roots=("patient",)),
    Q("patient-wildcard", "PATIENT", lambda c: ["PatientName=A*", "PatientID", "PatientBirthDate"],
      lambda c: {"P001", "P002"}, roots=("patient",)),
    Q("patient-question-mark", "PATIENT", lambda c: ["PatientName=B?OWN*", "PatientID"],
      lambda c: {"P004"}, roots=("patient",)),
    Q("patient-case", "PATIENT", lambda c: ["PatientName=adams*", "PatientID"], lambda c: {"P001"},
      roots=("patient",)),
    Q("patient-list", "PATIENT", lambda c: ["PatientID=P001\\P004", "PatientName", "PatientSex"],
      lambda c: {"P001", "P004"}, roots=("patient",)),
    Q("patient-cyrillic", "PATIENT", lambda c: [UTF8, "PatientName=Люк*", "PatientID"],
      lambda c: {"CS-chrRuss"}, roots=("patient",)),
    Q("patient-japanese", "PATIENT", lambda c: [UTF8, "PatientName=*山田*", "PatientID"],
      lambda c: {"CS-chrH31"}, roots=("patient",)),
    Q("patient-counts", "PATIENT",
      lambda c: ["PatientID=P001\\P002", "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                 "NumberOfPatientRelatedInstances"],
      lambda c: {"P001", "P002"}, roots=("patient",)),
    Q("patient-none", "PATIENT", lambda c: ["PatientID=NOBODY", "PatientName"], lambda c: set(), roots=("patient",)),
    # STUDY level
    Q("study-exact", "STUDY",
      lambda c: ["AccessionNumber=A1003", "PatientID", "PatientName", "StudyDate", "StudyDescription"],
      lambda c: studies(c, "s3")),
    Q("study-wildcard", "STUDY",
      lambda c: ["PatientName=A*", "PatientID", "StudyDate", "AccessionNumber", "ModalitiesInStudy"],
      lambda c: studies(c, "s1", "s2", "s3", "s4")),
    Q("study-question-mark", "STUDY", lambda c: ["PatientName=?AKER^CAROL", "PatientID", "StudyDescription"],
      lambda c: studies(c, "s5", "s6")),
    Q("study-date-range", "STUDY", lambda c: ["StudyDate=20200101-20211231", "PatientID", "AccessionNumber"],
      lambda c: studies(c, "s2", "s3", "s4", "s5", "s8")),
    Q("study-date-open-range", "STUDY", lambda c: ["StudyDate=-20191231", "PatientID"],
      lambda c: study_uids(c, lambda s: s.date <= "20191231")),
    Q("study-uid-list", "STUDY",
      lambda c: [f"StudyInstanceUID={c.studies['s2'].uid}\\{c.studies['s7'].uid}", "PatientID", "StudyDate"],
      lambda c: studies(c, "s2", "s7")),
    Q("study-modalities", "STUDY", lambda c: ["ModalitiesInStudy=MR", "PatientID", "StudyDate"],
      lambda c: studies(c, "s2", "s3", "s7")),
    Q("study-modalities-list", "STUDY", lambda c: ["ModalitiesInStudy=US\\DX", "PatientID", "StudyDate"],
      lambda c: studies(c, "s4", "s5")),
    Q("study-time-range", "STUDY",
      lambda c: ["StudyDate=20200101-20201231", "StudyTime=1000-1030", "PatientID", "AccessionNumber"],
      lambda c: studies(c, "s2", "s3", "s8")),
    Q("study-referring-physician", "STUDY",
      lambda c: ["ReferringPhysicianName=referrer*", "StudyDate=20230101-", "PatientID"],
      lambda c: studies(c, "s7")),
    Q("study-counts", "STUDY",
      lambda c: ["PatientID=P002", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"],
      lambda c: studies(c, "s3", "s4")),
    Q("study-latin1-exact", "STUDY", lambda c: [UTF8, "PatientName=Buc^Jérôme", "PatientID"],
      lambda c: studies(c, "chrFren", "chrFrenMulti")),
    Q("study-greek", "STUDY", lambda c: [UTF8, "PatientName=Διον*", "PatientID"],
      lambda c: studies(c, "chrGreek")),
    Q("study-japanese", "STUDY", lambda c: [UTF8, "PatientName=やまだ*", "PatientID"],
      lambda c: studies(c, "chrJapMulti")),
    Q("study-korean", "STUDY", lambda c: [UTF8, "PatientName=*길동*", "PatientID"], lambda c: studies(c, "chrI2")),
    # the identifier in other character sets than UTF-8: decoded by its own
    Q("study-identifier-iso-ir-144", "STUDY", lambda c: [*encoded("ISO_IR 144", "Люк*", "iso8859_5"), "PatientID"],
      lambda c: studies(c, "chrRuss")),
    Q("study-identifier-iso-2022-ir-87", "STUDY",
      lambda c: [*encoded("\\ISO 2022 IR 87", "やまだ*", "iso2022_jp"), "PatientID"],
      lambda c: studies(c, "chrJapMulti")),
    Q("study-identifier-iso-ir-100", "STUDY", lambda c: [*encoded("ISO_IR 100", "Buc^J*", "latin-1"), "PatientID"],
      lambda c: studies(c, "chrFren", "chrFrenMulti")),
    Q("study-identifier-gb18030", "STUDY", lambda c: [*encoded("GB18030", "*王^小东*", "gb18030"), "PatientID"],
      lambda c: studies(c, "chrX2")),
    Q("study-none", "STUDY", lambda c: ["AccessionNumber=NOTHING", "PatientID"], lambda c: set()),
    Q("study-every-charset", "STUDY", lambda c: ["StudyDate=20180101-20181231", "PatientName", "PatientID"],
      lambda c: studies(c, *charset_keys(c))),
    # SERIES level
    Q("series-in-study", "SERIES",
      lambda c: [f"StudyInstanceUID={c.studies['s3'].uid}", "Modality", "SeriesNumber", "SeriesDescription"],
      lambda c: series_uids(c, lambda st, se: st is c.studies["s3"]), patient=lambda c: "P002"),
    Q("series-modality", "SERIES", lambda c: ["Modality=MR", "StudyInstanceUID", "SeriesDescription"],
      lambda c: series_uids(c, lambda st, se: se.modality == "MR")),
    Q("series-wildcard", "SERIES", lambda c: ["SeriesDescription=AX*", "Modality", "StudyInstanceUID"],
      lambda c: series_uids(c, lambda st, se: se.description.startswith("AX"))),
    Q("series-uid-list", "SERIES",
      lambda c: [f"StudyInstanceUID={c.studies['s2'].uid}",
                 "SeriesInstanceUID=" + "\\".join(se.uid for se in c.studies["s2"].series), "Modality"],
      lambda c: series_uids(c, lambda st, se: st is c.studies["s2"]), patient=lambda c: "P001"),
    Q("series-date-range", "SERIES", lambda c: ["SeriesDate=20210101-20211231", "Modality"],
      lambda c: {c.studies["s3"].series[1].uid, c.studies["s4"].series[0].uid, c.studies["s5"].series[0].uid}),
    Q("series-by-patient-name", "SERIES", lambda c: ["PatientName=BROWN*", "Modality", "StudyInstanceUID"],
      lambda c: series_uids(c, lambda st, se: st.patient_id == "P004")),
    Q("series-by-study-date", "SERIES", lambda c: ["StudyDate=20200101-20201231", "Modality", "SeriesNumber"],
      lambda c: series_uids(c, lambda st, se: "20200101" <= st.date <= "20201231")),
    Q("series-counts", "SERIES",
      lambda c: [f"StudyInstanceUID={c.studies['s2'].uid}", "NumberOfSeriesRelatedInstances"],
      lambda c: series_uids(c, lambda st, se: st is c.studies["s2"]), patient=lambda c: "P001"),
    # IMAGE level
    Q("image-in-series", "IMAGE",
      lambda c: [f"StudyInstanceUID={c.studies['s2'].uid}", f"SeriesInstanceUID={c.studies['s2'].series[0].uid}",
                 "InstanceNumber", "SOPClassUID"],
      lambda c: set(c.studies["s2"].series[0].instances), patient=lambda c: "P001"),
    Q("image-number", "IMAGE",
      lambda c: [f"StudyInstanceUID={c.studies['s1'].uid}", "InstanceNumber=2", "SOPClassUID"],
      lambda c: {c.studies["s1"].series[0].instances[1]}, patient=lambda c: "P001"),
    Q("image-of-a-patient", "IMAGE", lambda c: ["PatientID=P004", "SOPClassUID", "InstanceNumber"],
      lambda c: {i for k in ("s7", "s8") for se in c.studies[k].series for i in se.instances}),
    Q("image-uid-list", "IMAGE",
      lambda c: [f"StudyInstanceUID={c.studies['s6'].uid}",
                 "SOPInstanceUID=" + "\\".join(c.studies["s6"].series[0].instances), "InstanceNumber"],
      lambda c: set(c.studies["s6"].series[0].instances), patient=lambda c: "P003"),
]

CASES = [(q, root) for q in QUERIES for root in q.roots]
CASE_IDS = [f"{q.name}-{root}" for q, root in CASES]


@pytest.fixture(scope="module")
def direct(orthanc: Orthanc, corpus: FindCorpus) -> Callable[[Q, str], FindResult]:
    """findscu straight to Orthanc, each query asked once per module."""
    answers: dict[tuple[str, str], FindResult] = {}

    def ask(q: Q, root: str) -> FindResult:
        if (q.name, root) not in answers:
            answers[(q.name, root)] = findscu(orthanc.dicom_port, q.level, q.args(corpus, root), root=root,
                                              called_ae=orthanc.aet).check()
        return answers[(q.name, root)]

    return ask


def assert_shape(result: FindResult, level: str, keys: list[str]) -> None:
    """What every response of the bridge carries: the keys asked for, the level's unique
    key, Query/Retrieve Level, Specific Character Set and the bridge's AE title as
    Retrieve AE Title; never a Retrieve URL, nothing else; each match once."""
    allowed = {*keywords(keys), UNIQUE[level], *ALWAYS}
    for ds in result.responses:
        present = {e.keyword for e in ds}
        assert present <= allowed, f"not asked for: {sorted(present - allowed)}"
        assert ds.RetrieveAETitle == BRIDGE_AE
        assert "RetrieveURL" not in ds
        assert ds.QueryRetrieveLevel == level
        assert ds.get(UNIQUE[level])
    uids = unique_values(result, level)
    assert len(uids) == len(set(uids)), "a match answered twice"


def without_misread(found: set[tuple[tuple[str, object], ...]], misread: FindCorpus) -> set[Any]:
    """``found`` less the matches of the files only the bridge's archive holds."""
    theirs = {s.patient_id for s in misread.studies.values()} | {s.uid for s in misread.studies.values()}
    theirs |= {se.uid for s in misread.studies.values() for se in s.series}
    theirs |= {i for s in misread.studies.values() for se in s.series for i in se.instances}
    return {m for m in found if not any(value in theirs for _, value in m)}


@pytest.mark.parametrize(("q", "root"), CASES, ids=CASE_IDS)
def test_orthanc_answers_what_was_loaded(q: Q, root: str, corpus: FindCorpus, direct: Any) -> None:
    """The reference itself: Orthanc's matches are those the loaded studies should give
    (so that a comparison with it cannot pass on empty answers)."""
    result = direct(q, root)
    assert set(unique_values(result, q.level)) == q.expected(corpus)


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize(("q", "root"), CASES, ids=CASE_IDS)
def test_same_matches_as_orthanc(source: str, q: Q, root: str, corpus: FindCorpus, misread: FindCorpus,
                                 bridge: Bridge, direct: Any) -> None:
    keys = q.args(corpus, root)
    result = findscu(bridge.port, q.level, keys, root=root, calling_ae=SOURCES[source]).check()
    assert_shape(result, q.level, keys)
    found = matches(result, q.level, keys)
    if source == "local":  # the files Orthanc misreads are in the archive only
        found = without_misread(found, misread)
    assert found == matches(direct(q, root), q.level, keys)


def test_more_matches_than_one_qido_page(bridge: Bridge, corpus: FindCorpus, direct: Any) -> None:
    """``page_size: 3``: every study of the archive, asked for three at a time, each once."""
    keys = ["PatientName", "PatientID", "StudyDate", "StudyInstanceUID"]
    q = Q("all-studies", "STUDY", lambda c: keys, lambda c: {s.uid for s in c.studies.values()})
    result = findscu(bridge.port, "STUDY", keys, calling_ae="PAGEDQ").check()
    assert_shape(result, "STUDY", keys)
    assert len(result.responses) == len(corpus.studies) > 3 * 5
    assert matches(result, "STUDY", keys) == matches(direct(q, "study"), "STUDY", keys)


def test_answers_in_the_requesters_character_set(bridge: Bridge, corpus: FindCorpus) -> None:
    """LATINWS is a node with ``charset: ISO_IR 100``: names are answered in Latin-1, a
    character Latin-1 lacks as '?'; JAPANWS one with ISO 2022 IR 87; any other requester
    gets UTF-8."""
    keys = ["StudyDate=20180101-20181231", "PatientName", "PatientID", "StudyInstanceUID"]
    latin = findscu(bridge.port, "STUDY", keys, calling_ae="LATINWS").check()
    utf8 = findscu(bridge.port, "STUDY", keys, calling_ae="WEBQ").check()
    names = {str(ds.PatientID): (ds.SpecificCharacterSet, str(ds.PatientName)) for ds in latin.responses}
    assert names["CS-chrFren"] == ("ISO_IR 100", "Buc^Jérôme")
    assert names["CS-chrGerm"] == ("ISO_IR 100", "Äneas^Rüdiger")
    charset, greek = names["CS-chrGreek"]
    assert charset == "ISO_IR 100" and greek == "?" * len(corpus.studies["chrGreek"].patient_name)
    assert {(str(ds.PatientID), ds.SpecificCharacterSet, str(ds.PatientName)) for ds in utf8.responses} == {
        (s.patient_id, "ISO_IR 192", s.patient_name) for k, s in corpus.studies.items() if k.startswith("chr")}
    assert "characters ISO_IR 100 cannot hold" in bridge.log()
    # ISO 2022 IR 87 (JIS X 0208, with code extensions): kanji, kana, Greek and Cyrillic
    # letters; not Hangul, nor the simplified 东 of chrX2, nor a final sigma
    japanese = findscu(bridge.port, "STUDY", keys, calling_ae="JAPANWS").check()
    names = {str(ds.PatientID): (list(ds.SpecificCharacterSet), str(ds.PatientName)) for ds in japanese.responses}
    assert names["CS-chrH31"] == (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう")
    assert names["CS-chrRuss"][1] == "Люкceмбypг"
    assert names["CS-chrI2"][1] == "Hong^Gildong=洪^吉洞=?^??"
    assert names["CS-chrX2"][1] == "Wang^XiaoDong=王^小?"
    assert names["CS-chrGreek"][1] == "Διονυσιο?"


def test_local_decodes_names_orthanc_misreads(bridge: Bridge, misread: FindCorpus) -> None:
    """ISO 2022 IR 13 (half-width katakana) and an explicit IR 6 with IR 87: the archive
    answers the names pydicom reads from the files."""
    ids = "\\".join(s.patient_id for s in misread.studies.values())
    result = findscu(bridge.port, "STUDY", [f"PatientID={ids}", "PatientName", "StudyInstanceUID"],
                     calling_ae="LOCALQ").check()
    expected = {(s.patient_id, s.patient_name) for s in misread.studies.values()}
    assert {(str(ds.PatientID), str(ds.PatientName)) for ds in result.responses} == expected
    assert "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう" in {name for _, name in expected}
    # and a Japanese wildcard query finds them, as it finds chrH31
    result = findscu(bridge.port, "STUDY", [UTF8, "PatientName=*山田*", "PatientID", "StudyInstanceUID"],
                     calling_ae="LOCALQ").check()
    assert {text(ds, "PatientID") for ds in result.responses} >= {"CS-chrH31", "CS-chrH32"}



def test_embedded_default_finds_what_it_stored(bridge_factory: Any, corpus: FindCorpus) -> None:
    """No destinations and no rules: the embedded default keeps every instance in the
    archive and answers C-FIND from it (``find: [local]``), out of the box."""
    daemon = bridge_factory({})
    s2 = corpus.studies["s2"]
    files = [f for f in corpus.files if f.name.startswith("s2-")]
    assert storescu(daemon.port, files).statuses == [0] * len(files)
    wait_for(lambda: daemon.queue_states() == {"done": len(files)}, 30, "the archive to hold the study")
    result = findscu(daemon.port, "STUDY", ["PatientID=P001", "PatientName", "StudyInstanceUID",
                                            "NumberOfStudyRelatedInstances"]).check()
    assert [(text(ds, "StudyInstanceUID"), text(ds, "PatientName"), text(ds, "NumberOfStudyRelatedInstances"))
            for ds in result.responses] == [(s2.uid, "ADAMS^ANNA", str(len(files)))]
    result = findscu(daemon.port, "IMAGE", [f"StudyInstanceUID={s2.uid}", "SOPInstanceUID"]).check()
    assert {text(ds, "SOPInstanceUID") for ds in result.responses} == {i for se in s2.series for i in se.instances}


def test_concurrent_queries(bridge: Bridge, corpus: FindCorpus, misread: FindCorpus, direct: Any) -> None:
    """Eighteen C-FINDs at once, through every source (each source shared by several
    associations): each answer is what Orthanc answers that query alone."""
    chosen = [q for q in QUERIES if q.name in ("study-wildcard", "series-modality", "image-of-a-patient",
                                               "study-every-charset", "study-date-range", "series-in-study")]
    cases = [(q, source) for q in chosen for source in ("web", "pacs")] + [(q, "local") for q in chosen[:3]] \
        + [(q, "pacs+web") for q in chosen[3:]]
    expected = {(q.name, source): matches(direct(q, "study"), q.level, q.args(corpus, "study")) for q, source in cases}
    with ThreadPoolExecutor(len(cases)) as pool:
        answers = list(pool.map(lambda case: findscu(bridge.port, case[0].level, case[0].args(corpus, "study"),
                                                     calling_ae=SOURCES[case[1]]), cases))
    for (q, source), result in zip(cases, answers, strict=True):
        result.check()
        found = matches(result, q.level, q.args(corpus, "study"))
        if source == "local":
            found = without_misread(found, misread)
        assert found == expected[(q.name, source)], (q.name, source)


def test_key_the_archive_cannot_match_answered_unverified(bridge: Bridge, corpus: FindCorpus) -> None:
    """InstitutionName is not in the archive's index: its matches on the other keys are
    answered 0xFF01 (an optional key not supported for matching, PS3.4 C.4.1.1.3.1),
    not dropped, and not taken for checked (0xFF00)."""
    keys = ["InstitutionName=NOWHERE*", "PatientID=P001", "StudyInstanceUID"]
    result = findscu(bridge.port, "STUDY", keys, calling_ae="LOCALQ").check()
    assert set(unique_values(result, "STUDY")) == studies(corpus, "s1", "s2")
    assert result.statuses[:-1] == [0xFF01] * 2
