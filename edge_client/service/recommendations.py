"""``GET /v1/users/{user_id}/recommendations``: top-k next items, computed per request."""

from __future__ import annotations

import json
import time
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response, status

from edge_client.errors import StoreError
from edge_client.service.deps import EdgeRuntime
from edge_client.service.schemas import ErrorOut, RecommendationsOut
from edge_client.store import ID_MAX_LEN, ID_PATTERN

router = APIRouter(prefix="/v1", tags=["recommendations"])

UserPath = Annotated[
    str,
    Path(min_length=1, max_length=ID_MAX_LEN, pattern=ID_PATTERN, examples=["u1"]),
]


# An async endpoint on purpose: the store reads are two indexed queries, and inference goes
# through the runtime's `RankBatcher` (shared ORT runs on its own thread), so a threadpool
# hop per request would add latency without adding parallelism.
@router.get(
    "/users/{user_id}/recommendations",
    response_model=RecommendationsOut,
    responses={422: {"model": ErrorOut}, 503: {"model": ErrorOut}},
    summary="What this shopper may buy next",
)
async def recommendations(
    request: Request,
    user_id: UserPath,
    k: Annotated[int, Query(ge=1, le=100, description="how many items")] = 10,
    exclude_purchased: Annotated[
        bool, Query(description="leave out items the shopper already bought")
    ] = True,
) -> Response:
    """Top-``k`` items from the served model over the shopper's latest events.

    Unknown shoppers, and every request while no model is loaded, get this store's most
    popular items. Each item says why it is recommended.
    """
    runtime: EdgeRuntime = request.app.state.runtime
    start = time.perf_counter()
    try:
        if runtime.batcher is not None:
            rec = await runtime.recommender.recommend_batched(
                runtime.batcher, user_id, k, exclude_purchased=exclude_purchased
            )
        else:
            rec = runtime.recommender.recommend(user_id, k, exclude_purchased=exclude_purchased)
    except StoreError as err:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(err)) from err
    runtime.metrics.recommend_seconds.labels(rec.source).observe(time.perf_counter() - start)
    # Serialised here rather than through the response model (the schema above documents
    # the same shape), which saves re-validating every answer on the hot path.
    body = {
        "user_id": user_id,
        "items": [{"item_id": i.item_id, "score": i.score, "reason": i.reason} for i in rec.items],
        "model_version": rec.model_version,
        "source": rec.source,
    }
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")
