"""``type: folder``: Part-10 files under a path template of tags.

Every path component comes from a validated UID or a sanitised value, and the final
path is checked to stay under the template's root. Writes are atomic (a temporary
name, fsync, rename) and the folders are fsynced once per batch.

An instance with a modification (``SpooledInstance.modify``) is written as its modified
copy (``bridge.routing.modify``), and its path is rendered from the copy's values: the file lies
where its content says it belongs, and a value a rule replaces (a pseudonymised
PatientID) does not survive in the path.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import string
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from pydicom.dataset import Dataset

from bridge.config import FolderDestination as FolderConfig
from bridge.dataset.dicomfile import read_header
from bridge.dataset.uids import is_valid_uid, sanitise
from bridge.destinations import sending
from bridge.errors import InboundError, UpstreamUnavailable
from bridge.forward.spool import fsync_dir, fsync_file, sha256_file
from bridge.model import Done, Duplicate, Outcome, Permanent, SpooledInstance
from bridge.routing.modify import ModifiedCopy

LOGGER = logging.getLogger(__name__)

# Errors that say the destination as a whole cannot be written now: back it off.
_DESTINATION_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EIO,
                       errno.EDQUOT, errno.ENOENT, errno.EEXIST, errno.ENODEV, errno.ESTALE}


# Keywords a SpooledInstance carries, so templates using only these need no header read.
_KNOWN = {
    "StudyInstanceUID": "study_uid",
    "SeriesInstanceUID": "series_uid",
    "SOPInstanceUID": "sop_instance_uid",
    "SOPClassUID": "sop_class_uid",
}


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


class FileDestination:
    """Writes each instance to ``root/<rendered path>/<rendered filename>``."""

    link = False  # hard-link from the spool instead of copying (only for files we own)

    def __init__(self, name: str, path_template: str, filename_template: str, duplicates: str) -> None:
        self.name = name
        self.path_template = path_template
        self.filename_template = filename_template
        self.duplicates = duplicates
        # The root is the part of the template without fields; the rest is rendered per instance.
        parts = Path(path_template).parts
        fixed = next((i for i, p in enumerate(parts) if "{" in p), len(parts))
        self.root = Path(*parts[:fixed]) if fixed else Path(".")
        self._components = list(parts[fixed:])
        self._fields = set(template_fields(path_template) + template_fields(filename_template))
        self._needs_header = bool(self._fields - set(_KNOWN))

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def probe(self) -> bool:
        """Whether the destination can be written again: its fixed root is created if
        missing (as a delivery would), and a small hidden file is written there, synced
        and removed (a full disk, a read-only mount or a file in the way says no)."""
        return sending.writable(self.root)

    def send(self, batch: Sequence[SpooledInstance]) -> list[Outcome]:
        dirty: set[Path] = set()
        outcomes: list[Outcome] = []
        written: list[tuple[SpooledInstance, Path]] = []
        try:
            for instance in batch:
                try:
                    outcome, target, kept = self._write(instance, dirty)
                except sending.Unsendable as exc:
                    outcomes.append(exc.outcome)
                    continue
                outcomes.append(outcome)
                if target is not None:
                    written.append((kept, target))
            try:
                for folder in dirty:
                    fsync_dir(folder)
            except OSError as exc:
                raise UpstreamUnavailable(f"cannot sync {self.name}: {exc.strerror}") from exc
            self.after_batch(written)
        except BaseException:
            self.abandon(written)
            raise
        return outcomes

    def abandon(self, written: list[tuple[SpooledInstance, Path]]) -> None:
        """Hook for subclasses: the batch failed as a whole (its rows are sent again
        later), after ``written`` were placed."""

    def after_batch(self, written: list[tuple[SpooledInstance, Path]]) -> None:
        """Hook for subclasses: the files are durable. Each instance is as written: a
        modified copy's has the copy's UIDs, attributes, size and hash."""

    def _write(self, instance: SpooledInstance, dirty: set[Path]) -> tuple[Outcome, Path | None, SpooledInstance]:
        if not instance.spool_path.exists():
            raise sending.spool_file_missing()
        copy: ModifiedCopy | None = None
        try:
            if instance.modify is not None:
                copy = sending.modified_copy(instance)
                header: Dataset | None = copy.header
                instance = copy.describe(instance)  # the path is rendered from the copy's values
            else:
                header = read_header(instance.spool_path) if self._needs_header else None
        except InboundError as exc:
            return Permanent(f"cannot read header: {exc.reason}"), None, instance
        except FileNotFoundError as exc:
            raise sending.spool_file_missing() from exc
        folder = self.root.joinpath(*(self._render(c, instance, header) for c in self._components))
        target = folder / self._render(self.filename_template, instance, header)
        if not _inside(target, self.root):
            return Permanent("rendered path leaves the destination folder"), None, instance
        try:
            self._makedirs(folder, dirty)
            if target.exists():
                if self.duplicates == "keep-first":
                    return Duplicate("file exists (keep-first)"), None, instance
                sha256 = instance.sha256 if copy is None else copy.sha256()
                if self.duplicates == "keep-both" and sha256_file(target) != sha256:
                    target = target.with_name(f"{target.stem}~{sha256[:12]}{target.suffix}")
                    if target.exists():
                        return Duplicate("this content is already present (keep-both)"), None, instance
            if copy is None:
                self._place(instance.spool_path, target)
            else:
                instance = replace(instance, sha256=self._place_copy(copy, target))
        except FileNotFoundError as exc:
            if not instance.spool_path.exists():
                raise sending.spool_file_missing() from exc
            raise UpstreamUnavailable(f"cannot write to {self.name}: {exc.strerror}") from exc
        except OSError as exc:
            if exc.errno in _DESTINATION_ERRNOS:
                raise UpstreamUnavailable(f"cannot write to {self.name}: {exc.strerror}") from exc
            raise
        dirty.add(target.parent)
        return Done(), target, instance

    def _place(self, source: Path, target: Path) -> None:
        temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            if self.link:
                try:
                    os.link(source, temp)
                except OSError:
                    shutil.copyfile(source, temp)
                    fsync_file(temp)
            else:
                shutil.copyfile(source, temp)
                fsync_file(temp)
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def _place_copy(self, copy: ModifiedCopy, target: Path) -> str:
        """Write a modified copy atomically (never a link: the spool file is the original);
        returns its SHA-256."""
        temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            with open(temp, "xb") as out:
                sha256 = copy.write(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return sha256

    def _makedirs(self, folder: Path, dirty: set[Path]) -> None:
        missing = []
        probe = folder
        while not probe.is_dir():
            missing.append(probe)
            probe = probe.parent
        for path in reversed(missing):
            if path.exists():
                raise UpstreamUnavailable(f"cannot create folder {path}: a file is in the way")
            path.mkdir()
            dirty.add(path.parent)

    def _render(self, template: str, instance: SpooledInstance, header: Dataset | None) -> str:
        """One path component: fields become validated UIDs or sanitised values; never ``..``."""
        values = {}
        for keyword in template_fields(template):
            if keyword in _KNOWN:
                raw = getattr(instance, _KNOWN[keyword])
            else:
                value = header.get(keyword, "") if header is not None else ""
                raw = "" if value is None else str(value)
            values[keyword] = raw if is_valid_uid(raw) else sanitise(raw)
        rendered = template.format(**values)
        return sanitise(rendered, max_length=255) if "/" in rendered or rendered in ("", ".", "..") else rendered


def _inside(path: Path, root: Path) -> bool:
    root_abs = os.path.abspath(root)
    return os.path.commonpath([root_abs, os.path.abspath(path)]) == root_abs


class FolderDestination(FileDestination):
    def __init__(self, name: str, config: FolderConfig) -> None:
        super().__init__(name, config.path, config.filename, config.duplicates)
