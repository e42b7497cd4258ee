"""``ApiState``: what the HTTP server's app holds besides the daemon: the tokens and the
static trees it serves, both replaced at a reload."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from starlette.types import ASGIApp

from bridge.api.auth import Tokens, read_tokens
from bridge.api.runtime import Runtime
from bridge.config import Config, StaticDestination

LOGGER = logging.getLogger(__name__)


@dataclass
class ApiState:
    runtime: Runtime
    tokens: Tokens | None = None
    # URL path -> (tree root, its app), longest paths first
    static: list[tuple[str, Path, ASGIApp]] = field(default_factory=list)

    def configure(self, config: Config) -> None:
        """Tokens and static trees as ``config`` says. ``TokenFileError`` when the token
        file cannot be used (at start: the daemon does not start; at a reload: the reload
        is refused)."""
        from bridge.static import serve

        tokens = read_tokens(config.http.token_file)
        kept = {path: (root, app) for path, root, app in self.static}
        static: list[tuple[str, Path, ASGIApp]] = []
        for destination in config.destinations.values():
            if isinstance(destination, StaticDestination) and destination.serve and destination.path:
                root = Path(destination.path)
                old = kept.get(destination.serve)
                app = old[1] if old and old[0] == root else serve.app(root)
                static.append((destination.serve, root, app))
        static.sort(key=lambda entry: len(entry[0]), reverse=True)
        self.tokens, self.static = tokens, static
        for path, root, _ in static:
            LOGGER.info("static DICOMweb tree %s served at %s", root, path)
