"""Sources: where queries and retrievals are answered from, one module per kind
(``local``: the archive's index, ``dicomweb``: QIDO-RS, ``dimse``: a remote PACS,
``rad69``: an XDS-I.b Imaging Document Source, located through another source). The
``Source`` protocol is in ``bridge.model``; ``bridge.dataset.query`` reads a C-FIND
identifier into the ``Query`` every source answers."""

from __future__ import annotations

import threading
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


def temp_dir(config: Config) -> Path:
    """Where sources write what they retrieve: on the spool's file system, in the folder
    a restart empties (``bridge.forward.spool``)."""
    return DataDir(Path(config.data_dir)).incoming


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

        return DicomwebSource(name, settings, metrics, temp_dir(config))
    if settings.type == "rad69":
        from bridge.sources.rad69 import Rad69Source

        # RAD-69 cannot query: the source that locates is built here, not by the RAD-69
        # source itself (``check`` makes sure it is a dicomweb, dimse or local one).
        return Rad69Source(name, settings, build(settings.locate, config, metrics), metrics, temp_dir(config))
    from bridge.sources.dimse import DimseSource

    return DimseSource(name, settings, config.nodes[settings.node], config.ae_title, config.listen.timeouts.network,
                       metrics, temp_dir(config))


class Sources:
    """The sources the C-FIND service asks, built when first asked for, and built again
    when a reload changes what they are built from. An association asks with the
    configuration it started with; a source a reload replaced is not closed under a query
    still using it, but left to go when the last one ends."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._lock = threading.Lock()
        self._built: dict[str, tuple[str, Source]] = {}

    def get(self, name: str, config: Config) -> Source:
        """The source ``name`` of ``config``; ``KeyError`` when ``config`` has none of that name,
        ``ValueError`` for ``local`` without one archive."""
        key = _built_from(name, config)
        with self._lock:
            built = self._built.get(name)
            if built is not None and built[0] == key:
                return built[1]
        source = build(name, config, self.metrics)
        with self._lock:
            self._built[name] = (key, source)
        return source

    def close(self) -> None:
        with self._lock:
            built, self._built = self._built, {}
        for _, source in built.values():
            source.close()


def _built_from(name: str, config: Config) -> str:
    """What the source ``name`` is built from, as text: when it changes, so does the source."""
    if name == LOCAL:
        return f"local {archive_root(config)}"
    settings = config.sources[name]
    if settings.type == "rad69":
        return f"{settings!r} {temp_dir(config)} locate: {_built_from(settings.locate, config)}"
    node = config.nodes.get(settings.node) if settings.type == "dimse" else None
    return f"{settings!r} {node!r} {config.ae_title} {config.listen.timeouts.network} {temp_dir(config)}"
