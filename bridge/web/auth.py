"""Authentication of HTTP requests to DICOMweb peers: none, basic, bearer token, OAuth 2.0
client credentials.

Secrets come from files (``*_file``) or environment variables (``env:NAME``), never from
the configuration itself, and never go into a log line, an error or a queue reason:
messages name the file or the variable, not what it holds. A final line break in a
secret file is ignored.

Each ``Auth`` gives the headers of the next request (``headers``) and, after a 401,
tries to get better credentials once (``refresh``: a changed file, a new token). Errors
are raised as the upstream errors: ``UpstreamMisconfigured`` when only an
administrator can fix it (a missing secret, a refused client), ``UpstreamUnavailable``
when the token endpoint is down.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from pathlib import Path
from typing import Protocol

import requests

from bridge.config import BasicAuth, BearerAuth, HttpAuth, HttpTimeouts, OAuth2Auth
from bridge.errors import UpstreamMisconfigured, UpstreamUnavailable

LOGGER = logging.getLogger(__name__)

# A token is renewed this long before it expires (or at 90% of a shorter lifetime), so a
# request never leaves with a token that lapses on the way.
REFRESH_MARGIN = 60.0


class Auth(Protocol):
    def headers(self) -> dict[str, str]: ...

    def refresh(self) -> bool:
        """After a 401: True if there are new credentials worth one more try."""
        ...


def read_secret(file: Path | None, reference: str | None, what: str) -> str:
    """The secret in ``file``, or in the environment variable of ``env:NAME``."""
    if file is not None:
        try:
            value = file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise UpstreamMisconfigured(f"{what}: cannot read {file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise UpstreamMisconfigured(f"{what}: {file} is not UTF-8 text") from None
        if not value:
            raise UpstreamMisconfigured(f"{what}: {file} is empty")
        return value
    assert reference is not None
    name = reference.removeprefix("env:")
    value = os.environ.get(name, "")
    if not value:
        raise UpstreamMisconfigured(f"{what}: environment variable {name} is not set")
    return value


class NoAuth:
    def headers(self) -> dict[str, str]:
        return {}

    def refresh(self) -> bool:
        return False


class Basic:
    """HTTP basic (RFC 7617, UTF-8). The password is read again after a 401."""

    def __init__(self, settings: BasicAuth) -> None:
        self.settings = settings
        self._password = self._read()

    def _read(self) -> str:
        return read_secret(self.settings.password_file, self.settings.password, "auth.password")

    def headers(self) -> dict[str, str]:
        pair = f"{self.settings.username}:{self._password}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}

    def refresh(self) -> bool:
        old, self._password = self._password, self._read()
        return self._password != old


class Bearer:
    """A bearer token (RFC 6750) from a file, read again whenever the file changes (another
    process renews it), or from an environment variable."""

    def __init__(self, settings: BearerAuth) -> None:
        self.settings = settings
        self._stamp: tuple[int, int, int] | None = None
        self._token = ""
        self._load()

    def _load(self) -> None:
        file = self.settings.token_file
        if file is None:
            self._token = read_secret(None, self.settings.token, "auth.token")
            return
        try:
            st = file.stat()
        except OSError as exc:
            raise UpstreamMisconfigured(f"auth.token_file: cannot read {file}: {exc.strerror}") from None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._stamp:
            self._token = read_secret(file, None, "auth.token_file")
            self._stamp = stamp

    def headers(self) -> dict[str, str]:
        self._load()
        return {"Authorization": f"Bearer {self._token}"}

    def refresh(self) -> bool:
        old = self._token
        self._stamp = None
        self._load()
        return self._token != old


class OAuth2ClientCredentials:
    """Tokens from an OAuth 2.0 token endpoint (client credentials grant, RFC 6749 4.4),
    fetched when first needed, renewed before they expire and after a 401."""

    def __init__(self, settings: OAuth2Auth, timeouts: HttpTimeouts, verify: bool | str) -> None:
        self.settings = settings
        self._timeouts = timeouts
        self._verify = verify
        self._secret = read_secret(settings.client_secret_file, settings.client_secret, "auth.client_secret")
        self._token = ""
        self._renew_at = 0.0
        self._lock = threading.Lock()
        # A session of its own: the token endpoint is another server, maybe behind another
        # proxy (or none, by NO_PROXY); the environment is read once, as for the server.
        self._session = requests.Session()
        self._session.trust_env = False
        self._session.proxies = requests.utils.get_environ_proxies(settings.token_url)

    def headers(self) -> dict[str, str]:
        with self._lock:
            if not self._token or time.monotonic() >= self._renew_at:
                self._fetch()
            return {"Authorization": f"Bearer {self._token}"}

    def refresh(self) -> bool:
        with self._lock:
            self._secret = read_secret(self.settings.client_secret_file, self.settings.client_secret,
                                       "auth.client_secret")
            self._fetch()
            return True

    def _fetch(self) -> None:
        s = self.settings
        form = {"grant_type": "client_credentials"}
        if s.scope:
            form["scope"] = s.scope
        auth: tuple[str, str] | None = None
        if s.client_auth == "basic":
            auth = (s.client_id, self._secret)  # requests encodes it (RFC 6749 2.3.1)
        else:
            form |= {"client_id": s.client_id, "client_secret": self._secret}
        try:
            response = self._session.post(
                s.token_url, data=form, auth=auth, headers={"Accept": "application/json"},
                timeout=(self._timeouts.connect, self._timeouts.read), verify=self._verify, allow_redirects=False,
            )
        except requests.exceptions.SSLError as exc:
            raise UpstreamMisconfigured(f"token endpoint {s.token_url}: TLS: {_short(exc)}") from None
        except requests.RequestException as exc:
            raise UpstreamUnavailable(f"token endpoint {s.token_url}: {type(exc).__name__}") from None
        status = response.status_code
        try:
            answer = response.json()
        except ValueError:
            answer = {}
        if not isinstance(answer, dict):
            answer = {}
        if status == 429 or status >= 500:
            raise UpstreamUnavailable(f"token endpoint {s.token_url}: HTTP {status}")
        if status != 200 or not isinstance(answer.get("access_token"), str):
            # RFC 6749 5.2: ``error`` and ``error_description`` say why; neither holds a secret.
            why = " ".join(str(answer[k]) for k in ("error", "error_description") if answer.get(k))
            raise UpstreamMisconfigured(f"token endpoint {s.token_url} refused the client {s.client_id}: "
                                        f"HTTP {status}{': ' + why[:200] if why else ''}")
        self._token = answer["access_token"]
        lifetime = answer.get("expires_in")
        now = time.monotonic()
        if isinstance(lifetime, int | float) and lifetime > 0:
            self._renew_at = now + max(min(lifetime - REFRESH_MARGIN, lifetime * 0.9), 0.0)
        else:
            self._renew_at = float("inf")  # no lifetime given: renewed after a 401
        LOGGER.info("token for client %s from %s, valid for %s s", s.client_id, s.token_url, lifetime or "?")


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def build(settings: HttpAuth, timeouts: HttpTimeouts, verify: bool | str) -> Auth:
    if isinstance(settings, BasicAuth):
        return Basic(settings)
    if isinstance(settings, BearerAuth):
        return Bearer(settings)
    if isinstance(settings, OAuth2Auth):
        return OAuth2ClientCredentials(settings, timeouts, verify)
    return NoAuth()
