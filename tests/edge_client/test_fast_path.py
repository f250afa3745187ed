"""The recommendations fast path answers exactly what the FastAPI route answers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from edge_kit import client, live_server, settings_for, write_model
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import Field, TypeAdapter, ValidationError
from starlette.datastructures import QueryParams

from edge_client.service.recommendations import K_MAX, fast_params

T = 1_700_000_000

_K = TypeAdapter(Annotated[int, Field(ge=1, le=K_MAX)])
_BOOL = TypeAdapter(bool)


def reference_params(query: bytes) -> tuple[int, bool] | None:
    """What FastAPI makes of the query: Starlette's parsing, then pydantic's lax validation."""
    params = QueryParams(query)  # decoded as latin-1, as Starlette decodes scope["query_string"]
    try:
        k = _K.validate_python(params["k"]) if "k" in params else 10
        exclude = _BOOL.validate_python(params.get("exclude_purchased", "true"))
    except ValidationError:
        return None
    return k, exclude


_PARTS = st.sampled_from(
    ["k", "exclude_purchased", "K", "x", "=", "&", "%", "+", " ", "0", "5", "100", "101", "-1"]
)
_VALUES = st.sampled_from(["true", "False", "yes", "OFF", "t", "maybe", "\u0665", "\xe9", ""])


@given(st.lists(_PARTS | _VALUES, max_size=12).map("".join))
@example("")
@example("k=5")
@example("k=05&exclude_purchased=False")
@example("exclude_purchased=OFF&x=1&k=100")
@example("k=101")
@example("k=5&k=6")
@example("k=%35")
def test_the_fast_path_takes_only_queries_the_route_reads_the_same_way(query: str) -> None:
    # Arrange
    raw = query.encode()  # as a client sends it: UTF-8, whatever the server makes of it
    # Act
    fast = fast_params(raw)
    # Assert: the fast path may decline anything; what it takes, FastAPI reads identically
    if fast is not None:
        assert fast == reference_params(raw)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"", (10, True)),
        (b"k=5", (5, True)),
        (b"k=05&exclude_purchased=False", (5, False)),
        (b"exclude_purchased=OFF&x=1&k=100", (100, False)),
    ],
)
def test_plain_queries_take_the_fast_path(query: bytes, expected: tuple[int, bool]) -> None:
    assert fast_params(query) == expected


_PATHS = [
    "/v1/users/u1/recommendations",
    "/v1/users/u1/recommendations?k=3",
    "/v1/users/u1/recommendations?k=3&exclude_purchased=false",
    "/v1/users/u1/recommendations?k=03&exclude_purchased=No",
    "/v1/users/u1/recommendations?k=100",
    "/v1/users/u1/recommendations?k=101",
    "/v1/users/u1/recommendations?k=0",
    "/v1/users/u1/recommendations?k=ten",
    "/v1/users/u1/recommendations?k=%33",
    "/v1/users/u1/recommendations?k=+3",
    "/v1/users/u1/recommendations?k=3&k=4",
    "/v1/users/u1/recommendations?exclude_purchased=maybe",
    "/v1/users/u1/recommendations?unknown=1",
    "/v1/users/u2/recommendations?k=5",
    "/v1/users/stranger/recommendations?k=5",
    "/v1/users/a.b:c@d+e=f~g-h_/recommendations",
    "/v1/users/a%2Fb/recommendations",
    "/v1/users/bad!id/recommendations",
    "/v1/users/" + "x" * 128 + "/recommendations",
    "/v1/users/" + "x" * 129 + "/recommendations",
    "/v1/users/u1/recommendations/",
    "/v1/users//recommendations",
]


def _answer(c: httpx.Client, path: str) -> tuple[int, Any]:
    response = c.get(path)
    body = response.json() if response.headers.get("content-type") == "application/json" else None
    return response.status_code, body


@pytest.mark.integration
def test_fast_and_routed_servers_answer_every_request_alike(site: Path) -> None:
    # Arrange: one store and model, two real servers, fast path on and off
    write_model(site / "models", "v1")
    events = [
        {"event_id": f"e{n}", "user_id": user, "item_id": f"i{item}", "event_type": kind,
         "timestamp": T + n}
        for n, (user, item, kind) in enumerate(
            [("u1", 3, "view"), ("u1", 4, "purchase"), ("u1", 5, "cart"),
             ("u2", 7, "view"), ("u2", 3, "fav")]
        )
    ]  # fmt: skip
    with live_server(settings_for(site, fast_path=False)) as routed_base:
        with client(routed_base) as c:
            assert c.post("/v1/events", json={"events": events}).status_code == 200
        with (
            live_server(settings_for(site, fast_path=True)) as fast_base,
            client(routed_base) as routed,
            client(fast_base) as fast,
        ):
            # Act
            pairs = [(path, _answer(fast, path), _answer(routed, path)) for path in _PATHS]
            metrics = fast.get("/metrics").text
    # Assert
    for path, got, want in pairs:
        assert got == want, path
    statuses = {path: got[0] for path, got, _ in pairs}
    assert statuses["/v1/users/u1/recommendations?k=3"] == 200
    assert statuses["/v1/users/u1/recommendations?k=101"] == 422
    first = pairs[1][1][1]
    assert first["model_version"] == "v1" and first["source"] == "model"
    assert len(first["items"]) == 3 and "i4" not in [i["item_id"] for i in first["items"]]
    # Fast answers are timed under the route's template like routed ones
    assert 'route="/v1/users/{user_id}/recommendations",status="200"' in metrics
