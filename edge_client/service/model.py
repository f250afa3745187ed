"""``GET /v1/model``: the model version being served, its metadata and privacy statement."""

from __future__ import annotations

from fastapi import APIRouter

from edge_client.service.deps import RuntimeDep
from edge_client.service.schemas import ModelOut, PrivacyOut, RejectionOut

router = APIRouter(prefix="/v1", tags=["model"])


@router.get("/model", response_model=ModelOut, summary="The model being served")
def get_model(runtime: RuntimeDep) -> ModelOut:
    """Version, catalogue size, privacy guarantee and lineage of the served model.

    ``mode: popularity`` when none is loaded; also the last version refused, if any.
    """
    rejection = runtime.models.last_rejection
    last = (
        RejectionOut(version=rejection.version, reason=rejection.reason, at=rejection.at)
        if rejection
        else None
    )
    model = runtime.models.current
    if model is None:
        return ModelOut(mode="popularity", last_rejection=last)
    meta = model.metadata
    privacy = meta.privacy
    return ModelOut(
        mode="model",
        version=model.version,
        kind=meta.kind,
        n_items=meta.n_items,
        max_len=meta.max_len,
        top_k=meta.top_k,
        vocab_sha256=meta.vocab_sha256,
        created_at=meta.created_at,
        round=meta.round,
        parent=meta.parent,
        metrics=dict(meta.metrics),
        privacy=PrivacyOut(
            unit=privacy.unit,
            epsilon=privacy.epsilon,
            delta=privacy.delta,
            accountant=privacy.accountant,
            mechanism=privacy.mechanism,
            statement=privacy.describe(),
        ),
        loaded_at=model.loaded_at,
        precision="int8" if model.precision == "int8" else "fp32",
        last_rejection=last,
    )
