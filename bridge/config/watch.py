"""The watch schema: folders whose new DICOM files enter the rules and the queue as a
C-STORE would (docs/watch.md), and the check that no two of them feed each other."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from bridge.config.units import parse_size
from bridge.config.values import AETitle, ByteSize, Duration, Model


class WatchZip(Model):
    """Zip archives dropped into a watched folder: their members are taken as files."""

    enabled: bool = Field(False, description="take *.zip files apart (off: a zip is not DICOM and fails)")
    max_expanded: ByteSize = Field(parse_size("4GiB"), ge=1, description="most bytes one zip may expand to")
    max_ratio: float = Field(200.0, ge=1, description="most a zip may expand, as a multiple of its own size")


class Watch(Model):
    """A folder whose new DICOM files enter the rules and the queue as a C-STORE would."""

    path: Path = Field(description="the folder watched")
    name: str | None = Field(None, description="the label in logs and metrics (default: the path)")
    recursive: bool = Field(True, description="watch subfolders too")
    include: list[str] = Field(default_factory=lambda: ["*"], description="globs a file's name or relative "
                               "path must match")
    exclude: list[str] = Field(default_factory=list, description="globs that leave a file alone")
    calling_ae: AETitle = Field("WATCH", description="the calling AE title rules see for these files")
    called_ae: AETitle | None = Field(None, description="the called AE title rules see (default: ae_title)")
    peer: str | None = Field(None, description="the peer rules see (default: watch:<path>)")
    after: Literal["delete", "move"] = Field("delete", description="what happens to a file once it is queued")
    move_to: Path | None = Field(None, description="with after: move, where files go (relative path kept)")
    failed: Path = Field(description="where files that cannot be taken go, each with a .reason file")
    observer: Literal["inotify", "polling"] = Field(
        "inotify", description="inotify, or polling for network shares written by other machines",
    )
    poll_interval: Duration = Field(2.0, gt=0, description="with observer: polling, how often to look")
    settle: Duration = Field(2.0, ge=0, description="a file must be unchanged this long before it is taken")
    rescan: Duration = Field(60.0, gt=0, description="look at the whole folder this often, for missed events")
    incomplete_timeout: Duration = Field(
        300.0, ge=0, description="a file that parses as truncated is retried until unchanged this long",
    )
    zip: WatchZip = Field(default_factory=WatchZip)

    @model_validator(mode="after")
    def _after(self) -> Watch:
        if self.after == "move" and self.move_to is None:
            raise ValueError("after: move needs move_to")
        if self.after == "delete" and self.move_to is not None:
            raise ValueError("move_to is only used with after: move")
        return self

    @property
    def label(self) -> str:
        return self.name or str(self.path)


def valid_watches(raw: Any) -> list[tuple[int, Watch]]:
    """The entries of a ``watch`` list that are valid on their own, with their index in
    the file (the whole model's validation reports why the others are not)."""
    if not isinstance(raw, list):
        return []
    watches = []
    for i, entry in enumerate(raw):
        try:
            watches.append((i, Watch.model_validate(entry)))
        except ValidationError:
            pass
    return watches


def watch_overlaps(watches: list[tuple[int, Watch]]) -> list[str]:
    """Folders that would feed each other: a watched folder inside another recursive one,
    a failed or move_to folder that is watched itself; and labels used twice."""
    def watched_by(path: Path, other: Watch) -> bool:
        return path == other.path or (other.recursive and path.is_relative_to(other.path))

    errors = []
    seen: dict[str, int] = {}
    for i, watch in watches:
        if watch.label in seen:
            errors.append(f"watch[{i}]: {watch.label!r} is already watch[{seen[watch.label]}]"
                          " (give one of them another name)")
        seen.setdefault(watch.label, i)
        for j, other in watches:
            if i != j and watched_by(watch.path, other):
                errors.append(f"watch[{i}].path: {watch.path} is also watched by watch[{j}]")
            for key in ("failed", "move_to"):
                target = getattr(watch, key)
                if target is not None and watched_by(target, other):
                    errors.append(f"watch[{i}].{key}: {target} is inside the watched folder {other.path}")
    return errors
