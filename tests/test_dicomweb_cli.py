"""``dicom-bridge dicomweb``: lookup, pull, push and delete, run as a user runs them (a
subprocess) against Orthanc with its DICOMweb plugin; Orthanc stores each file as it
was received, so what is pulled is compared byte for byte with what was pushed."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import forkserver
import numpy as np
import pytest
import yaml
from corpus import write_ct
from peers import REPO, Orthanc
from pydicom.uid import generate_uid

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
PUSHED = re.compile(r"(\d+) stored, (\d+) already present, (\d+) failed, (\d+) not DICOM \(skipped\) in [\d.]+ s")
PULLED = re.compile(r"(\d+) retrieved, (\d+) already there, (\d+) failed, of (\d+) series into .* in [\d.]+ s")


def dicomweb(*args: str | Path, env: dict[str, str] | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return forkserver.run(["dicomweb", *map(str, args)], env=env or ENV, stdin=subprocess.DEVNULL, timeout=timeout)


def counts(pattern: re.Pattern[str], result: subprocess.CompletedProcess[str]) -> tuple[int, ...]:
    match = pattern.fullmatch(result.stdout.strip().splitlines()[-1])
    assert match, (result.stdout, result.stderr)
    return tuple(int(n) for n in match.groups())


def write_series(folder: Path, study: str, count: int, seed: int) -> tuple[str, list[Path]]:
    """A CT series of ``count`` instances in ``folder``; file names run against the
    InstanceNumbers, so that the pulled order must come from the numbers. The files in
    InstanceNumber order."""
    series = generate_uid()
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [write_ct(folder / f"img{count - n:03d}.dcm", study, series, n + 1,
                      rng.integers(0, 4096, (16, 16), dtype=np.uint16)) for n in range(count)]
    return series, paths


class Pacs:
    def __init__(self, orthanc: Orthanc, root: Path) -> None:
        self.orthanc = orthanc
        self.root = root
        self.url = orthanc.dicomweb
        self.study = generate_uid()
        self.tree = root / "tree"
        self.series_a, self.files_a = write_series(self.tree / "a", self.study, 5, 1)
        self.series_b, self.files_b = write_series(self.tree / "b", self.study, 3, 2)
        (self.tree / "a" / "notes.txt").write_text("not DICOM\n")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacs]:
    root = tmp_path_factory.mktemp("dicomweb-cli")
    orthanc = Orthanc(root / "orthanc").start()
    try:
        yield Pacs(orthanc, root)
    finally:
        orthanc.stop()


@pytest.fixture(scope="module")
def pushed(pacs: Pacs) -> Pacs:
    """The tree pushed: series a first (with --include, and its non-DICOM file), then the rest."""
    result = dicomweb("push", pacs.tree, "--include", r"^a/", "--url", pacs.url)
    assert result.returncode == 0, result.stderr
    assert counts(PUSHED, result) == (5, 0, 0, 1)
    assert "notes.txt: not DICOM, skipped" in result.stderr
    held = pacs.orthanc.instance_uids()
    assert sorted(held) == sorted(_uid(p) for p in pacs.files_a)
    result = dicomweb("push", pacs.tree, "--exclude", r"\.txt$", "--url", pacs.url, "--batch", "2")
    assert result.returncode == 0, result.stderr
    stored, present, failed, skipped = counts(PUSHED, result)
    assert (stored + present, failed, skipped) == (8, 0, 0)
    assert sorted(pacs.orthanc.instance_uids()) == sorted(_uid(p) for p in pacs.files_a + pacs.files_b)
    return pacs


def _uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_push_include_and_skip(pushed: Pacs) -> None:
    assert pushed.orthanc.count() >= 8


def test_lookup_both_ways(pushed: Pacs, tmp_path: Path) -> None:
    result = dicomweb("lookup", "--series", pushed.series_a, "--url", pushed.url)
    assert (result.returncode, result.stdout.strip()) == (0, pushed.study), result.stderr
    result = dicomweb("lookup", "--study", pushed.study, "--url", pushed.url)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == sorted([pushed.series_a, pushed.series_b])
    unknown = generate_uid()
    for level in ("--series", "--study"):
        result = dicomweb("lookup", level, unknown, "--url", pushed.url)
        assert result.returncode == 1
        assert f"{unknown} not found" in result.stderr
    # the same through a configured destination, with the config's retry settings
    config = tmp_path / "bridge.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "retry": {"initial": "1s"},
                                      "destinations": {"pacs": {"type": "dicomweb", "url": pushed.url}},
                                      "rules": [{"name": "all", "store": ["pacs"]}]}))
    result = dicomweb("lookup", "--series", pushed.series_b, "--config", config, "--target", "pacs")
    assert (result.returncode, result.stdout.strip()) == (0, pushed.study), result.stderr
    result = dicomweb("lookup", "--series", pushed.series_b, "--config", config, "--target", "nope")
    assert result.returncode == 2 and "no destination or source 'nope'" in result.stderr


def test_pull_resume_and_refuse(pushed: Pacs, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = dicomweb("pull", "--study", pushed.study, "-o", out, "--url", pushed.url, "--parallel", "2")
    assert result.returncode == 0, result.stderr
    assert counts(PULLED, result)[:4] == (8, 0, 0, 2)
    for series, files in ((pushed.series_a, pushed.files_a), (pushed.series_b, pushed.files_b)):
        folder = out / pushed.study / series
        assert sorted(p.name for p in folder.iterdir()) == [f"file{n:06d}.dcm" for n in range(len(files))]
        for n, original in enumerate(files):
            assert (folder / f"file{n:06d}.dcm").read_bytes() == original.read_bytes()

    result = dicomweb("pull", "--study", pushed.study, "-o", out, "--url", pushed.url)
    assert result.returncode == 2
    assert "exists: give --resume" in result.stderr

    folder = out / pushed.study / pushed.series_a
    for name in ("file000001.dcm", "file000003.dcm"):
        (folder / name).unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    time.sleep(0.05)
    result = dicomweb("pull", "--study", pushed.study, "--series", pushed.series_a, "-o", out,
                      "--url", pushed.url, "--resume")
    assert result.returncode == 0, result.stderr
    assert counts(PULLED, result)[:4] == (2, 3, 0, 1)
    assert {name: (folder / name).stat().st_mtime_ns for name in kept} == kept
    for n, original in enumerate(pushed.files_a):
        assert (folder / f"file{n:06d}.dcm").read_bytes() == original.read_bytes()

    flat = tmp_path / "flat"
    result = dicomweb("pull", "--study", pushed.study, "--series", pushed.series_b, "-o", flat,
                      "--no-study-folder", "--url", pushed.url)
    assert result.returncode == 0, result.stderr
    assert len(list((flat / pushed.series_b).iterdir())) == 3

    result = dicomweb("pull", "--study", generate_uid(), "-o", tmp_path / "none", "--url", pushed.url)
    assert result.returncode == 1 and "not found" in result.stderr


def test_delete_through_orthanc_rest(pacs: Pacs, tmp_path: Path) -> None:
    study = generate_uid()
    series_1, _ = write_series(tmp_path / "d" / "1", study, 2, 3)
    series_2, _ = write_series(tmp_path / "d" / "2", study, 2, 4)
    assert dicomweb("push", tmp_path / "d", "--url", pacs.url).returncode == 0
    args: list[Any] = ["--url", pacs.url, "--orthanc-rest", pacs.orthanc.url]

    result = dicomweb("delete", "--study", study, "--series", series_1, *args)
    assert result.returncode == 2 and "--yes" in result.stderr  # not a terminal, no --yes
    result = dicomweb("delete", "--study", study, "--series", series_1, "--url", pacs.url, "--yes")
    assert result.returncode == 1 and "--orthanc-rest" in result.stderr  # Orthanc has no DICOMweb DELETE

    result = dicomweb("delete", "--study", study, "--series", series_1, *args, "--yes")
    assert result.returncode == 0, result.stderr
    assert dicomweb("lookup", "--series", series_1, "--url", pacs.url).returncode == 1
    assert dicomweb("lookup", "--series", series_2, "--url", pacs.url).stdout.strip() == study

    result = dicomweb("delete", "--study", study, *args, "--yes")
    assert result.returncode == 0, result.stderr
    result = dicomweb("lookup", "--study", study, "--url", pacs.url)
    assert result.returncode == 1 and "not found" in result.stderr
    result = dicomweb("delete", "--study", study, *args, "--yes")
    assert result.returncode == 1 and "not found" in result.stderr


def test_url_with_credentials_from_env(tmp_path: Path) -> None:
    orthanc = Orthanc(tmp_path / "orthanc", users={"alice": "s3cret"}).start()
    try:
        study = generate_uid()
        series, _ = write_series(tmp_path / "tree", study, 2, 5)
        env = {**ENV, "PACS_PASSWORD": "s3cret"}
        auth = ["--url", orthanc.dicomweb, "--user", "alice", "--password", "env:PACS_PASSWORD"]
        result = dicomweb("push", tmp_path / "tree", *auth, env=env)
        assert result.returncode == 0, result.stderr
        result = dicomweb("lookup", "--series", series, *auth, env=env)
        assert (result.returncode, result.stdout.strip()) == (0, study), result.stderr
        secret = tmp_path / "password"
        secret.write_text("s3cret\n")
        result = dicomweb("lookup", "--study", study, "--url", orthanc.dicomweb, "--user", "alice",
                          "--password-file", secret)
        assert (result.returncode, result.stdout.strip()) == (0, series), result.stderr

        result = dicomweb("lookup", "--series", series, "--url", orthanc.dicomweb, "--retries", "0")
        assert result.returncode == 1 and "401" in result.stderr
        result = dicomweb("lookup", "--series", series, "--url", orthanc.dicomweb, "--user", "alice",
                          "--password", "s3cret")
        assert result.returncode == 2 and "never written inline" in result.stderr
        assert "s3cret" not in result.stderr
    finally:
        orthanc.stop()


def test_push_failure_exits_1(tmp_path: Path) -> None:
    study = generate_uid()
    write_series(tmp_path / "tree", study, 1, 6)
    result = dicomweb("push", tmp_path / "tree", "--url", "http://127.0.0.1:9/dicom-web", "--retries", "1",
                      "--backoff", "0.01")
    assert result.returncode == 1
    assert counts(PUSHED, result)[:3] == (0, 0, 1)
    assert "img001.dcm" in result.stderr


BEARER_FILTER = """
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  return httpHeaders['authorization'] == 'Bearer t0ken-abc'
end
"""


def test_url_with_a_bearer_token_from_env(tmp_path: Path) -> None:
    orthanc = Orthanc(tmp_path / "orthanc", lua=BEARER_FILTER,
                      headers={"Authorization": "Bearer t0ken-abc"}).start()
    try:
        study = generate_uid()
        series, files = write_series(tmp_path / "tree", study, 2, 7)
        env = {**ENV, "PACS_TOKEN": "t0ken-abc"}
        auth = ["--url", orthanc.dicomweb, "--token", "env:PACS_TOKEN"]
        result = dicomweb("push", tmp_path / "tree", *auth, env=env)
        assert result.returncode == 0, result.stderr
        assert sorted(orthanc.instance_uids()) == sorted(_uid(p) for p in files)
        result = dicomweb("pull", "--study", study, "-o", tmp_path / "out", *auth, env=env)
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "out" / study / series / "file000001.dcm").read_bytes() == files[1].read_bytes()
        result = dicomweb("lookup", "--study", study, "--url", orthanc.dicomweb, "--token", "env:NOT_SET",
                          env=env)
        assert result.returncode == 1 and "NOT_SET" in result.stderr
    finally:
        orthanc.stop()


def test_retry_settings(tmp_path: Path) -> None:
    import json
    from http.server import BaseHTTPRequestHandler

    import fakehttp
    from peers import free_port

    requests: list[str] = []
    study, series = generate_uid(), generate_uid()

    def get(handler: BaseHTTPRequestHandler) -> None:
        requests.append(handler.path)
        if len(requests) % 3 != 0:  # two refusals, then the answer
            handler.send_response(503)
            handler.send_header("Retry-After", "0")
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        body = json.dumps([{"0020000D": {"vr": "UI", "Value": [study]},
                            "0020000E": {"vr": "UI", "Value": [series]}}]).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/dicom+json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    port = free_port()
    server = fakehttp.serve(port, get, "fake-qido")
    try:
        url = f"http://127.0.0.1:{port}/dicom-web"
        result = dicomweb("lookup", "--series", series, "--url", url, "--retries", "2", "--backoff", "0.01")
        assert (result.returncode, result.stdout.strip(), len(requests)) == (0, study, 3), result.stderr
        requests.clear()
        result = dicomweb("lookup", "--series", series, "--url", url, "--retries", "1", "--backoff", "0.01")
        assert result.returncode == 1 and "503" in result.stderr and len(requests) == 2
        requests.clear()
        result = dicomweb("lookup", "--series", series, "--url", url, "--retries", "5", "--retry-on", "500,502")
        assert result.returncode == 1 and "503" in result.stderr and len(requests) == 1
        config = tmp_path / "bridge.yaml"
        config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"),
                                          "retry": {"initial": "10ms", "max_attempts": 3},
                                          "sources": {"qido": {"type": "dicomweb", "url": url}}}))
        requests.clear()
        result = dicomweb("lookup", "--series", series, "--config", config, "--target", "qido")
        assert (result.returncode, result.stdout.strip(), len(requests)) == (0, study, 3), result.stderr
    finally:
        fakehttp.close(server)
