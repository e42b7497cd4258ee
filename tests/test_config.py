"""Configuration: every error at once, each with its path and a hint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import forkserver
import pytest
from corpus import ct_series
from peers import storescu, wait_for

from bridge.config import load_config
from bridge.config.units import parse_duration, parse_size
from bridge.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted([*REPO.glob("config/*.yaml"), REPO / "docker" / "bridge-with-orthanc.yaml"])


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_example_passes_check(example):
    result = forkserver.run(["check", "--config", str(example)], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK"), result.stdout


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("10m", 600), ("7d", 604800), ("500ms", 0.5),
                                               ("2h", 7200), (45, 45), ("1.5m", 90)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [("64MiB", 64 * 2**20), ("2GiB", 2 * 2**30), ("64MB", 64 * 10**6),
                                            ("512B", 512), (4096, 4096), ("1kb", 1000)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["10 parsecs", "-1s", True, "s"])
def test_bad_durations_say_what_is_expected(bad):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


def test_every_error_at_once_with_paths_and_hints(tmp_path):
    path = write(tmp_path, """
ae_title: BRIDGE_WITH_A_FAR_TOO_LONG_TITLE
listn: {port: 104}
listen: {port: 70000, timeouts: {acse: soon}}
spool: {min_free: lots, size: 1GiB}
destinations:
  out: {type: folder, pth: /srv/out}
  web: {type: stow}
  arch: {type: archive, workrs: 2}
rules:
  - name: ct
    when: {calling_aet: CT1}
    store: [ot]
unrouted: nowhere
""")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    errors = info.value.errors
    expected = [
        "ae_title:",
        "listn: unknown key (did you mean 'listen'?)",
        "listen.port:",
        "listen.timeouts.acse: 'soon' is not a duration",
        "spool.min_free: 'lots' is not a size",
        "spool.size: unknown key (expected one of: min_free)",  # nothing close: what may go there
        "destinations.out.pth: unknown key (did you mean 'path'?)",
        "destinations.out.path: required",
        "destinations.web.type: 'stow' is not a known type",
        "destinations.arch.workrs: unknown key (did you mean 'workers'?)",
        "rules[0].when.calling_aet: unknown key (did you mean 'calling_ae'?)",
    ]
    for fragment in expected:
        assert any(e.startswith(fragment) for e in errors), f"{fragment!r} not in {errors}"


def test_references_are_checked_after_the_shapes(tmp_path):
    path = write(tmp_path, """
destinations:
  archive: {type: archive}
rules:
  - {name: all, store: [archiv]}
unrouted: nowhere
""")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "rules[0].store[0]: unknown destination 'archiv' (did you mean 'archive'?)" in info.value.errors
    assert any(e.startswith("unrouted: unknown destination 'nowhere'") for e in info.value.errors)


def test_sources_are_checked_with_paths_and_hints(tmp_path):
    path = write(tmp_path, """
nodes:
  pacs: {host: 127.0.0.1, port: 104}
destinations:
  archive: {type: archive}
sources:
  qido: {type: dicomweb, url: "http://127.0.0.1:8042/dicom-web", page_sze: 100}
  remote: {type: dimse, node: pcs}
  local: {type: dimse, node: pacs}
  slow: {type: dimse, node: pacs, find_timeout: 1h}
rules:
  - {name: all, store: [archive], find: [local, qdo], retrieve: [remote, lcal]}
""")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    errors = info.value.errors
    assert "sources.qido.page_sze: unknown key (did you mean 'page_size'?)" in errors
    assert "sources.remote.node: unknown node 'pcs' (did you mean 'pacs'?)" in errors
    assert any(e.startswith("sources.local: 'local' is built in") for e in errors)
    assert any(e.startswith("sources.slow.find_timeout:") for e in errors)
    assert "rules[0].find[1]: unknown source 'qdo' (did you mean 'qido'?)" in errors
    assert "rules[0].retrieve[1]: unknown source 'lcal' (did you mean 'local'?)" in errors


@pytest.mark.parametrize(("archives", "says"), [
    ({}, "no destination has type: archive"),
    ({"a": "{type: archive}", "b": "{type: archive, path: b}"}, "several destinations have type: archive (a, b)"),
])
def test_local_is_the_one_archive(tmp_path, archives, says):
    entries = archives or {"out": "{type: folder, path: out}"}
    destinations = "".join(f"  {name}: {body}\n" for name, body in entries.items())
    first = next(iter(entries))
    path = write(tmp_path, f"""
destinations:
{destinations}rules:
  - {{name: all, store: [{first}], find: [local]}}
""")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert any(e.startswith("rules[0].find[0]: source 'local' is the local archive, and " + says)
               for e in info.value.errors), info.value.errors


def test_sources_load_with_their_settings(tmp_path):
    (tmp_path / "token").write_text("t\n")
    path = write(tmp_path, """
nodes:
  pacs: {host: 127.0.0.1, port: 104}
destinations:
  archive: {type: archive}
sources:
  qido: {type: dicomweb, url: "http://127.0.0.1:8042/dicom-web/", auth: {type: bearer, token_file: token}}
  remote: {type: dimse, node: pacs, find_timeout: 5s}
rules:
  - {name: all, store: [archive], find: [qido, remote, local], retrieve: [local]}
""")
    config = load_config(path)
    qido, remote = config.sources["qido"], config.sources["remote"]
    assert qido.url == "http://127.0.0.1:8042/dicom-web" and qido.page_size == 1000 and qido.find_timeout == 20
    assert qido.auth.token_file == tmp_path / "token"
    assert remote.node == "pacs" and remote.find_timeout == 5
    assert check(path).returncode == 0


def test_template_keywords_are_checked(tmp_path):
    path = write(tmp_path, """
destinations:
  out: {type: folder, path: "/srv/{StudyInstanceUD}"}
""")
    with pytest.raises(ConfigError, match="did you mean 'StudyInstanceUID'"):
        load_config(path)


def test_yaml_syntax_errors_name_the_line(tmp_path):
    path = write(tmp_path, "destinations:\n  out: {type: folder, path: /srv/{x}}\n")
    with pytest.raises(ConfigError, match="line 2"):
        load_config(path)


def test_relative_paths_resolve_against_the_file(tmp_path):
    path = write(tmp_path, """
data_dir: data
destinations:
  out: {type: folder, path: "out/{StudyInstanceUID}"}
rules: rules.yaml
""")
    (tmp_path / "rules.yaml").write_text("- {name: all, store: [out]}\n")
    config = load_config(path)
    assert config.data_dir == tmp_path / "data"
    assert config.destinations["out"].path == f"{tmp_path}/out/{{StudyInstanceUID}}"
    assert [r.name for r in config.rules] == ["all"]


def test_the_embedded_default_keeps_everything_in_the_archive():
    config = load_config(None)
    assert config.ae_title == "DICOM_BRIDGE"
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 11112)
    assert config.data_dir.name == "dicom-bridge-data"
    assert config.destinations["archive"].type == "archive"
    assert config.rules[0].store == ["archive"]


def test_run_refuses_an_invalid_config_and_check_reports_it(tmp_path):
    path = write(tmp_path, "listen: {prot: 104}\n")
    run = subprocess.run([sys.executable, "-m", "bridge", "run", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "listen.prot: unknown key (did you mean 'port'?)" in run.stderr
    check = forkserver.run(["check", "--config", str(path)], timeout=60)
    assert check.returncode == 1
    assert "listen.prot" in check.stderr


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return forkserver.run(["check", "--config", str(path)], timeout=60)


def test_no_destinations_and_no_rules_run_the_embedded_default_archive(tmp_path, bridge_factory):
    bridge = bridge_factory({})  # only listen, data_dir and spool.min_free
    files = ct_series(tmp_path / "ct", 2)
    result = storescu(bridge.port, files)
    assert result.statuses == [0, 0], result.output
    wait_for(lambda: bridge.queue_states() == {"done": 2}, 30, "both instances archived")
    assert {r["destination"] for r in bridge.queue_rows()} == {"archive"}
    assert "every instance is kept in the local archive" in bridge.log()
    result = check(bridge.config_path)
    assert result.returncode == 0, result.stderr
    assert "note: no destinations and no rules: every instance is kept in the local archive" in result.stdout


def test_destinations_without_store_rules_warn_that_every_store_is_refused(tmp_path, bridge_factory):
    bridge = bridge_factory({"destinations": {"archive": {"type": "archive"}}}, start=False)
    result = check(bridge.config_path)
    assert result.returncode == 0, result.stderr  # it runs: a warning, not an error
    assert "warning: rules: no rule has store: every C-STORE will be refused (0x0124)" in result.stdout
    assert result.stdout.strip().endswith("OK, 1 warning(s)")
    bridge.start()
    assert "WARNING" in bridge.log() and "every C-STORE will be refused" in bridge.log()
    assert storescu(bridge.port, ct_series(tmp_path / "ct", 1)).statuses == [0x0124]
    bridge.config["unrouted"] = "archive"  # what the warning suggests: then it is silent
    bridge.write_config()
    assert "warning" not in check(bridge.config_path).stdout


def test_ae_title_patterns_longer_than_an_ae_title_are_errors(tmp_path):
    path = write(tmp_path, "accept:\n  calling_ae: [CT*, MODALITY_WITH_A_LONG_NAME, '????????????????*', "
                           "'[AB]2345678901234567', '[AB]234567890123456']\n"
                           "destinations: {a: {type: archive}}\n"
                           "rules: [{name: r, when: {called_ae: BRIDGE_WITH_A_LONG_TITLE}, store: [a]}]\n")
    result = check(path)
    assert result.returncode == 1
    assert "accept.calling_ae[1]: 'MODALITY_WITH_A_LONG_NAME' can never match: AE titles have at most 16 " \
           "characters, this needs 25" in result.stderr
    assert "accept.calling_ae[3]: '[AB]2345678901234567' can never match: AE titles have at most 16 " \
           "characters, this needs 17" in result.stderr
    for fits in (0, 2, 4):  # a glob, sixteen ?s then *, [AB] and 15 characters
        assert f"calling_ae[{fits}]" not in result.stderr
    assert "rules[0].when.called_ae: 'BRIDGE_WITH_A_LONG_TITLE' can never match" in result.stderr


def test_every_command_has_a_description():
    for command in ("run", "route", "check", "queue"):
        result = forkserver.run([command, "--help"], timeout=60)
        usage, _, rest = result.stdout.partition("\n\n")
        assert result.returncode == 0 and not rest.startswith("options:"), f"{command} --help:\n{result.stdout}"
