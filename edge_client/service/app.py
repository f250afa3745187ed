"""The FastAPI application: `create_app(settings)`, its lifespan and error rendering.

The lifespan opens the store and loads the model named by ``models/CURRENT`` once, then
runs its background loops: a cheap poll of CURRENT (hot swap), the recent-popularity
refresh and, when configured, the retention policy. Run it with one uvicorn worker: one
process owns the ORT session and the store's write path (`fedrec edge serve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge_client.ab_serving import ExperimentServing, maintain
from edge_client.inference import LoadedModel, ModelServer, RankBatcher, Rejection
from edge_client.outcomes import ImpressionLog, indicators
from edge_client.popularity import SitePopularity
from edge_client.recommend import Recommender
from edge_client.service import admin, events, health, model, recommendations
from edge_client.service.deps import EdgeRuntime
from edge_client.service.events import RowsRefusedError
from edge_client.service.outcome_metrics import CachedIndicators, register_indicator_metrics
from edge_client.service.recommendations import ROUTE, RecommendationsFastPath
from edge_client.service.telemetry import BodyLimitMiddleware, ServiceMetrics, TimingMiddleware
from edge_client.settings import EdgeSettings
from edge_client.store import EventStore

log = logging.getLogger(__name__)

DESCRIPTION = """
The store/app daemon of **fedrec**: records shoppers' behaviour in the site's own SQLite
store and answers "what next?" in milliseconds from the federated model (ONNX Runtime), or
from this store's popular items when there is no model yet. No event leaves the site.

Admin endpoints need `Authorization: Bearer <FEDREC_EDGE_ADMIN_TOKEN>`.
"""

TAGS = [
    {"name": "events", "description": "Record behaviour (idempotent by event_id)."},
    {"name": "recommendations", "description": "Real-time next-item recommendations."},
    {"name": "model", "description": "The model version being served."},
    {"name": "admin", "description": "Bulk import, model reload, forget, retention."},
    {"name": "health", "description": "Liveness, readiness, Prometheus metrics."},
]


def _problem(error: dict[str, Any]) -> dict[str, Any]:
    """One pydantic error as ``{row, field, reason}``: row = position in the batch."""
    loc = [p for p in error.get("loc", ()) if p not in ("body", "single", "batch")]
    row = 0
    if len(loc) >= 2 and loc[0] == "events" and isinstance(loc[1], int):
        row, loc = loc[1], loc[2:]
    field = ".".join(str(p) for p in loc) or "event"
    reason = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    return {"row": row, "field": field, "reason": reason}


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if bad_json is not None:
        why = bad_json.get("ctx", {}).get("error", "cannot parse")
        where = bad_json["loc"][-1]
        return JSONResponse(
            {"detail": f"malformed JSON: {why} at position {where}", "errors": []},
            status_code=status.HTTP_400_BAD_REQUEST,
        )
    has_body = any(e.get("loc", ("",))[0] == "body" for e in errors)
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if has_body and not (media == "application/json" or media.endswith("+json")):
        return JSONResponse(
            {"detail": f"send application/json, not {media or 'no content type'}", "errors": []},
            status_code=status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
        )
    problems = [_problem(e) for e in errors]
    what = "invalid events, nothing stored" if has_body else "invalid request"
    return JSONResponse(
        {"detail": f"{len(problems)} problem(s): {what}", "errors": problems},
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
    )


async def _rows_refused(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RowsRefusedError)
    err = exc.err
    return JSONResponse(
        {
            "detail": f"{err.total} problem(s): invalid events, nothing stored",
            "errors": [{"row": p.row, "field": p.field, "reason": p.reason} for p in err.problems],
        },
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse(
        {"detail": exc.detail, "errors": []},
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


async def _every(interval_s: float, work: Callable[[], object], what: str) -> None:
    """Run ``work`` in a thread every ``interval_s`` seconds, first after one interval.

    The loop outlives any one failure; each is logged. Used for the CURRENT poll (one stat
    when nothing changed) and the recent-popularity refresh.
    """
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(work)
        except Exception:  # the loop must outlive any one failure; it is logged
            log.exception("%s failed", what)


async def _retention(runtime: EdgeRuntime) -> None:
    """Apply the retention policy every ``retention_interval_s``."""
    s = runtime.settings
    while True:
        try:
            result = await asyncio.to_thread(
                runtime.store.apply_retention,
                max_age_days=s.retention_max_age_days,
                max_events_per_user=s.retention_max_events_per_user,
            )
            if result.deleted:
                log.info("retention deleted %d events", result.deleted)
        except Exception:  # keep retrying at the next interval; it is logged
            log.exception("retention pass failed")
        await asyncio.sleep(s.retention_interval_s)


def create_app(settings: EdgeSettings) -> FastAPI:
    """The edge service for one site (store at ``settings.db``, models at ``model_dir``)."""
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = EventStore(settings.db, synchronous=settings.synchronous)
        settings.model_dir.mkdir(parents=True, exist_ok=True)

        def swapped(m: LoadedModel) -> None:
            metrics.model_swaps.inc()
            metrics.serving(m.version)

        def rejected(_: Rejection) -> None:
            metrics.model_rejections.inc()

        models = ModelServer(
            settings.model_dir,
            intra_op_threads=settings.intra_op_threads,
            quantize=settings.quantize,
            on_swap=swapped,
            on_reject=rejected,
        )
        await asyncio.to_thread(models.check)
        metrics.track_store(store.count_events)
        # Impressions (A/B outcomes, indicator R) and the site's running A/B experiment.
        impressions = ImpressionLog(settings.db)
        experiments = (
            ExperimentServing(
                settings.db,
                settings.model_dir,
                models=models,
                intra_op_threads=settings.intra_op_threads,
                quantize=settings.quantize,
            )
            if settings.ab_testing
            else None
        )
        if experiments is not None:
            await asyncio.to_thread(experiments.refresh)
        window = settings.indicator_window_days
        register_indicator_metrics(
            metrics.registry,
            CachedIndicators(
                lambda: impressions.query(lambda c: indicators(c, impressions.clock(), window))
            ),
        )
        popularity = SitePopularity(
            store,
            window_days=settings.popularity_window_days,
            refresh_s=settings.popularity_refresh_s,
            refresh_inline=False,
        )
        app.state.runtime = EdgeRuntime(
            settings=settings,
            store=store,
            models=models,
            recommender=Recommender(
                store,
                models,
                experiments=experiments,
                impressions=impressions if settings.log_impressions else None,
                popularity=popularity,
            ),
            metrics=metrics,
            batcher=RankBatcher(settings.max_inference_batch, threaded=settings.inference_thread)
            if settings.batch_inference
            else None,
        )
        # Everything loaded so far (modules, the model, the schemas) lives as long as the
        # service; moved out of the collector's reach, it is no longer re-scanned by every
        # full collection. Measured: full collections paused serving for 70-85 ms, which set
        # the HTTP p99 at 800 req/s (benchmarks/edge_latency.py, docs/benchmarks.md).
        gc.collect()
        gc.freeze()
        served = models.current.version if models.current else "popularity (no model yet)"
        log.info("edge service ready: store %s, serving %s", settings.db, served)
        tasks = [
            asyncio.create_task(_every(settings.poll_interval_s, models.check, "model check")),
            asyncio.create_task(
                maintain(
                    experiments,
                    impressions,
                    poll_interval_s=settings.poll_interval_s,
                    retention_days=settings.impression_retention_days,
                )
            ),
        ]
        if popularity.window_days is not None:
            tasks.append(
                asyncio.create_task(
                    _every(popularity.refresh_s, popularity.refresh, "popularity refresh")
                )
            )
        if settings.retention_max_age_days or settings.retention_max_events_per_user:
            tasks.append(asyncio.create_task(_retention(app.state.runtime)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            # A cancelled `asyncio.to_thread` call keeps running in its thread (a retention
            # pass, a popularity refresh): wait for it, or the connections closed below
            # would be pulled from under it (a SQLite segfault, seen in the test suite).
            await asyncio.get_running_loop().shutdown_default_executor()
            if app.state.runtime.batcher is not None:
                app.state.runtime.batcher.close()
            impressions.close()  # writes what is still buffered
            if experiments is not None:
                experiments.close()
            store.close()
            gc.unfreeze()  # an app created again in this process starts from a normal heap

    app = FastAPI(
        title="fedrec edge",
        version="1",
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
    )
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(RowsRefusedError, _rows_refused)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for router in (events, recommendations, model, admin, health):
        app.include_router(router.router)
    # Added last = outermost: timing sees every answer, 413s included.
    app.add_middleware(
        BodyLimitMiddleware,
        limit=settings.max_body_bytes,
        larger={"/v1/admin/import": settings.max_import_bytes},
    )
    if settings.fast_path:
        # Inside the timing middleware (which labels it by the route it sets), outside
        # everything else: a GET needs no body limit.
        route = next(r for r in recommendations.router.routes if getattr(r, "path", "") == ROUTE)
        app.add_middleware(RecommendationsFastPath, route=route)
    app.add_middleware(TimingMiddleware, metrics=metrics)
    return app
