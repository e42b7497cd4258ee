"""Where the instances of the bridge's own C-MOVEs arrive: a process-wide registry of the
retrievals waiting for C-STORE sub-operations (PS3.4 C.4.2.3) on the listener.

A ``dimse`` source that retrieves with ``c-move`` asks its node to C-MOVE to
``move_destination_ae``, an AE title of the bridge's own listener. Before it sends the
C-MOVE it registers here (``INBOX.expect``): the move destination, the node's AE title,
its own AE title as the Move Originator, the SOP Instance UIDs it asks for, and what to do
with each file. The listener's store service asks ``INBOX.take`` first for every C-STORE:

| the C-STORE | what happens |
| --- | --- |
| called AE not a waiting retrieval's move destination | not taken: the normal store path |
| Move Originator AE Title and Message ID of a waiting retrieval | the retrieval's (``deliver``) |
| no Move Originator, calling AE the node's, SOP Instance UID expected | the retrieval's |
| Move Originator of a retrieval ended in the last ``ENDED_FOR`` seconds | refused, 0xA700 (sent after a C-CANCEL) |
| anything else | not taken: the normal store path |

A taken instance never reaches ingest, the rules or the queue: the retrieval renames the
received file into its temporary folder before the handler returns (``keep``).

Message IDs. Each registration gets a C-MOVE Message ID no other waiting retrieval of
the same originator holds, so a C-STORE's Move Originator Message ID names one retrieval.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.forward.spool import HashingTempFile

LOGGER = logging.getLogger(__name__)

# How long a C-STORE naming an ended retrieval as its Move Originator is still refused
# rather than taken as a new instance (the node may send what was in flight when the
# C-MOVE was cancelled).
ENDED_FOR = 60.0

Status = tuple[int, str]  # a C-STORE status and its ErrorComment ("" for none)


@dataclass(frozen=True, eq=False)
class Awaited:
    """One C-MOVE waiting for its sub-operations. ``deliver(sop_instance_uid, path)`` takes
    the received file (renames it away, or leaves it to be removed) and returns the
    C-STORE's status; it runs on the listener's association thread."""

    move_destination: str
    node_ae: str
    originator_ae: str
    message_id: int
    expected: frozenset[str]
    deliver: Callable[[str, Path], Status]


class Inbox:
    """The retrievals waiting for C-STOREs; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._awaited: list[Awaited] = []
        self._ended: dict[tuple[str, str, int], float] = {}  # (destination, originator, id) -> when
        self._ids = itertools.count(1)

    def expect(self, move_destination: str, node_ae: str, originator_ae: str, expected: frozenset[str],
               deliver: Callable[[str, Path], Status]) -> Awaited:
        """Register a retrieval before its C-MOVE is sent; its ``message_id`` is the C-MOVE's."""
        with self._lock:
            taken = {a.message_id for a in self._awaited if a.originator_ae == originator_ae}
            message_id = next(self._ids) % 0xFFFF + 1
            while message_id in taken:  # at most 65535 retrievals wait at once: one is free
                message_id = next(self._ids) % 0xFFFF + 1
            awaited = Awaited(move_destination, node_ae, originator_ae, message_id, expected, deliver)
            self._awaited.append(awaited)
            return awaited

    def forget(self, awaited: Awaited) -> None:
        """The retrieval ended: its C-STOREs are refused for ``ENDED_FOR`` seconds, then are
        ordinary ones."""
        with self._lock:
            if awaited in self._awaited:
                self._awaited.remove(awaited)
            now = time.monotonic()
            self._ended = {k: t for k, t in self._ended.items() if now - t < ENDED_FOR}
            self._ended[(awaited.move_destination, awaited.originator_ae, awaited.message_id)] = now

    def move_destinations(self) -> set[str]:
        """The AE titles waiting retrievals have the node C-MOVE to."""
        with self._lock:
            return {a.move_destination for a in self._awaited}

    def take(self, called_ae: str, calling_ae: str, request: Any, path: Path) -> Status | None:
        """The status of a C-STORE (``request``: pynetdicom's C_STORE primitive, its data set
        received into ``path``) taken by a waiting retrieval, or None when it is none of
        theirs (see the module's table). The caller removes ``path`` if it is still there."""
        originator = str(getattr(request, "MoveOriginatorApplicationEntityTitle", None) or "").strip()
        message_id = getattr(request, "MoveOriginatorMessageID", None)
        sop_instance = str(request.AffectedSOPInstanceUID or "")
        with self._lock:
            if not self._awaited and not self._ended:
                return None
            waiting = [a for a in self._awaited if a.move_destination == called_ae]
            if originator and message_id is not None:
                found = next((a for a in waiting if a.originator_ae == originator and a.message_id == message_id),
                             None)
                ended = time.monotonic() - self._ended.get((called_ae, originator, message_id), -ENDED_FOR) < ENDED_FOR
            else:
                found = next((a for a in waiting if a.node_ae == calling_ae and sop_instance in a.expected), None)
                ended = False
        if found is not None:
            return found.deliver(sop_instance, path)
        if ended:
            LOGGER.info("C-STORE of %s from %s refused: the C-MOVE %d it answers has ended", sop_instance, calling_ae,
                        message_id)
            return 0xA700, "the C-MOVE this answers has ended"
        return None


# The one registry of the process: the listener's store service and every dimse source share it.
INBOX = Inbox()


def keep(path: Path, temp_dir: Path, prefix: str) -> Path:
    """``path`` (a complete received file) renamed to a new file of ``temp_dir`` named
    ``<prefix><random>.dcm``; copied when ``temp_dir`` is on another file system. Raises
    ``OSError`` when the file could not be written whole (a full disk while it arrived)."""
    failed = HashingTempFile.write_error(path)
    if failed is not None:
        raise failed
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".dcm", dir=temp_dir)
    os.close(fd)
    try:
        try:
            os.replace(path, name)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            shutil.copyfile(path, name)
            path.unlink(missing_ok=True)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)
