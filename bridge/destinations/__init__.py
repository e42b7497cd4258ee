"""Destinations: where stored instances go. One module per type; ``build`` picks one."""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from bridge.config import ArchiveDestination as ArchiveConfig
from bridge.config import DataDir, DestinationBase, Node
from bridge.config import DicomwebDestination as DicomwebConfig
from bridge.config import DimseDestination as DimseConfig
from bridge.config import FolderDestination as FolderConfig
from bridge.config import StaticDestination as StaticConfig
from bridge.model import Destination

_MODULES = {FolderConfig: "folder", DicomwebConfig: "dicomweb", ArchiveConfig: "archive", DimseConfig: "dimse",
            StaticConfig: "static"}


def preload(destinations: Iterable[DestinationBase]) -> None:
    """Import the modules of the configured destination types now, at start or reload,
    not in a delivery worker's first batch (the dicomweb module brings requests and
    urllib3: 15 ms of imports holding the GIL while the first images arrive)."""
    for settings in destinations:
        module = _MODULES.get(type(settings))
        if module:
            importlib.import_module(f"bridge.destinations.{module}")


def build(name: str, settings: DestinationBase, node: Node | None, ae_title: str, data_dir: DataDir) -> Destination:
    """The destination ``name`` as ``settings`` describe it; a dimse destination calls
    ``node`` as ``ae_title``."""
    if isinstance(settings, FolderConfig):
        from bridge.destinations.folder import FolderDestination

        return FolderDestination(name, settings)
    if isinstance(settings, DicomwebConfig):
        from bridge.destinations.dicomweb import DicomwebDestination

        # Modified copies are written where a restart removes what a crash left.
        return DicomwebDestination(name, settings, data_dir.incoming)
    if isinstance(settings, ArchiveConfig):
        from bridge.destinations.archive import ArchiveDestination

        return ArchiveDestination(name, settings, data_dir.archive)
    if isinstance(settings, DimseConfig):
        from bridge.destinations.dimse import DimseDestination

        assert node is not None  # loading checks that a dimse destination's node exists
        # Converted copies are written where a restart removes what a crash left.
        return DimseDestination(name, settings, node, ae_title, data_dir.incoming)
    if isinstance(settings, StaticConfig):
        from bridge.destinations.static import StaticDestination

        # Modified copies are written where a restart removes what a crash left.
        return StaticDestination(name, settings, data_dir.incoming)
    raise TypeError(f"no destination type for {type(settings).__name__}")
