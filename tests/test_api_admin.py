"""The admin API under /api, as an administrator (or a script) uses it, against a real
daemon and DCMTK's storescu: tokens, dead letters listed, retried and purged, a
destination resumed, a reload; then requests made up from the OpenAPI document.

Dead rows are made as tests/test_queue_cli.py makes them: a folder destination whose
path runs through a file, with a ``max_age`` of a second."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import openapi_fuzz as fuzz
from corpus import ct_series
from peers import Bridge, free_port, storescu, wait_for
from test_queue_cli import FAST_RETRY, config, delivered, folder, in_the_way, listing, spool_files

TOKENS = {"ops": "ops-3f9c0a7e5d1b4c2f9e8d7c6b5a4f3e2d", "grafana": "gr-b7a6f3f9c0a7e5d1b4c2f9e8d7c6b5a4"}
OPS = TOKENS["ops"]


def with_api(tmp_path: Path, settings: dict[str, Any], tokens: bool = True) -> dict[str, Any]:
    """``settings`` with the HTTP server on a free port, and a token file unless ``tokens`` is false."""
    http: dict[str, Any] = {"port": free_port()}
    if tokens:
        token_file = tmp_path / "api-tokens"
        token_file.write_text("# who calls\n" + "".join(f"{name} {token}\n" for name, token in TOKENS.items()))
        token_file.chmod(0o600)
        http["token_file"] = str(token_file)
    return {**settings, "http": http}


class Api:
    """The daemon's HTTP server, called as a client would; counts the calls under /api."""

    def __init__(self, bridge: Bridge, token: str | None = OPS) -> None:
        self.base = f"http://127.0.0.1:{bridge.config['http']['port']}"
        self.token = token
        self.calls = 0

    def call(self, method: str, target: str, body: Any = None, token: str | None = "") -> fuzz.Answer:
        token = self.token if token == "" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        raw = None
        if body is not None:
            raw = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if target.startswith("/api"):
            self.calls += 1
        return fuzz.request(self.base, method, target, raw, headers)

    def get(self, target: str, **kwargs: Any) -> Any:
        answer = self.call("GET", target, **kwargs)
        assert answer.status == 200, (target, answer.status, answer.body)
        return answer.json()

    def post(self, target: str, body: Any = None, status: int = 200) -> Any:
        answer = self.call("POST", target, body)
        assert answer.status == status, (target, answer.status, answer.body)
        return answer.json()


CALL = re.compile(r"api: (GET|POST) /\S* by ")


def calls_logged(bridge: Bridge, count: int, text: str = "") -> list[str]:
    """The log's lines of calls under /api (those with ``text``), once there are ``count``:
    a call's line is written as its answer has been sent."""

    def lines() -> list[str]:
        found = [line for line in bridge.log().splitlines() if CALL.search(line) and text in line]
        return found if len(found) == count else []

    return wait_for(lines, 5, f"{count} lines of calls under /api in the log" + (f" with {text!r}" if text else ""))


def test_the_api_wants_a_token_of_the_token_file(tmp_path, bridge_factory):
    bridge = bridge_factory(with_api(tmp_path, config({"out": folder(tmp_path / "out")})))
    api = Api(bridge)
    for token in (None, "not-a-token-of-the-file", OPS + "x"):
        answer = api.call("GET", "/api/queue", token=token)
        assert answer.status == 401, answer.body
        body = answer.json()
        assert "Authorization: Bearer" in body["message"]
        assert answer.headers["www-authenticate"] == "Bearer"
        assert body["correlation_id"] == answer.headers["x-correlation-id"]
    lines = calls_logged(bridge, 3, "(no valid token)")
    assert all("api: GET /api/queue by (no valid token) from 127.0.0.1: 401" in line for line in lines), lines
    assert set(api.get("/api/queue")["totals"]["counts"]) == {"pending", "in_flight", "done", "dead", "cancelled"}
    assert api.call("GET", "/api/destinations", token=TOKENS["grafana"]).status == 200
    assert api.call("GET", "/healthz", token=None).status == 200
    assert api.call("GET", "/metrics", token=None).status == 200
    calls_logged(bridge, 1, "api: GET /api/destinations by grafana from 127.0.0.1: 200")


def test_without_a_token_file_the_api_is_off_and_the_rest_serves(tmp_path, bridge_factory):
    bridge = bridge_factory(with_api(tmp_path, config({"out": folder(tmp_path / "out")}), tokens=False))
    api = Api(bridge)
    for method, target in (("GET", "/api/queue"), ("POST", "/api/reload"), ("GET", "/api/dead-letters")):
        answer = api.call(method, target)
        assert answer.status == 403, answer.body
        assert "http.token_file" in answer.json()["message"]
    assert api.call("GET", "/healthz", token=None).json() == {"status": "alive"}
    assert b"dicom_bridge_" in api.call("GET", "/metrics", token=None).body
    wait_for(lambda: api.call("GET", "/readyz", token=None).status == 200, 10, "ready")


def test_dead_letters_are_listed_retried_purged_and_a_destination_resumed(tmp_path, bridge_factory):
    """Three destinations take every image: ``good`` works, ``bad`` gives up after a second
    (dead rows), ``slow`` backs off for an hour (probes off). Through the API: the summary
    and the listings, a resume that delivers ``slow`` at once, a purge of two dead rows
    and their spool files, a retry of the others that delivers them once ``bad`` works."""
    bad_blocker, slow_blocker = in_the_way(tmp_path), tmp_path / "slow-blocked"
    slow_blocker.write_text("a file, not a folder")
    bridge = bridge_factory(with_api(tmp_path, config({
        "good": folder(tmp_path / "good"),
        "bad": folder(bad_blocker, retry={**FAST_RETRY, "max_age": "1s"}),
        "slow": folder(slow_blocker, retry={"initial": "1h", "max": "1h"}, probe_every="0s"),
    })))
    api = Api(bridge)
    assert storescu(bridge.port, ct_series(tmp_path / "ct", 4)).statuses == [0] * 4
    wait_for(lambda: api.get("/api/queue")["totals"]["counts"]["dead"] == 4, 30, "4 dead rows")
    wait_for(lambda: api.get("/api/queue")["totals"]["counts"]["done"] == 4, 30, "4 rows of good done")

    summary = api.get("/api/queue")
    assert summary["totals"]["rows"] == 12
    good, bad, slow = (summary["destinations"][name] for name in ("good", "bad", "slow"))
    assert (good["state"], good["counts"]["done"], good["oldest_undelivered_seconds"]) == ("up", 4, None)
    assert (bad["counts"]["dead"], bad["in_config"]) == (4, True)
    assert (slow["state"], slow["counts"]["pending"]) == ("backing_off", 4)
    assert "a file is in the way" in slow["reason"] and slow["until"] > time.strftime("%Y-%m-%dT%H:%M:%S",
                                                                                       time.gmtime())
    assert slow["oldest_undelivered_seconds"] > 0

    dead = api.get("/api/dead-letters")
    assert dead["matching"] == 4 and dead["destinations"]["bad"]["counts"] == {"dead": 4}
    assert [(r["destination"], r["state"]) for r in dead["rows"]] == [("bad", "dead")] * 4
    cli = listing(bridge, "--state", "dead")  # the same rows as dicom-bridge queue list --json
    assert [{**r, "age_seconds": 0} for r in dead["rows"]] == [{**r, "age_seconds": 0} for r in cli["rows"]]
    some = api.get("/api/queue/rows?destination=slow&state=pending&limit=2")
    assert len(some["rows"]) == 2 and some["matching"] == 4
    assert api.get("/api/queue/rows?older_than=1h")["rows"] == []
    refused = api.call("GET", "/api/queue/rows?older_than=soon")
    assert refused.status == 400 and refused.json()["message"].startswith("older_than: 'soon' is not a duration")
    assert api.call("GET", "/api/dead-letters?limit=0").json()["message"].startswith("limit: ")

    # slow: the cause is fixed, and a resume delivers now rather than in an hour
    slow_blocker.unlink()
    resumed = api.post("/api/destinations/slow/resume")
    assert resumed == {"destination": "slow", "was": "backing_off", "state": "up"}
    wait_for(lambda: api.get("/api/queue")["destinations"]["slow"]["counts"]["done"] == 4, 15, "slow delivered")
    assert len(delivered(slow_blocker)) == 4
    unknown = api.call("POST", "/api/destinations/nowhere/resume")
    assert unknown.status == 404
    assert unknown.json()["message"] == "no destination 'nowhere' in the configuration (destinations: bad, good, slow)"

    # a retry or purge must say which rows
    for action in ("retry", "purge"):
        for body in ({}, {"all": False}):
            answer = api.call("POST", f"/api/dead-letters/{action}", body)
            assert answer.status == 400 and '"all": true' in answer.json()["message"], answer.body
    ids = [r["id"] for r in dead["rows"]]

    # a retried row is pending again (and, bad still failing, soon dead again)
    assert api.post("/api/dead-letters/retry", {"ids": ids[:1]}) == {"retried": {"bad": 1}, "total": 1}
    [again] = api.get("/api/queue/rows?destination=bad&state=pending")["rows"] or \
        api.get("/api/queue/rows?destination=bad&state=in_flight")["rows"]
    assert again["id"] == ids[0]
    wait_for(lambda: api.get("/api/dead-letters")["matching"] == 4, 15, "the retried row dead again")

    # purge two: their spool files go (good and slow have theirs done)
    assert len(spool_files(bridge)) == 4
    purged = api.post("/api/dead-letters/purge", {"ids": ids[:2], "destination": "bad"})
    assert purged == {"purged": {"bad": 2}, "total": 2, "spool_files_deleted": 2}
    assert len(spool_files(bridge)) == 2
    assert [r["id"] for r in api.get("/api/dead-letters")["rows"]] == ids[2:]

    # bad is fixed: a retry of the rest delivers them at once
    bad_blocker.unlink()
    assert api.post("/api/dead-letters/retry", {"destination": "bad"}) == {"retried": {"bad": 2}, "total": 2}
    wait_for(lambda: api.get("/api/queue")["destinations"]["bad"]["counts"]["done"] == 2, 15, "bad delivered")
    assert len(delivered(bad_blocker)) == 2
    wait_for(lambda: spool_files(bridge) == [], 10, "every spool file gone")
    assert api.get("/api/dead-letters") == {"matching": 0, "destinations": {}, "rows": []}

    # one log line per call, each naming the token; the changes said with who made them
    lines = calls_logged(bridge, api.calls)
    assert all(" by ops from 127.0.0.1: " in line for line in lines), lines
    log = bridge.log()
    assert "2 dead row(s) purged by ops (2 spool file(s) deleted): bad 2" in log
    assert "2 dead row(s) retried by ops: bad 2" in log
    assert "destination slow: resume asked by ops through the API (was backing_off)" in log


def test_a_queue_locked_by_another_connection_answers_503_and_then_works(tmp_path, bridge_factory):
    bridge = bridge_factory(with_api(tmp_path, {**config({"out": folder(tmp_path / "out")}),
                                                "queue": {"busy_timeout": "300ms"}}))
    api = Api(bridge)
    locker = sqlite3.connect(bridge.data_dir / "queue.sqlite", isolation_level=None, timeout=30)
    try:
        locker.execute("BEGIN IMMEDIATE")
        answer = api.call("POST", "/api/dead-letters/purge", {"all": True})
        assert answer.status == 503, answer.body
        assert answer.json()["message"] == "the queue database cannot be used now (database is locked); try again"
        assert api.get("/api/queue")["totals"]["rows"] == 0  # reading goes on (WAL)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert api.post("/api/dead-letters/purge", {"all": True}) == {"purged": {}, "total": 0, "spool_files_deleted": 0}


def test_reload_adds_a_destination_and_refuses_a_broken_file(tmp_path, bridge_factory):
    bridge = bridge_factory(with_api(tmp_path, config({"out": folder(tmp_path / "out")})))
    api = Api(bridge)
    assert list(api.get("/api/destinations")["destinations"]) == ["out"]

    bridge.config["destinations"]["more"] = folder(tmp_path / "more")
    bridge.config["rules"][0]["store"].append("more")
    bridge.write_config()
    assert api.post("/api/reload") == {"reloaded": True}
    shown = api.get("/api/destinations")["destinations"]
    assert list(shown) == ["more", "out"]
    assert shown["more"] == {"type": "folder", "state": "up", "reason": None, "until": None, "workers": 1}
    assert storescu(bridge.port, ct_series(tmp_path / "ct", 1)).statuses == [0]
    wait_for(lambda: len(delivered(tmp_path / "more")) == 1, 15, "an image in the added destination")

    bridge.config["destinations"]["more"]["workers"] = "many"
    bridge.write_config()
    refused = api.call("POST", "/api/reload", {"timeout": 30})
    assert refused.status == 409, refused.body
    message = refused.json()["message"]
    assert message.startswith("reload refused, keeping the running configuration: ")
    assert "destinations.more.workers" in message and "Traceback" not in message
    assert list(api.get("/api/destinations")["destinations"]) == ["more", "out"]  # the running one serves on

    bad = api.call("POST", "/api/reload", {"timeout": "soon"})
    assert bad.status == 400 and bad.json()["message"].startswith("timeout: ")
    extra = api.call("POST", "/api/reload", {"timeout": 5, "force": True})
    assert extra.status == 400 and extra.json()["message"].startswith("force: ")


def test_made_up_requests_from_the_openapi_document_get_sane_answers(tmp_path, bridge_factory):
    """Every operation under /api, with a few hundred requests valid and not: never a 500,
    a 5xx only where documented, an error always JSON with its message and correlation ID,
    and every status documented (a path made not to match aside: another path's 404)."""
    bridge = bridge_factory(with_api(tmp_path, config({
        "out": folder(in_the_way(tmp_path), retry={**FAST_RETRY, "max_age": "1s"}),
    })))
    api = Api(bridge)
    assert storescu(bridge.port, ct_series(tmp_path / "ct", 3)).statuses == [0] * 3
    wait_for(lambda: api.get("/api/dead-letters")["matching"] == 3, 30, "3 dead rows")
    document = fuzz.get_json(api.base, "/openapi.json")
    assert {op.path for op in fuzz.operations(document)} >= {
        "/api/queue", "/api/queue/rows", "/api/dead-letters", "/api/dead-letters/retry", "/api/dead-letters/purge",
        "/api/destinations", "/api/destinations/{name}/resume", "/api/reload"}
    started = time.monotonic()
    report = fuzz.fuzz(api.base, document, headers={"Authorization": f"Bearer {OPS}"}, per_operation=40,
                       limits={"/api/reload": 8}, hints={"name": ["out"], "destination": ["out"]}, strict=True,
                       budget=30)
    took = time.monotonic() - started
    assert not report.problems, report.describe()
    assert report.sent >= 250, report.describe()
    ok = sum(n for statuses in report.statuses.values() for status, n in statuses.items() if status == 200)
    assert ok >= 50, report.describe()  # the valid ones got through
    assert took < 30, report.describe()
    assert bridge.proc is not None and bridge.proc.poll() is None
    # no traceback, and no line forged by a path with a newline in it
    assert api.call("POST", "/api/destinations/x%0D%0A2026-01-01%2000:00:00%20FORGED/resume").status == 404
    wait_for(lambda: "x\\r\\n2026-01-01 00:00:00 FORGED/resume by ops" in bridge.log(), 5, "the call logged")
    stray = [line for line in bridge.log().splitlines() if not re.match(r"\d{4}-\d\d-\d\d \d\d:", line)]
    assert not stray, stray[:5]


def test_a_reload_reads_the_token_file_again_and_keeps_the_old_one_when_the_new_is_broken(tmp_path,
                                                                                        bridge_factory):
    bridge = bridge_factory(with_api(tmp_path, config({"out": folder(tmp_path / "out")})))
    api = Api(bridge)
    token_file = Path(bridge.config["http"]["token_file"])
    new = "rotated-0123456789abcdef0123"
    token_file.write_text(f"ops {new}\n")
    assert api.post("/api/reload") == {"reloaded": True}
    assert api.call("GET", "/api/queue", token=new).status == 200
    assert api.call("GET", "/api/queue", token=OPS).status == 401
    token_file.write_text("ops short\n")  # a reload must not lock everyone out
    answer = api.call("POST", "/api/reload", token=new)
    assert answer.status == 409, answer.body
    assert "http.token_file" in answer.json()["message"] and "line 1" in answer.json()["message"]
    assert api.call("GET", "/api/queue", token=new).status == 200
