"""Reading what intake and destinations need from Part-10 files, without Pixel Data."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from bridge.errors import IntakeError
from bridge.uids import is_valid_uid

# Values longer than this stay on disk until asked for: the header of a 2 GB
# multi-frame instance costs kilobytes.
_DEFER = 16 * 1024


def read_header(path: Path) -> Dataset:
    """The file's meta and data set up to, not including, Pixel Data.

    Raises ``IntakeError(0xC000)`` when the file cannot be parsed.
    """
    try:
        ds = dcmread(path, stop_before_pixels=True, defer_size=_DEFER)
        # pydicom converts values lazily: touch the top level now, so a broken
        # data set fails here with a clear status rather than later in a rule.
        for element in ds:
            _ = element.value
    except (InvalidDicomError, EOFError, ValueError, KeyError, OSError, NotImplementedError) as exc:
        raise IntakeError(0xC000, f"cannot parse data set: {type(exc).__name__}") from exc
    except Exception as exc:  # pydicom raises many kinds on garbage; all mean the same here
        raise IntakeError(0xC000, f"cannot parse data set: {type(exc).__name__}") from exc
    return ds


def required_uids(ds: Dataset) -> tuple[str, str, str, str]:
    """(SOP Class, SOP Instance, Study, Series) UIDs, each valid, or ``IntakeError(0xC000)``."""
    values = []
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = ds.get(keyword)
        if value is None or value == "":
            raise IntakeError(0xC000, f"missing {keyword}")
        text = str(value)
        if not is_valid_uid(text):
            raise IntakeError(0xC000, f"invalid {keyword}")
        values.append(text)
    return values[0], values[1], values[2], values[3]


def text(ds: Dataset, keyword: str) -> str:
    """A tag's value as plain text ('' when absent); never raises."""
    try:
        value = ds.get(keyword)
    except Exception:
        return ""
    return "" if value is None else str(value)
