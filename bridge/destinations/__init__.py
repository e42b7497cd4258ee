"""Destinations: where stored instances go. One module per type; ``build`` picks one."""

from __future__ import annotations

from bridge.config import ArchiveDestination as ArchiveConfig
from bridge.config import Config
from bridge.config import DicomwebDestination as DicomwebConfig
from bridge.config import DimseDestination as DimseConfig
from bridge.config import FolderDestination as FolderConfig
from bridge.model import Destination


def build(name: str, config: Config) -> Destination:
    settings = config.destinations[name]
    if isinstance(settings, FolderConfig):
        from bridge.destinations.folder import FolderDestination

        return FolderDestination(name, settings)
    if isinstance(settings, DicomwebConfig):
        from bridge.destinations.dicomweb import DicomwebDestination
        from bridge.spool import Spool

        # Modified copies are written where a restart removes what a crash left.
        return DicomwebDestination(name, settings, Spool(config.data_dir / "spool").incoming)
    if isinstance(settings, ArchiveConfig):
        from bridge.destinations.archive import ArchiveDestination

        return ArchiveDestination(name, settings, config.data_dir / "archive")
    if isinstance(settings, DimseConfig):
        from bridge.destinations.dimse import DimseDestination
        from bridge.spool import Spool

        # Converted copies are written where a restart removes what a crash left.
        temp_dir = Spool(config.data_dir / "spool").incoming
        return DimseDestination(name, settings, config.nodes[settings.node], config.ae_title, temp_dir)
    raise TypeError(f"no destination type for {type(settings).__name__}")
