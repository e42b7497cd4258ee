"""Modified copies: what a rule changes in the copy one destination receives.

The spooled original is only ever read. A copy is the original's header (File Meta and
data set up to Pixel Data) as pydicom reads it, changed in the order ``copy``,
``replace``, ``set``, ``remove``, and written by pydicom with the original's transfer
syntax and File Meta, followed by the original's bytes from the Pixel Data tag to the
end of the file, unchanged: the pixels are never decoded, nor held in memory. A
deflated data set cannot be cut that way; it is read and written whole.

Values get the data dictionary's VR and are validated strictly against it (length,
character repertoire, format; ``bridge.dataset.elements``), whatever pydicom's global
validation mode. Text is encoded in the data set's Specific Character Set (by pydicom);
a value that set cannot hold is an error, never a ``?``. Every such problem raises
``ModificationError``, which destinations turn into a ``Permanent`` outcome.
"""

from __future__ import annotations

import copy as copying
import hashlib
import io
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread, dcmwrite
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import CUSTOMIZABLE_CHARSET_VR, STR_VR

from bridge.config import Modification
from bridge.dataset import tagpath
from bridge.dataset.dicomfile import attributes, required_uids, text
from bridge.dataset.elements import FLOAT_VRS, INT_VRS, PIXEL_TAGS, element, settable_vr
from bridge.errors import InvalidUid, ModificationError
from bridge.model import SpooledInstance

_CHUNK = 1 << 20
# pydicom's header read stops at the first of PIXEL_TAGS; anything from there on is in
# the copied tail, so a modification naming such a tag needs the whole data set.
_FIRST_TAIL_TAG = min(PIXEL_TAGS)
_FILE_META_OF = {"SOPInstanceUID": "MediaStorageSOPInstanceUID", "SOPClassUID": "MediaStorageSOPClassUID"}


def apply(ds: Dataset, modification: Modification) -> None:
    """Change ``ds`` (a header, or a whole data set) as ``modification`` says: copy,
    replace, set, remove, in that order. Then check that every changed text value can be
    encoded in the data set's character set and that the SOP Class, SOP Instance, Study
    and Series UIDs are still there and valid; the File Meta's SOP UIDs follow the data
    set's. ``ModificationError`` names the element at fault."""
    charset_changes = 0x00080005 in {tagpath.top_level(name) for name in modification.keys()}
    if charset_changes:
        # Decode every value, nested ones too, while the old character set is still the
        # data set's: pydicom then encodes them all in the new one. Raw values would be
        # written as they are, in the old one.
        ds.walk(lambda _ds, _element: None)
    touched: dict[int, str] = {}
    for target, source in modification.copy_.items():
        tag = tagpath.top_level(target)
        found = ds.get(tagpath.top_level(source))
        if found is None:
            continue  # nothing to copy: the target stays as it is
        ds[tag] = _copied(tag, found, ds, target, source)
        touched[tag] = target
    for name, rule in modification.replace.items():
        tag = tagpath.top_level(name)
        if tag not in ds:
            continue
        old = ds[tag]
        before = _texts(old, name) or [""]  # an empty element is one empty value: "^$" can fill it
        try:
            after = [re.sub(rule.pattern, rule.with_, value) for value in before]
        except (re.error, IndexError) as exc:
            raise ModificationError(name, f"replace: {exc}") from None
        if after != before:
            ds[tag] = _made(name, tag, after, ds, str(old.VR))
            touched[tag] = name
    for name, value in modification.set.items():
        tag = tagpath.top_level(name)
        ds[tag] = _made(name, tag, value, ds)
        touched[tag] = name
    for name in modification.remove:
        tag = tagpath.top_level(name)
        if tag in ds:
            del ds[tag]
        touched[tag] = name
    if charset_changes:  # every text value must fit the new character set, nested ones too
        _check_encodable(ds, _every_element(ds))
    else:
        _check_encodable(ds, ((name, ds.get(tag)) for tag, name in touched.items()))
    try:
        required_uids(ds)
    except InvalidUid as exc:
        raise ModificationError(exc.keyword, f"{exc.problem} in the modified copy") from None
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        for keyword, meta_keyword in _FILE_META_OF.items():
            if meta_keyword in meta and meta[meta_keyword].value != ds[keyword].value:
                meta[meta_keyword].value = ds[keyword].value


def _made(name: str, tag: int, value: Any, ds: Dataset, vr: str | None = None) -> DataElement:
    try:
        return element(tag, value, ds, vr)
    except ValueError as exc:
        raise ModificationError(name, str(exc)) from None


def _copied(tag: int, source: DataElement, ds: Dataset, target_name: str, source_name: str) -> DataElement:
    try:
        vr = settable_vr(tag)
    except ValueError as exc:
        raise ModificationError(target_name, str(exc)) from None
    if source.VR == vr:  # the value is valid for this VR already; sequences are copied item by item
        return DataElement(tag, vr, copying.deepcopy(source.value), already_converted=True)
    return _made(target_name, tag, _texts(source, source_name), ds, vr)


def _texts(found: DataElement, name: str) -> list[str]:
    """An element's values as text, one per value; ``ModificationError`` for binary ones."""
    vr = str(found.VR)
    if vr not in STR_VR and vr not in INT_VRS and vr not in FLOAT_VRS:
        raise ModificationError(name, f"a {vr} value is not text")
    value = found.value
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list):
        return [str(v) for v in value]
    return [str(value)]


def _every_element(ds: Dataset) -> list[tuple[str, DataElement | None]]:
    found: list[tuple[str, DataElement | None]] = []
    ds.walk(lambda _ds, e: found.append((e.keyword or str(e.tag), e)))
    return found


def _check_encodable(ds: Dataset, elements: Iterable[tuple[str, DataElement | None]]) -> None:
    charset = ds.get(0x00080005)
    term = charset.value if charset is not None else None
    # pydicom decodes the default repertoire as Latin-1, to be lenient with what it
    # reads; what we write in it must be ISO-IR 6, plain ASCII (PS3.5 6.1.2.2).
    encodings = ["ascii" if e == default_encoding else e for e in convert_encodings(term)]
    for name, found in elements:
        if found is None or found.VR not in STR_VR:
            continue
        allowed = encodings if found.VR in CUSTOMIZABLE_CHARSET_VR else ["ascii"]
        for value in _texts(found, name):
            if not _encodable(value, allowed):
                where = "the default repertoire (no Specific Character Set)" if not term else f"character set {term}"
                raise ModificationError(name, f"{value!r} cannot be encoded in {where}")


def _encodable(value: str, encodings: list[str]) -> bool:
    if any(_fits(value, e) for e in encodings):
        return True
    # ISO 2022 code extensions: pydicom switches between the sets within a value
    return len(encodings) > 1 and all(any(_fits(c, e) for e in encodings) for c in value)


def _fits(value: str, encoding: str) -> bool:
    try:
        value.encode(encoding)
    except (UnicodeError, LookupError):
        return False
    return True


def _needs_whole(modification: Modification) -> bool:
    names: Iterable[str] = [*modification.keys(), *modification.copy_.values()]
    return any(tagpath.top_level(name) >= _FIRST_TAIL_TAG for name in names)


class ModifiedCopy:
    """The copy of a spooled file that one destination receives, ready to be written."""

    def __init__(self, source: Path, header: Dataset, encoded: bytes, tail: int | None, end: int) -> None:
        self.source = source
        self.header = header  # the changed data set: up to Pixel Data, or whole when ``tail`` is None
        self._encoded = encoded
        self._tail = tail
        self.size = len(encoded) + (end - tail if tail is not None else 0)

    def write(self, out: BinaryIO) -> str:
        """Write the copy to ``out``; return its SHA-256 (hex)."""
        digest = hashlib.sha256()
        for chunk in self._chunks():
            digest.update(chunk)
            out.write(chunk)
        return digest.hexdigest()

    def sha256(self) -> str:
        """The copy's SHA-256, without writing it anywhere."""
        digest = hashlib.sha256()
        for chunk in self._chunks():
            digest.update(chunk)
        return digest.hexdigest()

    def _chunks(self) -> Iterator[bytes]:
        yield self._encoded
        if self._tail is None:
            return
        # The original's bytes from the Pixel Data tag on, copied as they are: pydicom can
        # only write an element it has read, and reading Pixel Data would hold a
        # multi-frame's gigabytes in memory. pydicom's header ends after a whole element
        # and the tail starts with one, so the splice is a valid data set.
        with open(self.source, "rb") as f:
            f.seek(self._tail)
            while chunk := f.read(_CHUNK):
                yield chunk

    def describe(self, instance: SpooledInstance) -> SpooledInstance:
        """``instance`` as the copy has it: UIDs, patient ID, accession number, index
        attributes and size. ``sha256`` is left empty: ``write`` returns the copy's."""
        h = self.header
        return replace(
            instance, sop_class_uid=text(h, "SOPClassUID"), sop_instance_uid=text(h, "SOPInstanceUID"),
            study_uid=text(h, "StudyInstanceUID"), series_uid=text(h, "SeriesInstanceUID"),
            patient_id=text(h, "PatientID"), accession_number=text(h, "AccessionNumber"),
            attributes=attributes(h), size=self.size, sha256="",
        )


def prepare(source: Path, modification: Modification) -> ModifiedCopy:
    """Read ``source``'s header, apply ``modification`` and encode the result.

    ``ModificationError`` when the change cannot be made; ``OSError`` (e.g.
    ``FileNotFoundError``) when the file cannot be read.
    """
    whole = _needs_whole(modification)
    with open(source, "rb") as f:
        try:
            ds = dcmread(f, stop_before_pixels=not whole)
            tail = f.tell()
            if not whole and ds.file_meta.TransferSyntaxUID.is_deflated:
                whole = True  # the tail would be compressed together with the header
                f.seek(0)
                ds = dcmread(f)
        except OSError:
            raise
        except Exception as exc:  # pydicom raises many kinds on garbage; all mean the same here
            raise ModificationError(None, f"cannot parse the spooled file: {type(exc).__name__}: {exc}") from exc
        end = os.fstat(f.fileno()).st_size
    apply(ds, modification)
    buffer = io.BytesIO()
    try:
        dcmwrite(buffer, ds, enforce_file_format=False)
    except Exception as exc:
        raise ModificationError(None, f"cannot encode the modified data set: {exc}") from exc
    return ModifiedCopy(source, ds, buffer.getvalue(), None if whole else tail, end)


def write_modified(source: Path, modification: Modification, target: BinaryIO | Path) -> ModifiedCopy:
    """Write ``source`` with ``modification`` applied to ``target`` (an open binary file,
    or a path, created or truncated; neither fsynced). Returns the copy, whose ``size``
    and ``header`` describe what was written."""
    prepared = prepare(source, modification)
    if isinstance(target, Path):
        with open(target, "wb") as out:
            prepared.write(out)
    else:
        prepared.write(target)
    return prepared
