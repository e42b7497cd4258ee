"""Sources: where queries and retrievals are answered from, one module per kind
(``local``: the archive's index, ``dicomweb``: QIDO-RS, ``dimse``: a remote PACS). The
``Source`` protocol is in ``bridge.model``; ``query`` reads a C-FIND identifier into
the ``Query`` every source answers."""

from __future__ import annotations

from pathlib import Path

from bridge.config import LOCAL, ArchiveDestination, Config, DataDir
from bridge.metrics import Metrics
from bridge.model import Source


def archive_root(config: Config) -> Path | None:
    """The folder of the one ``type: archive`` destination (its files and ``index.sqlite``),
    or None when there is none (or several: ``check`` refuses rules naming ``local`` then)."""
    archives = [d for d in config.destinations.values() if isinstance(d, ArchiveDestination)]
    if len(archives) != 1:
        return None
    return Path(archives[0].path) if archives[0].path else DataDir(Path(config.data_dir)).archive


def build(name: str, config: Config, metrics: Metrics) -> Source:
    """The source called ``name`` in ``config`` (``local``, or a key of ``sources``)."""
    if name == LOCAL:
        from bridge.sources.local import LocalSource

        root = archive_root(config)
        if root is None:
            raise ValueError("source 'local' needs exactly one destination of type: archive")
        return LocalSource(root / "index.sqlite", metrics)
    settings = config.sources[name]
    if settings.type == "dicomweb":
        from bridge.sources.dicomweb import DicomwebSource

        return DicomwebSource(name, settings, metrics)
    from bridge.sources.dimse import DimseSource

    return DimseSource(name, settings, config.nodes[settings.node], config.ae_title, config.listen.timeouts.network,
                       metrics)
