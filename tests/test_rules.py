"""Routing rules, end to end: a real daemon, real storescu, files landing (or not) in the
folder of each rule; `route` and `check` as an administrator runs them; SIGHUP."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import forkserver
import pydicom
import pytest
import yaml
from corpus import ct_series, with_uid
from peers import storescu, wait_for
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.uid import generate_uid

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"


def fresh(source: Path, target: Path, **values: str) -> Path:
    """A copy of ``source`` with fresh UIDs and the given values set."""
    return with_uid(source, target, StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(),
                    SOPInstanceUID=generate_uid(), **values)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Files whose routing-relevant values the test controls."""
    cts = ct_series(tmp_path / "ct", 3)  # Modality CT, Test^Patient, ACC1, 20261122, InstanceNumber 1..3
    us = pydicom.dcmread(cts[0])
    us.Modality = "US"
    us.SOPClassUID = us.file_meta.MediaStorageSOPClassUID = US_IMAGE_STORAGE
    us.SOPInstanceUID = us.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    us.StudyInstanceUID, us.SeriesInstanceUID = generate_uid(), generate_uid()
    us.StudyDate = "20191231"
    del us.AccessionNumber
    us.save_as(tmp_path / "us.dcm", enforce_file_format=True)
    return {
        "ct1": cts[0], "ct2": cts[1], "ct3": cts[2],
        "us": tmp_path / "us.dcm",
        "mr": fresh(Path(get_testdata_file("MR_small.dcm")), tmp_path / "mr.dcm", AccessionNumber="ACC-MR"),
        "de": fresh(Path(get_charset_files("chrGerm.dcm")[0]), tmp_path / "de.dcm", AccessionNumber="ACC-DE",
                    StudyDate="20261122"),
        "rt": fresh(Path(get_testdata_file("rtplan.dcm")), tmp_path / "rt.dcm", AccessionNumber="ACC-RT",
                    StudyDate="20261122", InstanceNumber="1"),
    }


def _clock(delta_minutes: int) -> str:
    return (datetime.now() + timedelta(minutes=delta_minutes)).strftime("%H:%M")


def condition_rules() -> list[tuple[dict, set[str]]]:
    """(the `when` of a rule, the files it must route), one per kind of condition. Every
    rule continues, so each decides on its own."""
    today = datetime.now().strftime("%a").lower()[:3]
    other_days = [d for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun") if d != today]
    every = {"ct1", "ct2", "ct3", "us", "mr", "de", "rt"}
    cts = {"ct1", "ct2", "ct3"}
    return [
        ({"calling_ae": "CT*"}, every),
        ({"calling_ae": ["MR1", "XR?"]}, set()),
        ({"called_ae": "BRIDGE"}, every),
        ({"peer": ["10.0.0.0/8", "127.0.0.0/8"]}, every),
        ({"peer": "192.168.0.0/16"}, set()),
        ({"time": f"{_clock(-60)}-{_clock(60)}", "weekday": today}, every),
        ({"time": f"{_clock(90)}-{_clock(-90)}"}, set()),  # the rest of the day, wrapping midnight
        ({"weekday": other_days}, set()),
        ({"tags": {"Modality": "CT"}}, cts),
        ({"tags": {"Modality": ["MR", "US"]}}, {"mr", "us"}),
        ({"tags": {"PatientName": "Test^*"}}, cts | {"us"}),  # a glob
        ({"tags": {"(0010,0010)": "Test^*"}}, cts | {"us"}),  # by tag number
        ({"tags": {"PatientName": {"equals": "Test^*"}}}, set()),  # equals: no glob
        ({"tags": {"PatientName": {"regex": "(?i)^äneas"}}}, {"de"}),  # text decoded from ISO_IR 100
        ({"tags": {"Modality": {"not": ["CT", "US"]}}}, {"mr", "de", "rt"}),
        ({"tags": {"AccessionNumber": {"present": False}}}, {"us"}),
        ({"tags": {"InstanceNumber": {"ge": 2}}}, {"ct2", "ct3"}),  # numeric, not text ("10" > "2")
        ({"tags": {"StudyDate": {"lt": "20200101"}}}, {"us", "mr"}),  # a date
        ({"tags": {"BeamSequence.BeamName": "Field 1"}}, {"rt"}),  # into a sequence, any item
        ({"tags": {"BeamSequence[0].BeamName": {"present": True}}}, {"rt"}),
        ({"tags": {"Modality": "CT", "InstanceNumber": {"le": 1}}}, {"ct1"}),  # all must hold
    ]


def test_every_condition_type_routes_the_corpus(tmp_path, files, bridge_factory):
    cases = condition_rules()
    out = tmp_path / "out"
    destinations = {f"r{i}": {"type": "folder", "path": str(out / f"r{i}"), "filename": "{SOPInstanceUID}.dcm"}
                    for i in range(len(cases))}
    rules = [{"name": f"r{i}", "when": when, "store": [f"r{i}"], "continue": True}
             for i, (when, _) in enumerate(cases)]
    destinations["all"] = {"type": "folder", "path": str(out / "all")}
    rules.append({"name": "all", "store": ["all"]})
    bridge = bridge_factory({"ae_title": "BRIDGE", "destinations": destinations, "rules": rules})
    names = {pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID: name for name, path in files.items()}
    result = storescu(bridge.port, list(files.values()), calling_ae="CT1", called_ae="BRIDGE")
    assert result.statuses == [0] * len(files), result.output
    wait_for(lambda: len(list((out / "all").glob("*.dcm"))) == len(files), 30, "every file in 'all'")
    # each rule's destination has its own worker: 'all' may finish before the others
    wait_for(lambda: not {"pending", "in_flight"} & set(bridge.queue_states()), 30, "every row delivered")
    bridge.stop()
    for i, (when, expected) in enumerate(cases):
        landed = {names[p.stem] for p in (out / f"r{i}").glob("*.dcm")}
        assert landed == expected, f"rule r{i} when={when}"


def route(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return forkserver.run(["route", "--config", str(config), *args], timeout=60)


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return forkserver.run(["check", "--config", str(config)], timeout=60)


def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


def test_route_explains_each_decision(tmp_path, files):
    config = write(tmp_path / "config.yaml", {
        "data_dir": str(tmp_path / "data"),
        "destinations": {"pacs": {"type": "folder", "path": str(tmp_path / "pacs")},
                         "research": {"type": "folder", "path": str(tmp_path / "research")}},
        "rules": [
            {"name": "stat-first", "when": {"tags": {"RequestedProcedurePriority": "STAT"}}, "store": ["pacs"],
             "priority": 100, "continue": True},
            {"name": "ct-research", "when": {"calling_ae": "CT*", "tags": {"Modality": "CT"}}, "store": ["research"],
             "modify": {"research": {"set": {"InstitutionName": "Research"}, "remove": ["PatientComments"]}},
             "continue": True},
            {"name": "mr-only", "when": {"tags": {"Modality": "MR"}}, "store": ["pacs"]},
            {"name": "after-mr", "store": ["pacs"]},
        ],
    })
    ct = route(config, "--calling-ae", "CT1", str(files["ct1"]))
    assert ct.returncode == 0, ct.stderr
    assert "rules[0] stat-first: no match, tags.RequestedProcedurePriority: absent, expected 'STAT'" in ct.stdout
    assert "rules[1] ct-research: matched -> research (continue); modify research: " \
           "set InstitutionName='Research', remove PatientComments" in ct.stdout
    assert "rules[2] mr-only: no match, tags.Modality: 'CT' is not 'MR'" in ct.stdout
    assert "rules[3] after-mr: matched -> pacs" in ct.stdout
    assert "=> research (priority 0), pacs (priority 0)" in ct.stdout

    mr = route(config, "--calling-ae", "MR1", str(files["mr"]))
    assert "rules[1] ct-research: no match, calling_ae: 'MR1' is not 'CT*'" in mr.stdout
    assert "rules[2] mr-only: matched -> pacs" in mr.stdout
    assert "rules[3] after-mr: not considered: an earlier rule matched without continue" in mr.stdout

    stat_ct = with_uid(files["ct2"], tmp_path / "stat.dcm", RequestedProcedurePriority="STAT")
    assert "=> pacs (priority 100), research (priority 0)" in route(config, "--calling-ae", "CT1",
                                                                    str(stat_ct)).stdout

    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not DICOM at all" * 10)
    answer = route(config, str(broken), str(tmp_path / "missing.dcm"))
    assert "would be refused: 0xC000 Error: cannot understand: cannot parse data set" in answer.stdout
    assert "missing.dcm: no such file or folder" in answer.stderr and answer.returncode == 1


def test_route_says_what_unrouted_does(tmp_path, files):
    rules = [{"name": "mr", "when": {"tags": {"Modality": "MR"}}, "store": ["pacs"]}]
    base = {"data_dir": str(tmp_path / "data"), "rules": rules,
            "destinations": {"pacs": {"type": "folder", "path": str(tmp_path / "pacs")}}}
    reject = route(write(tmp_path / "reject.yaml", base), str(files["ct1"]))
    assert "=> no rule routes it: would be refused: 0x0124 Refused: not authorised: no rule routes this " \
           "instance (unrouted: reject)" in reject.stdout
    assert reject.returncode == 1
    default = route(write(tmp_path / "default.yaml", {**base, "unrouted": "pacs"}), str(files["ct1"]))
    assert "=> no rule routes it: unrouted sends it to pacs" in default.stdout
    assert default.returncode == 0


def test_unrouted_instances_are_refused_or_go_to_the_default(tmp_path, files, bridge_factory):
    rules = [{"name": "mr", "when": {"tags": {"Modality": "MR"}}, "store": ["mr"]}]
    destinations = {"mr": {"type": "folder", "path": str(tmp_path / "mr")},
                    "fallback": {"type": "folder", "path": str(tmp_path / "fallback")}}
    reject = bridge_factory({"destinations": destinations, "rules": rules}, name="reject")
    result = storescu(reject.port, [files["ct1"], files["mr"]])
    assert result.statuses == [0x0124, 0x0000]
    assert "no rule routes it (unrouted: reject)" in reject.log()
    reject.stop()
    default = bridge_factory({"destinations": destinations, "rules": rules, "unrouted": "fallback"}, name="default")
    assert storescu(default.port, [files["ct1"], files["mr"]]).statuses == [0, 0]
    wait_for(lambda: len(list((tmp_path / "fallback").glob("*.dcm"))) == 1, 30, "the CT in the fallback")
    wait_for(lambda: len(list((tmp_path / "mr").glob("*.dcm"))) == 1, 30, "the MR in its folder")


def test_check_reports_every_error_at_once_with_its_path(tmp_path):
    rules_file = write(tmp_path / "rules.yaml", {"rules": [
        {"name": "ok", "store": ["pacs"]},
        {"name": "typo", "when": {"tags": {"Modalty": "CT"}}, "store": ["pacs"]},
        {"name": "regex", "when": {"tags": {"StudyDescription": {"regex": "(chest"}}}, "store": ["pacs"]},
        {"name": "dest", "store": ["pacz"]},
    ]})
    config = write(tmp_path / "config.yaml", {
        "data_dir": str(tmp_path / "data"),
        "listen": {"prot": 104},
        "nodes": {"PACS": {"host": "127.0.0.1", "port": 104}},
        "destinations": {"pacs": {"type": "dimse", "node": "PACSS"}},
        "rules": str(rules_file),
    })
    answer = check(config)
    assert answer.returncode == 1
    for expected in (
        "listen.prot: unknown key (did you mean 'port'?)",
        "destinations.pacs.node: unknown node 'PACSS' (did you mean 'PACS'?)",
        "rules.yaml: rules[1].when.tags.Modalty: unknown keyword (did you mean 'Modality'?)",
        "rules.yaml: rules[2].when.tags.StudyDescription.regex: bad regex: missing ), unterminated subpattern "
        "at position 0",
        "rules.yaml: rules[3].store[0]: unknown destination 'pacz' (did you mean 'pacs'?)",
    ):
        assert expected in answer.stderr, answer.stderr


def test_check_warns_about_rules_that_cannot_matter(tmp_path):
    token = tmp_path / "token"
    token.write_text("secret")
    token.chmod(0o644)
    config = write(tmp_path / "config.yaml", {
        "data_dir": str(tmp_path / "data"),
        "accept": {"calling_ae": ["CT*"]},
        "destinations": {"a": {"type": "folder", "path": str(tmp_path / "a")},
                         "b": {"type": "folder", "path": str(tmp_path / "b")}},
        "rules": [
            {"name": "ct", "when": {"tags": {"Modality": "CT"}}, "store": ["a"],
             "modify": {"a": {"set": {"InstitutionName": "X"}}}, "continue": True},
            {"name": "ct-too", "when": {"tags": {"Modality": "CT"}}, "store": ["a"],
             "modify": {"a": {"set": {"InstitutionName": "Y"}}}},
            {"name": "shadowed", "when": {"tags": {"Modality": "CT"}}, "store": ["b"]},
            {"name": "xr", "when": {"calling_ae": "XR1"}, "store": ["b"]},
            {"name": "catch-all", "store": ["b"]},
            {"name": "late", "when": {"tags": {"Modality": "MR"}}, "store": ["b"]},
        ],
    })
    answer = check(config)
    assert answer.returncode == 0, answer.stderr
    out = answer.stdout
    assert "rules[2] (shadowed): shadowed for store by rules[1] (ct-too)" in out
    assert "rules[3] (xr): can never match: calling_ae 'XR1' is refused by accept.calling_ae" in out
    assert "rules[5] (late): shadowed for store by rules[4] (catch-all)" in out
    assert "rules[1] (ct-too).modify.a: changes InstitutionName, as rules[0] (ct) does" in out
    assert "warning(s)" in out

    # a secret file anyone can read
    from bridge.cli.report import secret_warnings

    config.write_text(yaml.safe_dump({"auth": {"token_file": str(token)}}))
    assert any("readable by every user" in w and "chmod 600" in w for w in secret_warnings(config))
    token.chmod(0o600)
    assert not any(str(token) in w for w in secret_warnings(config))


def test_sighup_applies_new_rules_to_new_associations_and_keeps_them_on_a_broken_file(tmp_path, files,
                                                                                      bridge_factory):
    rules_file = tmp_path / "rules.yaml"
    write(rules_file, {"rules": [{"name": "to-a", "store": ["a"]}]})
    bridge = bridge_factory({
        "destinations": {"a": {"type": "folder", "path": str(tmp_path / "a")},
                         "b": {"type": "folder", "path": str(tmp_path / "b")}},
        "rules": str(rules_file),
    })
    assert storescu(bridge.port, [files["ct1"]]).statuses == [0]
    wait_for(lambda: len(list((tmp_path / "a").glob("*.dcm"))) == 1, 30, "ct1 in a")

    write(rules_file, {"rules": [{"name": "to-b", "store": ["b"]}]})
    bridge.signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in bridge.log(), 30, "the reload")
    assert storescu(bridge.port, [files["ct2"]]).statuses == [0]
    wait_for(lambda: len(list((tmp_path / "b").glob("*.dcm"))) == 1, 30, "ct2 in b")

    rules_file.write_text("rules:\n  - name: broken\n    when: {tags: {Modalty: CT}}\n    store: [b]\n")
    bridge.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in bridge.log(), 30, "the refused reload")
    assert "rules[0].when.tags.Modalty: unknown keyword (did you mean 'Modality'?)" in bridge.log()
    assert storescu(bridge.port, [files["ct3"]]).statuses == [0]  # the old rules (to-b) still apply
    wait_for(lambda: len(list((tmp_path / "b").glob("*.dcm"))) == 2, 30, "ct3 in b")
    assert len(list((tmp_path / "a").glob("*.dcm"))) == 1
    assert bridge.stop() == 0


def test_an_association_keeps_the_rules_it_started_with(tmp_path, files, bridge_factory):
    """A reload during an association does not change where the rest of it goes."""
    from pynetdicom import AE

    rules_file = tmp_path / "rules.yaml"
    write(rules_file, {"rules": [{"name": "to-a", "store": ["a"]}]})
    bridge = bridge_factory({
        "destinations": {"a": {"type": "folder", "path": str(tmp_path / "a")},
                         "b": {"type": "folder", "path": str(tmp_path / "b")}},
        "rules": str(rules_file),
    })
    ae = AE(ae_title="RULESCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", bridge.port)
    try:
        assert assoc.is_established
        assert assoc.send_c_store(pydicom.dcmread(files["ct1"])).Status == 0
        write(rules_file, {"rules": [{"name": "to-b", "store": ["b"]}]})
        bridge.signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in bridge.log(), 30, "the reload")
        assert assoc.send_c_store(pydicom.dcmread(files["ct2"])).Status == 0
    finally:
        assoc.release()
        ae.shutdown()
    wait_for(lambda: len(list((tmp_path / "a").glob("*.dcm"))) == 2, 30, "both in a")
    assert storescu(bridge.port, [files["ct3"]]).statuses == [0]  # a new association: the new rules
    wait_for(lambda: len(list((tmp_path / "b").glob("*.dcm"))) == 1, 30, "ct3 in b")


def test_a_world_readable_config_naming_secrets_is_reported(tmp_path):
    from bridge.cli.report import secret_warnings

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"destinations": {"cloud": {"auth": {"password_file": "pw"}}}}))
    (tmp_path / "pw").write_text("x")
    os.chmod(tmp_path / "pw", 0o600)
    os.chmod(config, 0o644)
    assert any("chmod 640" in w for w in secret_warnings(config))
    os.chmod(config, 0o640)
    assert not secret_warnings(config)
    assert stat.S_IMODE(config.stat().st_mode) == 0o640


def test_route_answers_what_the_listener_answers(tmp_path, files, bridge_factory):
    """route runs the listener's checks: a file the listener refuses is refused, with the
    listener's status, and the exit status says so."""
    settings = {"destinations": {"pacs": {"type": "folder", "path": str(tmp_path / "pacs")}},
                "rules": [{"name": "all", "store": ["pacs"]}]}
    bridge = bridge_factory(settings)
    no_study = pydicom.dcmread(files["ct1"])
    del no_study.StudyInstanceUID
    no_study.SOPInstanceUID = no_study.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    no_study.save_as(tmp_path / "no-study.dcm", enforce_file_format=True)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(files["ct2"].read_bytes()[:-100])
    listener = storescu(bridge.port, [tmp_path / "no-study.dcm"])  # (storescu will not send a cut file)
    assert listener.statuses == [0xC000], listener.output

    answer = route(bridge.config_path, str(tmp_path / "no-study.dcm"))
    assert answer.returncode == 1, answer.stdout + answer.stderr
    assert answer.stdout == f"{tmp_path / 'no-study.dcm'}: would be refused: 0xC000 Error: cannot understand: " \
                            "missing StudyInstanceUID\n"
    answer = route(bridge.config_path, str(truncated))
    assert answer.returncode == 1 and "would be refused: 0xC000" in answer.stdout and "truncated" in answer.stdout
    notes = tmp_path / "notes.txt"
    notes.write_text("not DICOM\n")
    assert route(bridge.config_path, str(notes)).returncode == 1
    good = route(bridge.config_path, str(files["ct3"]))
    assert good.returncode == 0 and "rules[0] all: matched -> pacs" in good.stdout
    private = with_uid(files["ct3"], tmp_path / "private.dcm", SOPClassUID="1.2.826.0.1.3680043.9.1")
    answer = route(bridge.config_path, str(private))
    assert answer.returncode == 1 and "its SOP class 1.2.826.0.1.3680043.9.1 is not accepted" in answer.stdout
    bridge.config["accept"] = {"any_sop_class": True}
    bridge.write_config()
    assert route(bridge.config_path, str(private)).returncode == 0
    (tmp_path / "broken.yaml").write_text("rules: [{name: x, store: [nowhere]}]\n")
    assert route(tmp_path / "broken.yaml", str(files["ct3"])).returncode == 2
