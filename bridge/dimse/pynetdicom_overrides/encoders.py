"""Direct encoders for what every C-STORE and C-FIND makes pynetdicom encode through pydicom.

- Each received data set gets its File Meta Information built as a pydicom
  ``FileMetaDataset`` and written by pydicom's general writer, for seven elements.
  ``_create_file_meta`` encodes the same bytes directly (``_write_file_meta_info``
  writes them).
- Each C-STORE response is turned into a pydicom command ``Dataset``, encoded by
  pydicom's writer and fragmented by a generator, for a ~150-byte message.
  ``_store_response_command`` encodes the same bytes directly, for C-STORE responses
  only; every other message, and any response with fields it does not know, is encoded
  by pynetdicom.

- Each C-FIND response is a command set like a C-STORE's (``_find_response_command``)
  and an identifier of a few text values (``_identifier``, for ``pynetdicom.service_class``'s
  ``encode``; anything but a flat data set of text in UTF-8, Latin-1 or ASCII is encoded
  by pynetdicom).

Each is checked against pydicom's and pynetdicom's output by tests; what each saved is
in docs/performance.md.
"""

from __future__ import annotations

import struct
from typing import Any

from pydicom.filewriter import write_file_meta_info as _pydicom_write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode as _pynetdicom_encode

from bridge.dataset import charset

# The VRs whose explicit VR elements have a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


def _explicit_le(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if vr in _LONG_VRS:
        return struct.pack("<HH2s2xL", group, element, vr, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _padded(text: str, pad: bytes, errors: str = "strict") -> bytes:
    data = text.encode("ascii", errors)
    return data + pad if len(data) % 2 else data


def _create_file_meta(*, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                      implementation_uid: str = PYNETDICOM_IMPLEMENTATION_UID,
                      implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION) -> bytes:
    """The encoded File Meta Information group (PS3.10 7.1), as pynetdicom's would be.
    A UID that is not ASCII (from a peer's command, refused once complete) is written
    with ``?`` for what cannot be encoded, rather than ending the thread that receives."""
    body = b"".join((
        _explicit_le(0x0002, 0x0001, b"OB", b"\x00\x01"),
        _explicit_le(0x0002, 0x0002, b"UI", _padded(str(sop_class_uid), b"\x00", "replace")),
        _explicit_le(0x0002, 0x0003, b"UI", _padded(str(sop_instance_uid), b"\x00", "replace")),
        _explicit_le(0x0002, 0x0010, b"UI", _padded(str(transfer_syntax), b"\x00")),
        _explicit_le(0x0002, 0x0012, b"UI", _padded(str(implementation_uid), b"\x00")),
        _explicit_le(0x0002, 0x0013, b"SH", _padded(str(implementation_version), b" ")),
    ))
    return _explicit_le(0x0002, 0x0000, b"UL", struct.pack("<L", len(body))) + body


def _write_file_meta_info(fp: Any, file_meta: Any, enforce_standard: bool = True) -> None:
    if isinstance(file_meta, bytes):
        fp.write(file_meta)
    else:  # not ours: leave it to pydicom
        _pydicom_write_file_meta_info(fp, file_meta, enforce_standard)


def _implicit_le(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", group, element, len(value)) + value


# What pynetdicom would put in a C-STORE response besides the fields the direct encoder
# writes (MessageIDBeingRespondedTo, Affected SOP Class/Instance UID, Status, ErrorComment).
_STORE_RSP_OTHERS = tuple(
    name for name in (*C_STORE.RESPONSE_KEYWORDS, *C_STORE.STATUS_OPTIONAL_KEYWORDS)
    if name not in ("MessageIDBeingRespondedTo", "Status", "ErrorComment")
) + ("DataSet",)


def _store_response_command(primitive: Any) -> bytes | None:
    """The C-STORE-RSP command set (implicit VR little endian, PS3.7 9.3.1.2) as pynetdicom
    would encode it, or None when the primitive has a field this encoder does not write."""
    if any(getattr(primitive, name, None) is not None for name in _STORE_RSP_OTHERS):
        return None
    status = primitive.Status
    if status is None or primitive.AffectedSOPClassUID is None or primitive.AffectedSOPInstanceUID is None:
        return None
    elements = [
        _implicit_le(0x0000, 0x0002, _padded(str(primitive.AffectedSOPClassUID), b"\x00")),
        _implicit_le(0x0000, 0x0100, struct.pack("<H", 0x8001)),
        _implicit_le(0x0000, 0x0120, struct.pack("<H", primitive.MessageIDBeingRespondedTo)),
        _implicit_le(0x0000, 0x0800, struct.pack("<H", 0x0101)),
        _implicit_le(0x0000, 0x0900, struct.pack("<H", status)),
    ]
    after = [_implicit_le(0x0000, 0x1000, _padded(str(primitive.AffectedSOPInstanceUID), b"\x00"))]
    return _command_set(elements, primitive.ErrorComment, after)


def _find_response_command(primitive: Any) -> bytes | None:
    """The C-FIND-RSP command set (implicit VR little endian, PS3.7 9.3.2.2) as pynetdicom
    would encode it, or None when the primitive has a field this encoder does not write
    (an OffendingElement). pynetdicom builds a command Dataset for each response and
    encodes it twice (its group length, then the message): most of a small C-FIND
    response's cost."""
    status = primitive.Status
    if status is None or primitive.MessageIDBeingRespondedTo is None or primitive.OffendingElement is not None:
        return None
    elements = []
    if primitive.AffectedSOPClassUID is not None:
        elements.append(_implicit_le(0x0000, 0x0002, _padded(str(primitive.AffectedSOPClassUID), b"\x00")))
    elements += [
        _implicit_le(0x0000, 0x0100, struct.pack("<H", 0x8020)),
        _implicit_le(0x0000, 0x0120, struct.pack("<H", primitive.MessageIDBeingRespondedTo)),
        _implicit_le(0x0000, 0x0800, struct.pack("<H", 0x0101 if primitive.Identifier is None else 0x0001)),
        _implicit_le(0x0000, 0x0900, struct.pack("<H", status)),
    ]
    return _command_set(elements, primitive.ErrorComment)


def _command_set(elements: list[bytes], comment: str | None, after: list[bytes] | None = None) -> bytes | None:
    """A response's command set: ``elements`` (up to Status), the ErrorComment if any,
    ``after`` (elements of higher tags), behind the Command Group Length; None for an
    ErrorComment that is not ASCII (pynetdicom's own encoder says what is wrong)."""
    if comment:
        try:
            elements = [*elements, _implicit_le(0x0000, 0x0902, _padded(str(comment), b" "))]
        except UnicodeEncodeError:
            return None
    body = b"".join([*elements, *(after or [])])
    return _implicit_le(0x0000, 0x0000, struct.pack("<L", len(body))) + body


def _p_data_tf(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF PDU of one PDV: the whole of a command set (PS3.8 9.3.5, E.2)."""
    return struct.pack(">BBLLBB", 0x04, 0, 6 + len(command), 2 + len(command), context_id, 0x03) + command


# -- C-FIND response identifiers ------------------------------------------------------------

# The VRs of a C-FIND answer's text values, as pydicom writes them: padded with a space
# (UI with a NUL) to an even length; values of several joined by backslashes.
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
                       "UR", "UT"})
_CODECS = {"ISO_IR 192": "utf-8", "ISO_IR 100": "latin_1", "": "ascii", "ISO_IR 6": "ascii"}


def _identifier(ds: Any, is_implicit_vr: bool, is_little_endian: bool, deflated: bool = False) -> bytes | None:
    """``pynetdicom.dsutils.encode`` for a service's response identifier: a flat data set
    of text values in UTF-8, Latin-1 or ASCII (what the C-FIND service answers) encoded
    directly, little endian; anything else by pynetdicom. pydicom's writer costs ~0.5 ms
    for a ten-element identifier, most of sending a C-FIND match."""
    encoded = _text_data_set(ds, is_implicit_vr) if is_little_endian and not deflated else None
    return encoded if encoded is not None else _pynetdicom_encode(ds, is_implicit_vr, is_little_endian, deflated)


def _text_data_set(ds: Any, implicit: bool) -> bytes | None:
    value = ds.get("SpecificCharacterSet", "")
    codec = _CODECS.get(value) if isinstance(value, str) else None
    if codec is None or getattr(ds, "file_meta", None):
        return None
    parts = []
    for element in ds:
        vr, tag = element.VR, element.tag
        if vr not in _TEXT_VRS or tag.group in (0x0000, 0x0002) or tag.is_private:
            return None
        raw = element.value
        if raw is None or raw == "":
            data = b""
        else:
            values = list(raw) if isinstance(raw, MultiValue | list | tuple) else [raw]
            try:
                data = "\\".join(_text(v) for v in values).encode(codec if vr in charset.TEXT_VRS else "ascii")
            except (UnicodeEncodeError, TypeError):
                return None
            if len(data) % 2:
                data += b"\x00" if vr == "UI" else b" "
        if implicit:
            parts.append(_implicit_le(tag.group, tag.element, data))
        elif len(data) > 0xFFFF and vr.encode() not in _LONG_VRS:
            return None  # too long for a 2-byte length: pydicom's writer says what is wrong
        else:
            parts.append(_explicit_le(tag.group, tag.element, vr.encode(), data))
    return b"".join(parts)


def _text(value: Any) -> str:
    """A value as pydicom writes it: a number string by its original text."""
    if isinstance(value, str):
        return value
    original = getattr(value, "original_string", None)
    if isinstance(original, str):
        return original
    if isinstance(value, float | int | PersonName):
        return str(value)
    raise TypeError(type(value).__name__)
