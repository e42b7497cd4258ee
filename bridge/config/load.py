"""Loading: the file read and validated whole, its rules file, the embedded default, and
the names that must refer to something (destinations, nodes, sources), checked in one
place. Every problem is reported at once, each with its path (``bridge.config.errors``).
Relative paths in a file are resolved against the file's folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from bridge.config.destinations import ArchiveDestination, FolderDestination, StaticDestination
from bridge.config.errors import describe, hint
from bridge.config.nodes import HttpPeer
from bridge.config.rules import Rule
from bridge.config.settings import Config
from bridge.config.sources import LOCAL
from bridge.config.values import resolve
from bridge.config.watch import valid_watches, watch_overlaps
from bridge.errors import ConfigError


def embedded_default() -> dict[str, Any]:
    """The configuration used when no file is given: keep every instance in the local archive."""
    return {
        "destinations": {"archive": {"type": "archive"}},
        "rules": [{"name": "keep-everything", "store": ["archive"], "find": ["local"], "retrieve": ["local"]}],
    }


def load_config(path: Path | None = None) -> Config:
    """Load and validate a configuration file, or the embedded default when ``path`` is None.

    Raises ``ConfigError`` listing every problem, each with its path.
    """
    if path is None:
        return validate(embedded_default(), base=Path.cwd(), source="embedded default")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror}"], str(path)) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"{where}{getattr(exc, 'problem', exc)}"], str(path)) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["the file must be a mapping of settings"], str(path))
    return validate(raw, base=path.parent.resolve(), source=str(path))


def validate(raw: dict[str, Any], base: Path, source: str = "configuration") -> Config:
    """Validate a whole configuration; ``ConfigError`` lists every problem at once: the
    models' errors, those of a rules file, and names that refer to nothing."""
    errors: list[str] = []
    config: Config | None = None
    defaulted = raw.get("destinations") in (None, {}) and raw.get("rules") in (None, [])
    if defaulted:  # nowhere to send anything: do what running without a file does
        raw = {**raw, **embedded_default()}
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        errors += [e for e in (describe(err, raw, Config) for err in exc.errors()) if e]
    raw_rules: list[tuple[str, Any]] = []
    rules: list[Rule] | None = None
    if isinstance(raw.get("rules"), str):
        rules_path = resolve(base, Path(raw["rules"]))
        try:
            raw_rules = _read_rules(rules_path)
            rules = _validate_rules(raw_rules)
        except ConfigError as exc:
            errors += exc.errors
    elif isinstance(raw.get("rules"), list):
        raw_rules = [(f"rules[{i}]", item) for i, item in enumerate(raw["rules"])]
    errors += _cross_references(raw, raw_rules)
    # Folders that feed each other are reported with everything else, even when another
    # section has errors: the watch entries are checked on their own then.
    watches = list(enumerate(config.watch)) if config is not None else valid_watches(raw.get("watch"))
    for _, watch in watches:  # normalised: compared with each other, and shown in logs and rows
        watch.path = Path(os.path.normpath(resolve(base, watch.path)))
        watch.failed = Path(os.path.normpath(resolve(base, watch.failed)))
        watch.move_to = Path(os.path.normpath(resolve(base, watch.move_to))) if watch.move_to else None
    errors += watch_overlaps(watches)
    if config is not None:
        errors += _http(config, base)
    if errors or config is None:
        raise ConfigError(list(dict.fromkeys(errors)), source)
    if rules is not None:
        config.rules = rules
    if defaulted:
        config.notes.append("no destinations and no rules: every instance is kept in the local archive, "
                            "as with the embedded default (destination 'archive', rule 'keep-everything')")
    config.data_dir = resolve(base, config.data_dir)
    for destination in config.destinations.values():
        local = FolderDestination | ArchiveDestination | StaticDestination
        if isinstance(destination, local) and destination.path is not None:
            destination.path = str(resolve(base, Path(destination.path)))
    for peer in [*config.destinations.values(), *config.sources.values()]:
        if isinstance(peer, HttpPeer):
            peer.resolve_paths(base)
    return config


def _read_rules(path: Path) -> list[tuple[str, Any]]:
    """The raw rules of a file or folder, each with the path an error about it names."""
    if not path.exists():
        raise ConfigError([f"rules: {path} does not exist"], str(path))
    files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
    found: list[tuple[str, Any]] = []
    for file in files:
        try:
            raw = yaml.safe_load(file.read_text(encoding="utf-8")) or []
        except OSError as exc:
            raise ConfigError([f"{file}: cannot read: {exc.strerror}"], "rules") from exc
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            raise ConfigError([f"{file}: {where}{getattr(exc, 'problem', exc)}"], "rules") from exc
        if isinstance(raw, dict):
            raw = raw.get("rules", [])
        if not isinstance(raw, list):
            raise ConfigError([f"{file}: expected a list of rules, or a mapping with rules:"], "rules")
        found += [(f"{file.name}: rules[{i}]", item) for i, item in enumerate(raw)]
    return found


def _validate_rules(raw_rules: list[tuple[str, Any]]) -> list[Rule]:
    rules: list[Rule] = []
    errors: list[str] = []
    for where, item in raw_rules:
        try:
            rules.append(Rule.model_validate(item))
        except ValidationError as exc:
            file, _, prefix = where.rpartition(": ")
            lead = f"{file}: " if file else ""
            errors += [lead + e for e in (describe(err, item, Rule, prefix) for err in exc.errors()) if e]
    if errors:
        raise ConfigError(errors, "rules")
    return rules


def _cross_references(raw: dict[str, Any], raw_rules: list[tuple[str, Any]]) -> list[str]:
    """Names that refer to nothing, read from the raw file so that they are reported
    together with every other error."""
    errors = []
    destinations: dict[str, Any] = raw["destinations"] if isinstance(raw.get("destinations"), dict) else {}
    configured: dict[str, Any] = raw["sources"] if isinstance(raw.get("sources"), dict) else {}
    nodes: dict[str, Any] = raw["nodes"] if isinstance(raw.get("nodes"), dict) else {}
    names = [str(n) for n in destinations]
    sources = [LOCAL] + [str(n) for n in configured if n != LOCAL]
    archives = [str(n) for n, d in destinations.items() if isinstance(d, dict) and d.get("type") == "archive"]
    unrouted = raw.get("unrouted", "reject")
    if isinstance(unrouted, str) and unrouted != "reject" and unrouted not in destinations:
        errors.append(f"unrouted: unknown destination {unrouted!r}{hint(unrouted, names + ['reject'])}")
    for section, entries in (("destinations", destinations), ("sources", configured)):
        for name, entry in entries.items():
            node = entry.get("node") if isinstance(entry, dict) else None
            if isinstance(node, str) and node not in nodes:
                errors.append(f"{section}.{name}.node: unknown node {node!r}{hint(node, [str(n) for n in nodes])}")
    for name, entry in configured.items():
        if isinstance(entry, dict) and entry.get("type") == "rad69":
            errors += _rad69_locate(str(name), entry.get("locate"), configured, sources)
    if LOCAL in configured:
        errors.append(f"sources.{LOCAL}: {LOCAL!r} is built in (the local archive, the one `type: archive` "
                      "destination): give this source another name")
    for where, rule in raw_rules:
        if not isinstance(rule, dict):
            continue
        for verb, known, what in (("store", names, "destination"), ("find", sources, "source"),
                                  ("retrieve", sources, "source")):
            targets = rule.get(verb)
            for j, target in enumerate(targets if isinstance(targets, list) else []):
                if isinstance(target, str) and target not in known:
                    errors.append(f"{where}.{verb}[{j}]: unknown {what} {target!r}{hint(target, known)}")
                elif target == LOCAL and verb != "store" and len(archives) != 1:
                    errors.append(f"{where}.{verb}[{j}]: {_local_archive(archives)}")
                elif verb == "find" and _type(configured, target) == "rad69":
                    errors.append(f"{where}.find[{j}]: source {target!r} is rad69, which cannot query (RAD-69 "
                                  "only retrieves): name its locate source here instead")
        modify = rule.get("modify")
        store: list[Any] = rule["store"] if isinstance(rule.get("store"), list) else []
        for name in modify if isinstance(modify, dict) else {}:
            if name not in destinations:
                errors.append(f"{where}.modify.{name}: unknown destination {name!r}{hint(str(name), names)}")
            elif name not in store:
                errors.append(f"{where}.modify.{name}: {name!r} is not in this rule's store list")
    return errors


def _type(configured: dict[str, Any], name: Any) -> Any:
    entry = configured.get(name) if isinstance(name, str) else None
    return entry.get("type") if isinstance(entry, dict) else None


def _rad69_locate(name: str, locate: Any, configured: dict[str, Any], sources: list[str]) -> list[str]:
    """A rad69 source's ``locate`` must name a source that can query: dicomweb, dimse or local."""
    if not isinstance(locate, str):
        return []  # missing or not text: the model says so
    where = f"sources.{name}.locate"
    if locate not in sources:
        return [f"{where}: unknown source {locate!r}{hint(locate, sources)}"]
    if locate != LOCAL and _type(configured, locate) == "rad69":
        return [f"{where}: source {locate!r} is rad69 too, which cannot query: name a dicomweb, dimse or local "
                "source"]
    return []


def _local_archive(archives: list[str]) -> str:
    """Why the source ``local`` cannot be used: it is the index of the one archive."""
    if not archives:
        return (f"source {LOCAL!r} is the local archive, and no destination has type: archive "
                "(add one, and a rule that stores into it)")
    return (f"source {LOCAL!r} is the local archive, and several destinations have type: archive "
            f"({', '.join(archives)}): keep one")


def _http(config: Config, base: Path) -> list[str]:
    """``metrics: {host, port}`` (before ``http`` existed) is read as ``http``, with a note
    that ``check`` shows; the HTTP server's files are resolved against the file's folder;
    static trees served by it have paths of their own. Returns the errors."""
    errors: list[str] = []
    old = config.metrics
    if old.port is not None:
        if config.http.port is not None:
            return ["metrics: replaced by http, which is set: remove the metrics section"]
        config.http = config.http.model_copy(update={"host": old.host, "port": old.port})
        config.notes.append(f"metrics is deprecated: read as http: {{host: {old.host}, port: {old.port}}}; "
                            "rename the section to http (it serves /metrics and more)")
    http = config.http
    if http.token_file is not None:
        http.token_file = resolve(base, http.token_file)
    if http.tls is not None:
        http.tls.cert_file = resolve(base, http.tls.cert_file)
        http.tls.key_file = resolve(base, http.tls.key_file)
        if http.tls.client_ca_file is not None:
            http.tls.client_ca_file = resolve(base, http.tls.client_ca_file)
    served: dict[str, str] = {}
    for name, destination in config.destinations.items():
        if isinstance(destination, StaticDestination) and destination.serve is not None:
            where = f"destinations.{name}.serve"
            if http.port is None:
                errors.append(f"{where}: the HTTP server is off: set http.port to serve the tree")
            elif destination.serve in served:
                errors.append(f"{where}: {destination.serve} is served already, by {served[destination.serve]}")
            served.setdefault(destination.serve, f"destinations.{name}")
    return errors
