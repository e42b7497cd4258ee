"""A static DICOMweb tree on disk, written instance by instance (``StaticTree.add``), in
the layout of ../shared/reference/static-dicomweb.md (docs/static.md has it in full).

For each instance (S, X, I: Study, Series, SOP Instance UID, each validated before it
names a folder):

- ``studies/S/series/X/instances/I/metadata.gz``: ``[instance metadata]`` (``metadata.to_json``)
  with AvailableTransferSyntaxUID (0008,3002) the file's transfer syntax and Pixel Data
  ``{"BulkDataURI": "./frames"}``;
- ``.../instances/I/frames/N.mht`` (encapsulated syntaxes) or ``N.mht.gz`` (native): a
  one-part multipart body per frame (``frames.multipart_frame``); frame files beyond the
  new count of a replaced instance are removed. With ``recompress``, native and lossless
  JPEG 2000 frames are written in that lossless syntax instead (``recompress``), and
  AvailableTransferSyntaxUID names it;
- ``studies/S/bulkdata/aa/bb/REST.mht.gz``: a binary value above the threshold, named by
  the SHA-256 of its bytes (``aa``, ``bb``: its first two pairs of hex digits), a one-part
  ``application/octet-stream`` multipart body. Written once, shared by every instance of
  the study that holds the same bytes; never removed.

BulkDataURIs are relative to the URL the metadata is served at, and name the resource
without the file's suffix (a server maps ``bulkdata/aa/bb/REST`` onto ``REST.mht.gz`` as it
maps ``frames/1`` onto ``1.mht``):

| metadata | served at | Pixel Data | other bulk data |
| --- | --- | --- | --- |
| instance | ``/studies/S/series/X/instances/I/metadata`` | ``./frames`` | ``../../../../bulkdata/aa/bb/REST`` |
| series | ``/studies/S/series/X/metadata`` | ``./instances/I/frames`` | ``../../bulkdata/aa/bb/REST`` |

Then, holding ``root/.lock`` (``fcntl.flock``: the workers of one destination, two
destinations on one path and a ``convert`` beside them all take it), each affected series
and study is regenerated from the instance files on disk, never from memory, so that
writers that interleave still leave files that agree with each other: the series'
``metadata.gz`` (every instance, by InstanceNumber), ``instances/index.json.gz``,
``series-singleton.json.gz``; the study's ``series/index.json.gz`` (by SeriesNumber) and
``index.json.gz`` (with ModalitiesInStudy and the counts); last ``studies/index.json.gz``.
One ``add`` of many instances rewrites each series and study once.

Every file is written under a temporary name (``.NAME.<random>.tmp``) in its own folder
and renamed into place, so a web server never serves half a file; a generated file whose
bytes would not change is left alone. gzip is written with no timestamp, so the same
content gives the same bytes.

An instance already in the tree from the same bytes (the file's SHA-256, kept beside its
metadata in ``.source.sha256``, written only once the series and study files include it)
is ``unchanged``: nothing is written. Conversion is outside the lock; two writers given
different content for one SOP Instance UID at the same moment may leave one's frames
with the other's metadata until it is added again.

Memory: Pixel Data is never held whole (``frames.frames`` reads a frame at a time), other
values over ``frames.DEFER_SIZE`` are read only when converted; a series' metadata is held
while it is regenerated (a few KB an instance).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian

from bridge.dataset.uids import is_valid_uid
from bridge.errors import InboundError
from bridge.static import frames as framing
from bridge.static.metadata import PIXEL_TAGS, QUERY_KEYWORDS, THRESHOLD, dumps, to_json
from bridge.static.recompress import KEEP, Plan, RecompressError, Recompressor

Status = Literal["added", "unchanged", "failed", "skipped"]

LOCK = ".lock"
SOURCE_HASH = ".source.sha256"
INSTANCE_BULK = "../../../../bulkdata/"
SERIES_BULK = "../../bulkdata/"

JSON_LEVEL = 6
BINARY_LEVEL = 1  # frames and bulk values: most of gzip's gain at a fraction of its time

_TS = "00083002"  # AvailableTransferSyntaxUID
_PIXEL_KEYS = frozenset(f"{t:08X}" for t in PIXEL_TAGS)
_FRAME = re.compile(r"([0-9]+)\.mht(\.gz)?")
_HASH_CHUNK = 1024 * 1024


def _tag(keyword: str) -> str:
    return f"{tag_for_keyword(keyword):08X}"


_KEYS = {level: frozenset(_tag(k) for k in kws) for level, kws in QUERY_KEYWORDS.items()}
STUDY, SERIES, SOP_INSTANCE = _tag("StudyInstanceUID"), _tag("SeriesInstanceUID"), _tag("SOPInstanceUID")
MODALITY, SERIES_NUMBER, INSTANCE_NUMBER = _tag("Modality"), _tag("SeriesNumber"), _tag("InstanceNumber")
STUDY_DATE, STUDY_TIME = _tag("StudyDate"), _tag("StudyTime")


@dataclass(frozen=True)
class Result:
    """What ``add`` did with one file: ``added`` (written, or rewritten with new content),
    ``unchanged`` (already in the tree from the same bytes), ``failed`` (a DICOM file that
    cannot be converted: ``reason`` says why) or ``skipped`` (not a DICOM instance at all:
    not DICOM, or a DICOMDIR). ``warning``: what was done differently than asked (an
    instance the recompression could not take, written as it is)."""

    path: Path
    status: Status
    reason: str = ""
    study_uid: str = ""
    series_uid: str = ""
    sop_instance_uid: str = ""
    warning: str = ""


class _Refused(Exception):
    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _TreeFailure(Exception):
    """Writing the tree failed while the source was being read: the ``OSError`` is the
    tree's, to be raised as it is, not taken for the source's."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class _Pending:
    """An instance written, its source hash still to be recorded."""

    folder: Path
    sha256: str


class StaticTree:
    """The tree under ``root``. ``add`` may be called from several threads and processes
    at once. An ``OSError`` writing the tree (a full disk, no permission) is raised, not
    turned into a ``Result``: it is the tree's failure, not the instance's.

    ``recompress``: a name of ``recompress.TARGETS`` (``jpeg-ls``, ``rle``,
    ``jpeg2000-lossless``) to write native and lossless JPEG 2000 frames in that syntax
    (``bridge.static.recompress``); None (the default) keeps every frame's own syntax."""

    def __init__(self, root: Path, threshold: int = THRESHOLD, recompress: str | None = None) -> None:
        self.root = root
        self.threshold = threshold
        self.recompressor = Recompressor(recompress) if recompress else None

    @property
    def studies(self) -> Path:
        return self.root / "studies"

    def add(self, paths: Sequence[Path]) -> list[Result]:
        """Convert each file into the tree, then bring its series and study files up to
        date; one ``Result`` per path, in order."""
        results: list[Result] = []
        pending: list[_Pending] = []
        for path in paths:
            try:
                result, written = self._convert(path)
            except _Refused as exc:
                result, written = Result(path, exc.status, exc.reason), None
            results.append(result)
            if written is not None:
                pending.append(written)
        touched = {(r.study_uid, r.series_uid) for r in results if r.status == "added"}
        if touched:
            with self.locked():
                for study, series in sorted(touched):
                    self._write_series(study, series)
                for study in sorted({study for study, _ in touched}):
                    self._write_study(study)
                self._write_studies()
                for done in pending:
                    _write(done.folder / SOURCE_HASH, done.sha256.encode("ascii"), compare=False)
        return results

    def holds(self, study: str, series: str, instance: str) -> bool:
        """Whether the tree has an instance of these (valid) UIDs."""
        if not all(map(is_valid_uid, (study, series, instance))):
            return False
        return (self._instance(study, series, instance) / "metadata.gz").is_file()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the tree's lock: ``root/.lock``, ``flock``ed (one open file description per
        holder, so threads of one process exclude each other too)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK, "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    # -- one instance ------------------------------------------------------------------

    def _convert(self, path: Path) -> tuple[Result, _Pending | None]:
        sha256 = _source_hash(path)
        if self.recompressor is not None:
            # Converted with another setting is not the same conversion: it is done again.
            sha256 += f" recompress={self.recompressor.name}"
        with _reading(path):
            ds = pydicom.dcmread(path, defer_size=_defer(path))
        syntax = str(getattr(ds.file_meta, "TransferSyntaxUID", "") or "")
        if ds.file_meta.get("MediaStorageSOPClassUID") == "1.2.840.10008.1.3.10":
            raise _Refused("skipped", "a DICOMDIR, not an instance")
        if not syntax:
            raise _Refused("failed", "no transfer syntax in the file meta information")
        uids = []
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            value = ds.get(keyword)
            if not value:
                raise _Refused("failed", f"missing {keyword}")
            if not is_valid_uid(str(value)):
                raise _Refused("failed", f"invalid {keyword} {str(value)[:80]!r}")
            uids.append(str(value))
        study, series, instance = uids
        folder = self._instance(study, series, instance)
        if _read_text(folder / SOURCE_HASH) == sha256 and (folder / "metadata.gz").is_file():
            return Result(path, "unchanged", "", study, series, instance), None
        existed = (folder / "metadata.gz").exists()
        plan = self.recompressor.plan(ds, syntax) if self.recompressor is not None else KEEP
        try:
            count, plan = self._write_planned(path, folder / "frames", plan)
            for keyword, changed in plan.changes:
                setattr(ds, keyword, changed)
            metadata = self._metadata(path, ds, plan.transfer_syntax or syntax, study)
        except _Refused:
            if not existed:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        (folder / SOURCE_HASH).unlink(missing_ok=True)
        _write(folder / "metadata.gz", _gzip(dumps([metadata]), JSON_LEVEL), compare=False)
        for number, stale in _frame_files(folder / "frames"):
            if number > count:
                stale.unlink(missing_ok=True)
        return Result(path, "added", "", study, series, instance, plan.warning), _Pending(folder, sha256)

    def _instance(self, study: str, series: str, instance: str) -> Path:
        return self.studies / study / "series" / series / "instances" / instance

    def _write_planned(self, path: Path, folder: Path, plan: Plan) -> tuple[int, Plan]:
        """The frames of ``path`` as ``plan`` says, or as they are when a frame cannot be
        recompressed; the number written and the plan followed."""
        if plan.encode is None:
            return self._write_frames(path, folder), plan
        assert self.recompressor is not None
        try:
            return self._write_frames(path, folder, plan.encode), plan
        except RecompressError as exc:
            warning = f"not recompressed to {self.recompressor.target.name}: {exc}; written as it is"
            return self._write_frames(path, folder), Plan(warning=warning)

    def _write_frames(self, path: Path, folder: Path,
                      encode: Callable[[framing.Frame], framing.Frame] | None = None) -> int:
        """Every frame of ``path`` as a frame file, through ``encode`` when given; the
        number written."""
        count = 0
        stream = framing.frames(path)
        while True:
            with _reading(path):
                frame = next(stream, None)
            if frame is None:
                return count
            if encode is not None:
                frame = encode(frame)
            body = framing.multipart_frame(frame, framing.new_boundary())
            if frame.content_type == framing.OCTET_STREAM:
                target, body = folder / f"{frame.number}.mht.gz", _gzip(body, BINARY_LEVEL)
            else:
                target = folder / f"{frame.number}.mht"
            folder.mkdir(parents=True, exist_ok=True)
            _write(target, body, compare=False)
            # A replaced instance whose frames changed syntax leaves the other form behind.
            other = target.with_name(target.name[:-3] if target.suffix == ".gz" else target.name + ".gz")
            other.unlink(missing_ok=True)
            count += 1

    def _metadata(self, path: Path, ds: Dataset, syntax: str, study: str) -> dict[str, Any]:
        # Pixel Data stays on disk: a two-byte stand-in of the same VR is enough for
        # to_json, which makes it the frames URI whatever its value.
        for tag in PIXEL_TAGS:
            elem = ds.get_item(tag, keep_deferred=True) if tag in ds else None
            if elem is not None:
                ds[tag] = DataElement(tag, str(elem.VR or "OB or OW"), b"\0\0")

        def bulk(tag: int, value: bytes, vr: str) -> str:
            try:
                return INSTANCE_BULK + self._write_bulk(study, value)
            except OSError as exc:
                raise _TreeFailure(exc) from exc

        try:
            with _reading(path):
                metadata = to_json(ds, bulk, self.threshold, pixel_uri="./frames")
        except _TreeFailure as failure:
            raise failure.error from None
        metadata[_TS] = {"vr": "UI", "Value": [syntax]}
        return dict(sorted(metadata.items()))

    def _write_bulk(self, study: str, value: bytes) -> str:
        """The bulk data file of ``value`` (written if missing); its URI below ``bulkdata/``."""
        digest = hashlib.sha256(value).hexdigest()
        name = f"{digest[:2]}/{digest[2:4]}/{digest[4:]}"
        target = self.studies / study / "bulkdata" / f"{name}.mht.gz"
        if not target.exists():
            boundary = framing.new_boundary()
            body = b"".join([f"--{boundary}\r\nContent-Type: {framing.OCTET_STREAM}\r\n\r\n".encode("ascii"),
                             value, f"\r\n--{boundary}--\r\n".encode("ascii")])
            target.parent.mkdir(parents=True, exist_ok=True)
            _write(target, _gzip(body, BINARY_LEVEL), compare=False)
        return name

    # -- series and study files, under the lock -----------------------------------------

    def _write_series(self, study: str, series: str) -> None:
        folder = self.studies / study / "series" / series
        instances = []
        for meta in sorted((folder / "instances").glob("*/metadata.gz")):
            found = _read_json(meta)
            if isinstance(found, list) and found:
                instances.append(found[0])
        if not instances:
            return
        instances.sort(key=lambda m: (_number(m, INSTANCE_NUMBER), _text(m, SOP_INSTANCE)))
        series_metadata = [_for_series(m) for m in instances]
        _write(folder / "metadata.gz", _gzip(dumps(series_metadata), JSON_LEVEL))
        index = [_only(m, _KEYS["INSTANCE"]) for m in instances]
        _write(folder / "instances" / "index.json.gz", _gzip(dumps(index), JSON_LEVEL))
        query = _only(instances[0], _KEYS["SERIES"])
        query["00201209"] = {"vr": "IS", "Value": [len(instances)]}  # NumberOfSeriesRelatedInstances
        _write(folder / "series-singleton.json.gz", _gzip(dumps([dict(sorted(query.items()))]), JSON_LEVEL))

    def _write_study(self, study: str) -> None:
        folder = self.studies / study
        series = []
        first: dict[str, Any] | None = None
        for singleton in sorted((folder / "series").glob("*/series-singleton.json.gz")):
            found = _read_json(singleton)
            if isinstance(found, list) and found:
                series.append(found[0])
                if first is None:
                    first = _first_instance(singleton.parent)
        if not series or first is None:
            return
        series.sort(key=lambda q: (_number(q, SERIES_NUMBER), _text(q, SERIES)))
        _write(folder / "series" / "index.json.gz", _gzip(dumps(series), JSON_LEVEL))
        query = _only(first, _KEYS["STUDY"])
        modalities = sorted({m for q in series if (m := _text(q, MODALITY))})
        query["00080061"] = {"vr": "CS", "Value": modalities} if modalities else {"vr": "CS"}
        query["00201206"] = {"vr": "IS", "Value": [len(series)]}
        query["00201208"] = {"vr": "IS", "Value": [sum(int(_number(q, "00201209")) for q in series)]}
        _write(folder / "index.json.gz", _gzip(dumps([dict(sorted(query.items()))]), JSON_LEVEL))

    def _write_studies(self) -> None:
        studies = []
        for index in self.studies.glob("*/index.json.gz"):
            found = _read_json(index)
            if isinstance(found, list) and found:
                studies.append(found[0])
        studies.sort(key=lambda q: (_text(q, STUDY_DATE), _text(q, STUDY_TIME), _text(q, STUDY)))
        _write(self.studies / "index.json.gz", _gzip(dumps(studies), JSON_LEVEL))


# -- helpers ------------------------------------------------------------------------------


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Failures reading the source file as ``_Refused``: they are the instance's."""
    try:
        yield
    except InvalidDicomError:
        raise _Refused("skipped", "not DICOM (no DICM prefix)") from None
    except InboundError as exc:
        raise _Refused("failed", exc.reason) from None
    except (OSError, EOFError) as exc:
        raise _Refused("failed", f"unreadable: {getattr(exc, 'strerror', None) or exc}") from None
    except (ValueError, KeyError, TypeError, AttributeError, NotImplementedError) as exc:
        raise _Refused("failed", f"cannot convert: {exc}") from None


def _source_hash(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise _Refused("failed", f"unreadable: {exc.strerror or exc}") from None
    return digest.hexdigest()


def _defer(path: Path) -> int | None:
    """Values left on disk while the header is converted (not for a deflated data set,
    which pydicom inflates whole anyway)."""
    with _reading(path):
        syntax = pydicom.filereader.read_file_meta_info(path).get("TransferSyntaxUID")
    return None if syntax == DeflatedExplicitVRLittleEndian else framing.DEFER_SIZE


def _gzip(data: bytes, level: int) -> bytes:
    return gzip.compress(data, compresslevel=level, mtime=0)


def _write(target: Path, data: bytes, compare: bool = True) -> None:
    """``data`` into ``target`` by a temporary file in its folder and a rename; with
    ``compare``, nothing is written when ``target`` holds those bytes already."""
    if compare:
        try:
            if target.stat().st_size == len(data) and target.read_bytes() == data:
                return
        except FileNotFoundError:
            pass
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "xb") as f:
            f.write(data)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="ascii").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return ""


def _read_json(path: Path) -> Any:
    """A gzipped JSON file of the tree; None when it is gone (replaced meanwhile) or not
    JSON (written by something else)."""
    try:
        return json.loads(gzip.decompress(path.read_bytes()))
    except FileNotFoundError:
        return None
    except (OSError, EOFError, ValueError):
        return None


def _frame_files(folder: Path) -> list[tuple[int, Path]]:
    """The frame files in ``folder``, with their numbers."""
    try:
        names = [(_FRAME.fullmatch(p.name), p) for p in folder.iterdir()]
    except FileNotFoundError:
        return []
    return [(int(m.group(1)), p) for m, p in names if m]


def _first_instance(series: Path) -> dict[str, Any] | None:
    for meta in sorted((series / "instances").glob("*/metadata.gz")):
        found = _read_json(meta)
        if isinstance(found, list) and found:
            return dict(found[0])
    return None


def _only(metadata: dict[str, Any], keys: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in metadata.items() if k in keys}


def _first_value(metadata: dict[str, Any], key: str) -> Any:
    values = metadata.get(key, {}).get("Value") or [None]
    return values[0]


def _number(metadata: dict[str, Any], key: str) -> float:
    """A numeric value for sorting; missing or unparseable ones sort last."""
    value = _first_value(metadata, key)
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("inf")


def _text(metadata: dict[str, Any], key: str) -> str:
    value = _first_value(metadata, key)
    return value if isinstance(value, str) else ""


def _for_series(metadata: dict[str, Any]) -> dict[str, Any]:
    """An instance's metadata as the series metadata holds it: its URIs relative to the
    series' URL (see the module docstring)."""
    instance = _text(metadata, SOP_INSTANCE)
    out = _rebase(metadata)
    for key in _PIXEL_KEYS & out.keys():
        if out[key].get("BulkDataURI") == "./frames":
            out[key] = {**out[key], "BulkDataURI": f"./instances/{instance}/frames"}
    return out


def _rebase(value: Any) -> Any:
    if isinstance(value, dict):
        uri = value.get("BulkDataURI")
        if isinstance(uri, str) and uri.startswith(INSTANCE_BULK):
            return {**value, "BulkDataURI": SERIES_BULK + uri[len(INSTANCE_BULK):]}
        return {k: _rebase(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebase(v) for v in value]
    return value
