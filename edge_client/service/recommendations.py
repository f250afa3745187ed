"""``GET /v1/users/{user_id}/recommendations``: top-k next items, computed per request.

Two ways in, one computation (`answer`): the FastAPI route, which documents the endpoint
and handles every request, and `RecommendationsFastPath`, a plain ASGI layer that answers
the well-formed requests of this one route without FastAPI's routing, dependency solving
and request objects. The fast path only ever answers what the route would answer with the
same status and body; anything it is not sure of (a bad id, an odd query) falls through to
the route, so errors keep their exact 422 text. `FEDREC_EDGE_FAST_PATH=false` turns it off.
"""

from __future__ import annotations

import json
import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response, status
from starlette.types import ASGIApp, Receive, Scope, Send

from edge_client.errors import StoreError
from edge_client.service.deps import EdgeRuntime
from edge_client.service.schemas import ErrorOut, RecommendationsOut
from edge_client.store import ID_CHARS, ID_MAX_LEN, ID_PATTERN

router = APIRouter(prefix="/v1", tags=["recommendations"])

ROUTE = "/v1/users/{user_id}/recommendations"
K_MAX = 100
UserPath = Annotated[
    str,
    Path(min_length=1, max_length=ID_MAX_LEN, pattern=ID_PATTERN, examples=["u1"]),
]


class RecommendUnavailableError(Exception):
    """The store could not be read: the answer is a 503 with this reason."""


async def answer(runtime: EdgeRuntime, user_id: str, k: int, exclude_purchased: bool) -> bytes:
    """The JSON body of one answer (both ways in call this)."""
    start = time.perf_counter()
    try:
        if runtime.batcher is not None:
            rec = await runtime.recommender.recommend_batched(
                runtime.batcher, user_id, k, exclude_purchased=exclude_purchased
            )
        else:
            rec = runtime.recommender.recommend(user_id, k, exclude_purchased=exclude_purchased)
    except StoreError as err:
        raise RecommendUnavailableError(str(err)) from err
    runtime.metrics.recommend_seconds.labels(rec.source).observe(time.perf_counter() - start)
    # Serialised here rather than through the response model (the schema documents the same
    # shape), which saves re-validating every answer on the hot path.
    body = {
        "user_id": user_id,
        "items": [{"item_id": i.item_id, "score": i.score, "reason": i.reason} for i in rec.items],
        "model_version": rec.model_version,
        "source": rec.source,
    }
    return json.dumps(body, separators=(",", ":")).encode()


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
    k: Annotated[int, Query(ge=1, le=K_MAX, description="how many items")] = 10,
    exclude_purchased: Annotated[
        bool, Query(description="leave out items the shopper already bought")
    ] = True,
) -> Response:
    """Top-``k`` items from the served model over the shopper's latest events.

    Unknown shoppers, and every request while no model is loaded, get this store's most
    popular items. Each item says why it is recommended.
    """
    try:
        body = await answer(request.app.state.runtime, user_id, k, exclude_purchased)
    except RecommendUnavailableError as err:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(err)) from err
    return Response(body, media_type="application/json")


# ----------------------------------------------------------------------------- fast path
# The route's own match: an id is one path segment ("/" is an id character, but FastAPI's
# {user_id} never spans segments, so such a path is not this route's).
_SEGMENT_CHARS = ID_CHARS.replace("/", "")
_PATH_RE = re.compile(f"/v1/users/([{_SEGMENT_CHARS}]{{1,{ID_MAX_LEN}}})/recommendations")
# What FastAPI's bool parsing accepts (pydantic, lax mode), lower-cased.
_BOOLS = {
    "1": True,
    "true": True,
    "t": True,
    "yes": True,
    "y": True,
    "on": True,
    "0": False,
    "false": False,
    "f": False,
    "no": False,
    "n": False,
    "off": False,
}


def fast_params(query: bytes) -> tuple[int, bool] | None:
    """``(k, exclude_purchased)`` when the query is plainly valid; None means "let FastAPI"."""
    k, exclude = 10, True
    if not query:
        return k, exclude
    if b"%" in query or b"+" in query:
        return None  # encoded names or values: FastAPI decodes them
    seen: set[str] = set()
    for part in query.decode("latin-1").split("&"):
        if not part:
            continue
        name, _, raw = part.partition("=")
        if name in seen:
            return None  # repeated parameters: FastAPI takes the last; not worth copying
        seen.add(name)
        value = raw
        if name == "k":
            if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= K_MAX:
                return None
            k = int(value)
        elif name == "exclude_purchased":
            parsed = _BOOLS.get(value.lower())
            if parsed is None:
                return None
            exclude = parsed
        # other parameters are ignored, as FastAPI ignores them
    return k, exclude


class RecommendationsFastPath:
    """Answers well-formed recommendation GETs directly; everything else goes to ``app``."""

    def __init__(self, app: ASGIApp, route: Any) -> None:
        self.app = app
        self.route = route  # the FastAPI route, so the timing middleware labels it alike

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer here when the request is this route's and plainly valid."""
        if scope["type"] != "http" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        match = _PATH_RE.fullmatch(scope["path"])
        params = fast_params(scope["query_string"]) if match else None
        runtime: EdgeRuntime | None = getattr(scope["app"].state, "runtime", None)
        if params is None or runtime is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        try:
            body = await answer(runtime, match.group(1), *params)  # type: ignore[union-attr]
            code = 200
        except RecommendUnavailableError as err:
            body = json.dumps({"detail": str(err), "errors": []}).encode()
            code = 503
        await send(
            {
                "type": "http.response.start",
                "status": code,
                "headers": [
                    (b"content-length", str(len(body)).encode()),
                    (b"content-type", b"application/json"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
