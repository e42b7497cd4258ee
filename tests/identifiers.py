"""C-FIND identifiers as the listener receives them: encoded by a requester, decoded from
those bytes, and read into the ``Query`` every source answers."""

from __future__ import annotations

from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.dsutils import decode, encode

from bridge.dataset.query import PATIENT_ROOT_FIND, STUDY_ROOT_FIND, Query, parse


def query(level: str, root: str = "study", fuzzy: bool = False, charset: str = "ISO_IR 192", **keys: Any) -> Query:
    """``keys`` at ``level``, in Patient or Study Root, encoded in ``charset``."""
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    received = decode(BytesIO(encode(ds, False, True)), False, True)
    return parse(received, PATIENT_ROOT_FIND if root == "patient" else STUDY_ROOT_FIND, fuzzy)
