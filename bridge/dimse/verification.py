"""The Verification service (C-ECHO, PS3.4 Annex A): the listener answers that it is there."""

from __future__ import annotations

from typing import Any

from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_ECHO

from bridge.config import Config
from bridge.dimse.listener import AssociationState
from bridge.metrics import Metrics

VERIFICATION = "1.2.840.10008.1.1"


class Verification:
    """C-ECHO under the Verification SOP Class, always answered 0x0000."""

    event = evt.EVT_C_ECHO

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def add_contexts(self, ae: AE, config: Config) -> None:
        ae.add_supported_context(VERIFICATION)

    def serves(self, primitive: Any) -> bool:
        return isinstance(primitive, C_ECHO) and primitive.MessageIDBeingRespondedTo is None \
            and primitive.AffectedSOPClassUID == VERIFICATION

    def handle(self, event: evt.Event, association: AssociationState) -> int:
        self.metrics.dimse_requests.labels("C-ECHO", "0x0000").inc()
        return 0x0000
