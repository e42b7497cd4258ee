"""What operators run the daemon with: JSON logs, the systemd notify protocol and unit,
and the Grafana dashboard and alert rules in docs/ (over metrics the daemon exports)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from corpus import ct_series
from peers import REPO, free_port, storescu, wait_for

from bridge.config import validate
from bridge.daemon import Daemon, watchdog_interval
from bridge.log import JsonFormatter
from bridge.metrics import Metrics

DOCS = REPO / "docs"
UNIT = REPO / "systemd" / "dicom-bridge.service"
KEYS = {"time", "level", "logger", "association", "thread", "event", "fields"}


def _archive_config() -> dict[str, Any]:
    return {"destinations": {"archive": {"type": "archive"}}, "rules": [{"name": "all", "store": ["archive"]}]}


def _spawn(bridge: Any, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """The daemon of ``bridge`` (written, not started, by bridge_factory) as a process of
    our own, with its log in bridge.log; bridge_factory kills it at the end."""
    with open(bridge.log_path, "ab") as log:
        bridge.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "run", "--config", str(bridge.config_path), *args],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )
    return bridge.proc


# -- logs --------------------------------------------------------------------------------


def test_json_logs_one_object_a_line_with_the_association_id(tmp_path, bridge_factory):
    bridge = bridge_factory(_archive_config(), start=False)
    _spawn(bridge, "--log-format", "json")
    wait_for(lambda: "listening on" in bridge.log(), 30, "the listener")
    files = ct_series(tmp_path / "ct", 2)
    assert storescu(bridge.port, files, calling_ae="CT1").statuses == [0, 0]
    wait_for(lambda: "association released" in bridge.log(), 30, "the association's end")
    assert bridge.stop() == 0

    lines = [json.loads(line) for line in bridge.log().splitlines()]  # every line is JSON
    assert lines
    for line in lines:
        assert set(line) == KEYS, line
        assert line["time"].endswith("+00:00")
        time.strptime(line["time"][:19], "%Y-%m-%dT%H:%M:%S")
        assert line["level"] in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}
        assert isinstance(line["fields"], dict)
    accepted = [line for line in lines if line["event"].startswith("association from")]
    assert len(accepted) == 1
    association = accepted[0]["association"]
    assert re.fullmatch(r"A\d+", association)
    assert accepted[0]["logger"] == "bridge.dimse.listener"
    ended = [line for line in lines if line["event"].startswith("association released after")]
    assert len(ended) == 1 and ended[0]["association"] == association
    assert ended[0]["event"].endswith("2 stored, 0 refused")
    # lines of the main thread carry no association
    assert next(line for line in lines if line["event"].startswith("listening on"))["association"] is None


def test_json_log_fields_carry_extra_values_and_the_exception():
    formatter = JsonFormatter()
    logger = logging.getLogger("bridge.test")
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        record = logger.makeRecord("bridge.test", logging.ERROR, __file__, 1, "failed: %s", ("x",),
                                   sys.exc_info(), extra={"destination": "pacs", "rows": 3, "path": Path("/a")})
    record.threadName = "deliver-pacs-0"
    text = formatter.format(record)
    assert "\n" not in text
    line = json.loads(text)
    assert line["event"] == "failed: x" and line["association"] is None and line["level"] == "ERROR"
    assert line["fields"]["destination"] == "pacs" and line["fields"]["rows"] == 3
    assert line["fields"]["path"] == "/a"
    assert "ValueError: bad" in line["fields"]["exc"]


def test_text_logs_stay_the_default(tmp_path, bridge_factory):
    bridge = bridge_factory(_archive_config())
    assert bridge.stop() == 0
    assert re.search(r"INFO +\[MainThread\] bridge\.dimse\.listener: listening on", bridge.log())
    assert not bridge.log().lstrip().startswith("{")


# -- systemd -----------------------------------------------------------------------------


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket like systemd's; its path short enough for sun_path (108 bytes)."""
    folder = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    yield sock, path
    sock.close()
    shutil.rmtree(folder)


def _messages(sock: socket.socket, deadline: float) -> Iterator[str]:
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(4096)
        except TimeoutError:
            return
        yield from data.decode().splitlines()


def test_systemd_ready_status_and_watchdog(bridge_factory, notify_socket):
    sock, path = notify_socket
    bridge = bridge_factory(_archive_config(), start=False)
    proc = _spawn(bridge, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    ready = False
    for message in _messages(sock, time.monotonic() + 30):
        if message == "READY=1":
            ready = True
            break
    assert ready, f"no READY=1 within 30 s:\n{bridge.log()}"
    # READY=1 comes only once the DICOM port accepts connections
    with socket.create_connection(("127.0.0.1", bridge.port), timeout=5):
        pass
    seen: list[tuple[float, str]] = []
    deadline = time.monotonic() + 15
    for message in _messages(sock, deadline):
        seen.append((time.monotonic(), message))
        statuses = [m for _, m in seen if m.startswith("STATUS=")]
        pings = [t for t, m in seen if m == "WATCHDOG=1"]
        if statuses and len(pings) >= 4:
            break
    statuses = [m for _, m in seen if m.startswith("STATUS=")]
    pings = [t for t, m in seen if m == "WATCHDOG=1"]
    assert statuses, f"no STATUS= line: {seen}"
    assert re.fullmatch(r"STATUS=queue: \d+ pending, \d+ dead; \d+ associations.*", statuses[0])
    assert len(pings) >= 4, f"WATCHDOG=1 pings: {seen}"
    # every half of WATCHDOG_USEC (0.5 s), so well within the watchdog's second
    assert max(b - a for a, b in zip(pings, pings[1:], strict=False)) < 0.9
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert "STOPPING=1" in list(_messages(sock, time.monotonic() + 1))


@pytest.mark.usefixtures("pynetdicom_restored")
def test_a_hung_main_loop_stops_the_watchdog_pings(tmp_path, monkeypatch, notify_socket):
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    daemon = Daemon(validate({"listen": {"port": free_port()}, "data_dir": str(tmp_path / "data"),
                              "spool": {"min_free": "16MiB"}, **_archive_config()}, base=tmp_path))
    daemon.start()
    hang, hung, release = threading.Event(), threading.Event(), threading.Event()
    act_on_requests = daemon.act_on_requests

    def stuck() -> None:
        if hang.is_set():
            hung.set()
            release.wait(30)
        act_on_requests()

    monkeypatch.setattr(daemon, "act_on_requests", stuck)
    loop = threading.Thread(target=daemon.serve_forever)
    loop.start()
    try:
        assert [m for m in _messages(sock, time.monotonic() + 1.5) if m == "WATCHDOG=1"]
        hang.set()
        assert hung.wait(5)
        list(_messages(sock, time.monotonic() + 0.3))  # a ping sent just before it hung
        assert "WATCHDOG=1" not in list(_messages(sock, time.monotonic() + 1.5))
        release.set()
        hang.clear()
        assert "WATCHDOG=1" in list(_messages(sock, time.monotonic() + 1.5))
    finally:
        release.set()
        daemon.request_stop()
        loop.join(60)


def test_no_watchdog_unless_asked_for_this_process(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    assert watchdog_interval() == 10.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 10.0


def test_the_unit_file(tmp_path):
    text = UNIT.read_text()
    assert re.search(r"^StateDirectory=dicom-bridge$", text, re.M)
    assert re.search(r"^WatchdogSec=\S+$", text, re.M)
    assert re.search(r"^Type=notify$", text, re.M)
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here")
    # verify wants ExecStart's program to exist: the installed command, wherever it is
    program = shutil.which("dicom-bridge") or "/bin/true"
    unit = tmp_path / "dicom-bridge.service"
    unit.write_text(text.replace("/usr/local/bin/dicom-bridge", program))
    result = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "dicom-bridge.service" not in output, output  # e.g. "Unknown key ..., ignoring"


# -- the container image ------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """docker/Dockerfile's instructions, (keyword, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (REPO / "docker" / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_the_image_serves_http_on_8080_and_checks_its_health_with_readyz(tmp_path, bridge_factory):
    instructions = dockerfile()
    [embedded] = [args for keyword, args in instructions if keyword == "RUN" and "printf" in args]
    lines = re.findall(r"'([^']*)'", embedded.split(">", 1)[0])[1:]  # after printf's format
    raw = yaml.safe_load("\n".join(lines))
    assert raw["http"] == {"host": "0.0.0.0", "port": 8080}
    validate(raw, base=tmp_path)
    [exposed] = [args.split() for keyword, args in instructions if keyword == "EXPOSE"]
    assert "8080" in exposed and "11112" in exposed
    [healthcheck] = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"] and "'/readyz'" in command[2] and "8080" in command[2]

    # The check's own command, against a daemon on another port than the image's.
    bridge = bridge_factory({"http": {"host": "127.0.0.1", "port": free_port()},
                             "destinations": {"out": {"type": "folder", "path": str(tmp_path / "out")}},
                             "rules": [{"name": "all", "store": ["out"]}]})

    def check(port: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", command[2].replace("8080", str(port))],
                              capture_output=True, text=True, timeout=30)

    healthy = check(bridge.config["http"]["port"])
    assert healthy.returncode == 0 and healthy.stdout.startswith("200 "), healthy.stdout + healthy.stderr
    incoming = bridge.data_dir / "spool" / "incoming"
    incoming.rmdir()
    incoming.write_text("not a folder")
    unhealthy = check(bridge.config["http"]["port"])
    assert unhealthy.returncode == 1 and unhealthy.stdout.startswith("503 "), unhealthy.stdout
    assert '"spool":{"ok":false' in unhealthy.stdout
    assert check(free_port()).returncode != 0  # nothing listening


# -- the dashboard and the alerts --------------------------------------------------------


def exported_names() -> set[str]:
    """The series names a scrape of the daemon shows: counters with _total, histograms
    with _bucket, _sum and _count (no _created series: the daemon turns them off)."""
    names = set()
    for family in Metrics().registry.collect():
        names.update(sample.name for sample in family.samples)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
    assert not any(name.endswith("_created") for name in names)
    return names


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
                "unless", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not functions,
    aggregation clauses, label names in matchers, keywords, durations or strings."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges, subqueries
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables ($__rate_interval)
    names = set()
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)\b(\s*\()?", expr):
        if match.group(2) or match.group(1).lower() in PROMQL_WORDS:
            continue
        names.add(match.group(1))
    return names


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        for sub in [panel, *panel.get("panels", [])]:
            exprs += [t["expr"] for t in sub.get("targets", []) if "expr" in t]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if variable.get("type") == "query":
            text = query.get("query", "") if isinstance(query, dict) else query
            exprs.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", text))
    return exprs


def test_the_promql_name_finder():
    assert promql_metric_names(
        'histogram_quantile(0.95, sum by (le, destination) (rate(dicom_bridge_delivery_latency_seconds_bucket'
        '{destination=~"$destination"}[$__rate_interval])))') == {"dicom_bridge_delivery_latency_seconds_bucket"}
    assert promql_metric_names('up{job="dicom-bridge"} == 0 and on(instance) x_total offset 5m') == {"up", "x_total"}


def test_the_grafana_dashboard_uses_only_exported_metrics():
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    assert dashboard["schemaVersion"] >= 36
    assert any(i["name"] == "DS_PROMETHEUS" and i["pluginId"] == "prometheus" for i in dashboard["__inputs"])
    exprs = _dashboard_exprs(dashboard)
    assert len(exprs) >= 10
    exported = exported_names()
    used: set[str] = set()
    for expr in exprs:
        names = promql_metric_names(expr)
        assert names, expr
        assert names <= exported, f"{expr}: {names - exported} not exported"
        used |= names
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    # what the issue asks to see
    for name in ("dicom_bridge_received_instances_total", "dicom_bridge_delivered_instances_total",
                 "dicom_bridge_queue_depth", "dicom_bridge_queue_oldest_pending_seconds",
                 "dicom_bridge_dead_letters_total", "dicom_bridge_delivery_latency_seconds_bucket",
                 "dicom_bridge_upstream_request_seconds_bucket", "dicom_bridge_finds_total",
                 "dicom_bridge_retrievals_total", "dicom_bridge_upstream_errors_total"):
        assert name in used, name


def test_every_metric_is_in_the_operations_guide():
    """docs/operations.md, "Metrics": one row per metric, as a scrape names it."""
    text = (DOCS / "operations.md").read_text().split("### Metrics", 1)[1].split("\n### ", 1)[0]
    listed = set(re.findall(r"^\| `(dicom_bridge_\w+)` \|", text, re.MULTILINE))
    scraped = set()
    for family in Metrics().registry.collect():
        scraped.add(family.name + ("_total" if family.type == "counter" else ""))
    assert listed == scraped, f"missing: {sorted(scraped - listed)}; unknown: {sorted(listed - scraped)}"


def test_the_alert_rules():
    rules = yaml.safe_load((DOCS / "alerts.yaml").read_text())
    exported = exported_names() | {"up"}
    alerts = {}
    for group in rules["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule
            assert rule["alert"] not in alerts
            alerts[rule["alert"]] = rule
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            names = promql_metric_names(rule["expr"])
            assert names and names <= exported, f"{rule['expr']}: {names - exported} not exported"
    exprs = {name: rule["expr"] for name, rule in alerts.items()}
    assert any("backing_off" in e and alerts[n].get("for") == "10m" for n, e in exprs.items())
    assert any("dicom_bridge_dead_letters_total" in e for e in exprs.values())
    assert any("dicom_bridge_spool_free_bytes" in e for e in exprs.values())
    assert any(re.search(r"\bup\b.*== 0", e) for e in exprs.values())
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed here: the rules were checked by structure only")
    result = subprocess.run([tool, "check", "rules", str(DOCS / "alerts.yaml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
