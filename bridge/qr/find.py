"""The Query/Retrieve FIND service (C-FIND, PS3.4 C.4.1): Patient Root and Study Root, at
PATIENT, STUDY, SERIES and IMAGE level, answered from the sources the ``find`` rules
name (``bridge.sources``), merged by ``bridge.sources.search.Search``.

Each match is sent as it comes (0xFF00; 0xFF01 when the source could not check every
matching key), cut to the keys asked for, with the bridge's AE title as Retrieve AE
Title, and encoded in the character set configured for the requesting node. Which
status ends a C-FIND is decided here (``failure``); docs/conformance.md has the table.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_FIND

from bridge.config import Config
from bridge.config.sources import FIND_TIMEOUT
from bridge.dataset import charset
from bridge.dataset.query import ROOTS, QueryError, parse
from bridge.dimse import pynetdicom_overrides
from bridge.dimse.listener import AssociationState
from bridge.errors import UpstreamUnavailable
from bridge.metrics import Metrics
from bridge.routing.rules import Context
from bridge.sources import Sources
from bridge.sources.search import Cancelled, Search

LOGGER = logging.getLogger(__name__)

# An identifier is small: the uncompressed syntaxes are all a C-FIND needs.
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                     ExplicitVRBigEndian]

PENDING = 0xFF00
PENDING_WARNING = 0xFF01  # optional keys were not supported for matching
CANCEL = 0xFE00

Response = tuple[int | Dataset, Dataset | None]


def failure(exc: Exception) -> int:
    """The status a C-FIND ends with when its sources failed with ``exc``: 0xA700 (out of
    resources) for a source unreachable, or that gave no answer in time; 0xC001 (unable to
    process) for any other failure (it refused us, or answered with an error)."""
    return 0xA700 if isinstance(exc, UpstreamUnavailable) else 0xC001


def requester_charset(config: Config, calling_ae: str) -> str:
    """The character set answers are encoded in for ``calling_ae``: its node's ``charset``
    (the node found by ``ae_title``, else by its key), else the default, UTF-8."""
    node = next((n for n in config.nodes.values() if n.ae_title == calling_ae), None) or config.nodes.get(calling_ae)
    return node.charset if node is not None else charset.DEFAULT


class Find:
    """C-FIND: each request parsed into a ``Query``, routed by the ``find`` rules, asked
    of their sources, and answered with their merged matches."""

    event = evt.EVT_C_FIND

    def __init__(self, sources: Sources, metrics: Metrics) -> None:
        self.sources = sources
        self.metrics = metrics

    def add_contexts(self, ae: AE, config: Config) -> None:
        for uid in ROOTS:
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)

    def serves(self, primitive: Any) -> bool:
        return isinstance(primitive, C_FIND) and primitive.MessageIDBeingRespondedTo is None \
            and primitive.AffectedSOPClassUID in ROOTS

    def handle(self, event: evt.Event, association: AssociationState) -> Iterator[Response]:
        return self._answer(event, association)

    def _answer(self, event: evt.Event, association: AssociationState) -> Iterator[Response]:
        started = time.monotonic()
        request = cast(C_FIND, event.request)
        sop_class = str(request.AffectedSOPClassUID)
        level, names, matches, status = "?", [], 0, 0x0000
        search: Search | None = None
        try:
            try:
                identifier = event.identifier
                query = parse(identifier, sop_class)
            except QueryError as exc:
                status = exc.status
                yield _status(exc.status, exc.comment), None
                return
            except Exception as exc:  # an identifier pydicom cannot decode
                status = 0xC000
                yield _status(0xC000, f"cannot decode identifier: {exc}"), None
                return
            level = query.level
            config = association.config
            ctx = Context(calling_ae=association.calling_ae, called_ae=association.called_ae, peer=association.peer)
            decision = association.rules.route("find", ctx, query.identifier)
            names = list(decision.destinations)
            if not names:
                status = 0xC000
                LOGGER.warning("C-FIND from %s: no find rule matches it", association.calling_ae)
                yield _status(0xC000, "no find rule matches this query"), None
                return
            if any(r.fuzzy_matching for r in association.rules.rules if r.name in decision.rules):
                query = dataclasses.replace(query, fuzzy=True)
            search = Search(query, [self.sources.get(name, config) for name in names],
                            {name: find_timeout(config, name) for name in names}, config.find.max_results,
                            cancelled=lambda: event.is_cancelled)
            target = requester_charset(config, association.calling_ae)
            replaced: set[str] = set()
            for match in search:
                response = query.shape(match.record, config.ae_title)
                replaced.update(charset.fit(response, target))
                matches += 1
                pynetdicom_overrides.still_busy(event.assoc)
                if event.is_cancelled:
                    raise Cancelled
                yield PENDING if match.verified else PENDING_WARNING, response
            if replaced:
                LOGGER.warning("C-FIND from %s: characters %s cannot hold replaced with '?' in %s",
                               association.calling_ae, target, ", ".join(sorted(replaced)))
            if search.capped:
                self.metrics.find_capped.labels(names[0]).inc()
                LOGGER.warning("C-FIND from %s: more than find.max_results (%d) matches: answered the first %d",
                               association.calling_ae, config.find.max_results, matches)
            status = self._final(search, association.calling_ae)
            if status != 0x0000:
                yield _status(status, str(search.failures[0].error)), None
        except Cancelled:
            status = CANCEL
            yield CANCEL, None
        except Exception as exc:  # a source that cannot even be built: the C-FIND fails, with why
            status = 0xC001
            LOGGER.exception("C-FIND from %s failed", association.calling_ae)
            yield _status(status, f"cannot query: {exc}"), None
        finally:
            if search is not None:
                search.stop()
                self._count(search, status)
            pynetdicom_overrides.still_busy(event.assoc)
            self.metrics.dimse_requests.labels("C-FIND", f"0x{status:04X}").inc()
            LOGGER.info("C-FIND from %s (%s): %s level, %s: %d matches, 0x%04X in %.2fs",
                        association.calling_ae, association.label, level, ", ".join(names) or "no source",
                        matches, status, time.monotonic() - started)

    def _final(self, search: Search, calling_ae: str) -> int:
        """The final status: success while any source answered; the first failure's status
        when all failed. A source that failed beside ones that answered is logged."""
        failed = {f.source for f in search.failures}
        for f in search.failures:
            LOGGER.warning("C-FIND from %s: source %s failed: %s", calling_ae, f.source, f.error)
        if search.sources and failed >= {s.name for s in search.sources}:
            return failure(search.failures[0].error)
        return 0x0000

    def _count(self, search: Search, status: int) -> None:
        failed = {f.source: failure(f.error) for f in search.failures}
        for source in search.sources:
            answered = CANCEL if status == CANCEL and source.name not in failed else failed.get(source.name, 0)
            self.metrics.finds.labels(source.name, f"0x{answered:04X}").inc()


def find_timeout(config: Config, name: str) -> float:
    """The ``find_timeout`` of the source ``name`` (``local``: the default)."""
    settings = config.sources.get(name)
    return settings.find_timeout if settings is not None else FIND_TIMEOUT  # local: no settings of its own


def _status(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    # LO, in the command set's default repertoire: ASCII, 64 characters at most
    ds.ErrorComment = comment.encode("ascii", "replace").decode()[:64]
    return ds
