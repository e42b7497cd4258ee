"""Association set-up without validating the same UIDs again and again.

- Each accepted association gets its own copy of the acceptor's presentation contexts
  through ``copy.deepcopy``, which builds every transfer syntax UID again, validating
  each with pydicom's regular expressions: with every storage SOP class in every syntax
  (170 x 39), GIL-holding Python on every association (docs/performance.md), which a
  modality that opens one association per image pays for every image.
  ``_copy_contexts`` copies each context object and its list of syntaxes; UIDs are
  immutable strings, so sharing them is safe.
- Each association request is decoded UID by UID through ``set_uid``, which validates
  every UID again: a storage SCU proposes hundreds (storescu: 120 contexts, 3 syntaxes
  each), the same ones on every association. The negotiation's modules (``pdu_items``,
  ``presentation``) get ``set_uid`` with its results remembered
  (``_set_uid_remembered``; failures are not, so they raise every time).
"""

from __future__ import annotations

import copy
from typing import Any

import pynetdicom.utils
from pynetdicom.presentation import PresentationContext


def _copy_contexts(value: Any, memo: dict[int, Any] | None = None) -> Any:
    """``deepcopy`` as ``pynetdicom.transport`` uses it (the acceptor's supported
    contexts for a new association): each context copied with its own list of transfer
    syntaxes, the immutable UIDs shared. Anything else is deep-copied."""
    if isinstance(value, list) and all(type(cx) is PresentationContext for cx in value):
        copies = []
        for cx in value:
            # copy.copy would go through __reduce_ex__: four times slower, for ~170 contexts
            c = object.__new__(PresentationContext)
            attributes = cx.__dict__.copy()
            attributes["_transfer_syntax"] = list(cx._transfer_syntax)
            c.__dict__ = attributes
            copies.append(c)
        return copies
    return copy.deepcopy(value, memo)


_pynetdicom_set_uid = pynetdicom.utils.set_uid
_UIDS: dict[tuple[Any, ...], Any] = {}
_UIDS_MAX = 4096  # beyond this many distinct UIDs, say from a peer proposing nonsense, no more are kept


def _set_uid_remembered(value: Any, name: str, allow_empty: bool = True, allow_none: bool = True,
                        validate: bool = True) -> Any:
    """``pynetdicom.utils.set_uid`` with each text's result kept: the same UID object for
    the same text (UIDs are immutable), the conformance warning logged once, a failure
    raised every time."""
    key = (type(value), value, allow_empty, allow_none, validate)
    if isinstance(value, str | bytes):
        found = _UIDS.get(key)
        if found is not None:
            return found
    uid = _pynetdicom_set_uid(value, name, allow_empty, allow_none, validate)
    if uid is not None and isinstance(value, str | bytes) and len(_UIDS) < _UIDS_MAX:
        _UIDS[key] = uid
    return uid
