"""C-MOVE (PS3.4 C.4.2): the instances a request names, fetched from the ``retrieve``
rules' sources and sent to its Move Destination, a node of ``nodes`` found by its
``ae_title``, else by its key (unknown: 0xA801). What C-MOVE and C-GET share is in
``bridge.qr.retrieve``. The HTTP API's retrievals (``bridge.api.qr``) send to a node
the same way: ``node_sink``.

The sub-operations go over an association of the bridge's own to the destination, made
once the first instance is fetched, with the ``dimse`` destination's machinery
(``bridge.destinations.dimse``): for each SOP class located, the first instance's syntax,
explicit and implicit VR little endian, and as room allows the common compressed
syntaxes, each in a presentation context of its own; an instance in a syntax not
proposed opens a new association, and one the destination refuses is converted exactly
(``bridge.dimse.transcode``) or fails. Every C-STORE carries the requester's AE title
and the C-MOVE's Message ID as Move Originator (PS3.7 9.3.1.1). Files are sent from disk
in PDU-sized pieces, never held whole in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from pynetdicom import evt
from pynetdicom.dimse_primitives import C_MOVE

from bridge.config import Config, Node
from bridge.config import DimseDestination as DimseConfig
from bridge.dataset.query import MOVE_ROOTS
from bridge.destinations.dimse import EXPLICIT, DimseDestination
from bridge.dimse.listener import AssociationState
from bridge.errors import UpstreamError
from bridge.model import InstanceRef, Outcome
from bridge.qr.retrieve import UNKNOWN_DESTINATION, Refused, Retrieve, retrieved_instance
from bridge.qr.suboperations import Sink, SubOperationsImpossible
from bridge.sources import temp_dir
from bridge.sources.retrieval import Fetched

# Proposed for each SOP class located, after the syntaxes its instances are known to be
# in, while room allows: an instance stored compressed goes out as it is, to a
# destination that takes it, without a new association for its syntax.
COMMON_SYNTAXES = (
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",     # RLE Lossless
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",     # Explicit VR Big Endian
)


def destination_node(nodes: dict[str, Node], ae_title: str) -> tuple[str, Node] | None:
    """The node a Move Destination names: by ``ae_title``, else by key."""
    for key, node in nodes.items():
        if (node.ae_title or key) == ae_title:
            return key, node
    named = nodes.get(ae_title)
    return (ae_title, named) if named is not None else None


class MoveSink(Sink):
    """C-STOREs to a node (a Move Destination), over the bridge's own association(s)."""

    def __init__(self, destination: DimseDestination, calling_ae: str) -> None:
        self.destination = destination
        self.calling_ae = calling_ae

    def prepare(self, located: Sequence[InstanceRef], ready: Sequence[Fetched]) -> None:
        sop_classes = list(dict.fromkeys(ref.sop_class_uid for ref in located if ref.sop_class_uid))
        expected = [(f.sop_class_uid, f.transfer_syntax) for f in ready]
        expected += [(sop_class, EXPLICIT) for sop_class in sop_classes]
        expected += [(sop_class, syntax) for syntax in COMMON_SYNTAXES for sop_class in sop_classes]
        self.destination.expected = expected

    def send(self, fetched: Fetched) -> Outcome:
        instance = retrieved_instance(fetched, self.calling_ae, self.destination.peer.called_ae)
        try:
            outcome, _ = self.destination.store(instance)
        except UpstreamError as exc:
            raise SubOperationsImpossible(f"move destination: {exc}") from exc
        return outcome

    def close(self) -> None:
        self.destination.close()


def node_sink(config: Config, key: str, node: Node, calling_ae: str,
              originator: tuple[str, int] | None = None) -> MoveSink:
    """Sub-operations to the node ``key`` of ``config``, called as the bridge's
    ``ae_title``, with the ``dimse`` destination's machinery; each C-STORE carries
    ``originator`` (the requester's AE title and the C-MOVE's Message ID) when given.
    ``calling_ae``: who asked, as the instances sent name it (``retrieved_instance``)."""
    destination = DimseDestination(f"move-{key}", DimseConfig(type="dimse", node=key), node, config.ae_title,
                                   temp_dir(config))
    destination.originator = originator
    return MoveSink(destination, calling_ae)


class Move(Retrieve):
    """C-MOVE SCP: Patient Root and Study Root."""

    event = evt.EVT_C_MOVE
    operation = "C-MOVE"
    roots = dict(MOVE_ROOTS)

    def sink(self, event: evt.Event, association: AssociationState) -> Sink:
        request = cast(C_MOVE, event.request)
        ae_title = _text(request.MoveDestination)
        config = association.config
        found = destination_node(config.nodes, ae_title)
        if found is None:
            raise Refused(UNKNOWN_DESTINATION, f"move destination {ae_title or '(none)'} is not among the nodes")
        key, node = found
        return node_sink(config, key, node, association.calling_ae,
                         originator=(association.calling_ae, int(request.MessageID or 0)))

    def describe(self, event: evt.Event) -> str:
        return f" to {_text(cast(C_MOVE, event.request).MoveDestination)}"


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip(" \0")
    return str(value or "").strip(" \0")

