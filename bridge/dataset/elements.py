"""New data elements from values a configuration gives: which tags a modification may
name, the VR an element it creates gets (the data dictionary's), and values converted
to that VR and validated strictly, whatever pydicom's global validation mode. The rule
schema checks a modification with these when the file is loaded; ``bridge.routing.modify``
makes the elements when a copy is made."""

from __future__ import annotations

import re
from typing import Any

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr_element
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.valuerep import AMBIGUOUS_VR

from bridge.dataset import tagpath

PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # Float, Double Float, Pixel Data
INT_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "US or SS", "US or OW", "US or SS or OW"})
FLOAT_VRS = frozenset({"FL", "FD"})
_SEE_TABLE = re.compile(r"\s*Please see <[^>]*> for allowed values for each VR\.")  # pydicom's, in every message


def check_modifiable(tag: int) -> None:
    """``ValueError`` for a tag no modification may name: File Meta, group lengths, Pixel Data."""
    if tag >> 16 == 0x0002:
        raise ValueError("File Meta elements are kept as received")
    if tag & 0xFFFF == 0:
        raise ValueError("group lengths are not written (PS3.5 7.2)")
    if tag in PIXEL_TAGS:
        raise ValueError("Pixel Data is never modified")


def settable_vr(tag: int) -> str:
    """The VR an element made by ``set`` or ``copy`` gets: the dictionary's. ``ValueError``
    for a private or unknown tag, which has none (replace or remove those instead)."""
    if Tag(tag).is_private:
        raise ValueError("a private element has no VR in the dictionary: it can be replaced or removed, not set")
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        raise ValueError("not in the DICOM dictionary: no VR to create it with") from None


def element(tag: int, value: Any, ds: Dataset | None = None, vr: str | None = None) -> DataElement:
    """A new element: ``value`` (one value, a list, or ``None`` for empty) converted to
    ``vr`` (default: the dictionary's) and validated strictly. ``ValueError`` says why not.
    ``ds`` resolves an ambiguous VR (US or SS by Pixel Representation)."""
    vr = vr or settable_vr(tag)
    values = list(value) if isinstance(value, list | tuple | MultiValue) else [] if value is None else [value]
    if vr in AMBIGUOUS_VR and vr not in INT_VRS or vr in ("SQ", "OB", "OD", "OF", "OL", "OV", "OW", "UN"):
        if any(v not in (None, "") for v in values):
            raise ValueError(f"a {vr} element can only be emptied (null)")
        values = []
    converted = [_convert(vr, v) for v in values]
    try:
        new = DataElement(tag, vr, None if not converted else converted[0] if len(converted) == 1 else converted,
                          validation_mode=pydicom_config.RAISE)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ValueError(_SEE_TABLE.sub("", str(exc).splitlines()[0]).rstrip(".")) from None
    if vr in AMBIGUOUS_VR:
        _resolve_vr(new, ds)
    return new


def _convert(vr: str, value: Any) -> Any:
    if vr in INT_VRS:
        try:
            number = float(value) if isinstance(value, float) else int(str(value).strip())
        except ValueError:
            raise ValueError(f"{value!r} is not an integer") from None
        if isinstance(number, float) and not number.is_integer():
            raise ValueError(f"{value!r} is not an integer")
        return int(number)
    if vr in FLOAT_VRS:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a number") from None
    if vr == "AT":
        return tagpath.tag_of(str(value).strip())
    return value if isinstance(value, int | float) and vr in ("IS", "DS") else str(value)


def _resolve_vr(new: DataElement, ds: Dataset | None) -> None:
    if ds is not None:
        try:
            correct_ambiguous_vr_element(new, ds, ds.original_encoding[1] is not False)
        except Exception:  # noqa: BLE001, S110 - pydicom cannot tell: the fallback below decides
            pass
    if new.VR in AMBIGUOUS_VR:
        values = new.value if isinstance(new.value, MultiValue | list) else [new.value]
        new.VR = "SS" if "SS" in new.VR and any(isinstance(v, int) and v < 0 for v in values) else new.VR[:2]
