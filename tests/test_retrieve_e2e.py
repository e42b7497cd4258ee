"""C-MOVE and C-GET through the bridge deliver what the source holds, unchanged (issue 17).

One Orthanc (its DICOMweb plugin on) holds a study of mixed SOP classes and transfer
syntaxes (``retrievepeers.mixed_study``); one bridge retrieves from it through each
kind of source, chosen by the requester's AE title:

  WEBMOVE   the ``dicomweb`` source: WADO-RS on Orthanc;
  PACSMOVE  a ``dimse`` source with ``retrieve: c-move``: Orthanc C-MOVEs to the bridge
            (it knows the bridge's AE title at the bridge's port, ``DicomModalities``);
  PACSGET   a ``dimse`` source with ``retrieve: c-get``: the bridge C-GETs from Orthanc;

and a second bridge, run with the embedded default (only ``nodes`` given), answers
from its own archive (``local``) after ``storescu`` of the same files.

DCMTK ``movescu`` moves to a ``storescp +xa`` (every syntax: each instance must arrive
in its own syntax, its data set byte for byte the study's file: see retrievepeers's
docstring for why that comparison is fair) and to a plain ``storescp`` (uncompressed
syntaxes only: compressed instances arrive decompressed, with equal pixels); DCMTK
``getscu`` retrieves into a folder. Each is asked at every level of Patient Root and
Study Root.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from corpus import needs_codecs
from movescu import SUCCESS, RetrieveResult, getscu, movescu
from peers import Bridge, Orthanc, free_port, run_dcmtk, wait_for
from retrievepeers import (
    Instance,
    MoveDestination,
    Study,
    assert_arrived,
    mixed_study,
    orthanc_settings,
    received,
    store_each_in_its_syntax,
    upload,
)

BRIDGE_AE = "RETRIEVEBRIDGE"
# the requester's AE title chooses the source (``local`` is the embedded default's bridge)
SOURCES = {"web": "WEBMOVE", "pacs-move": "PACSMOVE", "pacs-get": "PACSGET", "local": "MOVESCU"}


def retrieve_config(orthanc: Orthanc, port: int, destinations: dict[str, MoveDestination]) -> dict[str, Any]:
    return {
        "ae_title": BRIDGE_AE,
        "listen": {"port": port},
        "nodes": {
            "ORTHANC": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port},
            # keyed otherwise than their AE titles: a move destination is found by ae_title
            **{f"move-{name}": {"ae_title": scp.aet, "host": "127.0.0.1", "port": scp.port}
               for name, scp in destinations.items()},
        },
        "destinations": {"archive": {"type": "archive"}},
        "sources": {
            "web": {"type": "dicomweb", "url": orthanc.dicomweb},
            "pacs": {"type": "dimse", "node": "ORTHANC", "retrieve": "c-move"},
            "pacsget": {"type": "dimse", "node": "ORTHANC", "retrieve": "c-get"},
        },
        "rules": [
            # only the tests' own storescu is kept: Orthanc's C-STOREs are a C-MOVE's sub-operations
            {"name": "keep", "when": {"calling_ae": "STORESCU"}, "store": ["archive"]},
            {"name": "web", "when": {"calling_ae": "WEBMOVE"}, "retrieve": ["web"]},
            {"name": "pacs", "when": {"calling_ae": "PACSMOVE"}, "retrieve": ["pacs"]},
            {"name": "pacsget", "when": {"calling_ae": "PACSGET"}, "retrieve": ["pacsget"]},
        ],
    }


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return mixed_study(tmp_path_factory.mktemp("retrieve-study"))


@pytest.fixture(scope="module")
def destinations(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, MoveDestination]]:
    """``all``: storescp +xa (AE STORESCP); ``plain``: storescp, uncompressed only (PLAINSCP)."""
    folder = tmp_path_factory.mktemp("retrieve-destinations")
    scps = {"all": MoveDestination(folder / "all", "STORESCP"),
            "plain": MoveDestination(folder / "plain", "PLAINSCP", plain=True)}
    try:
        for scp in scps.values():
            scp.start()
        yield scps
    finally:
        for scp in scps.values():
            scp.stop()


@pytest.fixture(autouse=True)
def empty_destinations(destinations: dict[str, MoveDestination]) -> None:
    for scp in destinations.values():
        scp.clear()


@pytest.fixture(scope="module")
def bridge_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, study: Study, bridge_port: int,
            destinations: dict[str, MoveDestination]) -> Iterator[Orthanc]:
    modalities = {BRIDGE_AE: bridge_port, **{scp.aet: scp.port for scp in destinations.values()}}
    server = Orthanc(tmp_path_factory.mktemp("retrieve-orthanc"), extra=orthanc_settings(modalities)).start()
    try:
        upload(server, study.files)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory, orthanc: Orthanc, bridge_port: int,
           destinations: dict[str, MoveDestination]) -> Iterator[Bridge]:
    daemon = Bridge(tmp_path_factory.mktemp("retrieve-bridge"), retrieve_config(orthanc, bridge_port, destinations))
    try:
        yield daemon.start()
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()


@pytest.fixture(scope="module")
def default_bridge(tmp_path_factory: pytest.TempPathFactory, study: Study,
                   destinations: dict[str, MoveDestination]) -> Iterator[Bridge]:
    """The embedded default (archive everything, answer from it), with the move
    destinations as ``nodes``, holding the study after ``storescu``."""
    nodes = {scp.aet: {"host": "127.0.0.1", "port": scp.port} for scp in destinations.values()}
    daemon = Bridge(tmp_path_factory.mktemp("retrieve-default"), {"nodes": nodes})
    try:
        daemon.start()
        store_each_in_its_syntax(daemon.port, study.files)
        wait_for(lambda: daemon.queue_states() == {"done": len(study.instances)}, 60,
                 "the archive to hold the study")
        yield daemon
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()


@pytest.fixture
def port_of(request: pytest.FixtureRequest) -> Callable[[str], int]:
    """The port of the bridge that answers from ``source`` (each bridge started on demand)."""
    def port(source: str) -> int:
        daemon = request.getfixturevalue("default_bridge" if source == "local" else "bridge")
        return int(daemon.port)
    return port


# -- what is asked for ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    root: str
    level: str
    keys: Callable[[Study], list[str]]
    expected: Callable[[Study], list[Instance]]

    @property
    def id(self) -> str:
        return f"{self.root}-{self.level.lower()}"


def _two_mr(s: Study) -> list[Instance]:
    """Two MR instances of different syntaxes, one of them compressed."""
    return [i for i in s.in_series("MR") if i.path.name in ("MR_small_bigendian.dcm", "MR_small_jp2klossless.dcm")]


def _image_keys(s: Study) -> list[str]:
    return [f"StudyInstanceUID={s.uid}", f"SeriesInstanceUID={s.series_uid('MR')}",
            "SOPInstanceUID=" + "\\".join(i.sop_instance_uid for i in _two_mr(s))]


CASES = [
    Case("patient", "PATIENT", lambda s: [f"PatientID={s.patient_id}"], lambda s: s.instances),
    Case("patient", "STUDY", lambda s: [f"PatientID={s.patient_id}", f"StudyInstanceUID={s.uid}"],
         lambda s: s.instances),
    Case("patient", "SERIES",
         lambda s: [f"PatientID={s.patient_id}", f"StudyInstanceUID={s.uid}",
                    f"SeriesInstanceUID={s.series_uid('MR')}"],
         lambda s: s.in_series("MR")),
    Case("patient", "IMAGE", lambda s: [f"PatientID={s.patient_id}", *_image_keys(s)], _two_mr),
    Case("study", "STUDY", lambda s: [f"StudyInstanceUID={s.uid}"], lambda s: s.instances),
    Case("study", "SERIES",  # a list of two series: MR and SC
         lambda s: [f"StudyInstanceUID={s.uid}", f"SeriesInstanceUID={s.series_uid('MR')}\\{s.series_uid('SC')}"],
         lambda s: s.in_series("MR") + s.in_series("SC")),
    Case("study", "IMAGE", _image_keys, _two_mr),
]


def assert_complete(result: RetrieveResult, count: int) -> None:
    """Success, every sub-operation completed, none failed."""
    result.check(SUCCESS, completed=count)
    assert result.count("failed") in (0, None) and result.count("warning") in (0, None), result.summary()
    assert not result.failed_uids


# -- the reference --------------------------------------------------------------------------------


def test_orthanc_moves_the_reference(orthanc: Orthanc, study: Study,
                                     destinations: dict[str, MoveDestination]) -> None:
    """Orthanc's own C-MOVE delivers the study's files unchanged: the comparison of the
    bridge's deliveries with them is fair (and cannot pass on an empty folder)."""
    result = movescu(orthanc.dicom_port, "STUDY", [f"StudyInstanceUID={study.uid}"], "STORESCP",
                     called_ae=orthanc.aet)
    assert_complete(result, len(study.instances))
    assert_arrived(destinations["all"].received(), study.instances)


# -- C-MOVE ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("source", list(SOURCES))
def test_move_delivers_every_instance_unchanged(source: str, case: Case, study: Study, port_of: Any,
                                                destinations: dict[str, MoveDestination]) -> None:
    expected = case.expected(study)
    result = movescu(port_of(source), case.level, case.keys(study), "STORESCP", root=case.root,
                     calling_ae=SOURCES[source])
    assert_complete(result, len(expected))
    assert_arrived(destinations["all"].received(), expected)


@needs_codecs
@pytest.mark.parametrize("source", list(SOURCES))
def test_move_to_an_uncompressed_destination_decompresses(source: str, study: Study, port_of: Any,
                                                          destinations: dict[str, MoveDestination]) -> None:
    """PLAINSCP accepts uncompressed syntaxes only: the compressed instances arrive
    decompressed, pixel for pixel; the others as they are (or in another uncompressed
    syntax, with equal values)."""
    result = movescu(port_of(source), "STUDY", [f"StudyInstanceUID={study.uid}"], "PLAINSCP",
                     calling_ae=SOURCES[source])
    assert_complete(result, len(study.instances))
    assert_arrived(destinations["plain"].received(), study.instances, convert=True)
    assert any(i.compressed for i in study.instances)


def test_move_destination_found_by_node_key(study: Study, default_bridge: Bridge,
                                            destinations: dict[str, MoveDestination]) -> None:
    """The embedded default's nodes have no ae_title: the key is the AE title."""
    one = study.in_series("CT")
    result = movescu(default_bridge.port, "SERIES",
                     [f"StudyInstanceUID={study.uid}", f"SeriesInstanceUID={study.series_uid('CT')}"], "PLAINSCP")
    assert_complete(result, 1)
    assert_arrived(destinations["plain"].received(), one)


# -- C-GET ----------------------------------------------------------------------------------------


@needs_codecs
@pytest.mark.parametrize("source", list(SOURCES))
def test_getscu_receives_every_instance(source: str, study: Study, port_of: Any, tmp_path: Path) -> None:
    """getscu proposes the uncompressed syntaxes only (its default): every instance
    arrives in its folder, the compressed ones decompressed."""
    result = getscu(port_of(source), "STUDY", [f"StudyInstanceUID={study.uid}"], tmp_path / "got",
                    calling_ae=SOURCES[source])
    assert_complete(result, len(study.instances))
    assert_arrived(received(result.files), study.instances, convert=True)


@needs_codecs
@pytest.mark.parametrize("option", ["+xr", "+xv", "+xs"], ids=["rle", "j2k", "jpeg-lossless"])
def test_getscu_proposing_a_compressed_syntax_gets_every_instance(option: str, study: Study, bridge: Bridge,
                                                                  tmp_path: Path) -> None:
    """With ``--prefer-...`` getscu proposes, for each storage SOP class, one context of
    a compressed syntax first and the uncompressed ones after it: the bridge may accept
    only one of them per SOP class, and whichever it takes, every instance of the
    study must arrive (an instance in the accepted syntax unchanged, any other in an
    uncompressed one with equal pixels) (Patient Root)."""
    result = getscu(bridge.port, "STUDY", [f"PatientID={study.patient_id}", f"StudyInstanceUID={study.uid}"],
                    tmp_path / "got", root="patient", calling_ae="WEBMOVE", extra=[option])
    assert_complete(result, len(study.instances))
    assert_arrived(received(result.files), study.instances, convert=True)


# -- what C-GET must not change -------------------------------------------------------------------

_CONTEXT = re.compile(r"Context ID:\s+(\d+) \((\w+)\)")


def accepted_contexts(output: str) -> dict[int, tuple[str, str, str]]:
    """storescu -d's A-ASSOCIATE-AC: context ID -> (result, accepted syntax, role)."""
    ac = output.split("BEGIN A-ASSOCIATE-AC", 1)[1].split("END A-ASSOCIATE-AC", 1)[0]
    contexts: dict[int, tuple[str, str, str]] = {}
    for block in re.split(r"(?=Context ID:)", ac)[1:]:
        m = _CONTEXT.search(block)
        assert m is not None
        syntax = re.search(r"Accepted Transfer Syntax: (\S+)", block)
        role = re.search(r"Accepted SCP/SCU Role: (\S+)", block)
        contexts[int(m.group(1))] = (m.group(2), syntax.group(1) if syntax else "", role.group(1) if role else "")
    return contexts


def proposed_first_syntax(output: str) -> dict[int, str]:
    rq = output.split("BEGIN A-ASSOCIATE-RQ", 1)[1].split("END A-ASSOCIATE-RQ", 1)[0]
    first: dict[int, str] = {}
    for block in re.split(r"(?=Context ID:)", rq)[1:]:
        m = _CONTEXT.search(block)
        syntax = re.search(r"Proposed Transfer Syntax\(es\):\s*\n\S*\s+(\S+)", block)
        assert m is not None and syntax is not None
        first[int(m.group(1))] = syntax.group(1)
    return first


def test_plain_storescu_negotiates_as_before(bridge: Bridge, study: Study) -> None:
    """Offering C-GET (whose sub-operations need SCP/SCU role selection) changes nothing
    for a plain storescu: as on main before issue 17 (534c3da, recorded), each of its 128
    contexts (every storage SOP class DCMTK knows, twice: explicit little endian; big
    endian and implicit) is accepted with the first syntax proposed, and the
    A-ASSOCIATE-AC carries no role selection (every role "Default")."""
    result = run_dcmtk("storescu", "-d", "-aet", "STORESCU", "127.0.0.1", str(bridge.port), str(study.files[0]))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    contexts = accepted_contexts(output)
    first = proposed_first_syntax(output)
    assert len(contexts) == len(first) == 128
    assert {cid: ("Accepted", first[cid], "Default") for cid in first} == contexts
    ac = output.split("BEGIN A-ASSOCIATE-AC", 1)[1].split("END A-ASSOCIATE-AC", 1)[0]
    assert "Role: SC" not in ac  # SCU, SCP, SCP/SCU
