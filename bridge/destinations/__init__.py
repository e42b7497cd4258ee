"""Destinations: where stored instances go. One module per type; ``build`` picks one."""

from __future__ import annotations

import importlib

from bridge.config import ArchiveDestination as ArchiveConfig
from bridge.config import Config, DataDir
from bridge.config import DicomwebDestination as DicomwebConfig
from bridge.config import DimseDestination as DimseConfig
from bridge.config import FolderDestination as FolderConfig
from bridge.model import Destination

_MODULES = {FolderConfig: "folder", DicomwebConfig: "dicomweb", ArchiveConfig: "archive", DimseConfig: "dimse"}


def preload(config: Config) -> None:
    """Import the modules of the configured destination types now, at start or reload,
    not in a delivery worker's first batch (the dicomweb module brings requests and
    urllib3: 15 ms of imports holding the GIL while the first images arrive)."""
    for settings in config.destinations.values():
        module = _MODULES.get(type(settings))
        if module:
            importlib.import_module(f"bridge.destinations.{module}")


def build(name: str, config: Config) -> Destination:
    settings = config.destinations[name]
    if isinstance(settings, FolderConfig):
        from bridge.destinations.folder import FolderDestination

        return FolderDestination(name, settings)
    if isinstance(settings, DicomwebConfig):
        from bridge.destinations.dicomweb import DicomwebDestination

        # Modified copies are written where a restart removes what a crash left.
        return DicomwebDestination(name, settings, DataDir(config.data_dir).incoming)
    if isinstance(settings, ArchiveConfig):
        from bridge.destinations.archive import ArchiveDestination

        return ArchiveDestination(name, settings, DataDir(config.data_dir).archive)
    if isinstance(settings, DimseConfig):
        from bridge.destinations.dimse import DimseDestination

        # Converted copies are written where a restart removes what a crash left.
        temp_dir = DataDir(config.data_dir).incoming
        return DimseDestination(name, settings, config.nodes[settings.node], config.ae_title, temp_dir)
    raise TypeError(f"no destination type for {type(settings).__name__}")
