"""A C-FIND identifier read into a Query: levels, matching kinds, the check of what a
source answered, the shape of a response, and text fitted to a requester's charset."""

from __future__ import annotations

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.valuerep import PersonName

from bridge.dataset import charset
from bridge.dataset.query import (
    PATIENT_ROOT_FIND,
    PATIENT_ROOT_GET,
    PATIENT_ROOT_MOVE,
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
    QueryError,
    parse,
    retrieval_problem,
)


def identifier(level: str | None = "STUDY", **keys: object) -> Dataset:
    ds = Dataset()
    if level is not None:
        ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        if isinstance(value, RawDataElement):
            ds[value.tag] = value
        else:
            setattr(ds, keyword, value)
    return ds


def record(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(("ds", "sop_class", "status"), [
    (identifier(None, PatientID="1"), STUDY_ROOT_FIND, 0xA900),
    (identifier("STUDIES"), STUDY_ROOT_FIND, 0xA900),
    (identifier("PATIENT"), STUDY_ROOT_FIND, 0xA900),  # Study Root has no PATIENT level
    (identifier("STUDY"), "1.2.840.10008.5.1.4.31", 0x0122),  # a worklist query is not ours
])
def test_identifiers_that_cannot_be_answered(ds: Dataset, sop_class: str, status: int) -> None:
    with pytest.raises(QueryError) as raised:
        parse(ds, sop_class)
    assert raised.value.status == status
    assert 0 < len(raised.value.comment) <= 64


def test_every_level_of_patient_root() -> None:
    for level in ("PATIENT", "STUDY", "SERIES", "IMAGE"):
        query = parse(identifier(level), PATIENT_ROOT_FIND)
        assert query.level == level
        assert query.root == "patient"
        assert query.sop_class == PATIENT_ROOT_FIND


@pytest.mark.parametrize(("sop_class", "root"), [
    (PATIENT_ROOT_MOVE, "patient"), (STUDY_ROOT_MOVE, "study"), (PATIENT_ROOT_GET, "patient"),
    (STUDY_ROOT_GET, "study"),
])
def test_move_and_get_identifiers_are_read_under_their_root(sop_class: str, root: str) -> None:
    query = parse(identifier("STUDY", StudyInstanceUID="1.2.3"), sop_class)
    assert query.root == root and query.level == "STUDY"
    assert query.key("StudyInstanceUID").values == ("1.2.3",)  # type: ignore[union-attr]
    if root == "patient":
        assert parse(identifier("PATIENT", PatientID="P1"), sop_class).level == "PATIENT"
    else:
        with pytest.raises(QueryError) as raised:
            parse(identifier("PATIENT", PatientID="P1"), sop_class)
        assert raised.value.status == 0xA900


@pytest.mark.parametrize(("level", "keys", "missing"), [
    ("STUDY", {"StudyInstanceUID": "1.2.3"}, ""),
    ("STUDY", {"StudyInstanceUID": ["1.2.3", "1.2.4"]}, ""),
    ("STUDY", {"PatientID": "P1"}, "StudyInstanceUID"),
    ("STUDY", {"StudyInstanceUID": ""}, "StudyInstanceUID"),  # universal: it would widen to everything
    ("SERIES", {"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.1\\1.2.3.2"}, ""),
    ("SERIES", {"SeriesInstanceUID": "1.2.3.1"}, ""),  # the key above is used when given, not required
    ("SERIES", {"StudyInstanceUID": "1.2.3"}, "SeriesInstanceUID"),
    ("IMAGE", {"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.1"}, "SOPInstanceUID"),
    ("IMAGE", {"SOPInstanceUID": "1.2.3.1.1"}, ""),
    ("PATIENT", {"PatientID": "P1"}, ""),
    ("PATIENT", {"PatientName": "DOE^J"}, "PatientID"),
])
def test_a_retrieval_needs_the_unique_key_of_its_level(level: str, keys: dict, missing: str) -> None:
    query = parse(identifier(level, **keys), PATIENT_ROOT_MOVE)
    problem = retrieval_problem(query)
    if missing:
        assert missing in problem
    else:
        assert problem == ""


def test_matching_kinds_follow_the_vr() -> None:
    query = parse(identifier(
        "SERIES", PatientName="SM?TH*", PatientID="", StudyDate="20240101-20241231", StudyTime="-1030",
        StudyInstanceUID=["1.2.3", "1.2.4"], Modality="CT", SeriesDescription="A-B",
        ReferencedStudySequence=[],
        SeriesNumber=RawDataElement(Tag(0x00200011), "IS", 1, b"*", 0, False, True),  # as a requester may send
    ), STUDY_ROOT_FIND)
    kinds = {key.keyword: (key.kind, key.values) for key in query.keys}
    assert kinds["PatientName"] == ("wildcard", ("SM?TH*",))
    assert kinds["PatientID"] == ("universal", ())
    assert kinds["StudyDate"] == ("range", ("20240101", "20241231"))
    assert kinds["StudyTime"] == ("range", ("", "1030"))
    assert kinds["StudyInstanceUID"] == ("list", ("1.2.3", "1.2.4"))
    assert kinds["Modality"] == ("single", ("CT",))
    assert kinds["SeriesNumber"] == ("single", ("*",))  # IS: no wildcards
    assert kinds["SeriesDescription"] == ("single", ("A-B",))  # a dash in text is no range
    assert kinds["ReferencedStudySequence"][0] == "universal"
    assert {k.keyword for k in query.matching} == {"PatientName", "StudyDate", "StudyTime", "StudyInstanceUID",
                                                   "Modality", "SeriesNumber", "SeriesDescription"}
    assert query.key("StudyDate").level == "STUDY"  # type: ignore[union-attr]
    assert query.key("Modality").level == "SERIES"  # type: ignore[union-attr]


def test_values_are_decoded_by_the_identifiers_own_character_set() -> None:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller*"
    raw = Dataset()
    raw.QueryRetrieveLevel = "STUDY"
    raw.SpecificCharacterSet = "ISO_IR 100"
    raw.add_new(0x00100010, "PN", "Müller*".encode("latin-1"))  # as it comes off the network
    for candidate in (ds, raw):
        key = parse(candidate, STUDY_ROOT_FIND).key("PatientName")
        assert key is not None and key.values == ("Müller*",)


@pytest.mark.parametrize(("keys", "values", "expected"), [
    ({"PatientName": "SM?TH*"}, {"PatientName": "SMITH^JOHN"}, (True, True)),
    ({"PatientName": "smith*"}, {"PatientName": "SMITH^JOHN"}, (True, True)),
    ({"PatientName": "SMITH*"}, {"PatientName": "JONES"}, (False, True)),
    ({"StudyDescription": "chest*"}, {"StudyDescription": "CHEST"}, (True, True)),  # the check ignores case
    ({"StudyDescription": "chest*"}, {"StudyDescription": "HEAD"}, (False, True)),
    ({"StudyDate": "20240101-20241231"}, {"StudyDate": "20240615"}, (True, True)),
    ({"StudyDate": "20240101-20241231"}, {"StudyDate": "20250101"}, (False, True)),
    ({"StudyDate": "-20240101"}, {"StudyDate": "20240101"}, (True, True)),
    ({"StudyTime": "0800-1030"}, {"StudyTime": "103059.5"}, (True, True)),  # a bound covers what it prefixes
    ({"StudyTime": "0800-1030"}, {"StudyTime": "1031"}, (False, True)),
    ({"ModalitiesInStudy": ["CT", "MR"]}, {"ModalitiesInStudy": ["SR", "MR"]}, (True, True)),
    ({"StudyInstanceUID": ["1.2.3", "1.2.4"]}, {"StudyInstanceUID": "1.2.5"}, (False, True)),
    ({"AccessionNumber": "A1"}, {}, (True, False)),  # absent: not checked, answered as unverified
    ({"AccessionNumber": "*"}, {"AccessionNumber": ""}, (True, True)),
    ({"NumberOfStudyRelatedInstances": "3"}, {"NumberOfStudyRelatedInstances": "3"}, (True, True)),
])
def test_a_record_is_checked_against_the_query(keys: dict, values: dict, expected: tuple[bool, bool]) -> None:
    query = parse(identifier("STUDY", **keys), STUDY_ROOT_FIND)
    assert query.matches(record(**{"StudyInstanceUID": "1.2.9", **values})) == expected


def test_a_fuzzy_query_leaves_person_names_to_the_source() -> None:
    query = parse(identifier("STUDY", PatientName="MEIER", AccessionNumber="A1"), STUDY_ROOT_FIND, fuzzy=True)
    assert query.matches(record(PatientName="Mayer", AccessionNumber="A1")) == (True, True)
    assert query.matches(record(PatientName="Mayer", AccessionNumber="B2"))[0] is False


def test_a_response_carries_what_was_asked_and_no_upstream_retrieve_location() -> None:
    query = parse(identifier("SERIES", StudyInstanceUID="1.2.3", Modality="", SeriesDescription=""),
                  STUDY_ROOT_FIND)
    answered = record(StudyInstanceUID="1.2.3", SeriesInstanceUID="1.2.3.4", Modality="CT",
                      RetrieveAETitle="ORTHANC", RetrieveURL="http://pacs/studies/1.2.3", PatientName="SECRET")
    response = query.shape(answered, "DICOM_BRIDGE")
    assert set(response.dir()) == {"QueryRetrieveLevel", "RetrieveAETitle", "StudyInstanceUID", "Modality",
                                   "SeriesDescription", "SeriesInstanceUID"}
    assert response.RetrieveAETitle == "DICOM_BRIDGE"
    assert response.QueryRetrieveLevel == "SERIES"
    assert response.SeriesDescription in (None, "")  # asked for, unknown: present and empty


def test_text_fitted_to_the_requesters_character_set() -> None:
    ds = record(PatientName=PersonName("Müller^Jürgen"), StudyDescription="Thorax 山", PatientID="ÅB")
    changed = charset.fit(ds, "ISO_IR 100")
    assert ds.SpecificCharacterSet == "ISO_IR 100"
    assert str(ds.PatientName) == "Müller^Jürgen"  # Latin-1 holds it
    assert ds.StudyDescription == "Thorax ?"
    assert changed == ["StudyDescription"]
    japanese = record(PatientName=PersonName("Yamada^Tarou=山田^太郎"))
    assert charset.fit(japanese, "ISO 2022 IR 6\\ISO 2022 IR 87") == []
    assert japanese.SpecificCharacterSet == ["ISO 2022 IR 6", "ISO 2022 IR 87"]
    ascii_only = record(PatientName=PersonName("Jérôme=山田"))  # the default repertoire is ASCII, not Latin-1
    assert charset.fit(ascii_only, "\\ISO 2022 IR 87") == ["PatientName"]
    assert str(ascii_only.PatientName) == "J?r?me=山田"
    utf8 = record(PatientName=PersonName("Müller 山田"))
    assert charset.fit(utf8, charset.DEFAULT) == []
