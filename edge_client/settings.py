"""Settings of the edge service, from ``FEDREC_EDGE_*`` environment variables or arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from edge_client.errors import SettingsError
from edge_client.store import MAX_RETENTION_DAYS, MAX_USER_CAP

# Tokens that must never guard a real deployment; --dev accepts them (and an empty one).
DEFAULT_TOKENS = frozenset({"", "changethis", "change-me", "changeme", "secret", "dev", "token"})
DEV_TOKEN = "changethis"
MIN_TOKEN_LENGTH = 16


class EdgeSettings(BaseSettings):
    """Everything the edge service can be configured with; see docs/edge.md."""

    model_config = SettingsConfigDict(env_prefix="FEDREC_EDGE_", extra="forbid", frozen=True)

    db: Path = Field(Path("state/edge/site.db"), description="the site's SQLite event store")
    model_dir: Path = Field(
        Path("state/edge/models"),
        description="the site's models directory: <version>/ directories and CURRENT",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    admin_token: SecretStr = Field(
        SecretStr(""), description="bearer token of the /v1/admin endpoints"
    )
    dev: bool = Field(False, description="allow an empty or default admin token (never in a store)")
    intra_op_threads: int = Field(1, ge=1, le=64, description="ONNX Runtime threads per inference")
    batch_inference: bool = Field(
        True, description="share one ORT run between concurrent recommendation requests"
    )
    max_inference_batch: int = Field(32, ge=1, le=1024)
    inference_thread: bool = Field(
        True, description="run ORT on its own thread so the event loop keeps serving meanwhile"
    )
    fast_path: bool = Field(
        True,
        description="answer well-formed recommendation requests below FastAPI's routing "
        "(same answers; anything else still goes through the documented route)",
    )
    poll_interval_s: float = Field(1.0, gt=0, le=3600, description="how often CURRENT is checked")
    max_batch_events: int = Field(10_000, ge=1, le=100_000)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="limit of a request body")
    max_import_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, description="limit of an admin bulk-import body"
    )
    synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="SQLite synchronous mode: FULL survives power loss, NORMAL a crash"
    )
    retention_max_age_days: float | None = Field(default=None, gt=0, le=MAX_RETENTION_DAYS)
    retention_max_events_per_user: int | None = Field(default=None, ge=1, le=MAX_USER_CAP)
    retention_interval_s: float = Field(3600.0, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    quantize: Literal["none", "int8"] = Field(
        "none",
        description="int8: serve a dynamically quantized copy of each version (fp32 fallback)",
    )
    ab_testing: bool = Field(True, description="serve the A/B experiment the site received")
    log_impressions: bool = Field(
        True, description="record every answer (A/B outcomes, recommendation effect R)"
    )
    impression_retention_days: float = Field(30.0, gt=0, le=MAX_RETENTION_DAYS)
    popularity_window_days: int = Field(
        14,
        ge=0,
        le=3660,
        description="new shoppers get the items of the store's last N days first (0 = all-time)",
    )
    popularity_refresh_s: float = Field(
        30.0, gt=0, le=86_400, description="how often that recent ranking is recomputed"
    )
    indicator_window_days: float = Field(
        30.0, gt=0, le=MAX_RETENTION_DAYS, description="window of the R and I_u indicators"
    )

    @model_validator(mode="after")
    def _check_admin_token(self) -> EdgeSettings:
        token = self.admin_token.get_secret_value()
        if self.dev:
            return self
        if token.lower() in DEFAULT_TOKENS:
            raise ValueError(
                "refusing to start: FEDREC_EDGE_ADMIN_TOKEN is empty or a default value; set a "
                f"random token of at least {MIN_TOKEN_LENGTH} characters (or pass --dev)"
            )
        if len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"refusing to start: FEDREC_EDGE_ADMIN_TOKEN must have at least "
                f"{MIN_TOKEN_LENGTH} characters"
            )
        return self

    @property
    def token(self) -> str:
        """The admin token in effect (the dev default when --dev left it empty)."""
        return self.admin_token.get_secret_value() or DEV_TOKEN


def load_settings(**overrides: object) -> EdgeSettings:
    """Settings from the environment with explicit ``overrides``; `SettingsError` if unsafe."""
    from pydantic import ValidationError

    try:
        return EdgeSettings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
    except ValidationError as err:
        reasons = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in err.errors()
        )
        raise SettingsError(reasons) from err
