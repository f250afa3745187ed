"""``POST /v1/events``: one event or a batch, validated, stored all or nothing."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, status

from edge_client.errors import EventValidationError, StoreError
from edge_client.service.deps import RuntimeDep
from edge_client.service.schemas import (
    EVENT_EXAMPLE,
    ErrorOut,
    EventIn,
    EventsBody,
    IngestOut,
)

router = APIRouter(prefix="/v1", tags=["events"])

DUPLICATE_IDS_SHOWN = 1000

ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorOut, "description": "malformed JSON"},
    413: {"model": ErrorOut, "description": "body or batch too large"},
    415: {"model": ErrorOut, "description": "not application/json"},
    422: {"model": ErrorOut, "description": "invalid events (each bad row named); none stored"},
    503: {"model": ErrorOut, "description": "the event store is unavailable; none stored"},
}


class RowsRefusedError(Exception):
    """A batch refused by the store's own checks; rendered like a validation error."""

    def __init__(self, err: EventValidationError) -> None:
        self.err = err


@router.post(
    "/events",
    response_model=IngestOut,
    responses=ERROR_RESPONSES,
    summary="Record one event or a batch of up to 10,000",
)
def post_events(
    body: Annotated[
        EventsBody,
        Body(
            openapi_examples={
                "single": {"summary": "one event", "value": EVENT_EXAMPLE},
                "batch": {
                    "summary": "a batch (all or nothing)",
                    "value": {
                        "events": [
                            EVENT_EXAMPLE,
                            {
                                "event_id": "e2",
                                "user_id": "u1",
                                "item_id": "i4",
                                "event_type": "view",
                                "timestamp": "2023-11-14T22:14:00Z",
                            },
                        ]
                    },
                },
            }
        ),
    ],
    runtime: RuntimeDep,
) -> IngestOut:
    """Store events; a retry of an already stored ``event_id`` is reported as a duplicate.

    Timestamps are Unix seconds or ISO 8601. A batch with any invalid event is refused as a
    whole (422, each bad row named) and nothing is stored. The newest accepted event shapes
    the shopper's next recommendation immediately.
    """
    events = [body] if isinstance(body, EventIn) else body.events
    limit = runtime.settings.max_batch_events
    if len(events) > limit:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE, f"a batch holds at most {limit} events"
        )
    metrics = runtime.metrics
    try:
        result = runtime.store.add_events([e.to_event() for e in events])
    except EventValidationError as err:
        metrics.events.labels("rejected").inc(len(events))
        raise RowsRefusedError(err) from err
    except StoreError as err:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(err)) from err
    metrics.events.labels("accepted").inc(result.accepted)
    metrics.events.labels("duplicate").inc(result.duplicates)
    return IngestOut(
        accepted=result.accepted,
        duplicates=result.duplicates,
        duplicate_ids=list(result.duplicate_ids[:DUPLICATE_IDS_SHOWN]),
    )
