"""One C-MOVE's or C-GET's instances located and fetched from a rule's sources in order
(bridge.sources.retrieval): the first source that locates, each instance fetched from the
first source that delivers it, files checked before they are handed on, a bounded
look-ahead, signs of life, a stuck source given up on, and a stop that leaves no
temporary file behind. The sources are small fakes that write real Part-10 files."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from peers import wait_for
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from bridge.dataset.query import STUDY_ROOT_MOVE, Query, parse
from bridge.errors import UpstreamUnavailable
from bridge.model import InstanceRef, Retrieved
from bridge.sources import retrieval
from bridge.sources.retrieval import Fetched, Retrieval, TooMany

CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY = generate_uid()


def refs(count: int) -> list[InstanceRef]:
    series = generate_uid()
    return [InstanceRef(STUDY, series, generate_uid(), CT) for _ in range(count)]


def move_query() -> Query:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = STUDY
    return parse(ds, STUDY_ROOT_MOVE)


def part10(path: Path, ref: InstanceRef, sop_instance_uid: str | None = None) -> Path:
    """A small Part-10 file for ``ref`` (or carrying another SOP Instance UID)."""
    uid = sop_instance_uid or ref.sop_instance_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(ref.sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = ref.sop_class_uid
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = ref.study_uid
    ds.SeriesInstanceUID = ref.series_uid
    ds.PatientID = "P1"
    ds.save_as(path, enforce_file_format=True)
    return path


class Fake:
    """A source that locates ``located`` (or raises ``locate_error``) and retrieves by
    writing a file for each reference into its own folder, as ``plan`` says for each SOP
    Instance UID: "ok" (the default), "fail" (a failure), "wrong" (a file of another
    instance), "garbage" (a file that is not DICOM), "skip" (nothing at all).

    ``raise_after``: raises UpstreamUnavailable when that many references were handled.
    ``hold``/``hold_after``: waits for ``hold`` before handling reference ``hold_after``.
    ``ahead``: writes the next file before handing over the current one (and removes
    what it has not handed over when closed early, as a source must)."""

    def __init__(self, name: str, folder: Path, located: Sequence[InstanceRef] = (), *,
                 locate_error: Exception | None = None, plan: dict[str, str] | None = None,
                 raise_after: int | None = None, hold: threading.Event | None = None, hold_after: int = 0,
                 ahead: bool = False, temporary: bool = True) -> None:
        self.name = name
        self.folder = folder / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.located = list(located)
        self.locate_error = locate_error
        self.plan = plan or {}
        self.raise_after = raise_after
        self.hold = hold
        self.hold_after = hold_after
        self.ahead = ahead
        self.temporary = temporary
        self.asked: list[list[str]] = []  # the SOP Instance UIDs of each retrieve
        self.handed = 0  # items handed over
        self.closed = threading.Event()  # set when a retrieve generator ends, however it ends

    def files(self) -> list[Path]:
        return list(self.folder.iterdir())

    def find(self, query: Query) -> Iterator[Dataset | None]:
        return iter(())

    def locate(self, query: Query) -> Iterator[InstanceRef]:
        if self.locate_error is not None:
            raise self.locate_error
        yield from self.located

    def retrieve(self, wanted: Sequence[InstanceRef]) -> Iterator[Retrieved | None]:
        self.asked.append([r.sop_instance_uid for r in wanted])
        made: dict[int, Retrieved | None] = {}

        def make(n: int) -> Retrieved | None:
            if n not in made:
                made[n] = self._item(wanted[n])
            return made[n]

        try:
            for n in range(len(wanted)):
                if self.raise_after is not None and n == self.raise_after:
                    raise UpstreamUnavailable(f"{self.name} went away")
                if self.hold is not None and n == self.hold_after:
                    self.hold.wait()
                make(n)
                if self.ahead and n + 1 < len(wanted):
                    make(n + 1)
                item = made.pop(n)
                if item is not None:
                    self.handed += 1
                    yield item
        finally:
            for left in made.values():
                if left is not None and left.path is not None:
                    left.path.unlink(missing_ok=True)
            self.closed.set()

    def _item(self, ref: InstanceRef) -> Retrieved | None:
        kind = self.plan.get(ref.sop_instance_uid, "ok")
        path = self.folder / f"{ref.sop_instance_uid}.dcm"
        if kind == "ok":
            return Retrieved(ref, path=part10(path, ref), temporary=self.temporary)
        if kind == "fail":
            return Retrieved(ref, failure=f"{self.name} has no {ref.sop_instance_uid}")
        if kind == "wrong":
            return Retrieved(ref, path=part10(path, ref, generate_uid()), temporary=self.temporary)
        if kind == "garbage":
            path.write_bytes(b"this is not a DICOM file" * 10)
            return Retrieved(ref, path=path, temporary=self.temporary)
        assert kind == "skip"
        return None

    def close(self) -> None:
        pass


def engine(*sources: Fake, timeout: float = 30.0, **settings: float) -> Retrieval:
    return Retrieval(move_query(), sources, {s.name: timeout for s in sources}, **settings)  # type: ignore[arg-type]


def everything(r: Retrieval) -> list[Fetched | Retrieved]:
    """All ``r`` yields but signs of life, each fetched file sent (``done``) at once."""
    items: list[Fetched | Retrieved] = []
    try:
        for item in r:
            if item is None:
                continue
            items.append(item)
            if isinstance(item, Fetched):
                item.done()
    finally:
        r.stop()
    return items


def by_uid(items: list[Fetched | Retrieved]) -> dict[str, Fetched | Retrieved]:
    uids = [i.ref.sop_instance_uid for i in items]
    assert len(uids) == len(set(uids)), "an instance was accounted more than once"
    return dict(zip(uids, items, strict=True))


# -- locating -------------------------------------------------------------------------------

def test_the_first_source_that_locates_instances_names_them(tmp_path: Path) -> None:
    mine, theirs = refs(3), refs(2)
    empty = Fake("empty", tmp_path)
    first = Fake("first", tmp_path, [*mine, mine[0]])  # a duplicate counts once
    second = Fake("second", tmp_path, theirs)
    r = engine(empty, first, second)
    assert r.locate() == mine
    assert r.located_by == "first"


def test_locating_more_than_the_limit_stops_there(tmp_path: Path) -> None:
    """A retrieval takes at most ``limit`` instances (a C-MOVE's counts stop at 65,535):
    locating more raises ``TooMany`` without reading the rest of the source's answer."""
    taken: list[InstanceRef] = []
    many = refs(10)

    class Counting(Fake):
        def locate(self, query: Query) -> Iterator[InstanceRef]:
            for ref in many:
                taken.append(ref)
                yield ref

    r = engine(Counting("many", tmp_path), limit=5)
    with pytest.raises(TooMany):
        r.locate()
    assert len(taken) == 6
    assert engine(Counting("many", tmp_path), limit=10).locate() == many


def test_a_source_that_fails_to_locate_gives_way_to_the_next(tmp_path: Path) -> None:
    located = refs(2)
    r = engine(Fake("down", tmp_path, refs(5), locate_error=UpstreamUnavailable("down: no answer")),
               Fake("up", tmp_path, located))
    assert r.locate() == located
    assert r.located_by == "up"
    assert [name for name, _ in r.failures] == ["down"]


def test_when_every_source_fails_to_locate_the_first_failure_is_raised(tmp_path: Path) -> None:
    first, second = UpstreamUnavailable("a: no answer"), UpstreamUnavailable("b: no answer")
    r = engine(Fake("a", tmp_path, locate_error=first), Fake("b", tmp_path, locate_error=second))
    with pytest.raises(UpstreamUnavailable) as raised:
        r.locate()
    assert raised.value is first


def test_when_every_source_locates_nothing_there_is_nothing(tmp_path: Path) -> None:
    r = engine(Fake("a", tmp_path), Fake("b", tmp_path))
    assert r.locate() == []
    assert everything(r) == []


# -- fetching, in order, with fallback ------------------------------------------------------

def test_what_the_first_source_cannot_deliver_is_fetched_from_the_second(tmp_path: Path) -> None:
    located = refs(5)
    uids = [ref.sop_instance_uid for ref in located]
    # a: the first, a failure for the second, then it fails as a whole before the rest
    a = Fake("a", tmp_path, located, plan={uids[1]: "fail"}, raise_after=2)
    b = Fake("b", tmp_path, located)
    r = engine(a, b)
    assert r.locate() == located
    items = by_uid(everything(r))

    assert set(items) == set(uids)
    assert all(isinstance(item, Fetched) for item in items.values())
    assert {uid: getattr(item, "source", None) for uid, item in items.items()} == {
        uids[0]: "a", uids[1]: "b", uids[2]: "b", uids[3]: "b", uids[4]: "b"}
    assert a.asked == [uids]
    assert b.asked == [uids[1:]]  # only what a did not deliver
    fetched = items[uids[2]]
    assert isinstance(fetched, Fetched)
    assert fetched.transfer_syntax == ExplicitVRLittleEndian and fetched.sop_class_uid == CT
    assert a.files() == [] and b.files() == []  # every file sent was removed by done()


def test_an_instance_no_source_delivers_fails_with_each_sources_reason(tmp_path: Path) -> None:
    located = refs(4)
    uids = [ref.sop_instance_uid for ref in located]
    a = Fake("a", tmp_path, located, plan={uids[0]: "fail", uids[1]: "fail"}, raise_after=3)
    b = Fake("b", tmp_path, located, plan={uids[0]: "fail", uids[3]: "skip"})
    r = engine(a, b)
    r.locate()
    items = by_uid(everything(r))

    assert set(items) == set(uids)  # each once: fetched or failed
    assert {uid: getattr(item, "source", None) for uid, item in items.items()} == {
        uids[0]: None, uids[1]: "b", uids[2]: "a", uids[3]: None}
    lost = items[uids[0]]
    assert isinstance(lost, Retrieved) and lost.path is None
    assert f"a: a has no {uids[0]}" in lost.failure and f"b: b has no {uids[0]}" in lost.failure
    skipped = items[uids[3]]  # a failed as a whole before it, b never gave it
    assert isinstance(skipped, Retrieved) and skipped.path is None
    assert "a: a went away" in skipped.failure


class Refusing(Fake):
    """A source whose ``retrieve`` raises at once, before giving an iterator."""

    def retrieve(self, wanted: Sequence[InstanceRef]) -> Iterator[Retrieved | None]:
        self.asked.append([r.sop_instance_uid for r in wanted])
        raise UpstreamUnavailable(f"{self.name} refused at once")


def test_a_source_that_fails_as_soon_as_it_is_asked_gives_way_to_the_next(tmp_path: Path) -> None:
    located = refs(2)
    a = Refusing("a", tmp_path, located)
    b = Fake("b", tmp_path, located, plan={located[1].sop_instance_uid: "fail"})
    r = engine(a, b)
    r.locate()
    items = by_uid(everything(r))
    fetched, lost = items[located[0].sop_instance_uid], items[located[1].sop_instance_uid]
    assert isinstance(fetched, Fetched) and fetched.source == "b"
    assert isinstance(lost, Retrieved) and "a: a refused at once" in lost.failure and "b: b has no" in lost.failure


@pytest.mark.parametrize("kind", ["wrong", "garbage"])
def test_a_file_that_is_not_the_instance_asked_for_is_fetched_from_the_next_source(tmp_path: Path,
                                                                                 kind: str) -> None:
    located = refs(3)
    uids = [ref.sop_instance_uid for ref in located]
    a = Fake("a", tmp_path, located, plan={uids[1]: kind})
    b = Fake("b", tmp_path, located)
    r = engine(a, b)
    r.locate()
    items = by_uid(everything(r))

    assert {uid: getattr(item, "source", None) for uid, item in items.items()} == {
        uids[0]: "a", uids[1]: "b", uids[2]: "a"}
    assert b.asked == [[uids[1]]]
    assert a.files() == []  # the rejected file was removed too


@pytest.mark.parametrize(("kind", "reason"), [("wrong", "SOP Instance UID"), ("garbage", "cannot be read")])
def test_a_rejected_file_is_a_failure_naming_why(tmp_path: Path, kind: str, reason: str) -> None:
    [ref] = refs(1)
    a = Fake("a", tmp_path, [ref], plan={ref.sop_instance_uid: kind})
    r = engine(a)
    r.locate()
    [item] = everything(r)
    assert isinstance(item, Retrieved) and item.path is None
    assert item.failure.startswith("a: ") and reason in item.failure
    assert a.files() == []


def test_a_rejected_file_that_is_not_temporary_is_left_alone(tmp_path: Path) -> None:
    [ref] = refs(1)
    a = Fake("a", tmp_path, [ref], plan={ref.sop_instance_uid: "wrong"}, temporary=False)
    r = engine(a)
    r.locate()
    [item] = everything(r)
    assert isinstance(item, Retrieved) and "SOP Instance UID" in item.failure
    assert len(a.files()) == 1  # someone else's file: only read


# -- the look-ahead, signs of life, a stuck source ------------------------------------------

def test_fetching_runs_ahead_of_sending_by_the_lookahead_and_no_further(tmp_path: Path) -> None:
    located = refs(50)
    a = Fake("a", tmp_path, located)
    r = engine(a, lookahead=3, heartbeat=0.2)
    r.locate()
    it = iter(r)
    try:
        first = next(item for item in it if item is not None)
        assert isinstance(first, Fetched)
        first.done()
        # three waiting in the queue, one in the fetching thread's hand, and then it waits
        wait_for(lambda: a.handed == 5, 10, "the source to fill the look-ahead")
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:
            assert len(a.files()) <= 4
            assert a.handed == 5
            time.sleep(0.05)
        assert len(a.files()) == 4

        rest = []
        for item in it:
            if item is None:
                continue
            assert isinstance(item, Fetched)
            rest.append(item.ref.sop_instance_uid)
            item.done()
            assert len(a.files()) <= 4
    finally:
        r.stop()
    assert [first.ref.sop_instance_uid, *rest] == [ref.sop_instance_uid for ref in located]
    assert a.files() == []


def test_a_slow_source_yields_signs_of_life_before_its_first_file(tmp_path: Path) -> None:
    located = refs(2)
    slow = threading.Event()
    a = Fake("a", tmp_path, located, hold=slow)
    r = engine(a, heartbeat=0.2)
    r.locate()
    it = iter(r)
    try:
        started = time.monotonic()
        assert next(it) is None
        assert time.monotonic() - started < 5
        slow.set()
        items = [item for item in it if item is not None]
    finally:
        slow.set()
        r.stop()
    assert [item.ref for item in items] == located
    assert all(isinstance(item, Fetched) for item in items)


def test_a_source_that_gives_nothing_past_its_timeout_is_given_up(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retrieval, "GRACE", 0.2)
    located = refs(4)
    never = threading.Event()
    a = Fake("stuck", tmp_path, located, hold=never, hold_after=1, ahead=True)
    b = Fake("b", tmp_path, located)
    r = engine(a, b, timeout=0.3, heartbeat=0.2)
    r.locate()
    try:
        started = time.monotonic()
        items = by_uid(everything(r))
        assert time.monotonic() - started < 4
        assert set(items) == {ref.sop_instance_uid for ref in located}
        first = items.pop(located[0].sop_instance_uid)
        assert isinstance(first, Fetched) and first.source == "stuck"
        for item in items.values():
            assert isinstance(item, Retrieved) and item.path is None
            assert "stuck gave nothing" in item.failure
    finally:
        never.set()  # the source wakes up: what it fetches then is not kept
    wait_for(lambda: a.closed.is_set() and a.files() == [], 10, "the stuck source to be closed and cleaned up")
    assert b.asked == []


# -- stop, done -----------------------------------------------------------------------------

def test_stop_closes_the_source_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    located = refs(10)
    a = Fake("a", tmp_path, located, ahead=True)
    r = engine(a, lookahead=2, heartbeat=0.2)
    r.locate()
    it = iter(r)
    consumed = 0
    for item in it:
        if item is None:
            continue
        assert isinstance(item, Fetched)
        item.done()
        consumed += 1
        if consumed == 2:
            break
    wait_for(lambda: len(a.files()) >= 3, 10, "the source to fetch ahead")
    r.stop()
    wait_for(lambda: a.closed.is_set() and a.files() == [], 10, "the fetching to stop and remove its files")
    assert a.handed < 10  # closed early, not run to its end


def test_done_removes_a_temporary_file_and_leaves_the_archives_own(tmp_path: Path) -> None:
    [mine] = refs(1)
    [theirs] = refs(1)
    temporary = Fake("temporary", tmp_path, [mine])
    archive = Fake("archive", tmp_path, [theirs], temporary=False)
    for source, ref, left in ((temporary, mine, 0), (archive, theirs, 1)):
        r = engine(source)
        assert r.locate() == [ref]
        [item] = everything(r)  # sent, and done() called
        assert isinstance(item, Fetched) and item.temporary is (left == 0)
        assert len(source.files()) == left
    [kept] = archive.files()
    assert kept.is_file()
