"""Text values put into the character set a peer was configured to read (``nodes.X.charset``).

pydicom, asked to write a character the data set's Specific Character Set cannot hold,
writes ``?`` with a warning for each value, in its log, without saying where. ``fit`` does the same replacement
on purpose, before writing, and says which attributes it changed, so the caller can log
it (without the values: they are patient data).
"""

from __future__ import annotations

from functools import lru_cache

from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

# The VRs whose values are in the Specific Character Set (PS3.5 6.1.2.3); the others are
# the default repertoire.
TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UC", "UT", "PN"})

DEFAULT = "ISO_IR 192"


def terms(charset: str) -> list[str]:
    """``nodes.X.charset`` as Specific Character Set values: ``ISO 2022 IR 6\\ISO 2022 IR 87``
    is two, and a first empty one (``\\ISO 2022 IR 87``) stands for the default repertoire."""
    return [t.strip() for t in charset.split("\\")]


def fit(ds: Dataset, charset: str) -> list[str]:
    """Set ``ds``'s Specific Character Set to ``charset``, and replace each character of a
    text value (items of sequences included) that it cannot hold with ``?``. Returns the
    keywords of the attributes changed."""
    values = terms(charset)
    ds.SpecificCharacterSet = values if len(values) > 1 else values[0]
    # pydicom's codec for the default repertoire ('', ISO_IR 6, ISO 2022 IR 6) is Latin-1
    # ("iso8859"), as it reads leniently; what may be written in it is ASCII.
    encodings = tuple("ascii" if e == "iso8859" else e for e in convert_encodings(values))
    return _fit(ds, encodings)


def _fit(ds: Dataset, encodings: tuple[str, ...]) -> list[str]:
    changed: list[str] = []
    for element in ds:
        if element.VR == "SQ":
            for item in element.value or []:
                changed += _fit(item, encodings)
            continue
        if element.VR not in TEXT_VRS or element.value in (None, ""):
            continue
        multi = isinstance(element.value, MultiValue | list)
        values = list(element.value) if multi else [element.value]
        fitted = [_fit_text(str(v), encodings) for v in values]
        if fitted == [str(v) for v in values]:
            continue
        changed.append(element.keyword or str(element.tag))
        if element.VR == "PN":
            fitted_values: list[object] = [PersonName(v) for v in fitted]
        else:
            fitted_values = list(fitted)
        element.value = fitted_values if multi else fitted_values[0]
    return changed


def _fit_text(text: str, encodings: tuple[str, ...]) -> str:
    if text.isascii():
        return text
    return "".join(c if c.isascii() or _encodes(c, encodings) else "?" for c in text)


@lru_cache(maxsize=4096)
def _encodes(char: str, encodings: tuple[str, ...]) -> bool:
    """Whether one of the set's encodings holds ``char`` (ISO 2022 sets switch between
    them by escape sequences, character by character)."""
    for encoding in encodings:
        try:
            char.encode(encoding)
        except (UnicodeError, LookupError):
            continue
        return True
    return False
