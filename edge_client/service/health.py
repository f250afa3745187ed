"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edge_client.service.deps import RuntimeDep
from edge_client.service.schemas import HealthOut, ReadyOut

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut, summary="Liveness")
async def healthz() -> HealthOut:
    """The process answers."""
    return HealthOut(status="ok")


@router.get(
    "/readyz",
    response_model=ReadyOut,
    responses={503: {"model": ReadyOut, "description": "the event store does not answer"}},
    summary="Readiness",
)
def readyz(runtime: RuntimeDep) -> ReadyOut | JSONResponse:
    """Ready when the store answers; the mode says whether a model or popularity serves."""
    db = runtime.store.ping()
    model = runtime.models.current
    out = ReadyOut(
        ready=db,
        mode="model" if model else "popularity",
        model_version=model.version if model else None,
        db=db,
    )
    if not db:
        return JSONResponse(out.model_dump(), status_code=503)
    return out


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
    summary="Prometheus metrics",
)
def metrics(runtime: RuntimeDep) -> Response:
    """Request latency histograms, events ingested, model version, swaps and rejections."""
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
