"""C-GET (PS3.4 C.4.3): the instances a request names, fetched from the ``retrieve``
rules' sources and sent back as C-STORE sub-operations on the requester's own
association. What C-MOVE and C-GET share is in ``bridge.qr.retrieve`` (and
``bridge.qr.suboperations``).

The requester proposes the storage SOP classes it takes with SCP/SCU role selection
(PS3.7 D.3.3.4); the listener accepts the roles proposed for every storage class it
serves. A requester that proposes no role selection (a plain Storage SCU such as
``storescu``) negotiates exactly as before: the default roles. Each instance goes in its
own syntax when the requester accepted it for its SOP class with the bridge as SCU, else
converted exactly (``bridge.dimse.transcode``) to explicit or implicit VR little endian;
an instance of a SOP class the requester offered no context for fails.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import cast

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_GET

from bridge.config import Config
from bridge.dataset.query import GET_ROOTS
from bridge.destinations.dimse import choose_syntax
from bridge.dimse import statuses, transcode
from bridge.dimse.listener import TRANSFER_SYNTAXES, AssociationState
from bridge.dimse.store import storage_sop_classes
from bridge.model import Outcome, Permanent
from bridge.qr.retrieve import Retrieve
from bridge.qr.suboperations import Sink, SubOperationsImpossible
from bridge.sources import temp_dir
from bridge.sources.retrieval import Fetched


class GetSink(Sink):
    """C-STOREs on the requester's association."""

    def __init__(self, assoc: Association, calling_ae: str, message_id: int, temp: Path) -> None:
        self.assoc = assoc
        self.calling_ae = calling_ae
        self.message_id = message_id
        self.temp = temp
        self.accepted: dict[str, set[str]] = {}
        for cx in assoc.accepted_contexts:
            if cx.as_scu:  # the requester takes the SCP role for it: the bridge may send
                self.accepted.setdefault(str(cx.abstract_syntax), set()).update(str(ts) for ts in cx.transfer_syntax)

    def send(self, fetched: Fetched) -> Outcome:
        chosen = choose_syntax(self.accepted.get(fetched.sop_class_uid, set()), fetched.sop_class_uid,
                               fetched.transfer_syntax, f"the requester {self.calling_ae}")
        if isinstance(chosen, Permanent):
            return chosen
        copy: Path | None = None
        try:
            if chosen != fetched.transfer_syntax:
                copy = self._temporary()
                try:
                    transcode.convert(fetched.path, copy, chosen)
                except transcode.NotConvertible as exc:
                    return Permanent(f"cannot convert to a syntax the requester accepts: {exc.reason}")
            self.message_id = self.message_id % 0xFFFF + 1
            if not self.assoc.is_established:
                raise SubOperationsImpossible("the requester's association ended")
            rsp = self.assoc.send_c_store(copy or fetched.path, msg_id=self.message_id)
        finally:
            if copy is not None:
                copy.unlink(missing_ok=True)
        if "Status" not in rsp:
            raise SubOperationsImpossible("the requester did not answer a C-STORE (aborted, or no answer in time)")
        return statuses.outcome(int(rsp.Status), str(rsp.get("ErrorComment", "") or ""))

    def _temporary(self) -> Path:
        self.temp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="converted-get-", suffix=".dcm", dir=self.temp)
        os.close(fd)
        return Path(name)


class Get(Retrieve):
    """C-GET SCP: Patient Root and Study Root."""

    event = evt.EVT_C_GET
    operation = "C-GET"
    roots = dict(GET_ROOTS)

    def add_contexts(self, ae: AE, config: Config) -> None:
        super().add_contexts(ae, config)
        # Accept the roles a C-GET requester proposes for the storage classes (it takes
        # the SCP role). Without role selection items the default roles apply, as before.
        for uid in storage_sop_classes(config):
            ae.add_supported_context(uid, TRANSFER_SYNTAXES, scu_role=True, scp_role=True)

    def sink(self, event: evt.Event, association: AssociationState) -> Sink:
        request = cast(C_GET, event.request)
        return GetSink(event.assoc, association.calling_ae, int(request.MessageID or 0),
                       temp_dir(association.config))
