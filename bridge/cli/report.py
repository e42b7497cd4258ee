"""What ``dicom-bridge check`` and ``dicom-bridge route`` print: the configuration's
errors and warnings, and for a file, every rule considered and why it matched or not."""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import socket
import sqlite3
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from bridge.config import Config, DataDir, Modification
from bridge.dataset import dicomfile
from bridge.dimse import listener, statuses, store
from bridge.errors import InboundError
from bridge.forward import ingest
from bridge.routing import rules

UNROUTED = "no rule routes this instance (unrouted: reject)"
_SECRET_FILE = re.compile(r"(password|passphrase|token|secret|key|credentials?)_file$", re.IGNORECASE)


# -- check ---------------------------------------------------------------------------------


def warnings(config: Config, config_path: Path | None) -> list[str]:
    """What is valid but probably not what the administrator meant."""
    assert isinstance(config.rules, list)
    store = config.store_warning()
    found = [store] if store else []
    found += rules.warnings(config.rules, config.accept.calling_ae, config.ae_title, config.accept.check_called_ae)
    if config_path is not None:
        found += secret_warnings(config_path)
    found += _orphaned_rows(config)
    found += move_warnings(config)
    found += http_warnings(config)
    return found


def http_errors(config: Config) -> list[str]:
    """What would stop the HTTP server, and so the daemon, from starting: its token file
    and certificate files, read as the daemon reads them."""
    from bridge.api.auth import TokenFileError, read_tokens

    http = config.http
    if http.port is None:
        return []
    found = []
    try:
        read_tokens(http.token_file)
    except TokenFileError as exc:
        found.append(str(exc))
    if http.tls is not None:
        files = [("cert_file", http.tls.cert_file), ("key_file", http.tls.key_file),
                 ("client_ca_file", http.tls.client_ca_file)]
        found += [f"http.tls.{name}: cannot read {path}" for name, path in files
                  if path is not None and not os.access(path, os.R_OK)]
    return found


def http_warnings(config: Config) -> list[str]:
    """An API reachable from other hosts over plain HTTP: its tokens travel in clear text."""
    http = config.http
    if http.port is None or http.tls is not None or http.token_file is None:
        return []
    try:
        loopback = ipaddress.ip_address(http.host).is_loopback
    except ValueError:
        loopback = http.host == "localhost"
    if loopback:
        return []
    return [f"http: the API tokens travel in clear text to {http.host}:{http.port}: set http.tls, or serve "
            "on 127.0.0.1 behind a TLS reverse proxy"]


def move_warnings(config: Config) -> list[str]:
    """A ``c-move`` source whose node the listener would refuse: the node C-MOVEs to the
    bridge, associating with it as its own AE title (that of ``nodes``) from its host."""
    found = []
    accept = config.accept
    for name, source in config.sources.items():
        if source.type != "dimse" or source.retrieve != "c-move" or source.node not in config.nodes:
            continue
        node = config.nodes[source.node]
        calling = node.ae_title or source.node
        if accept.calling_ae is not None and not any(fnmatch.fnmatchcase(calling, p) for p in accept.calling_ae):
            found.append(f"sources.{name}: its node {source.node} C-MOVEs to the bridge as {calling}, which "
                         f"accept.calling_ae refuses: add {calling!r} to accept.calling_ae")
        if accept.hosts is not None:
            addresses = _addresses(node.host)
            if addresses and not any(any(ip in net for net in accept.hosts) for ip in addresses):
                found.append(f"sources.{name}: its node {source.node} C-MOVEs to the bridge from {node.host}, "
                             f"which accept.hosts refuses: add {addresses[0]}/{addresses[0].max_prefixlen} (or its "
                             "network) to accept.hosts")
    return found


def _addresses(host: str) -> list[Any]:
    """The IP addresses of ``host`` (none when it cannot be resolved now)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return []
    return list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos))


def secret_warnings(config_path: Path) -> list[str]:
    """Secret files (``*_file`` settings such as ``token_file``) that anyone on the machine
    can read."""
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return []
    found = []
    for where, value in _leaves(raw, ""):
        key = where.rsplit(".", 1)[-1]
        if not (_SECRET_FILE.search(key) and isinstance(value, str)):
            continue
        path = Path(value) if Path(value).is_absolute() else config_path.parent / value
        try:
            mode = path.stat().st_mode
        except OSError:
            found.append(f"{where}: {path} cannot be read")
            continue
        if mode & stat.S_IROTH:
            found.append(f"{where}: {path} is readable by every user of this machine (chmod 600 {path})")
    if config_path.exists() and config_path.stat().st_mode & stat.S_IROTH and _mentions_secret(raw):
        found.append(f"{config_path}: readable by every user of this machine and names secrets (chmod 640)")
    return found


def _mentions_secret(raw: Any) -> bool:
    return any(_SECRET_FILE.search(where.rsplit(".", 1)[-1]) for where, _ in _leaves(raw, ""))


def _leaves(raw: Any, where: str) -> Iterator[tuple[str, Any]]:
    if isinstance(raw, dict):
        for key, value in raw.items():
            yield from _leaves(value, f"{where}.{key}" if where else str(key))
    elif isinstance(raw, list):
        for i, value in enumerate(raw):
            yield from _leaves(value, f"{where}[{i}]")
    else:
        yield where, raw


def _orphaned_rows(config: Config) -> list[str]:
    """Queued rows of destinations the configuration no longer has: kept, never dropped."""
    path = DataDir(config.data_dir).queue
    if not path.exists():
        return []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            counts = db.execute(
                "SELECT destination, count(*) FROM queue WHERE state IN ('pending', 'in_flight', 'dead')"
                " GROUP BY destination"
            ).fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return []
    return [f"destinations: the queue holds {n} row(s) for {name!r}, which is not configured; they are kept"
            f" (add it back to deliver them, or `dicom-bridge queue purge --destination {name}`)"
            for name, n in counts if name not in config.destinations]


# -- route ---------------------------------------------------------------------------------


def files(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def route_lines(config: Config, path: Path, ctx: rules.Context,
                verb: rules.Verb = "store") -> tuple[list[str], int]:
    """The explanation of one file's routing, a line each, and the status a C-STORE of it
    would get (0 for a find or retrieve identifier that parses). A C-STORE goes through
    the listener's own checks (``ingest.examine``): header, required UIDs, rules."""
    ruleset = listener.ruleset(config)  # the listener's rules, built as the listener builds them
    try:
        if verb == "store":
            header, (sop_class, *_), decision = ingest.examine(path, ctx, ruleset, explain=True)
            if not config.accept.any_sop_class and sop_class not in store.storage_sop_classes(config):
                return [f"{path}: would be refused: its SOP class {sop_class} is not accepted (no presentation "
                        "context for it: see accept.extra_sop_classes, accept.any_sop_class)"], 0x0122
        else:
            header = dicomfile.read_header(path)
            decision = ruleset.route(verb, ctx, header, explain=True)
    except InboundError as exc:
        status, comment = store.refusal(exc)
        return [f"{path}: would be refused: {statuses.describe(status, comment)}"], status
    summary = ", ".join(f"{k} {v}" for k, v in (
        ("Modality", dicomfile.text(header, "Modality")),
        ("study", dicomfile.text(header, "StudyInstanceUID")),
        ("SOP", dicomfile.text(header, "SOPInstanceUID")),
    ) if v)
    lines = [f"{path} ({summary})"]
    for verdict in decision.verdicts:
        where = f"rules[{verdict.index}] {verdict.rule}"
        if verdict.matched:
            changes = "; ".join(f"{name}: {describe(mod)}" for name, mod in verdict.modify.items()
                                if name in verdict.targets)
            tail = "" if verdict.stop else " (continue)"
            lines.append(f"  {where}: matched -> {', '.join(verdict.targets)}{tail}"
                         + (f"; modify {changes}" if changes else ""))
        elif verdict.reason.startswith("not considered"):
            lines.append(f"  {where}: {verdict.reason}")
        else:
            lines.append(f"  {where}: no match, {verdict.reason}")
    if not decision.verdicts:
        lines.append(f"  no rule has {verb}")
    if decision.destinations:
        targets = ", ".join(f"{name} (priority {prio})" for name, prio in decision.destinations.items())
        lines.append(f"  => {targets}")
        for name, mod in decision.modify.items():
            lines.append(f"     {name} gets: {describe(mod)}")
    elif verb != "store":
        lines.append(f"  => no rule routes this {verb}")
    elif config.unrouted == "reject":
        lines.append(f"  => no rule routes it: would be refused: {statuses.describe(0x0124, UNROUTED)}")
        return lines, 0x0124
    else:
        lines.append(f"  => no rule routes it: unrouted sends it to {config.unrouted}")
    return lines, 0x0000


def describe(mod: Modification) -> str:
    parts = [f"copy {source} to {target}" for target, source in mod.copy_.items()]
    parts += [f"replace /{r.pattern}/ in {key} with {r.with_!r}" for key, r in mod.replace.items()]
    parts += [f"set {key}={value!r}" for key, value in mod.set.items()]
    parts += [f"remove {key}" for key in mod.remove]
    return ", ".join(parts) or "nothing"
