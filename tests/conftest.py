from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pynetdicom
import pynetdicom.association
import pynetdicom.dimse
import pynetdicom.dimse_messages
import pynetdicom.dul
import pynetdicom.fsm
import pynetdicom.pdu_items
import pynetdicom.presentation
import pynetdicom.service_class
import pynetdicom.transport
import pytest
from pydicom import config as pydicom_config

sys.path.insert(0, str(Path(__file__).parent))

from corpus import ct_series, fresh_copies  # noqa: E402
from peers import Bridge, Orthanc  # noqa: E402
from retrievepeers import MoveDestination  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fuzz-seconds", type=float, default=3.0,
                     help="how long each fuzz test of tests/test_hostile_peers.py runs (default 3)")


@pytest.fixture
def fuzz_seconds(request: pytest.FixtureRequest) -> float:
    return float(request.config.getoption("--fuzz-seconds"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """pydicom's usable test files with fresh UIDs (every syntax pydicom ships)."""
    return fresh_copies(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    return ct_series(tmp_path / "series", 10)


@pytest.fixture
def bridge_factory(tmp_path: Path):
    """Start daemons with a given config; every one is stopped at the end of the test."""
    started: list[Bridge] = []

    def make(config: dict, name: str = "bridge", start: bool = True) -> Bridge:
        bridge = Bridge(tmp_path / name, config)
        started.append(bridge)
        return bridge.start() if start else bridge

    yield make
    for bridge in started:
        if bridge.proc is not None and bridge.proc.poll() is None:
            bridge.kill()


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory, shared_config: dict) -> Iterator[Bridge]:
    """One daemon for the tests of a module that neither change its configuration (the
    module's ``shared_config`` fixture) nor stop it; tests take it as ``shared_bridge``."""
    bridge = Bridge(tmp_path_factory.mktemp("shared-bridge"), shared_config).start()
    yield bridge
    if bridge.proc is not None and bridge.proc.poll() is None:
        bridge.kill()


@pytest.fixture
def shared_bridge(shared_daemon: Bridge) -> Iterator[Bridge]:
    """The module's shared daemon; its ``log()`` holds this test's lines only, and it must
    still run when the test is done (else the tests after it would fail for this one)."""
    shared_daemon.skip_log()
    yield shared_daemon
    assert shared_daemon.proc is not None and shared_daemon.proc.poll() is None, \
        f"the shared daemon ended during this test:\n{shared_daemon.log()[-3000:]}"


@pytest.fixture
def orthanc_factory(tmp_path: Path):
    """Start private Orthancs (DICOMweb plugin on); every one is stopped at the end of the test."""
    started: list[Orthanc] = []

    def make(name: str = "orthanc", **options: Any) -> Orthanc:
        orthanc = Orthanc(tmp_path / name, **options)
        started.append(orthanc)
        return orthanc.start()

    yield make
    for orthanc in started:
        orthanc.stop()


@pytest.fixture(scope="module")
def move_destination(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MoveDestination]:
    """A ``storescp`` as the C-MOVE destination STORESCP (``retrievepeers.MoveDestination``),
    one for the tests of a module; a bridge's ``nodes`` name it by its ``aet`` and ``port``."""
    scp = MoveDestination(tmp_path_factory.mktemp("storescp"), "STORESCP")
    try:
        yield scp.start()
    finally:
        scp.stop()


@pytest.fixture
def destination(move_destination: MoveDestination) -> MoveDestination:
    """The module's ``move_destination``, emptied for this test."""
    move_destination.clear()
    return move_destination


@pytest.fixture
def raw_scu():
    """A pynetdicom AE that sends files as they are on disk (no parsing, no fixing)."""
    from pynetdicom import AE, _config

    saved = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="RAWSCU")
    yield ae
    ae.shutdown()
    _config.STORE_SEND_CHUNKED_DATASET = saved


@pytest.fixture
def tmpfs_factory(tmp_path):
    """Mount small tmpfs file systems (really full disks for the tests); unmounted at the
    end. ``size`` is tmpfs's option, other options may follow it (``"4m,nr_inodes=320"``)."""
    mounted: list[Path] = []

    def mount(name: str, size: str = "6m") -> Path:
        mountpoint = tmp_path / name
        mountpoint.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root; this machine runs the tests as another user")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"this machine forbids mounting a tmpfs: {result.stderr.strip()}")
        mounted.append(mountpoint)
        return mountpoint

    yield mount
    for mountpoint in reversed(mounted):
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


# -- pynetdicom's process globals, for tests that run the daemon in this process --------------

# What bridge.dimse.pynetdicom_overrides.install changes: pynetdicom's switches, and
# functions and methods of these modules and classes.
_PYNETDICOM_PARTS = [
    pynetdicom._config, pynetdicom.dimse_messages, pynetdicom.dimse.DIMSEServiceProvider, pynetdicom.association,
    pynetdicom.association.Association, pynetdicom.transport, pynetdicom.transport.AssociationSocket,
    pynetdicom.service_class, pynetdicom.service_class.StorageServiceClass,
    pynetdicom.service_class.QueryRetrieveServiceClass, pynetdicom.dul, pynetdicom.dul.DULServiceProvider,
    pynetdicom.fsm.StateMachine, pynetdicom.pdu_items, pynetdicom.presentation,
]


@contextmanager
def _pynetdicom_kept() -> Iterator[None]:
    """Whatever ``pynetdicom_overrides.install`` changes in this process (pynetdicom's
    switches and the functions it replaces, its loggers' levels, pydicom's validation
    mode), put back at the end."""
    saved = [(part, dict(vars(part))) for part in _PYNETDICOM_PARTS]
    levels = {name: logging.getLogger(name).level for name in ("pynetdicom", "pynetdicom.utils")}
    validation = pydicom_config.settings.reading_validation_mode
    try:
        yield
    finally:
        for part, before in saved:
            for key in set(vars(part)) - set(before):
                delattr(part, key)
            for key, value in before.items():
                if vars(part).get(key) is not value:
                    setattr(part, key, value)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        pydicom_config.settings.reading_validation_mode = validation


@pytest.fixture
def pynetdicom_restored() -> Iterator[None]:
    """For a test that starts ``bridge.daemon.Daemon`` in this process: pynetdicom and
    pydicom as they were before it, once it is done."""
    with _pynetdicom_kept():
        yield


@pytest.fixture(scope="module")
def pynetdicom_restored_after_module() -> Iterator[None]:
    """As ``pynetdicom_restored``, for a daemon that the tests of a module share."""
    with _pynetdicom_kept():
        yield
