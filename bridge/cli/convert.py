"""``dicom-bridge convert INPUT... -o DIR``: DICOM files and folders into a static
DICOMweb tree (``bridge.static.tree``), as the ``static`` destination writes it.

Files are converted in batches of ``BATCH`` (each series and study rewritten once a
batch), so memory stays bounded whatever the input's size: a frame at a time, a batch's
instances' metadata, a series' metadata while it is rewritten.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.config.destinations import RECOMPRESS_SYNTAXES

if TYPE_CHECKING:
    from bridge.static.tree import Result

BATCH = 50


def register(commands: Any) -> None:
    convert = commands.add_parser(
        "convert", help="convert DICOM files and folders into a static DICOMweb tree",
        description="Convert DICOM files (folders are walked recursively) into a static DICOMweb tree under "
                    "DIR, in the layout a plain web server serves to viewers such as OHIF (docs/static.md). "
                    "Converting the same files again changes nothing; new instances are added to what DIR "
                    "holds. Files that are not DICOM are reported and skipped. A progress bar is shown when "
                    "stderr is a terminal. Exit status: 0 when every DICOM file was converted, 1 when any "
                    "failed (each is listed with the reason) or an input is missing, 2 when DIR cannot be "
                    "written.")
    convert.add_argument("inputs", type=Path, nargs="+", metavar="INPUT", help="DICOM files or folders")
    convert.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="the tree's root folder")
    convert.add_argument("--recompress", choices=list(RECOMPRESS_SYNTAXES), metavar="SYNTAX",
                         help="write native and lossless JPEG 2000 frames in this lossless syntax: "
                              f"{', '.join(RECOMPRESS_SYNTAXES)} (an image the encoder cannot take is written as "
                              "it is, with a warning); default: every frame in its own syntax")
    convert.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here: the codecs it loads take a third of a second, which every other
    # command of dicom-bridge would pay at start.
    from bridge.static.tree import StaticTree

    missing = [p for p in args.inputs if not p.exists()]
    for path in missing:
        print(f"{path}: no such file or folder", file=sys.stderr)
    paths = list(_files([p for p in args.inputs if p.exists()], args.output))
    tree = StaticTree(args.output, recompress=args.recompress)
    results: list[Result] = []
    progress = _progress(len(paths))
    try:
        for start in range(0, len(paths), BATCH):
            with warnings.catch_warnings():
                # pydicom warns of each odd value it reads; failures are listed with their reason.
                warnings.simplefilter("ignore", UserWarning)
                batch = tree.add(paths[start:start + BATCH])
            results += batch
            if progress is not None:
                progress.update(len(batch))
    except OSError as exc:
        print(f"dicom-bridge convert: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    finally:
        if progress is not None:
            progress.close()
    for result in results:
        if result.status == "skipped":
            print(f"{result.path}: skipped: {_reason(result)}", file=sys.stderr)
        if result.warning:
            print(f"{result.path}: {result.warning}", file=sys.stderr)
    failed = [r for r in results if r.status == "failed"]
    for result in failed:
        print(f"{result.path}: failed: {result.reason}", file=sys.stderr)
    print(summary(results))
    return 1 if failed or missing else 0


def summary(results: Sequence[Result]) -> str:
    """``N instances added, N unchanged, N studies, N errors, N skipped (not DICOM)``."""
    def count(status: str) -> int:
        return sum(r.status == status for r in results)

    studies = {r.study_uid for r in results if r.status in ("added", "unchanged")}
    return (f"{count('added')} instances added, {count('unchanged')} unchanged, {len(studies)} studies, "
            f"{count('failed')} errors, {count('skipped')} skipped (not DICOM)")


def _files(inputs: Sequence[Path], output: Path) -> Iterator[Path]:
    """The files of ``inputs`` (folders walked, in name order), leaving out the tree's own."""
    tree = os.path.abspath(output)
    for path in inputs:
        if not path.is_dir():
            yield path
            continue
        for folder, subfolders, names in os.walk(path):
            subfolders[:] = sorted(d for d in subfolders if os.path.abspath(os.path.join(folder, d)) != tree)
            for name in sorted(names):
                yield Path(folder, name)


def _reason(result: Result) -> str:
    if result.path.suffix.lower() == ".zip":
        return "a zip archive (not taken apart: unzip it first)"
    return result.reason


def _progress(total: int) -> Any:
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="file", file=sys.stderr)
