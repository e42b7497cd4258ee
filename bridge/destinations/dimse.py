"""``type: dimse``: C-STORE to a PACS node. Not built yet: the destination suspends with
a reason that says so, and its rows wait in the queue (nothing is dropped)."""

from __future__ import annotations

from collections.abc import Sequence

from bridge.errors import DestinationMisconfigured
from bridge.model import Outcome, SpooledInstance


class DimseDestination:
    def __init__(self, name: str, node: str) -> None:
        self.name = name
        self.node = node

    def open(self) -> None:
        raise DestinationMisconfigured(f"type dimse (node {self.node}): delivery over DIMSE is not available "
                                       "in this version; rows wait in the queue")

    def send(self, batch: Sequence[SpooledInstance]) -> list[Outcome]:
        raise DestinationMisconfigured("type dimse: not available in this version")

    def close(self) -> None:
        pass
