"""``dicom-bridge rad69 fetch`` and ``dicom-bridge fetch``: a study, a series or instances
retrieved into a folder, run as a user runs it (a subprocess), against Orthanc with its
DICOMweb plugin (a ``dicomweb`` source) and against the local archive (``local``). The
command is generic over sources: with no ``rad69`` source in the configuration it takes
the only source there is, or the one ``--source`` names.

What a user sees: the files, byte for byte as the server holds them, named by SOP
Instance UID; the summary line; a line per instance that did not come; the exit status.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import forkserver
import pydicom
import pytest
import yaml
from corpus import write_ct
from peers import REPO, Orthanc, free_port, on_a_terminal
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from test_local_source import Archive

from bridge.cli.fetch import RAD69, Usage, choose_source, deliver
from bridge.model import InstanceRef
from bridge.sources.retrieval import Fetched

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
SUMMARY = re.compile(r"(\d+) retrieved, (\d+) failed of (\d+) located(, \d+ not found)? in \d+\.\d s")


def fetch(*args: str | Path, command: tuple[str, ...] = ("rad69", "fetch"),
          timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return forkserver.run([*command, *map(str, args)], env=ENV, timeout=timeout)


def summary(result: subprocess.CompletedProcess[str]) -> tuple[int, int, int]:
    """(retrieved, failed, located) of the summary line, the last line of stdout."""
    match = SUMMARY.fullmatch(result.stdout.strip().splitlines()[-1])
    assert match, result.stdout
    return int(match[1]), int(match[2]), int(match[3])


def config(tmp_path: Path, sources: dict[str, Any], **more: Any) -> Path:
    """A configuration with ``sources``, its data under ``tmp_path/data``; a folder
    destination unless ``more`` says otherwise (no destination would bring the embedded
    default's archive, and with it the source ``local``)."""
    settings = {"data_dir": str(tmp_path / "data"), "sources": sources,
                "destinations": {"out": {"type": "folder", "path": str(tmp_path / "routed")}}, **more}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def incoming(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "data" / "spool" / "incoming"
    return sorted(folder.iterdir()) if folder.exists() else []


class Pacs:
    """An Orthanc holding one study: a CT series of three and a series of pydicom's files
    in their own transfer syntaxes; what Orthanc stored of each, by SOP Instance UID."""

    def __init__(self, orthanc: Orthanc, workdir: Path) -> None:
        self.orthanc = orthanc
        self.study = generate_uid()
        self.ct_series, self.mixed_series = generate_uid(), generate_uid()
        self.series: dict[str, list[str]] = {self.ct_series: [], self.mixed_series: []}
        pixels = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array
        for n in range(3):
            self._post(write_ct(workdir / f"ct{n}.dcm", self.study, self.ct_series, n + 1, pixels))
        for n, name in enumerate(["MR_small_implicit.dcm", "JPEG2000.dcm"]):
            ds = pydicom.dcmread(get_testdata_file(name))
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = self.study, self.mixed_series, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = n + 1
            ds.save_as(workdir / f"mixed{n}.dcm", enforce_file_format=True)
            self._post(workdir / f"mixed{n}.dcm")
        self.held = {f"{uid}.dcm": orthanc.get_bytes(f"/instances/{orthanc_id}/file")
                     for uid, orthanc_id in orthanc.instance_uids().items()}

    def _post(self, path: Path) -> None:
        request = urllib.request.Request(self.orthanc.url + "/instances", data=path.read_bytes(), method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        self.series[str(ds.SeriesInstanceUID)].append(str(ds.SOPInstanceUID))

    def web(self) -> dict[str, Any]:
        return {"web": {"type": "dicomweb", "url": self.orthanc.dicomweb}}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacs]:
    workdir = tmp_path_factory.mktemp("fetch")
    orthanc = Orthanc(workdir / "orthanc").start()
    try:
        yield Pacs(orthanc, workdir)
    finally:
        orthanc.stop()


# -- from a DICOMweb server ---------------------------------------------------------------------

def test_a_study_comes_to_the_folder_as_the_server_holds_it(pacs: Pacs, tmp_path: Path) -> None:
    out = tmp_path / "out" / "deeper"  # made when missing
    result = fetch("--config", config(tmp_path, pacs.web()), "--study", pacs.study, "-o", out)
    assert result.returncode == 0, result.stderr
    assert summary(result) == (5, 0, 5)
    assert files(out) == pacs.held  # <SOPInstanceUID>.dcm, byte for byte: not transcoded
    assert result.stderr == ""  # no progress bar off a terminal, nothing logged
    assert incoming(tmp_path) == []  # every temporary file was moved out


def test_a_series_only_that_series(pacs: Pacs, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = fetch("--config", config(tmp_path, pacs.web()), "--study", pacs.study, "--series", pacs.mixed_series,
                   "-o", out)
    assert result.returncode == 0, result.stderr
    assert summary(result) == (2, 0, 2)
    assert files(out) == {f"{uid}.dcm": pacs.held[f"{uid}.dcm"] for uid in pacs.series[pacs.mixed_series]}


def test_instances_only_those_and_the_generic_command_too(pacs: Pacs, tmp_path: Path) -> None:
    wanted = [pacs.series[pacs.ct_series][2], pacs.series[pacs.mixed_series][0]]
    out = tmp_path / "out"
    result = fetch("--config", config(tmp_path, pacs.web()), "--study", pacs.study, "--instances", *wanted,
                   "-o", out, command=("fetch",))
    assert result.returncode == 0, result.stderr
    assert summary(result) == (2, 0, 2)
    assert files(out) == {f"{uid}.dcm": pacs.held[f"{uid}.dcm"] for uid in wanted}


def test_an_instance_the_server_lacks_is_named_and_exits_1(pacs: Pacs, tmp_path: Path) -> None:
    present, absent = pacs.series[pacs.ct_series][0], generate_uid()
    out = tmp_path / "out"
    result = fetch("--config", config(tmp_path, pacs.web()), "--study", pacs.study, "--series", pacs.ct_series,
                   "--instances", present, absent, "-o", out)
    assert result.returncode == 1, result.stderr
    assert result.stdout.strip().startswith("1 retrieved, 0 failed of 1 located, 1 not found in ")
    assert result.stderr.splitlines() == [
        f"{absent}: not found: source web locates no such instance in series {pacs.ct_series} of study {pacs.study}"]
    assert files(out) == {f"{present}.dcm": pacs.held[f"{present}.dcm"]}


def test_a_study_the_server_lacks_exits_1(pacs: Pacs, tmp_path: Path) -> None:
    study = generate_uid()
    result = fetch("--config", config(tmp_path, pacs.web()), "--study", study, "-o", tmp_path / "out")
    assert result.returncode == 1, result.stderr
    assert summary(result) == (0, 0, 0)
    assert result.stderr.strip() == f"study {study}: not found: source web locates no instance of it"


def test_to_another_file_system_temporary_files_are_copied_then_removed(pacs: Pacs, tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no other file system to write to")
    out = shm / f"fetch-{generate_uid()}"
    try:
        result = fetch("--config", config(tmp_path, pacs.web()), "--study", pacs.study, "-o", out)
        assert result.returncode == 0, result.stderr
        assert files(out) == pacs.held
        assert incoming(tmp_path) == []
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_an_unreachable_source_exits_2_with_the_reason_quickly(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    settings = {"web": {"type": "dicomweb", "url": f"http://127.0.0.1:{port}/dicom-web"}}
    started = time.monotonic()
    result = fetch("--config", config(tmp_path, settings), "--study", generate_uid(), "-o", tmp_path / "out")
    assert time.monotonic() - started < 20
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("dicom-bridge rad69 fetch: cannot locate study ")
    assert ": source web: " in line and "Connection refused" in line and f"127.0.0.1:{port}" in line, line
    assert result.stdout == ""
    assert "Traceback" not in result.stderr


def test_progress_bar_on_a_terminal(pacs: Pacs, tmp_path: Path) -> None:
    code, shown, output = on_a_terminal(["rad69", "fetch", "--config", str(config(tmp_path, pacs.web())),
                                         "--study", pacs.study, "-o", str(tmp_path / "out")], env=ENV)
    assert code == 0
    assert b"5/5" in shown and b"100%" in shown
    assert SUMMARY.fullmatch(output.strip())


# -- choosing the source, and what cannot run ----------------------------------------------------

def test_several_sources_without_source_exit_2_naming_them(pacs: Pacs, tmp_path: Path) -> None:
    settings = {**pacs.web(), "other": {"type": "dicomweb", "url": "http://127.0.0.1:1/dicom-web"}}
    path = config(tmp_path, settings)
    result = fetch("--config", path, "--study", pacs.study, "-o", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip() == "dicom-bridge rad69 fetch: several sources (web, other): choose one with --source"
    assert not (tmp_path / "out").exists()

    unknown = fetch("--config", path, "--study", pacs.study, "-o", tmp_path / "out", "--source", "pacs")
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == ("dicom-bridge rad69 fetch: no source 'pacs' in the configuration "
                                      "(sources: web, other)")

    chosen = fetch("--config", path, "--study", pacs.study, "--series", pacs.ct_series, "-o", tmp_path / "out",
                   "--source", "web")
    assert chosen.returncode == 0, chosen.stderr
    assert summary(chosen) == (3, 0, 3)


def test_an_invalid_configuration_or_uid_exits_2(tmp_path: Path) -> None:
    path = config(tmp_path, {"web": {"type": "dicomweb", "url": "http://127.0.0.1:1", "page_size": 0}})
    result = fetch("--config", path, "--study", generate_uid(), "-o", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == f"{path}: 1 error(s)"
    assert "sources.web.page_size" in result.stderr

    bad_uid = fetch("--config", path, "--study", "1.2.x", "-o", tmp_path / "out")
    assert bad_uid.returncode == 2
    assert "argument --study: not a UID: '1.2.x'" in bad_uid.stderr


def test_rad69_fetch_prefers_the_one_rad69_source() -> None:
    """Checked on the choice alone until the rad69 source type exists in the configuration:
    a configuration stands in for one with a rad69 source and the source that locates for it."""
    def configured(**types: str) -> Any:
        return SimpleNamespace(sources={n: SimpleNamespace(type=t) for n, t in types.items()}, destinations={})

    assert choose_source(configured(web="dicomweb", xds="rad69"), None, RAD69) == "xds"
    assert choose_source(configured(web="dicomweb", xds="rad69"), "web", RAD69) == "web"
    with pytest.raises(Usage, match=r"several sources \(web, xds\)"):
        choose_source(configured(web="dicomweb", xds="rad69"), None, None)  # dicom-bridge fetch
    with pytest.raises(Usage, match=r"several sources of type rad69 \(a, b\)"):
        choose_source(configured(a="rad69", b="rad69", web="dicomweb"), None, RAD69)
    assert choose_source(configured(web="dicomweb"), None, RAD69) == "web"
    with pytest.raises(Usage, match="has no source"):
        choose_source(configured(), None, RAD69)


# -- from the local archive ---------------------------------------------------------------------

def test_local_archive_files_are_copied_not_moved(tmp_path: Path) -> None:
    archive = Archive(tmp_path, tmp_path / "archive")
    study, series = generate_uid(), generate_uid()
    stored = [archive.file(StudyInstanceUID=study, SeriesInstanceUID=series) for _ in range(3)]
    archive.store(*stored)
    archive.close()
    held = {p: p.read_bytes() for p in (tmp_path / "archive").rglob("*.dcm")}
    assert len(held) == 3
    path = config(tmp_path, {}, destinations={"archive": {"type": "archive", "path": str(tmp_path / "archive")}})

    out = tmp_path / "out"
    result = fetch("--config", path, "--study", study, "-o", out)  # local, the only source
    assert result.returncode == 0, result.stderr
    assert summary(result) == (3, 0, 3)
    assert sorted(files(out).values()) == sorted(held.values())
    assert {p: p.read_bytes() for p in held} == held  # the archive still holds its files

    gone = next(iter(held))
    gone.unlink()
    again = fetch("--config", path, "--study", study, "-o", tmp_path / "again", "--source", "local")
    assert again.returncode == 1
    assert summary(again) == (2, 1, 3)
    [line] = again.stderr.splitlines()
    assert re.fullmatch(rf"[0-9.]+: failed: local: the archive's file {re.escape(str(gone))} is missing", line), line


def test_deliver_moves_a_temporary_file_and_copies_another(tmp_path: Path) -> None:
    ref = InstanceRef("1.2.3", "1.2.3.4", "1.2.3.4.5", "1.2.840.10008.5.1.4.1.1.2")
    out = tmp_path / "out"
    out.mkdir()
    kept = tmp_path / "kept.dcm"
    kept.write_bytes(b"archive")
    deliver(Fetched(ref, kept, "1.2.840.10008.1.2.1", ref.sop_class_uid, "local", temporary=False), out)
    assert kept.read_bytes() == b"archive" and (out / "1.2.3.4.5.dcm").read_bytes() == b"archive"
    spooled = tmp_path / "retrieved.dcm"
    spooled.write_bytes(b"spooled")
    deliver(Fetched(ref, spooled, "1.2.840.10008.1.2.1", ref.sop_class_uid, "web", temporary=True), out)
    assert not spooled.exists() and (out / "1.2.3.4.5.dcm").read_bytes() == b"spooled"
    assert sorted(p.name for p in out.iterdir()) == ["1.2.3.4.5.dcm"]
