"""``type: static``: a static DICOMweb tree that a plain web server serves to viewers
(``bridge.static.tree``; the layout is in docs/static.md).

Each batch is one ``StaticTree.add``: its instances are converted, then each series and
study it touched is rewritten once, under the tree's lock, so several workers (or two
destinations on one path, or a ``dicom-bridge convert``) leave a consistent tree. An
instance a rule modifies for this destination is converted from its modified copy
(``sending.outgoing``).

| what happens | outcome |
| --- | --- |
| converted, or already in the tree from the same bytes | ``Done``, ``Duplicate`` |
| ``duplicates: keep-first`` and the tree holds the instance | ``Duplicate`` |
| the file cannot be converted (invalid UIDs, unreadable pixel data) | ``Permanent`` with the reason |
| ``recompress`` set and the encoder cannot take the instance | ``Done``, written as it is, a warning logged |
| the tree cannot be written (a full disk, no permission) | ``UpstreamUnavailable``: the destination backs off |
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

from bridge.config import StaticDestination as StaticConfig
from bridge.destinations import sending
from bridge.errors import UpstreamUnavailable
from bridge.model import Done, Duplicate, Outcome, Permanent, SpooledInstance
from bridge.static.tree import Result, StaticTree

LOGGER = logging.getLogger(__name__)


class StaticDestination:
    def __init__(self, name: str, config: StaticConfig, temp_dir: Path) -> None:
        self.name = name
        self.tree = StaticTree(Path(config.path), recompress=config.recompress)
        self.keep_first = config.duplicates == "keep-first"
        self.temp_dir = temp_dir

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def probe(self) -> bool:
        """Whether the tree can be written again: a small hidden file written in its root,
        synced and removed."""
        return sending.writable(self.tree.root)

    def send(self, batch: Sequence[SpooledInstance]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(batch)
        with contextlib.ExitStack() as files:
            paths: list[Path] = []
            where: list[int] = []
            for i, instance in enumerate(batch):
                try:
                    out = files.enter_context(sending.outgoing(instance, self.temp_dir, f"static-{self.name}-"))
                except sending.Unsendable as exc:
                    outcomes[i] = exc.outcome
                    continue
                sent = out.instance
                if self.keep_first and self.tree.holds(sent.study_uid, sent.series_uid, sent.sop_instance_uid):
                    outcomes[i] = Duplicate("in the tree already (keep-first)")
                    continue
                paths.append(out.path)
                where.append(i)
            try:
                results = self.tree.add(paths)
            except OSError as exc:
                raise UpstreamUnavailable(f"cannot write to {self.name}: {exc.strerror or exc}") from exc
        for i, result in zip(where, results, strict=True):
            outcomes[i] = _outcome(result)
            if result.warning:
                LOGGER.warning("%s: %s: %s", self.name, result.sop_instance_uid, result.warning)
        return [o if o is not None else Permanent("not converted") for o in outcomes]


def _outcome(result: Result) -> Outcome:
    if result.status == "added":
        return Done()
    if result.status == "unchanged":
        return Duplicate("in the tree already, from the same bytes")
    return Permanent(result.reason)
