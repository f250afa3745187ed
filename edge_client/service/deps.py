"""What the routers share: the runtime (store, models, metrics) and the admin guard."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from edge_client.inference import ModelServer, RankBatcher
from edge_client.recommend import Recommender
from edge_client.service.telemetry import ServiceMetrics
from edge_client.settings import EdgeSettings
from edge_client.store import EventStore


@dataclass
class EdgeRuntime:
    """Everything a request may need; built once by the app's lifespan."""

    settings: EdgeSettings
    store: EventStore
    models: ModelServer
    recommender: Recommender
    metrics: ServiceMetrics
    batcher: RankBatcher | None


def get_runtime(request: Request) -> EdgeRuntime:
    """The runtime of the app serving ``request``."""
    runtime: EdgeRuntime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[EdgeRuntime, Depends(get_runtime)]

_bearer = HTTPBearer(auto_error=False, description="the service's admin token")


def require_admin(
    runtime: RuntimeDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Let the request through only with ``Authorization: Bearer <admin token>``."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "admin endpoints need 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    expected = runtime.settings.token.encode()
    if not secrets.compare_digest(credentials.credentials.encode(), expected):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "wrong admin token")
