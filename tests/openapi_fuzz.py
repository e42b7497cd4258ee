"""Requests made up from an OpenAPI document, valid and not, sent to a real server: what
schemathesis does, in a few hundred lines and without a dependency, deterministic for a
seed (``random.Random``).

For each operation under a prefix, ``fuzz`` sends a bounded number of requests: some
valid by the document, most broken in one place (a parameter or property of the wrong
type, out of its range, too long, empty, unicode, control characters, unpaired
surrogates; required ones missing, unknown ones added; path parameters with ``../`` and
``%00``; bodies that are not JSON, not objects, nested too deep, with numbers too large
for any type). ``problems`` says what is wrong with an answer: a 5xx the operation does
not document (so never a 500), an error without a JSON body of ``message`` and
``correlation_id``, and optionally a status it does not document.

    document = fuzz.get_json(base, "/openapi.json")
    report = fuzz.fuzz(base, document, headers={"Authorization": f"Bearer {token}"})
    assert not report.problems, report.describe()
"""

from __future__ import annotations

import http.client
import json
import random
import string
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

_MISSING = object()  # a value left out: a property or parameter not sent
NASTY_TEXT = [
    "", " ", "../", "..%2F", "%00", "\x00", "\ud800", "\u202e\u0644\u0627", "\U0001f600" * 40, "日本語",
    "a" * 5000, "' OR 1=1 --", "{}", "null", "-1", "1e309", "NaN", "\r\nX-Injected: 1",
]
NASTY_VALUES: list[Any] = [None, True, False, 0, -1, 10**30, -(10**30), 1.5, 1e308, "", "x", [], [1, "a"], {}, {"a": 1}]
PATH_ATTACKS = ["..", "../", "..%2F..%2Fetc%2Fpasswd", "%2e%2e", "%00", "a%00b", "%2F", "%FF%FE", "a" * 300,
                "%E2%80%AE", "~root", "%25", "x%0AFORGED%20log%20line", "x%0D%0AFORGED"]


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # the template: /api/destinations/{name}/resume
    parameters: tuple[dict[str, Any], ...]
    body: dict[str, Any] | None  # the JSON body's schema
    body_required: bool
    statuses: frozenset[str]  # documented: "200", "400", ...

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


@dataclass
class Case:
    operation: Operation
    target: str  # path and query as sent
    body: bytes | None
    content_type: str | None
    what: str  # "valid", or what was broken

    def __str__(self) -> str:
        shown = self.body[:200] if self.body is not None else b""
        return f"{self.operation.method} {self.target[:300]} body={shown!r} ({self.what})"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Report:
    sent: int = 0
    statuses: dict[str, dict[int, int]] = field(default_factory=dict)  # operation -> status -> count
    problems: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.sent} requests; statuses {self.statuses}; problems:\n" + "\n".join(self.problems[:30])


# -- HTTP ---------------------------------------------------------------------------------------


def request(base: str, method: str, target: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 30) -> Answer:
    """One request on a connection of its own; ``target`` is sent as it is (no
    normalisation of ``..``, no quoting)."""
    url = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=timeout)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def get_json(base: str, target: str, headers: dict[str, str] | None = None) -> Any:
    answer = request(base, "GET", target, headers=headers)
    assert answer.status == 200, (target, answer.status, answer.body[:500])
    return answer.json()


# -- the document -------------------------------------------------------------------------------


def operations(document: dict[str, Any], prefix: str = "/api") -> list[Operation]:
    found = []
    for path, methods in sorted(document.get("paths", {}).items()):
        if not (path == prefix or path.startswith(prefix + "/")):
            continue
        for method, operation in sorted(methods.items()):
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            parameters = tuple(_resolve(document, p) for p in operation.get("parameters", []))
            body = operation.get("requestBody")
            schema = None
            if body is not None:
                body = _resolve(document, body)
                schema = body.get("content", {}).get("application/json", {}).get("schema")
            found.append(Operation(method.upper(), path, parameters, schema, bool(body and body.get("required")),
                                   frozenset(str(s) for s in operation.get("responses", {}))))
    return found


def _resolve(document: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in item:
        node: Any = document
        for part in item["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        item = {**node, **{k: v for k, v in item.items() if k != "$ref"}}
    return item


# -- values -------------------------------------------------------------------------------------


class Generator:
    """Values valid and invalid for JSON schemas of ``document``; ``hints`` are values to
    use now and then for parameters and properties of these names (a destination that
    exists, say), so that valid requests reach more than "not found"."""

    def __init__(self, document: dict[str, Any], rng: random.Random,
                 hints: dict[str, list[Any]] | None = None) -> None:
        self.document = document
        self.rng = rng
        self.hints = hints or {}

    def schema(self, schema: dict[str, Any] | None) -> dict[str, Any]:
        return _resolve(self.document, schema or {})

    def valid(self, schema: dict[str, Any] | None, name: str = "") -> Any:
        s = self.schema(schema)
        rng = self.rng
        if name in self.hints and rng.random() < 0.5:
            return rng.choice(self.hints[name])
        for key in ("anyOf", "oneOf"):
            if key in s:
                branches = [self.schema(b) for b in s[key]]
                typed = [b for b in branches if b.get("type") != "null"]
                if typed and rng.random() < 0.7:  # mostly a value, now and then null
                    return self.valid(rng.choice(typed), name)
                return self.valid(rng.choice(branches), name)
        if "allOf" in s:
            return self.valid(self.schema(s["allOf"][0]), name)
        if "const" in s:
            return s["const"]
        if "enum" in s:
            return rng.choice(s["enum"])
        if s.get("examples") and rng.random() < 0.6:
            return rng.choice(s["examples"])
        kind = s.get("type")
        if kind == "null":
            return None
        if kind == "boolean":
            return rng.random() < 0.5
        if kind == "integer":
            low, high = _bounds(s, int)
            return rng.choice([low, high, rng.randint(low, high)])
        if kind == "number":
            low, high = _bounds(s, float)
            return rng.choice([rng.uniform(low, high), high])
        if kind == "string":
            low = int(s.get("minLength", 0))
            high = min(int(s.get("maxLength", low + 24)), low + 24)
            alphabet = string.ascii_letters + string.digits + ".-_é日"
            return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, max(low, high))))
        if kind == "array":
            low = int(s.get("minItems", 0))
            high = min(int(s.get("maxItems", low + 4)), low + 4)
            return [self.valid(s.get("items"), name) for _ in range(rng.randint(low, high))]
        if kind == "object" or "properties" in s:
            required = set(s.get("required", []))
            return {key: self.valid(sub, key) for key, sub in s.get("properties", {}).items()
                    if key in required or rng.random() < 0.4}
        return rng.choice(["x", 1, True, None])

    def invalid(self, schema: dict[str, Any] | None, name: str = "") -> tuple[Any, str]:
        """A value that breaks ``schema`` (or one as nasty as can be, when it takes anything),
        and what it breaks."""
        s = self.schema(schema)
        rng = self.rng
        for key in ("anyOf", "oneOf"):
            if key in s:
                typed = [self.schema(b) for b in s[key] if self.schema(b).get("type") != "null"]
                if typed:
                    s = typed[0]
        kind = s.get("type")
        choices: list[tuple[Any, str]] = [(v, "wrong type") for v in NASTY_VALUES if not _fits(v, kind)]
        if kind == "string":
            if "maxLength" in s:
                choices.append(("y" * (int(s["maxLength"]) + rng.choice([1, 100, 4000])), "too long"))
            if s.get("minLength", 0) >= 1:
                choices.append(("", "empty"))
            choices += [(t, "nasty text") for t in NASTY_TEXT]
        elif kind in ("integer", "number"):
            if "minimum" in s:
                choices.append((int(s["minimum"]) - 1, "below the minimum"))
            if "maximum" in s:
                choices.append((int(s["maximum"]) + 1, "above the maximum"))
            choices += [(10**400, "a huge number"), (-(10**400), "a huge negative number")]
        elif kind == "array":
            if "maxItems" in s:
                choices.append(([1] * (int(s["maxItems"]) + 1), "too many items"))
            if s.get("minItems", 0) >= 1:
                choices.append(([], "too few items"))
            bad, what = self.invalid(s.get("items"))
            choices.append(([bad], f"an item: {what}"))
        elif kind == "object" or "properties" in s:
            valid = self.valid(s)
            choices.append(({**valid, "unexpected_field": 1}, "an unknown property"))
            for key in s.get("required", []):
                choices.append(({k: v for k, v in valid.items() if k != key}, f"{key} missing"))
            for key, sub in s.get("properties", {}).items():
                bad, what = self.invalid(sub, key)
                choices.append(({**valid, key: bad}, f"{key}: {what}"))
        elif "enum" in s:
            choices.append(("not-one-of-them", "not in the enum"))
        return rng.choice(choices) if choices else (rng.choice(NASTY_TEXT), "nasty text")

    # -- requests ---------------------------------------------------------------------------

    def case(self, operation: Operation) -> Case:
        """A request for ``operation``: valid about a third of the time."""
        rng = self.rng
        values: dict[str, Any] = {}
        for p in operation.parameters:
            if p.get("required") or rng.random() < 0.5:
                values[p["name"]] = self.valid(p.get("schema"), p["name"])
        body: Any = _MISSING
        if operation.body is not None and (operation.body_required or rng.random() < 0.7):
            body = self.valid(operation.body)
        raw: bytes | None = None
        what = "valid"
        if rng.random() > 0.35:
            mutations = ["extra query parameter"]
            if operation.parameters:
                mutations += ["bad parameter"] * 3
            if any(p["in"] == "path" for p in operation.parameters):
                mutations += ["path attack"] * 3
            if operation.body is not None:
                mutations += ["bad body"] * 4 + ["raw body"] * 2
            what = rng.choice(mutations)
            if what == "bad parameter":
                p = rng.choice(operation.parameters)
                bad, broken = self.invalid(p.get("schema"), p["name"])
                values[p["name"]] = bad
                what = f"parameter {p['name']}: {broken}"
            elif what == "path attack":
                p = rng.choice([p for p in operation.parameters if p["in"] == "path"])
                values[p["name"]] = _Raw(rng.choice(PATH_ATTACKS))
                what = f"path parameter {p['name']}: {values[p['name']]}"
            elif what == "extra query parameter":
                values[rng.choice(["unexpected", "limit2", "x" * 100, "日本"])] = _Extra(rng.choice(NASTY_TEXT))
            elif what == "bad body":
                body, broken = self.invalid(operation.body)
                what = f"body: {broken}"
            else:
                raw, what = rng.choice(_RAW_BODIES)
        target = self._target(operation, values)
        if raw is None and body is not _MISSING:
            raw = json.dumps(body, ensure_ascii=True).encode()
        content_type = "application/json" if raw is not None else None
        if raw is not None and rng.random() < 0.05:
            content_type, what = "text/plain", what + ", as text/plain"
        return Case(operation, target, raw, content_type, what)

    def _target(self, operation: Operation, values: dict[str, Any]) -> str:
        path = operation.path
        query: list[tuple[str, str]] = []
        kinds = {p["name"]: p["in"] for p in operation.parameters}
        for name, value in values.items():
            where = kinds.get(name, "query")
            if where == "path":
                text = value.text if isinstance(value, _Raw) else _quote(_wire(value))
                path = path.replace("{" + name + "}", text)
            elif where == "query":
                if isinstance(value, list):  # the parameter repeated; an empty list: given empty
                    query += [(name, _wire(v)) for v in value] or [(name, "")]
                else:
                    query.append((name, _wire(value.text if isinstance(value, _Extra) else value)))
        if query:
            path += "?" + "&".join(f"{_quote(name)}={_quote(value)}" for name, value in query)
        return path


@dataclass(frozen=True)
class _Raw:
    text: str  # a path parameter sent as it is

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class _Extra:
    text: str  # the value of a query parameter the operation does not have


def _quote(text: str) -> str:
    """Percent-encoded UTF-8, unpaired surrogates as they would be encoded if they could."""
    return urllib.parse.quote(text, safe="", errors="surrogatepass")


def _wire(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _bounds(schema: dict[str, Any], kind: type) -> tuple[Any, Any]:
    low = schema.get("minimum", schema.get("exclusiveMinimum", -1000))
    high = schema.get("maximum", schema.get("exclusiveMaximum", 1000))
    if "exclusiveMinimum" in schema and "minimum" not in schema:
        low = low + (1 if kind is int else 1e-3)
    low, high = max(low, -(10**6)), min(high, 10**6)
    return (int(low), int(high)) if kind is int else (float(low), float(high))


def _fits(value: Any, kind: str | None) -> bool:
    """Whether ``value`` is of JSON type ``kind``: a value that is not breaks the schema."""
    if kind is None:
        return True
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return {"string": str, "boolean": bool, "array": list, "object": dict, "null": type(None)}[kind] is type(value)


_RAW_BODIES: list[tuple[bytes, str]] = [
    (b"", "an empty body"),
    (b"{", "truncated JSON"),
    (b"not json at all", "not JSON"),
    (b"\xff\xfe\x00{", "not UTF-8"),
    (b"null", "null"),
    (b"[]", "an array"),
    (b'"text"', "a string"),
    (b"1" * 5000, "a number of 5000 digits"),
    (b'{"limit": ' + b"9" * 5000 + b"}", "a property of 5000 digits"),
    (b"[" * 50_000 + b"]" * 50_000, "arrays nested 50000 deep"),
    (b'{"a": NaN, "b": Infinity}', "NaN and Infinity"),
    (b'{"destination": "x", "destination": 5}', "a key given twice"),
    (b'{"destination": "\\ud800"}', "an unpaired surrogate"),
    (b'{"destination": "a\\u0000b"}', "a NUL character"),
]


# -- checks -------------------------------------------------------------------------------------


def problems(case: Case, answer: Answer, strict: bool = False,
             tolerated: frozenset[int] = frozenset({404})) -> list[str]:
    """What is wrong with ``answer``: a 5xx that ``case``'s operation does not document,
    an error without a JSON body of ``message`` and ``correlation_id`` (the same as the
    ``X-Correlation-ID`` header), a success that is not JSON; with ``strict``, also a
    status the operation does not document (``tolerated`` aside: a path attack that no
    longer matches the operation's path is another path's 404)."""
    found = []
    status = str(answer.status)
    documented = case.operation.statuses
    if answer.status >= 500 and status not in documented:
        found.append(f"{answer.status}, not documented")
    elif strict and status not in documented and answer.status not in tolerated:
        found.append(f"{answer.status}, not documented (documented: {', '.join(sorted(documented))})")
    try:
        body = answer.json()
    except ValueError:
        found.append(f"{answer.status} with a body that is not JSON: {answer.body[:200]!r}")
    else:
        if answer.status >= 400:
            if not (isinstance(body, dict) and isinstance(body.get("message"), str) and body["message"]
                    and isinstance(body.get("correlation_id"), str) and body["correlation_id"]):
                found.append(f"{answer.status} without message and correlation_id: {answer.body[:200]!r}")
            elif answer.headers.get("x-correlation-id") != body["correlation_id"]:
                found.append(f"{answer.status}: X-Correlation-ID {answer.headers.get('x-correlation-id')!r} "
                             f"is not the body's {body['correlation_id']!r}")
    return [f"{case}: {p}" for p in found]


def cases(document: dict[str, Any], prefix: str = "/api", per_operation: int = 30,
          limits: dict[str, int] | None = None, seed: int = 20,
          hints: dict[str, list[Any]] | None = None) -> Iterator[Case]:
    """``per_operation`` cases for each operation under ``prefix`` (``limits``: fewer for
    some, by path), interleaved; the same ones for the same seed and document."""
    generator = Generator(document, random.Random(seed), hints)
    found = operations(document, prefix)
    counts = [(limits or {}).get(op.path, per_operation) for op in found]
    for n in range(max(counts, default=0)):
        for op, count in zip(found, counts, strict=True):
            if n < count:
                yield generator.case(op)


def fuzz(base: str, document: dict[str, Any], headers: dict[str, str] | None = None, prefix: str = "/api",
         per_operation: int = 30, limits: dict[str, int] | None = None, seed: int = 20,
         hints: dict[str, list[Any]] | None = None, strict: bool = False, budget: float = 60.0) -> Report:
    """Send the ``cases`` to the server at ``base`` with ``headers`` (the token), and check
    every answer (``problems``); stops early past ``budget`` seconds (a problem too)."""
    report = Report()
    started = time.monotonic()
    for case in cases(document, prefix, per_operation, limits, seed, hints):
        if time.monotonic() - started > budget:
            report.problems.append(f"stopped after {budget}s and {report.sent} requests")
            break
        sent = {**(headers or {}), **({"Content-Type": case.content_type} if case.content_type else {})}
        try:
            answer = request(base, case.operation.method, case.target, case.body, sent)
        except (OSError, http.client.HTTPException) as exc:
            report.problems.append(f"{case}: no answer: {type(exc).__name__}: {exc}")
            continue
        report.sent += 1
        by_status = report.statuses.setdefault(str(case.operation), {})
        by_status[answer.status] = by_status.get(answer.status, 0) + 1
        report.problems += problems(case, answer, strict)
    return report
