"""Admin endpoints (bearer token): bulk import, model reload, forget a shopper, retention."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path as FsPath
from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Request, status
from fastapi.responses import JSONResponse

from edge_client.errors import EventValidationError, StoreError
from edge_client.service.deps import EdgeRuntime, RuntimeDep, require_admin
from edge_client.service.events import RowsRefusedError
from edge_client.service.schemas import (
    ErrorOut,
    ForgetOut,
    ImportOut,
    ReloadOut,
    RetentionIn,
    RetentionOut,
)
from edge_client.store import ID_MAX_LEN, ID_PATTERN
from shared.errors import DataError

router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses={
        401: {"model": ErrorOut, "description": "no bearer token"},
        403: {"model": ErrorOut, "description": "wrong bearer token"},
    },
)

# Bulk-import body types -> the file suffix `shared.readers.read_events` reads them by.
IMPORT_TYPES = {
    "text/csv": ".csv",
    "application/x-ndjson": ".jsonl",
    "application/jsonl": ".jsonl",
    "application/vnd.apache.parquet": ".parquet",
}
CSV_EXAMPLE = (
    "event_id,user_id,item_id,event_type,timestamp\n"
    "e1,u1,i9,purchase,1700000000\n"
    "e2,u2,i4,view,2023-11-14T22:14:00Z\n"
)


def _import_file(runtime: EdgeRuntime, body: bytes, suffix: str) -> ImportOut:
    """Read the body as an `events` file (with cleaning) and bulk-store it."""
    from shared.readers import read_dataset

    with tempfile.TemporaryDirectory(dir=runtime.settings.db.parent, prefix=".import-") as tmp:
        path = FsPath(tmp) / f"events{suffix}"
        path.write_bytes(body)
        dataset = read_dataset(path, "events")
    frame = dataset.events
    result = runtime.store.import_events(frame)
    runtime.metrics.events.labels("accepted").inc(result.accepted)
    runtime.metrics.events.labels("duplicate").inc(result.duplicates)
    cleaning = dataset.info.get("cleaning", {})
    return ImportOut(
        accepted=result.accepted,
        duplicates=result.duplicates,
        duplicate_ids=[],
        rows_read=int(cleaning.get("rows_in", len(frame))) if isinstance(cleaning, dict) else 0,
        cleaning=cleaning if isinstance(cleaning, dict) else {},
    )


@router.post(
    "/import",
    response_model=ImportOut,
    responses={
        413: {"model": ErrorOut},
        415: {"model": ErrorOut},
        422: {"model": ErrorOut, "description": "unreadable or invalid file; nothing stored"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "text/csv": {"schema": {"type": "string"}, "example": CSV_EXAMPLE},
                "application/x-ndjson": {"schema": {"type": "string"}},
                "application/vnd.apache.parquet": {
                    "schema": {"type": "string", "format": "binary"}
                },
            },
        }
    },
    summary="Bulk-import an event file (CSV, JSONL or Parquet)",
)
async def import_events(request: Request, runtime: RuntimeDep) -> ImportOut:
    """Import an event log in the `events` format (CSV, JSONL or Parquet).

    Columns ``user_id, item_id, event_type`` and a timestamp (docs/data.md), optional
    ``value, site, event_id``. The file is cleaned first (the report comes back); the rest
    is stored in one transaction. Rows without ``event_id`` get a content-derived one, so a
    repeated import stores nothing new.
    """
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    suffix = IMPORT_TYPES.get(media)
    if suffix is None:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            f"send the events as one of {', '.join(IMPORT_TYPES)}",
        )
    body = await request.body()
    if not body:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "the request body is empty")
    try:
        return await asyncio.to_thread(_import_file, runtime, body, suffix)
    except EventValidationError as err:
        raise RowsRefusedError(err) from err
    except DataError as err:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(err)) from err
    except StoreError as err:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(err)) from err


@router.post(
    "/model/reload",
    response_model=ReloadOut,
    responses={409: {"model": ReloadOut, "description": "the version was refused"}},
    summary="Load the version models/CURRENT names now",
)
async def reload_model(runtime: RuntimeDep) -> ReloadOut | JSONResponse:
    """Verify and swap to the version ``models/CURRENT`` names (also retries a refused one).

    A refused version answers 409 with the reason; the old model keeps serving.
    """
    outcome = await asyncio.to_thread(runtime.models.reload)
    runtime.metrics.serving(runtime.models.current.version if runtime.models.current else None)
    out = ReloadOut(status=outcome.status, version=outcome.version, reason=outcome.reason)
    if outcome.status == "rejected":
        return JSONResponse(out.model_dump(), status_code=status.HTTP_409_CONFLICT)
    return out


@router.delete(
    "/users/{user_id}",
    response_model=ForgetOut,
    summary="Forget a shopper: delete every event of theirs",
)
def forget_user(
    user_id: Annotated[str, Path(min_length=1, max_length=ID_MAX_LEN, pattern=ID_PATTERN)],
    runtime: RuntimeDep,
) -> ForgetOut:
    """Delete all of the shopper's events (overwritten on disk, WAL truncated)."""
    try:
        deleted = runtime.store.forget(user_id)
    except StoreError as err:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(err)) from err
    return ForgetOut(user_id=user_id, deleted_events=deleted)


@router.post("/retention", response_model=RetentionOut, summary="Apply the retention policy now")
def apply_retention(
    runtime: RuntimeDep, body: Annotated[RetentionIn | None, Body()] = None
) -> RetentionOut:
    """Apply the retention rules now; omitted rules use the service settings.

    Deletes events older than ``max_age_days`` and all but each shopper's newest
    ``max_events_per_user``.
    """
    settings = runtime.settings
    max_age = body.max_age_days if body and body.max_age_days else settings.retention_max_age_days
    cap = (
        body.max_events_per_user
        if body and body.max_events_per_user
        else settings.retention_max_events_per_user
    )
    try:
        result = runtime.store.apply_retention(max_age_days=max_age, max_events_per_user=cap)
    except StoreError as err:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(err)) from err
    return RetentionOut(deleted_by_age=result.deleted_by_age, deleted_by_cap=result.deleted_by_cap)
