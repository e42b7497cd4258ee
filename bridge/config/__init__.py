"""The configuration file: typed models, the embedded default, and error reporting.

Every setting is declared once, in the module of its section (type, default, help);
docs/configuration.md is checked against these models by a test. This face hands on
the names the rest of the daemon uses.
"""

from bridge.config.datadir import DataDir
from bridge.config.destinations import (
    ArchiveDestination,
    DestinationBase,
    DicomwebDestination,
    DimseDestination,
    FolderDestination,
    StaticDestination,
)
from bridge.config.load import load_config, validate
from bridge.config.nodes import BasicAuth, BearerAuth, HttpAuth, HttpPeer, HttpTimeouts, Node, OAuth2Auth
from bridge.config.rules import WEEKDAYS, Modification, Rule, TagMatch
from bridge.config.settings import Config, Retry
from bridge.config.sources import LOCAL, DicomwebSource, DimseSource, Rad69Source, SourceBase
from bridge.config.watch import Watch
from bridge.errors import ConfigError

__all__ = [
    "LOCAL", "WEEKDAYS", "ArchiveDestination", "BasicAuth", "BearerAuth", "Config", "ConfigError", "DataDir",
    "DestinationBase", "DicomwebDestination", "DicomwebSource", "DimseDestination", "DimseSource",
    "FolderDestination", "HttpAuth", "HttpPeer", "HttpTimeouts", "Modification", "Node", "OAuth2Auth",
    "Rad69Source", "Retry", "Rule", "SourceBase", "StaticDestination", "TagMatch", "Watch", "load_config", "validate",
]
