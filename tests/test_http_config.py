"""The ``http`` section, its deprecated ``metrics`` alias, static trees served by the
daemon, and the token file of ``/api``."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.api.auth import TokenFileError, Tokens, read_tokens
from bridge.config import load_config
from bridge.config.units import format_size
from bridge.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

STORE_ALL = """
destinations:
  archive: {type: archive}
rules:
  - {name: all, store: [archive]}
"""


def load(tmp_path: Path, text: str):
    """``text``, with an archive for everything unless it has destinations of its own."""
    path = tmp_path / "config.yaml"
    path.write_text(text if "destinations:" in text else text + STORE_ALL)
    return load_config(path)


def errors_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    return str(caught.value)


def static(serve: str) -> str:
    return f"destinations:\n  web: {{type: static, path: t, serve: '{serve}'}}\nrules:\n  - {{name: w, store: [web]}}\n"


def test_no_http_section_means_no_http_server(tmp_path):
    config = load(tmp_path, "")
    assert config.http.port is None
    assert config.http.host == "127.0.0.1"


def test_the_token_file_and_certificates_are_found_beside_the_config(tmp_path):
    config = load(tmp_path, "http: {port: 8080, token_file: tokens, tls: {cert_file: c.pem, key_file: k.pem}}\n")
    assert config.http.token_file == tmp_path / "tokens"
    assert config.http.tls is not None
    assert (config.http.tls.cert_file, config.http.tls.key_file) == (tmp_path / "c.pem", tmp_path / "k.pem")


def test_the_deprecated_metrics_section_is_read_as_http_with_a_note(tmp_path):
    config = load(tmp_path, "metrics: {host: 127.0.0.2, port: 9110}\n")
    assert (config.http.host, config.http.port) == ("127.0.0.2", 9110)
    assert any("metrics is deprecated" in note and "http" in note for note in config.notes)


def test_metrics_and_http_both_set_is_an_error_naming_metrics(tmp_path):
    message = errors_of(tmp_path, "metrics: {port: 9110}\nhttp: {port: 8080}\n")
    assert "metrics: replaced by http" in message


@pytest.mark.parametrize(("text", "expected"), [
    ("http: {port: 70000}", "http.port"),
    ("http: {port: 8080, tokens: x}", "http.tokens"),
    ("http: {port: 8080, tls: {cert_file: c.pem}}", "http.tls.key_file"),
])
def test_http_errors_name_their_path(tmp_path, text, expected):
    assert expected in errors_of(tmp_path, text + "\n")


def test_a_static_tree_is_served_at_a_path_of_its_own(tmp_path):
    config = load(tmp_path, "http: {port: 8080}\n" + static("/static/web/"))
    assert config.destinations["web"].serve == "/static/web"  # type: ignore[union-attr]


@pytest.mark.parametrize(("serve", "expected"), [
    ("/api/x", "/api is the daemon's own"),
    ("/metrics", "/metrics is the daemon's own"),
    ("static/x", "not a URL path"),
    ("/a/../b", "not a URL path"),
    ("/a b", "not a URL path"),
])
def test_a_static_tree_path_must_be_free_and_plain(tmp_path, serve, expected):
    message = errors_of(tmp_path, "http: {port: 8080}\n" + static(serve))
    assert "destinations.web.serve" in message
    assert expected in message


def test_serving_a_tree_needs_the_http_server_and_a_path_of_its_own(tmp_path):
    text = ("destinations:\n  a: {type: static, path: a, serve: /t}\n  b: {type: static, path: b, serve: /t}\n"
            "rules:\n  - {name: all, store: [a, b]}\n")
    message = errors_of(tmp_path, text)
    assert "destinations.a.serve: the HTTP server is off: set http.port" in message
    message = errors_of(tmp_path, "http: {port: 8080}\n" + text)
    assert "destinations.b.serve: /t is served already, by destinations.a" in message


# -- the token file --------------------------------------------------------------------


def test_tokens_with_and_without_names(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# who may call /api\n\nops 0123456789abcdef0123\n  fedcba9876543210fedc  \n")
    path.chmod(0o600)
    tokens = Tokens.read(path)
    assert tokens.who("0123456789abcdef0123") == "ops"
    assert tokens.who("fedcba9876543210fedc") == "token"
    assert tokens.who("0123456789abcdef012") is None
    assert tokens.who("") is None
    assert tokens.who("ops 0123456789abcdef0123") is None
    assert tokens.who("0123456789abcdef0123\u00e9") is None


@pytest.mark.parametrize(("text", "expected"), [
    ("", "no token in it"),
    ("# only a comment\n", "no token in it"),
    ("short\n", "line 1: a token is at least 16"),
    ("ops 0123456789abcdef0123\nops fedcba9876543210fedc\n", "line 2: the name 'ops' is given twice"),
    ("ops 0123456789abcdef\u00e90123\n", "printable ASCII"),
])
def test_an_unusable_token_file_is_refused_with_the_line(tmp_path, text, expected):
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(TokenFileError, match=expected) as caught:
        Tokens.read(path)
    assert "http.token_file" in str(caught.value)


def test_a_missing_token_file_is_named(tmp_path):
    with pytest.raises(TokenFileError, match="http.token_file .*: no such file"):
        read_tokens(tmp_path / "absent")
    assert read_tokens(None) is None


def test_a_token_file_others_can_read_is_warned_about(tmp_path, caplog):
    path = tmp_path / "tokens"
    path.write_text("0123456789abcdef0123\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        Tokens.read(path)
    assert "can be read by other users" in caplog.text
    caplog.clear()
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        Tokens.read(path)
    assert "can be read by other users" not in caplog.text


@pytest.mark.parametrize(("size", "text"), [(17, "17 B"), (4096, "4.0 KiB"), (312 << 20, "312 MiB"),
                                            (int(1.5 * 2**30), "1.5 GiB")])
def test_sizes_for_people(size, text):
    assert format_size(size) == text


def check(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "config.yaml"
    path.write_text(text + STORE_ALL)
    return subprocess.run([sys.executable, "-m", "bridge", "check", "--config", str(path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def test_check_reads_the_token_file_as_the_daemon_would(tmp_path):
    result = check(tmp_path, "http: {port: 8080, token_file: tokens}\n")
    assert result.returncode == 1
    assert f"http.token_file {tmp_path / 'tokens'}: no such file" in result.stderr
    (tmp_path / "tokens").write_text("short\n")
    result = check(tmp_path, "http: {port: 8080, token_file: tokens}\n")
    assert result.returncode == 1
    assert "line 1: a token is at least 16" in result.stderr
    (tmp_path / "tokens").write_text("0123456789abcdef0123\n")
    (tmp_path / "tokens").chmod(0o600)
    result = check(tmp_path, "http: {port: 8080, token_file: tokens}\n")
    assert result.returncode == 0, result.stderr
    assert "clear text" not in result.stdout


def test_check_warns_of_tokens_in_clear_text_off_this_host(tmp_path):
    (tmp_path / "tokens").write_text("0123456789abcdef0123\n")
    (tmp_path / "tokens").chmod(0o600)
    result = check(tmp_path, "http: {host: 0.0.0.0, port: 8080, token_file: tokens}\n")
    assert result.returncode == 0, result.stderr
    assert "warning: http: the API tokens travel in clear text to 0.0.0.0:8080" in result.stdout


def test_check_names_unreadable_certificate_files(tmp_path):
    result = check(tmp_path, "http: {port: 8443, tls: {cert_file: cert.pem, key_file: key.pem}}\n")
    assert result.returncode == 1
    assert f"http.tls.cert_file: cannot read {tmp_path / 'cert.pem'}" in result.stderr
    assert f"http.tls.key_file: cannot read {tmp_path / 'key.pem'}" in result.stderr
