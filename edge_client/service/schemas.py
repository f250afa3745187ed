"""Request and response models of the edge service (pydantic), with OpenAPI examples."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from edge_client.store import (
    ID_MAX_LEN,
    ID_PATTERN,
    MAX_RETENTION_DAYS,
    MAX_USER_CAP,
    SITE_MAX_LEN,
    SITE_PATTERN,
    Event,
    now_ms,
)
from shared.events import MAX_FUTURE_SKEW_MS, EventType

MAX_BATCH = 10_000

IdStr = Annotated[
    str,
    Field(
        min_length=1,
        max_length=ID_MAX_LEN,
        pattern=ID_PATTERN,
        description="opaque id: 1-128 of A-Z a-z 0-9 _ . : @ / + = ~ -",
    ),
]
SiteStr = Annotated[str, Field(max_length=SITE_MAX_LEN, pattern=SITE_PATTERN)]
Timestamp = Annotated[
    Any,
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0, "description": "Unix seconds"},
                {"type": "string", "format": "date-time", "description": "ISO 8601"},
            ],
            "description": "when it happened: Unix seconds or ISO 8601 (no zone = UTC)",
        }
    ),
]
Number = Annotated[Any, WithJsonSchema({"type": ["number", "null"]})]

EVENT_EXAMPLE: dict[str, Any] = {
    "event_id": "e1",
    "user_id": "u1",
    "item_id": "i9",
    "event_type": "purchase",
    "timestamp": 1700000000,
}


def timestamp_to_ms(value: object) -> int:
    """Unix seconds (number) or ISO 8601 text -> integer ms, within [1970, now + 1 day]."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("must be Unix seconds (a number) or an ISO 8601 string")
    if isinstance(value, str):
        if len(value) > 40:
            raise ValueError("is not an ISO 8601 date-time")
        try:
            when = datetime.fromisoformat(value)
        except ValueError as err:
            raise ValueError("is not an ISO 8601 date-time (or send Unix seconds)") from err
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp()
    else:
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ValueError("must be a finite number")
    if seconds < 0:
        raise ValueError("is before 1970 (negative)")
    # Compared in seconds first: a huge finite number times 1000 would overflow to inf.
    if seconds > (now_ms() + MAX_FUTURE_SKEW_MS) / 1000:
        hint = " (send Unix seconds, not milliseconds)" if 1e11 < seconds < 1e14 else ""
        raise ValueError(f"is more than a day in the future{hint}")
    return round(seconds * 1000)


class EventIn(BaseModel):
    """One behaviour event; a retry with the same ``event_id`` is stored once."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, json_schema_extra={"examples": [EVENT_EXAMPLE]}
    )

    event_id: IdStr = Field(description="client-chosen id; makes retries idempotent")
    user_id: IdStr
    item_id: IdStr
    event_type: EventType
    timestamp: Timestamp
    value: Number = Field(
        default=None, description="the rating of a `rating` event (required there)"
    )
    site: SiteStr = ""
    _ts_ms: int = PrivateAttr(0)

    @field_validator("timestamp", mode="before")
    @classmethod
    def _timestamp(cls, value: object) -> object:
        timestamp_to_ms(value)  # raises with the reason
        return value

    @field_validator("value", mode="before")
    @classmethod
    def _value(cls, value: object) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("must be a number or null")
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return float(value)

    @model_validator(mode="after")
    def _consistent(self) -> EventIn:
        if self.event_type is EventType.RATING and self.value is None:
            raise ValueError("a rating event needs a numeric value")
        if self.event_type is not EventType.RATING and self.value is not None:
            raise ValueError("value is only for rating events")
        self._ts_ms = timestamp_to_ms(self.timestamp)
        return self

    def to_event(self, default_site: str = "") -> Event:
        """The store's form of this event."""
        return Event(
            event_id=self.event_id,
            user_id=self.user_id,
            item_id=self.item_id,
            event_type=self.event_type.value,
            ts_ms=self._ts_ms,
            value=self.value,
            site=self.site or default_site,
        )


class EventBatchIn(BaseModel):
    """Up to 10,000 events, stored all together or (when any is invalid) not at all."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={
            "examples": [
                {
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
                }
            ]
        },
    )

    events: list[EventIn] = Field(min_length=1, max_length=MAX_BATCH)


def _event_body_kind(body: object) -> str:
    return "batch" if isinstance(body, dict) and "events" in body else "single"


EventsBody = Annotated[
    Annotated[EventIn, Tag("single")] | Annotated[EventBatchIn, Tag("batch")],
    Discriminator(_event_body_kind),
]


class IngestOut(BaseModel):
    """What a write stored: new events, and events already present (not rewritten)."""

    accepted: int = Field(examples=[1])
    duplicates: int = Field(examples=[0])
    duplicate_ids: list[str] = Field(
        description="event ids that were stored before (first 1,000)", examples=[[]]
    )


class ProblemOut(BaseModel):
    """One reason a row was refused."""

    row: int = Field(description="position in the batch (0 for a single event)")
    field: str
    reason: str


class ErrorOut(BaseModel):
    """An error answer; ``errors`` names each bad row when a batch was refused."""

    detail: str
    errors: list[ProblemOut] = Field(default_factory=list)


class RecommendedItemOut(BaseModel):
    """One recommended item."""

    item_id: str
    score: float = Field(description="model score (logit) or, for popular items, event count")
    reason: str = Field(
        description="why this item: the item of your history the model credits "
        "('because you viewed i9'), or the store's popularity"
    )


class RecommendationsOut(BaseModel):
    """Top-k items for a shopper, best first."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "user_id": "u1",
                    "items": [
                        {
                            "item_id": "i4",
                            "score": 7.91,
                            "reason": "because you viewed i9",
                        }
                    ],
                    "model_version": "v20261128T130102-1a2b3c4d",
                    "source": "model",
                }
            ]
        }
    )

    user_id: str
    items: list[RecommendedItemOut]
    model_version: str | None = Field(description="the model that ranked the items; null if none")
    source: Literal["model", "popularity", "model+popularity"]


class PrivacyOut(BaseModel):
    """The privacy guarantee of the model's training."""

    unit: str
    epsilon: float | None
    delta: float | None
    accountant: str | None
    mechanism: str
    statement: str


class RejectionOut(BaseModel):
    """The last model version that was refused."""

    version: str
    reason: str
    at: float = Field(description="Unix seconds")


class ModelOut(BaseModel):
    """What is being served: a model version, or popularity (cold start)."""

    mode: Literal["model", "popularity"]
    version: str | None = None
    kind: str | None = None
    n_items: int | None = None
    max_len: int | None = None
    top_k: int | None = None
    vocab_sha256: str | None = None
    created_at: str | None = None
    round: int | None = None
    parent: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    privacy: PrivacyOut | None = None
    loaded_at: float | None = Field(default=None, description="Unix seconds")
    precision: Literal["fp32", "int8"] | None = Field(
        default=None, description="int8: the quantized copy serves (FEDREC_EDGE_QUANTIZE)"
    )
    last_rejection: RejectionOut | None = None


class ReloadOut(BaseModel):
    """Result of a reload: swapped, unchanged, rejected (old model kept) or no model."""

    status: Literal["swapped", "unchanged", "rejected", "no-model"]
    version: str | None
    reason: str = ""


class ForgetOut(BaseModel):
    """Result of forgetting a shopper."""

    user_id: str
    deleted_events: int


class RetentionIn(BaseModel):
    """A retention pass; omitted rules fall back to the service settings."""

    model_config = ConfigDict(extra="forbid")

    max_age_days: float | None = Field(default=None, gt=0, le=MAX_RETENTION_DAYS)
    max_events_per_user: int | None = Field(default=None, ge=1, le=MAX_USER_CAP)


class RetentionOut(BaseModel):
    """Rows deleted by a retention pass, per rule."""

    deleted_by_age: int
    deleted_by_cap: int


class ImportOut(IngestOut):
    """Result of a bulk import: what was stored and what cleaning dropped."""

    rows_read: int
    cleaning: dict[str, Any] = Field(default_factory=dict)


class HealthOut(BaseModel):
    """Liveness."""

    status: Literal["ok"]


class ReadyOut(BaseModel):
    """Readiness: the store answers and a model or popularity mode is in effect."""

    ready: bool
    mode: Literal["model", "popularity"]
    model_version: str | None
    db: bool
