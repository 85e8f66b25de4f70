"""Optional API keys: ``Authorization: Bearer <key>`` over HTTP, the same in gRPC metadata.

Keys are compared in constant time, every configured key every time, and never logged.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from serve_app.errors import Unauthorized

#: HTTP paths that stay open so probes and scrapers need no key, for reading only (``POST /``
#: embeds, as text-embeddings-inference's root does, and needs the key).
OPEN_PATHS = frozenset({"/", "/v2/health/live", "/v2/health/ready", "/health", "/ping",
                        "/metrics", "/docs", "/openapi.json"})


def is_open(method: str, path: str) -> bool:
    """Whether ``method path`` is answered without an API key."""
    return method in ("GET", "HEAD") and path in OPEN_PATHS


class ApiKeys:
    """The accepted keys; empty means authentication is off."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._keys = tuple(k.encode() for k in keys if k)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        """Raise :class:`Unauthorized` unless ``authorization`` is ``Bearer <a configured key>``."""
        if not self._keys:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        given = token.strip().encode()
        ok = False
        for key in self._keys:  # no early exit: timing says nothing about which key matched
            ok |= hmac.compare_digest(given, key)
        if not ok:
            raise Unauthorized("invalid API key")

