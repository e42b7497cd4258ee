"""The server ``dicom-bridge dicomweb`` talks to, and how it retries.

The peer is a ``dicomweb`` destination or source of the configuration (``--config FILE
--target NAME``), or ``--url`` with authentication flags whose secrets come from files
or ``env:NAME`` only: the flags are validated by the configuration's own models
(``bridge.config.DicomwebDestination``), so the same rules and messages apply.

Every request goes through a ``RetryingClient``: a connection that fails, and the
statuses of ``--retry-on``, are tried again up to ``--retries`` times, waiting
``--backoff`` seconds, doubled each time (at most ``MAX_BACKOFF``), or what the server's
Retry-After asks.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bridge.config import DicomwebDestination, DicomwebSource, HttpPeer, load_config
from bridge.config.errors import describe
from bridge.errors import ConfigError, UpstreamUnavailable
from bridge.web.client import Body, HttpClient, HttpResponse

MAX_BACKOFF = 60.0  # seconds between two attempts, at most
DEFAULT_RETRY_ON = (429, 502, 503, 504)


class Usage(Exception):
    """What the command line or the configuration does not allow: exit 2 with the message."""


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 3
    backoff: float = 1.0
    retry_on: frozenset[int] = frozenset(DEFAULT_RETRY_ON)
    max_backoff: float = MAX_BACKOFF

    def delay(self, attempt: int, hint: float | None) -> float:
        """Seconds before attempt ``attempt + 1`` (0 is the first retry); a Retry-After wins."""
        if hint is not None:
            return min(hint, self.max_backoff)
        return min(self.backoff * 2 ** attempt, self.max_backoff)


class RetryingClient(HttpClient):
    """An ``HttpClient`` that sends again what ``policy`` says to retry."""

    def __init__(self, peer: HttpPeer, policy: RetryPolicy) -> None:
        super().__init__(peer)
        self.policy = policy

    def request(self, method: str, url: str, *, body: Body | bytes | None = None,
                headers: Mapping[str, str] | None = None, params: Mapping[str, str] | str | None = None,
                read_timeout: float | None = None, connect_timeout: float | None = None,
                retry: bool = True) -> HttpResponse:
        policy = self.policy
        for attempt in range(policy.retries + 1):
            last = attempt == policy.retries
            try:
                response = super().request(method, url, body=body, headers=headers, params=params,
                                           read_timeout=read_timeout, connect_timeout=connect_timeout, retry=retry)
            except UpstreamUnavailable as exc:
                if last:
                    raise
                self.close()  # a fresh connection for the next attempt
                time.sleep(policy.delay(attempt, exc.retry_after))
                continue
            if response.status in policy.retry_on and not last:
                response.close()
                time.sleep(policy.delay(attempt, response.retry_after))
                continue
            return response
        raise AssertionError("unreachable")


class Clients:
    """One ``RetryingClient`` per thread (an ``HttpClient`` is not shared between threads)."""

    def __init__(self, peer: HttpPeer, policy: RetryPolicy) -> None:
        self.peer = peer
        self.policy = policy
        self._local = threading.local()
        self._all: list[RetryingClient] = []
        self._lock = threading.Lock()

    def get(self) -> RetryingClient:
        client: RetryingClient | None = getattr(self._local, "client", None)
        if client is None:
            client = RetryingClient(self.peer, self.policy)
            self._local.client = client
            with self._lock:
                self._all.append(client)
        return client

    def close(self) -> None:
        with self._lock:
            clients, self._all = self._all, []
        for client in clients:
            client.close()


def add_options(parser: argparse.ArgumentParser) -> None:
    """The options that say which server, as whom, and how to retry (every subcommand)."""
    where = parser.add_argument_group("the server")
    where.add_argument("--config", type=Path, help="configuration file (YAML), with --target")
    where.add_argument("--target", metavar="NAME", help="a destination or source of type dicomweb in --config")
    where.add_argument("--url", help="the DICOMweb base URL (instead of --config/--target)")
    where.add_argument("--user", help="HTTP basic authentication: the user name")
    where.add_argument("--password-file", type=Path, help="basic authentication: a file holding the password")
    where.add_argument("--password", metavar="env:NAME", help="basic authentication: the password's variable")
    where.add_argument("--token-file", type=Path, help="bearer authentication: a file holding the token")
    where.add_argument("--token", metavar="env:NAME", help="bearer authentication: the token's variable")
    where.add_argument("--ca-bundle", type=Path, help="PEM file of CA certificates to trust")
    where.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for an answer (default 300)")
    retry = parser.add_argument_group("retries (default: the config's retry: with --target, else 3 of 1 s)")
    retry.add_argument("--retries", type=int, help="attempts after the first (0: none)")
    retry.add_argument("--backoff", type=float, help="seconds before the first retry, doubled after each")
    retry.add_argument("--retry-on", type=_statuses, help="HTTP statuses to retry (default 429,502,503,504)")


def _statuses(value: str) -> frozenset[int]:
    try:
        codes = frozenset(int(code) for code in value.split(",") if code.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HTTP statuses like 429,503, not {value!r}") from None
    if not all(100 <= code < 600 for code in codes):
        raise argparse.ArgumentTypeError(f"not HTTP statuses: {value!r}")
    return codes


def peer(args: argparse.Namespace) -> tuple[DicomwebDestination, RetryPolicy]:
    """The server's settings (as a ``dicomweb`` destination's, whatever the target) and
    the retry policy; ``Usage`` says what is wrong with the flags or the configuration."""
    retries, backoff = 3, 1.0
    if args.url is not None:
        if args.config is not None or args.target is not None:
            raise Usage("give either --url or --config with --target, not both")
        raw: dict[str, Any] = {"type": "dicomweb", "url": args.url, "auth": _auth(args),
                               "timeouts": {"read": args.timeout}}
        if args.ca_bundle is not None:
            raw["tls"] = {"ca_bundle": str(args.ca_bundle)}
        try:
            settings = DicomwebDestination.model_validate(raw)
        except ValidationError as exc:
            errors = [e for e in (describe(err, raw, DicomwebDestination) for err in exc.errors()) if e]
            raise Usage("; ".join(errors).replace("auth.", "--").replace("url:", "--url:")) from None
    else:
        if args.config is None or args.target is None:
            raise Usage("name the server: --url URL, or --config FILE --target NAME")
        if any(getattr(args, name) is not None for name in ("user", "password_file", "password", "token_file",
                                                            "token", "ca_bundle")):
            raise Usage("authentication flags go with --url; a --target has its own in the configuration")
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            raise Usage(str(exc)) from None
        found = config.destinations.get(args.target) or config.sources.get(args.target)
        if not isinstance(found, DicomwebDestination | DicomwebSource):
            names = [n for n, d in [*config.destinations.items(), *config.sources.items()]
                     if isinstance(d, DicomwebDestination | DicomwebSource)]
            raise Usage(f"no destination or source {args.target!r} of type dicomweb in {args.config}"
                        + (f" (there: {', '.join(names)})" if names else ""))
        fields = found.model_dump(include=set(HttpPeer.model_fields) | ({"batch", "duplicates"}
                                  if isinstance(found, DicomwebDestination) else set()))
        settings = DicomwebDestination.model_validate({"type": "dicomweb", **fields})
        retry = config.retry_for(args.target) if args.target in config.destinations else config.retry
        retries, backoff = max(0, min(retry.max_attempts - 1, 5)), retry.initial
    policy = RetryPolicy(
        retries=args.retries if args.retries is not None else retries,
        backoff=args.backoff if args.backoff is not None else backoff,
        retry_on=args.retry_on if args.retry_on is not None else frozenset(DEFAULT_RETRY_ON))
    if policy.retries < 0 or policy.backoff < 0:
        raise Usage("--retries and --backoff cannot be negative")
    return settings, policy


def _auth(args: argparse.Namespace) -> dict[str, Any]:
    basic = args.user is not None or args.password_file is not None or args.password is not None
    bearer = args.token_file is not None or args.token is not None
    if basic and bearer:
        raise Usage("give basic (--user) or bearer (--token...) authentication, not both")
    if basic:
        if args.user is None:
            raise Usage("--password-file and --password need --user")
        return {"type": "basic", "username": args.user, "password": args.password,
                "password_file": str(args.password_file) if args.password_file else None}
    if bearer:
        return {"type": "bearer", "token": args.token,
                "token_file": str(args.token_file) if args.token_file else None}
    return {"type": "none"}
