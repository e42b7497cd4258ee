"""The dimse destination: DCMTK storescu as the modality, the bridge, DCMTK storescp as the PACS."""

from __future__ import annotations

import os
import signal
from collections import defaultdict
from itertools import islice
from pathlib import Path

import numpy as np
import pydicom
import pytest
from corpus import ct_series, needs_codecs, with_uid
from peers import Bridge, StoreSCP, run_dcmtk, storescu, wait_for
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, generate_uid
from test_store import PROPOSE

pytestmark = pytest.mark.slow

EXPLICIT, IMPLICIT, BIG_ENDIAN = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"
MPEG4 = "1.2.840.10008.1.2.4.102"


@pytest.fixture
def storescp(tmp_path):
    """Start storescp with the given options; every one is stopped at the end of the test."""
    started: list[StoreSCP] = []

    def make(*options: str, name: str = "pacs", start: bool = True) -> StoreSCP:
        scp = StoreSCP(tmp_path / name, *options)
        started.append(scp)
        return scp.start() if start else scp

    yield make
    for scp in started:
        scp.stop()


def dimse_config(scp: StoreSCP, **destination) -> dict:
    return {
        "ae_title": "BRIDGE",
        "nodes": {"PACS": {"ae_title": scp.aet, "host": "127.0.0.1", "port": scp.port,
                           "timeouts": {"connect": "5s", "acse": "20s", "dimse": "60s"}}},
        "destinations": {"pacs": {"type": "dimse", "node": "PACS", **destination}},
        "rules": [{"name": "everything", "store": ["pacs"]}],
        "retry": {"initial": "1s", "max": "2s"},
    }


def send_corpus(bridge: Bridge, files: list[Path]) -> list[Path]:
    """storescu each file in its own syntax (one association per syntax); returns what was sent."""
    propose = {**PROPOSE, MPEG4: "-xn"}
    by_syntax: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        by_syntax[str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)].append(path)
    sent = []
    for ts, group in by_syntax.items():
        result = storescu(bridge.port, group, extra=["-R", propose[ts]])
        assert result.statuses == [0] * len(group), f"{ts}:\n{result.output[-2000:]}"
        sent += group
    return sent


def received(scp: StoreSCP) -> dict[str, Path]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in scp.files()}


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def syntax_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def decodable(path: Path) -> bool:
    try:
        pydicom.dcmread(path).pixel_array  # noqa: B018 - decoding is the test
    except Exception:
        return False
    return True


def assert_same_pixels(got: Path, original: Path) -> None:
    a, b = pydicom.dcmread(got), pydicom.dcmread(original)
    assert a.SOPInstanceUID == b.SOPInstanceUID
    assert a.SOPClassUID == b.SOPClassUID
    if "PixelData" in b and decodable(original):
        assert np.array_equal(a.pixel_array, b.pixel_array), f"{original.name}: pixel values differ"
    elif "PixelData" in b:  # e.g. badVR.dcm's NumberOfFrames '1A': sent as it was, so compare the bytes
        assert a.PixelData == b.PixelData
    if "WaveformSequence" in b:
        assert a.WaveformSequence[0].WaveformData == b.WaveformSequence[0].WaveformData


def proposable(files: list[Path]) -> list[Path]:
    """The files whose SOP class ``storescu -R`` can propose: only those its DCMTK version
    knows. It says so before connecting, naming the first file it does not know, and stops."""
    known = list(files)
    while True:
        stderr = run_dcmtk("storescu", "-R", "127.0.0.1", "1", *map(str, known)).stderr
        if "unknown storage SOP class in file: " not in stderr:
            return known
        named = stderr.split("unknown storage SOP class in file: ", 1)[1].split(": ", 1)[0]
        known.remove(Path(named))


def video(path: Path) -> Path:
    """A tiny MPEG-4 video instance: no pixel decoder exists for it."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.4.1"  # Video Photographic Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(MPEG4)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "XC"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "YBR_PARTIAL_420"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 16, 16, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.PlanarConfiguration = 8, 8, 7, 0, 0
    ds.PixelData = encapsulate([b"\x00\x00\x00\x01" + bytes(60)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_mixed_corpus_arrives_in_its_own_syntaxes(tmp_path, corpus, storescp, bridge_factory):
    scp = storescp("+xa")  # every syntax DCMTK knows
    bridge = bridge_factory(dimse_config(scp))
    sent = send_corpus(bridge, corpus)

    wait_for(lambda: bridge.queue_states() == {"done": len(sent)}, 180,
             f"{len(sent)} rows done; {bridge.queue_states()}\n{bridge.log()[-3000:]}")
    got = received(scp)
    assert set(got) == {uid_of(p) for p in sent}
    for original in sent:
        arrived = got[uid_of(original)]
        assert syntax_of(arrived) == syntax_of(original), original.name
        a, b = pydicom.dcmread(arrived), pydicom.dcmread(original)
        if "PixelData" in b:
            assert a.PixelData == b.PixelData, original.name
    assert bridge.stop() == 0


@needs_codecs
@pytest.mark.parametrize("options", [(), ("+xi",)], ids=["uncompressed", "implicit-only"])
def test_syntaxes_the_peer_refuses_arrive_converted_with_the_same_pixels(tmp_path, corpus, storescp,
                                                                         bridge_factory, options):
    """storescp by default takes uncompressed syntaxes only (explicit little and big endian,
    implicit); with +xi only implicit VR little endian."""
    scp = storescp(*options)
    bridge = bridge_factory(dimse_config(scp))
    files = [*corpus, video(tmp_path / "video.dcm")]
    sent = send_corpus(bridge, files)
    accepted = {EXPLICIT, IMPLICIT, BIG_ENDIAN} if not options else {IMPLICIT}
    # What cannot be decoded here (the MPEG-4 video, two JPEG files pydicom's codecs refuse)
    # cannot be converted: it must be dead, with the reason; everything else arrives.
    hopeless = {uid_of(p): p for p in sent if UID(syntax_of(p)).is_compressed and not decodable(p)}
    assert len(hopeless) >= 3

    wait_for(lambda: bridge.queue_states() == {"done": len(sent) - len(hopeless), "dead": len(hopeless)}, 240,
             f"rows done or dead; {bridge.queue_states()}\n{bridge.log()[-3000:]}")
    got = received(scp)
    assert set(got) == {uid_of(p) for p in sent} - set(hopeless)
    converted = 0
    for original in sent:
        uid = uid_of(original)
        if uid in hopeless:
            continue
        arrived = got[uid]
        if syntax_of(original) in accepted:
            assert syntax_of(arrived) == syntax_of(original)
        else:
            converted += 1
            assert syntax_of(arrived) == (EXPLICIT if not options else IMPLICIT), original.name
        assert_same_pixels(arrived, original)
    assert converted >= (20 if not options else 40)
    for row in bridge.queue_rows():
        if row["sop_instance_uid"] in hopeless:
            assert row["state"] == "dead"
            assert "cannot convert" in row["last_error"] or "does not accept" in row["last_error"], row
            if row["transfer_syntax"] == MPEG4:
                assert "no pixel decoder exists for MPEG-4" in row["last_error"], row["last_error"]
            else:
                assert "cannot decode" in row["last_error"], row["last_error"]
    assert bridge.stop() == 0


def test_big_endian_pixels_are_byte_swapped_not_relabelled(tmp_path, corpus, storescp, bridge_factory):
    scp = storescp("+xi")
    bridge = bridge_factory(dimse_config(scp))
    big = [p for p in corpus if syntax_of(p) == BIG_ENDIAN]
    assert {pydicom.dcmread(p).BitsAllocated for p in big} >= {1, 8, 16, 32}
    sent = send_corpus(bridge, big)
    wait_for(lambda: bridge.queue_states() == {"done": len(sent)}, 120, f"rows done; {bridge.queue_states()}")
    got = received(scp)
    for original in sent:
        arrived = got[uid_of(original)]
        assert syntax_of(arrived) == IMPLICIT
        assert_same_pixels(arrived, original)
        ds = pydicom.dcmread(original)
        if ds.BitsAllocated > 8:  # a relabelled copy would hold the same bytes
            assert pydicom.dcmread(arrived).PixelData != ds.PixelData


def test_one_association_serves_many_batches(tmp_path, storescp, bridge_factory):
    scp = storescp()
    bridge = bridge_factory(dimse_config(scp, batch={"max_instances": 4}))
    series = ct_series(tmp_path / "series", 30)
    for part in (series[:10], series[10:20], series[20:]):
        assert storescu(bridge.port, part).statuses == [0] * len(part)
    wait_for(lambda: bridge.queue_states() == {"done": 30}, 120, f"30 rows done; {bridge.queue_states()}")
    assert len(scp.files()) == 30
    assert scp.associations() == 1, scp.log()[-3000:]
    assert "Association Release" not in scp.log()  # still open: idle_close (60 s) has not passed
    assert bridge.stop() == 0
    wait_for(lambda: "Association Release" in scp.log(), 30, "the association released at shutdown")


def test_a_batch_of_another_common_modality_needs_no_new_association(tmp_path, storescp, bridge_factory):
    """CT, then MR: the common storage classes are proposed up front, in little endian."""
    from pydicom.data import get_testdata_file

    scp = storescp()
    bridge = bridge_factory(dimse_config(scp))
    assert storescu(bridge.port, ct_series(tmp_path / "ct", 2)).statuses == [0, 0]
    wait_for(lambda: bridge.queue_states() == {"done": 2}, 60, "the CTs delivered")
    mr = with_uid(Path(get_testdata_file("MR_small.dcm")), tmp_path / "mr.dcm", SOPInstanceUID=generate_uid())
    assert storescu(bridge.port, [mr]).statuses == [0]
    wait_for(lambda: bridge.queue_states() == {"done": 3}, 60, "the MR delivered")
    assert uid_of(mr) in received(scp)
    assert scp.associations() == 1, scp.log()[-3000:]


def test_idle_close_releases_and_the_next_batch_reassociates(tmp_path, storescp, bridge_factory):
    scp = storescp()
    bridge = bridge_factory(dimse_config(scp, idle_close="1s"))
    series = ct_series(tmp_path / "series", 6)
    assert storescu(bridge.port, series[:3]).statuses == [0] * 3
    wait_for(lambda: "Association Release" in scp.log(), 60, "the idle association released")
    assert storescu(bridge.port, series[3:]).statuses == [0] * 3
    wait_for(lambda: bridge.queue_states() == {"done": 6}, 60, "6 rows done")
    assert scp.associations() == 2
    assert len(scp.files()) == 6


def test_several_workers_use_several_associations(tmp_path, storescp, bridge_factory):
    scp = storescp("--fork")  # one process per association: several at once
    bridge = bridge_factory(dimse_config(scp, workers=3, batch={"max_instances": 2}))
    series = ct_series(tmp_path / "series", 40)
    assert storescu(bridge.port, series).statuses == [0] * 40
    wait_for(lambda: bridge.queue_states() == {"done": 40}, 120, f"40 rows done; {bridge.queue_states()}")
    assert len(scp.files()) == 40
    assert 2 <= scp.associations() <= 3, scp.log()[-3000:]


def test_peer_down_backs_off_without_charging_then_everything_arrives(tmp_path, storescp, bridge_factory):
    scp = storescp(start=False)
    bridge = bridge_factory(dimse_config(scp))
    series = ct_series(tmp_path / "series", 20)
    assert storescu(bridge.port, series).statuses == [0] * 20

    wait_for(lambda: bridge.destination_state("pacs")[0] == "backing_off", 60, "the destination backing off")
    assert "cannot connect to node PACS" in bridge.destination_state("pacs")[1]
    wait_for(lambda: "next try in" in bridge.log(), 30, "a second refused attempt")
    assert all(row["state"] == "pending" and row["attempts"] == 0 for row in bridge.queue_rows()), bridge.queue_rows()

    scp.start()
    wait_for(lambda: bridge.queue_states() == {"done": 20}, 120, f"20 rows done; {bridge.queue_states()}")
    assert {uid_of(p) for p in series} == set(received(scp))
    assert all(row["attempts"] == 1 for row in bridge.queue_rows()), bridge.queue_rows()  # only the delivery counted
    wait_for(lambda: bridge.destination_state("pacs")[0] == "up", 30, "the destination up again")


def test_a_peer_that_refuses_us_suspends_the_destination_and_kills_nothing(tmp_path, storescp, bridge_factory):
    scp = storescp("--refuse")  # A-ASSOCIATE-RJ 1/1/1: permanent, service user, no reason given
    bridge = bridge_factory(dimse_config(scp))
    series = ct_series(tmp_path / "series", 5)
    assert storescu(bridge.port, series).statuses == [0] * 5

    wait_for(lambda: bridge.destination_state("pacs")[0] == "suspended", 60, "the destination suspended")
    reason = bridge.destination_state("pacs")[1]
    assert "rejected the association from BRIDGE" in reason and "A-ASSOCIATE-RJ 1/1/1" in reason, reason
    assert bridge.queue_states() == {"pending": 5}
    assert all(row["attempts"] == 0 for row in bridge.queue_rows())
    assert scp.files() == []
    assert "suspended" in bridge.log()


def test_a_peer_that_closes_an_idle_association_costs_nothing(tmp_path, storescp, bridge_factory):
    scp = storescp("-ts", "1")  # storescp drops a connection silent for 1 s; the bridge keeps it 60 s
    bridge = bridge_factory(dimse_config(scp))
    series = ct_series(tmp_path / "series", 6)
    assert storescu(bridge.port, series[:3]).statuses == [0] * 3
    wait_for(lambda: bridge.queue_states() == {"done": 3}, 60, "3 rows done")
    wait_for(lambda: "Association Aborted" in scp.log(), 30, "storescp to drop the idle association")
    assert storescu(bridge.port, series[3:]).statuses == [0] * 3
    wait_for(lambda: bridge.queue_states() == {"done": 6}, 60, "6 rows done")
    assert all(row["attempts"] == 1 for row in bridge.queue_rows())
    assert "unavailable" not in bridge.log()
    assert len(scp.files()) == 6


def test_no_response_within_the_dimse_timeout_backs_off_without_charging(tmp_path, storescp, bridge_factory):
    # storescp sleeps 2 s at each step of receiving (three for a small CT): it answers after
    # some 6 s, long after the bridge's 1 s, and only then takes the bridge's next association
    scp = storescp("--sleep-during", "2")
    config = dimse_config(scp)
    config["nodes"]["PACS"]["timeouts"]["dimse"] = "1s"
    bridge = bridge_factory(config)
    series = ct_series(tmp_path / "series", 2)
    assert storescu(bridge.port, series).statuses == [0] * 2
    wait_for(lambda: bridge.destination_state("pacs")[0] == "backing_off", 60, "the destination backing off")
    assert "no C-STORE response within 1s" in bridge.destination_state("pacs")[1]
    assert all(row["attempts"] == 0 for row in bridge.queue_rows() if row["state"] == "pending")


def test_more_sop_classes_than_one_association_can_propose(tmp_path, storescp, bridge_factory):
    """70 SOP classes in one batch need 141 presentation contexts (two syntaxes each, and
    Verification): the batch goes out over two associations, in order."""
    from pynetdicom import AllStoragePresentationContexts

    scp = storescp("-pm", start=False)  # promiscuous: whatever the SOP class
    bridge = bridge_factory(dimse_config(scp, batch={"max_instances": 100}))
    contexts = enumerate(AllStoragePresentationContexts)
    files: list[Path] = []
    while len(files) < 70:
        candidates = []
        for n, cx in islice(contexts, 70 - len(files)):
            path = ct_series(tmp_path / f"s{n}", 1)[0]
            ds = pydicom.dcmread(path)
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = cx.abstract_syntax
            ds.save_as(path, enforce_file_format=True)
            candidates.append(path)
        assert candidates, f"this storescu knows only {len(files)} storage SOP classes"
        files += proposable(candidates)
    for part in (files[:35], files[35:]):  # storescu proposes one context per SOP class too
        assert storescu(bridge.port, part, extra=["-R"]).statuses == [0] * len(part)
    wait_for(lambda: bridge.destination_state("pacs")[0] == "backing_off", 60, "the destination backing off")

    scp.start()  # the next claim takes all 70 rows in one batch
    wait_for(lambda: bridge.queue_states() == {"done": 70}, 120, f"70 rows done; {bridge.queue_states()}")
    assert scp.associations() == 2, scp.log()[-2000:]
    assert set(received(scp)) == {uid_of(p) for p in files}


@needs_codecs
def test_a_rules_modification_reaches_the_peer_converted_too(tmp_path, corpus, storescp, bridge_factory):
    scp = storescp()  # uncompressed only: the JPEG 2000 copy is decoded after it is modified
    config = dimse_config(scp)
    config["rules"] = [{"name": "everything", "store": ["pacs"],
                        "modify": {"pacs": {"set": {"InstitutionName": "Main"}, "remove": ["PatientName"]}}}]
    bridge = bridge_factory(config)
    files = [*ct_series(tmp_path / "series", 3), *(p for p in corpus if p.name == "MR_small_jp2klossless.dcm")]
    sent = send_corpus(bridge, files)
    wait_for(lambda: bridge.queue_states() == {"done": len(sent)}, 60, f"rows done; {bridge.queue_states()}")
    got = received(scp)
    for original in sent:
        arrived = pydicom.dcmread(got[uid_of(original)])
        assert arrived.InstitutionName == "Main"
        assert "PatientName" not in arrived
        assert_same_pixels(got[uid_of(original)], original)
    assert syntax_of(got[uid_of(sent[-1])]) == EXPLICIT
    assert not list((bridge.data_dir / "spool" / "incoming").iterdir())  # no copy left behind


def test_a_peer_that_aborts_during_a_c_store_is_noticed_at_once(tmp_path, storescp, bridge_factory):
    scp = storescp("--abort-during")
    bridge = bridge_factory(dimse_config(scp))  # DIMSE timeout 60 s: not what ends the wait
    assert storescu(bridge.port, ct_series(tmp_path / "series", 2)).statuses == [0] * 2
    wait_for(lambda: bridge.destination_state("pacs")[0] == "backing_off", 20, "the destination backing off")
    assert "the association ended during a C-STORE" in bridge.destination_state("pacs")[1]
    assert all(row["attempts"] == 0 for row in bridge.queue_rows())


def test_a_peer_that_stops_reading_mid_instance_is_given_up_on_and_sent_to_again(tmp_path, storescp, bridge_factory):
    """The peer's process stops (SIGSTOP) with the association open: the next instance, a
    32 MiB one, fills the socket's buffers and the write waits. It waits no longer than
    the node's DIMSE timeout: the association is given up, the destination backs off
    without charging the instance, and once the peer runs again the instance arrives."""
    scp = storescp()
    config = dimse_config(scp)
    # while stopped, it answers nothing: each association tried meanwhile waits out the ACSE timeout
    config["nodes"]["PACS"]["timeouts"].update(dimse="2s", acse="1s")
    bridge = bridge_factory(config)
    first = ct_series(tmp_path / "first", 1)
    assert storescu(bridge.port, first).statuses == [0]
    wait_for(lambda: len(received(scp)) == 1, 30, "the first instance at the peer")
    big = tmp_path / "big.dcm"
    ds = pydicom.dcmread(first[0])
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Rows, ds.Columns, ds.NumberOfFrames = 1024, 1024, 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelData = np.zeros(16 * 1024 * 1024, dtype=np.uint16).tobytes()
    ds.save_as(big, enforce_file_format=True)
    assert scp.proc is not None
    os.kill(scp.proc.pid, signal.SIGSTOP)
    try:
        assert storescu(bridge.port, [big]).statuses == [0]
        wait_for(lambda: bridge.destination_state("pacs")[0] == "backing_off", 60, "the destination backing off")
        assert all(row["attempts"] == 0 for row in bridge.queue_rows() if row["state"] == "pending")
    finally:
        os.kill(scp.proc.pid, signal.SIGCONT)
    wait_for(lambda: ds.SOPInstanceUID in received(scp), 90, "the big instance at the peer once it runs again")
