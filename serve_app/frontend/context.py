"""What every protocol adapter needs besides the data plane: API keys, metrics, the request size
limit. One per ingress replica, shared by the HTTP app and the gRPC servicer."""

from __future__ import annotations

from dataclasses import dataclass, field

from serve_app.config.schema import LimitOptions
from serve_app.frontend.auth import ApiKeys
from serve_app.frontend.metrics import Metrics


@dataclass(frozen=True)
class ServerContext:
    """``max_body_bytes``: the largest HTTP body (after decompression) or gRPC message."""

    metrics: Metrics = field(default_factory=Metrics)
    api_keys: ApiKeys = field(default_factory=ApiKeys)
    max_body_bytes: int = LimitOptions().max_body_bytes
