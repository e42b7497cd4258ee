"""The peers the bridge talks to: DIMSE nodes (``nodes``), and HTTP servers (a
``dicomweb`` destination): where they are, as whom the bridge calls them, how long it
waits and how it trusts them. Secrets are never written inline."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, field_validator, model_validator

from bridge.config.values import AETitle, Duration, Model, resolve


class NodeTimeouts(Model):
    connect: Duration = 10.0
    acse: Duration = 30.0
    dimse: Duration = 300.0


class Node(Model):
    """A DIMSE peer. ae_title defaults to the node's key."""

    ae_title: AETitle | None = None
    host: str
    port: int = Field(ge=1, le=65535)
    charset: str = "ISO_IR 192"
    timeouts: NodeTimeouts = Field(default_factory=NodeTimeouts)


def _env_reference(value: str) -> str:
    # The message never repeats the value: it may be a secret pasted inline by mistake.
    if not re.fullmatch(r"env:[A-Za-z_][A-Za-z0-9_]*", value):
        raise ValueError("secrets are never written inline: give env:NAME (an environment variable) "
                         "or use the matching *_file setting")
    return value


EnvSecret = Annotated[str, AfterValidator(_env_reference)]


def _one_secret(model: BaseModel, name: str) -> None:
    if (getattr(model, f"{name}_file") is None) == (getattr(model, name) is None):
        raise ValueError(f"give exactly one of {name}_file and {name} (env:NAME)")


class NoAuth(Model):
    type: Literal["none"] = Field("none", description="none, basic, bearer or oauth2")


class BasicAuth(Model):
    type: Literal["basic"]
    username: str = Field(description="the user name")
    password_file: Path | None = Field(None, description="a file holding the password")
    password: EnvSecret | None = Field(None, description="env:NAME: the password from an environment variable")

    @model_validator(mode="after")
    def _secret(self) -> BasicAuth:
        _one_secret(self, "password")
        return self


class BearerAuth(Model):
    type: Literal["bearer"]
    token_file: Path | None = Field(None, description="a file holding the token; read again when it changes")
    token: EnvSecret | None = Field(None, description="env:NAME: the token from an environment variable")

    @model_validator(mode="after")
    def _secret(self) -> BearerAuth:
        _one_secret(self, "token")
        return self


class OAuth2Auth(Model):
    """OAuth 2.0 client credentials grant (RFC 6749 section 4.4)."""

    type: Literal["oauth2"]
    token_url: str = Field(description="the token endpoint")
    client_id: str
    client_secret_file: Path | None = Field(None, description="a file holding the client secret")
    client_secret: EnvSecret | None = Field(
        None, description="env:NAME: the client secret from an environment variable",
    )
    scope: str | None = Field(None, description="space-separated scopes to ask for")
    client_auth: Literal["basic", "post"] = Field(
        "basic", description="how the client authenticates: HTTP basic (RFC 6749 2.3.1) or form fields",
    )

    @model_validator(mode="after")
    def _secret(self) -> OAuth2Auth:
        _one_secret(self, "client_secret")
        return self

    @field_validator("token_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value)


HttpAuth = Annotated[NoAuth | BasicAuth | BearerAuth | OAuth2Auth, Field(discriminator="type")]


def _http_url(value: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials do not belong in the URL: use auth")
    if parts.query or parts.fragment:
        raise ValueError("expected a base URL without query or fragment")
    return value.rstrip("/")


class HttpTimeouts(Model):
    connect: Duration = Field(10.0, gt=0, description="TCP (and TLS) connect; also each write of a request body")
    read: Duration = Field(300.0, gt=0, description="the wait for the server's answer, and between its bytes")


class Tls(Model):
    verify: bool = Field(True, description="verify the server's certificate and host name")
    ca_bundle: Path | None = Field(None, description="PEM file of CA certificates to trust instead of the system's")
    client_cert: Path | None = Field(None, description="PEM client certificate (may hold the key too)")
    client_key: Path | None = Field(None, description="PEM private key of client_cert, unencrypted")

    @model_validator(mode="after")
    def _key_needs_cert(self) -> Tls:
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("client_key needs client_cert")
        return self


class HttpPeer(Model):
    """An HTTP server we talk to: where, as whom, how long to wait, how to trust it."""

    url: str = Field(description="the DICOMweb base URL (without /studies)")
    auth: HttpAuth = Field(default_factory=NoAuth)
    timeouts: HttpTimeouts = Field(default_factory=HttpTimeouts)
    tls: Tls = Field(default_factory=Tls)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value)

    def resolve_paths(self, base: Path) -> None:
        """Relative secret, CA and certificate files are relative to the config file's folder."""
        for holder, names in ((self.auth, ("password_file", "token_file", "client_secret_file")),
                              (self.tls, ("ca_bundle", "client_cert", "client_key"))):
            for name in names:
                if getattr(holder, name, None) is not None:
                    setattr(holder, name, resolve(base, getattr(holder, name)))
