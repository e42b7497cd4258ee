"""What every destination type does alike: the file it sends for an instance (the spool
file, or a rule's modified copy), the outcome of an instance that cannot be sent at all,
and the suspension of a destination whose peer refuses a whole batch.

| what happens | result |
| --- | --- |
| the spool file is missing | ``Permanent("spool file is missing")`` |
| the rule's modification cannot be applied (``ModificationError``) | ``Permanent("modify: <element>: <why>")`` |
| the modified copy cannot be written (a full disk) | ``UpstreamUnavailable`` (backs off) |
| every instance of a batch answered 0x0122 or 0x0124 | ``UpstreamMisconfigured`` (suspended) |
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bridge.dimse import statuses
from bridge.errors import ModificationError, UpstreamMisconfigured, UpstreamUnavailable
from bridge.model import Permanent, SpooledInstance
from bridge.routing.modify import ModifiedCopy, prepare, write_modified

SPOOL_FILE_MISSING = "spool file is missing"


class Unsendable(Exception):
    """This instance cannot be sent, to any destination: ``outcome`` says why."""

    def __init__(self, outcome: Permanent) -> None:
        self.outcome = outcome
        super().__init__(outcome.reason)


def spool_file_missing() -> Unsendable:
    return Unsendable(Permanent(SPOOL_FILE_MISSING))


def modified_copy(instance: SpooledInstance) -> ModifiedCopy:
    """``instance``'s copy as its rule modifies it, prepared for writing; ``Unsendable``
    when the spool file is missing or the modification cannot be applied."""
    assert instance.modify is not None
    try:
        return prepare(instance.spool_path, instance.modify)
    except ModificationError as exc:
        raise Unsendable(Permanent(f"modify: {exc}")) from None
    except FileNotFoundError:
        raise spool_file_missing() from None


@dataclass(frozen=True)
class Outgoing:
    """An instance as the peer receives it (a modified copy's UIDs and size), and the file
    that holds it."""

    instance: SpooledInstance
    path: Path
    size: int


@contextmanager
def outgoing(instance: SpooledInstance, temp_dir: Path, prefix: str) -> Iterator[Outgoing]:
    """The file to send for ``instance``: its spool file, or its modified copy written to a
    temporary file named ``prefix...`` in ``temp_dir`` and removed on leaving.

    ``temp_dir`` is on the spool's file system, in the folder a restart empties
    (``bridge.forward.spool``), so a copy a crash leaves behind does not stay. Raises
    ``Unsendable`` when the instance cannot be sent, ``UpstreamUnavailable`` when the
    copy cannot be written; what the caller raises inside passes through.
    """
    try:
        size = instance.spool_path.stat().st_size
    except FileNotFoundError:
        raise spool_file_missing() from None
    if instance.modify is None:
        yield Outgoing(instance, instance.spool_path, size)
        return
    try:
        temp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".dcm", dir=temp_dir)
        os.close(fd)
    except OSError as exc:
        raise _unwritable(temp_dir, exc) from exc
    copy = Path(name)
    try:
        try:
            written = write_modified(instance.spool_path, instance.modify, copy)
        except ModificationError as exc:
            raise Unsendable(Permanent(f"modify: {exc}")) from None
        except FileNotFoundError:
            raise spool_file_missing() from None
        except OSError as exc:
            raise _unwritable(temp_dir, exc) from exc
        yield Outgoing(written.describe(instance), copy, written.size)
    finally:
        copy.unlink(missing_ok=True)


def _unwritable(temp_dir: Path, exc: OSError) -> UpstreamUnavailable:
    return UpstreamUnavailable(f"cannot write a modified copy to {temp_dir}: {exc.strerror or exc}")


def check_refusals(peer: str, size: int, answered: Iterable[int]) -> None:
    """Suspend the destination (``UpstreamMisconfigured``) when the peer answered every
    one of the ``size`` instances of a batch with 0x0122 SOP class not supported or 0x0124
    not authorised: it refuses what it is sent (a SOP class, our AE title, our account),
    not these instances, and the next batch would fare no better. ``answered`` holds the
    statuses (or FailureReasons) of the instances the peer answered."""
    refusals = [status for status in answered if statuses.classify(status) is statuses.Kind.REFUSED]
    if size and len(refusals) == size:
        raise UpstreamMisconfigured(f"{peer} refused every instance of a batch of {size} "
                                    f"({statuses.describe(refusals[-1])})")


PROBE_BYTES = 4096  # written by a probe: a full file system refuses a block, not always an empty file


def writable(root: Path) -> bool:
    """Whether a local destination can write under ``root`` again (its ``probe``): the
    folder created if missing (as a delivery would), and a small hidden file written
    there, synced and removed (a full disk, a read-only mount or a file in the way says
    no)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".probe-", suffix=".tmp", dir=root)
        try:
            os.write(fd, bytes(PROBE_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError:
        return False
    return True
