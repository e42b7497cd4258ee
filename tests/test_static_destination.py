"""The ``static`` destination in a running daemon: a study stored by DCMTK's storescu, and
files dropped into a watched folder (slowly, and zipped), end as a consistent static
DICOMweb tree. The tree is read as a web server would serve it: the gzipped JSON files."""

from __future__ import annotations

import gzip
import json
import shutil
import time
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from corpus import ct_series, with_uid
from peers import storescu, wait_for
from pydicom.uid import generate_uid

from bridge.config import StaticDestination as StaticConfig
from bridge.config import validate
from bridge.destinations.static import StaticDestination
from bridge.errors import ConfigError, UpstreamUnavailable
from bridge.model import Done, Duplicate, Permanent, SpooledInstance


def gz(path: Path) -> Any:
    try:
        return json.loads(gzip.decompress(path.read_bytes()))
    except FileNotFoundError:
        return None


def value(obj: dict[str, Any], tag: str) -> Any:
    return (obj.get(tag, {}).get("Value") or [None])[0]


def study_counts(tree: Path, study: str) -> tuple[int, int] | None:
    found = gz(tree / "studies" / study / "index.json.gz")
    return (value(found[0], "00201206"), value(found[0], "00201208")) if found else None


def check_tree(tree: Path, study: str, per_series: dict[str, int]) -> None:
    """Every query and metadata file of the study counts what was sent."""
    assert [value(s, "0020000D") for s in gz(tree / "studies" / "index.json.gz")] == [study]
    [query] = gz(tree / "studies" / study / "index.json.gz")
    assert value(query, "00201206") == len(per_series)
    assert value(query, "00201208") == sum(per_series.values())
    series = gz(tree / "studies" / study / "series" / "index.json.gz")
    assert {value(s, "0020000E"): value(s, "00201209") for s in series} == per_series
    for uid, count in per_series.items():
        folder = tree / "studies" / study / "series" / uid
        [singleton] = gz(folder / "series-singleton.json.gz")
        assert value(singleton, "00201209") == count
        assert len(gz(folder / "metadata.gz")) == count
        assert len(gz(folder / "instances" / "index.json.gz")) == count
        assert len(list((folder / "instances").glob("*/metadata.gz"))) == count
    assert not [p for p in tree.rglob("*") if p.name.endswith(".tmp")]


def test_storescu_study_to_four_workers(tmp_path: Path, bridge_factory: Any) -> None:
    study = generate_uid()
    files = [*ct_series(tmp_path / "s1", 40, study_uid=study), *ct_series(tmp_path / "s2", 25, study_uid=study),
             *ct_series(tmp_path / "s3", 15, study_uid=study)]
    per_series: dict[str, int] = {}
    for path in files:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
        per_series[uid] = per_series.get(uid, 0) + 1
    tree = tmp_path / "tree"
    bridge = bridge_factory({
        "destinations": {"viewer": {"type": "static", "path": str(tree), "workers": 4,
                                    "batch": {"max_instances": 5, "linger": "0s"}}},
        "rules": [{"name": "all", "store": ["viewer"]}],
    })
    result = storescu(bridge.port, files)
    assert result.statuses == [0] * len(files), result.output
    wait_for(lambda: bridge.queue_states().get("done", 0) == len(files), 120, "every row done")
    assert bridge.queue_states() == {"done": len(files)}
    check_tree(tree, study, per_series)


def test_watch_folder_to_static(tmp_path: Path, bridge_factory: Any) -> None:
    study = generate_uid()
    slow = ct_series(tmp_path / "slow", 6, study_uid=study)
    zipped = ct_series(tmp_path / "zipped", 5, study_uid=study)
    watched, failed, tree = tmp_path / "watched", tmp_path / "failed", tmp_path / "tree"
    watched.mkdir()
    bridge = bridge_factory({
        "destinations": {"viewer": {"type": "static", "path": str(tree)}},
        "rules": [{"name": "all", "store": ["viewer"]}],
        "watch": [{"path": str(watched), "failed": str(failed), "after": "delete", "settle": "1s",
                   "rescan": "2s", "zip": {"enabled": True}}],
    })
    archive = tmp_path / "cd.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in zipped:
            z.write(path, f"DICOM/{path.name}")
    for path in slow:  # one at a time, as a person copying files would
        shutil.copy(path, watched / f".{path.name}.part")
        (watched / f".{path.name}.part").rename(watched / path.name)
        time.sleep(0.3)
    shutil.copy(archive, watched / ".cd.zip.part")
    (watched / ".cd.zip.part").rename(watched / "cd.zip")

    series = {str(pydicom.dcmread(p[0], stop_before_pixels=True).SeriesInstanceUID): len(p) for p in (slow, zipped)}
    wait_for(lambda: study_counts(tree, study) == (2, 11), 120, "the tree to count 2 series and 11 instances",
             interval=0.2)
    wait_for(lambda: not any(watched.iterdir()), 60, "the watched folder to be emptied")
    check_tree(tree, study, series)
    assert not failed.exists() or not any(failed.rglob("*"))
    assert bridge.stop() == 0


def test_keep_both_is_refused() -> None:
    with pytest.raises(ConfigError, match="one instance per SOP Instance UID"):
        validate({"destinations": {"viewer": {"type": "static", "path": "/srv/tree", "duplicates": "keep-both"}},
                  "rules": [{"name": "all", "store": ["viewer"]}]}, base=Path("/"))


def spooled(path: Path) -> SpooledInstance:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return SpooledInstance(spool_path=path, size=path.stat().st_size, sha256="", sop_class_uid=ds.SOPClassUID,
                           sop_instance_uid=ds.SOPInstanceUID, study_uid=ds.StudyInstanceUID,
                           series_uid=ds.SeriesInstanceUID, transfer_syntax=ds.file_meta.TransferSyntaxUID,
                           calling_ae="TEST", called_ae="BRIDGE", peer="127.0.0.1", received_at=datetime.now())


def test_outcomes_and_an_unwritable_tree(tmp_path: Path) -> None:
    good, other = ct_series(tmp_path / "ct", 2)
    bad = with_uid(other, tmp_path / "bad.dcm", SOPInstanceUID="1.2.x")
    config = StaticConfig(type="static", path=str(tmp_path / "tree"))
    destination = StaticDestination("viewer", config, tmp_path / "temp")
    outcomes = destination.send([spooled(good), spooled(bad)])
    assert outcomes[0] == Done()
    assert isinstance(outcomes[1], Permanent) and "invalid SOPInstanceUID" in outcomes[1].reason
    assert isinstance(destination.send([spooled(good)])[0], Duplicate)
    assert destination.probe()

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the tree should be")
    unwritable = StaticDestination("viewer", StaticConfig(type="static", path=str(blocked)), tmp_path / "temp")
    with pytest.raises(UpstreamUnavailable, match="cannot write to viewer"):
        unwritable.send([spooled(other)])
    assert not unwritable.probe()
