"""C-MOVE and C-GET requests handed whole to the bridge's handler.

pynetdicom's Query/Retrieve service (``_move_scp``, ``_get_scp``) drives a handler that
yields the destination, the number of sub-operations, then one data set per instance,
and sends every response itself. That shape cannot do what a retrieval through the
bridge must (docs/conformance.md, C-MOVE and C-GET):

- answer a failure before any sub-operation (0xA701 when the instances cannot be
  located, with a comment), where it can only answer 0xA801 or success;
- send a pending response before the first instance is fetched, and while a slow source
  fetches, so that a requester with a 30 s DIMSE timeout does not abort: it sends one
  only after each sub-operation;
- send instances from their files, in pieces, as the ``dimse`` destination does: it
  takes only a ``Dataset`` in memory, encoded whole for each send (pynetdicom's
  ``send_c_store`` takes a file, but its services never give it one);
- name every instance that failed, whether it failed to arrive or to be stored, in the
  Failed SOP Instance UID List.

So for a handler that says it answers whole (``answers_whole(handler)``: the bridge's
``bridge.qr.retrieve``), ``_retrieve_scp`` triggers the event and leaves the whole
request to it; it sends its responses through the association's DIMSE provider, and an
exception it lets out is answered with pynetdicom's own status for one (0xC511 for
C-MOVE, 0xC411 for C-GET), so no request goes unanswered. Any other handler (one that
yields, as pynetdicom documents) is served by pynetdicom's own method.
"""

from __future__ import annotations

import logging
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse_primitives import C_GET, C_MOVE

LOGGER = logging.getLogger(__name__)

# pynetdicom's own methods, for handlers that yield (set by install()).
ORIGINAL: dict[str, Any] = {}


def answers_whole(handler: Any) -> Any:
    """Mark ``handler`` (of EVT_C_MOVE or EVT_C_GET) as answering its request whole."""
    handler.bridge_answers_whole = True
    return handler


def _retrieve_scp(self: Any, req: C_MOVE | C_GET, context: Any) -> None:
    """``QueryRetrieveServiceClass._move_scp`` and ``_get_scp``."""
    move = isinstance(req, C_MOVE)
    event = evt.EVT_C_MOVE if move else evt.EVT_C_GET
    handlers = self.assoc.get_handlers(event)
    if not (handlers and getattr(handlers[0], "bridge_answers_whole", False)):
        ORIGINAL["_move_scp" if move else "_get_scp"](self, req, context)
        return
    try:
        evt.trigger(self.assoc, event,
                    {"request": req, "context": context.as_tuple, "_is_cancelled": self.is_cancelled})
    except Exception:
        LOGGER.exception("%s handler failed", "C-MOVE" if move else "C-GET")
        if not self.assoc.is_established:
            return
        rsp = C_MOVE() if move else C_GET()
        rsp.MessageIDBeingRespondedTo = req.MessageID
        rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
        rsp.Status = 0xC511 if move else 0xC411
        self.dimse.send_msg(rsp, context.context_id)
