"""Bearer tokens for ``/api``, read from ``http.token_file``.

The file holds one token per line, either alone or after a name and a space (``ops
3f9c...``): the name is who the logs say made a call (``token`` when the line has none).
Blank lines and lines starting with ``#`` are ignored. A token is at least 16 characters
of printable ASCII without spaces. Comparisons are in constant time (``hmac.compare_digest``,
against every token, whichever matches). The file is read at start and at each reload.
"""

from __future__ import annotations

import hmac
import logging
import os
import stat
from pathlib import Path

from bridge.errors import TokenFileError

__all__ = ["MIN_TOKEN_LENGTH", "TokenFileError", "Tokens", "read_tokens"]

LOGGER = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 16
MAX_TOKEN_FILE = 64 * 1024


class Tokens:
    def __init__(self, tokens: dict[str, str]) -> None:
        """``tokens``: name -> token."""
        self._tokens = [(name, token.encode()) for name, token in tokens.items()]

    @classmethod
    def read(cls, path: Path) -> Tokens:
        try:
            st = path.stat()
            if st.st_size > MAX_TOKEN_FILE:
                raise TokenFileError(f"http.token_file {path}: larger than {MAX_TOKEN_FILE} bytes: not a token file")
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TokenFileError(f"http.token_file {path}: cannot read: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise TokenFileError(f"http.token_file {path}: not UTF-8 text") from exc
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            LOGGER.warning("http.token_file %s can be read by other users (mode %o): chmod 600 it",
                           path, stat.S_IMODE(st.st_mode))
        tokens: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, _, token = line.rpartition(" ")
            name = name.strip() or "token"
            if len(token) < MIN_TOKEN_LENGTH or not token.isascii() or not token.isprintable():
                raise TokenFileError(f"http.token_file {path}, line {number}: a token is at least "
                                     f"{MIN_TOKEN_LENGTH} printable ASCII characters without spaces")
            if name in tokens:
                raise TokenFileError(f"http.token_file {path}, line {number}: the name {name!r} is given twice")
            tokens[name] = token
        if not tokens:
            raise TokenFileError(f"http.token_file {path}: no token in it")
        return cls(tokens)

    def who(self, presented: str) -> str | None:
        """The name of the token presented, or None when it is none of them."""
        given = presented.encode("utf-8", "replace")
        found = None
        for name, token in self._tokens:  # every one compared, so the time says nothing
            if hmac.compare_digest(given, token) and found is None:
                found = name
        return found


def read_tokens(path: Path | None) -> Tokens | None:
    """The tokens of ``http.token_file``, or None when it is not set (``/api`` is off)."""
    if path is None:
        return None
    if not os.path.exists(path):
        raise TokenFileError(f"http.token_file {path}: no such file")
    return Tokens.read(path)
