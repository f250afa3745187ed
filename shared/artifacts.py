"""Model directories: weights, vocabulary, config, ONNX graph and metadata, written atomically.

Layout of a model directory (every model the project produces, trained centrally or
federated, has it)::

    model.onnx      serving graph (see shared.onnx_export); all the edge needs besides vocab
    weights.pt      torch state_dict, for further training and federated initialisation
    vocab.json      the item vocabulary (shared.vocab)
    config.json     {"kind": ..., "model": {...}} enough to rebuild the torch module
    explain.npz     single-item attribution tables (shared.explanations): "because you viewed X"
    metadata.json   version, sha256 of every other file, privacy statement, metrics, lineage

Directories written before explain.npz existed lack it; their metadata does not list it, so
they still verify, and the edge serves them with a generic reason instead.

A directory is written under a temporary sibling name and renamed into place, so a reader
sees either the old complete directory or the new complete one, never a half-written one.
`verify_model_dir` re-hashes every file, which is how a corrupt or truncated copy is caught.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import ModelError, VocabError
from shared.vocab import ItemVocab

if TYPE_CHECKING:
    from torch import nn

# torch is imported inside the functions that save or rebuild a model: reading metadata and
# verifying a directory (all the edge's serving process does) must not load torch.

METADATA_FORMAT = 1
ONNX_FILE = "model.onnx"
WEIGHTS_FILE = "weights.pt"
VOCAB_FILE = "vocab.json"
CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"


@dataclass(frozen=True)
class PrivacyStatement:
    """What a model's training guarantees; epsilon None means no differential privacy."""

    unit: str = "shopper"  # whose data the guarantee protects: one shopper's whole history
    epsilon: float | None = None
    delta: float | None = None
    accountant: str | None = None  # e.g. "prv" (reported), "rdp" (cross-check)
    mechanism: str = "none"  # "none" | "dp-sgd (store mode)" | "client-level DP (app mode)"

    def describe(self) -> str:
        """One human-readable sentence."""
        if self.epsilon is None:
            return "not differentially private"
        return (
            f"({self.epsilon:.3g}, {self.delta:.1e})-DP per {self.unit}, "
            f"{self.mechanism}, {self.accountant} accountant"
        )


@dataclass(frozen=True)
class ModelMetadata:
    """The contents of metadata.json."""

    version: str
    kind: str
    n_items: int
    max_len: int
    top_k: int
    vocab_sha256: str
    files: dict[str, str]
    created_at: str
    privacy: PrivacyStatement = field(default_factory=PrivacyStatement)
    metrics: dict[str, float] = field(default_factory=dict)
    parent: str | None = None
    round: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    format: int = METADATA_FORMAT
    # > 0: the graph reads `shared.sequences.behaviour_tokens` (item and event type)
    n_behaviours: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMetadata:
        """Parse metadata.json content; raises `ModelError` when malformed."""
        try:
            if data.get("format") != METADATA_FORMAT:
                raise ModelError(f"unsupported metadata format {data.get('format')!r}")
            privacy = PrivacyStatement(**data.get("privacy", {}))
            return cls(**{**data, "privacy": privacy})
        except TypeError as err:
            raise ModelError(f"malformed model metadata: {err}") from err


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes | str) -> None:
    with path.open("wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())


def new_version(weights_sha256: str, now: datetime | None = None) -> str:
    """A sortable, content-derived version name: ``v20261128T130102-1a2b3c4d``."""
    now = now or datetime.now(UTC)
    return f"v{now:%Y%m%dT%H%M%S}-{weights_sha256[:8]}"


def save_model_dir(
    out: Path,
    model: nn.Module,
    vocab: ItemVocab,
    *,
    version: str | None = None,
    privacy: PrivacyStatement | None = None,
    metrics: dict[str, float] | None = None,
    parent: str | None = None,
    round: int | None = None,
    extra: dict[str, Any] | None = None,
) -> ModelMetadata:
    """Write a complete model directory at ``out`` (replacing one that is there) atomically."""
    import torch

    from shared.explanations import EXPLAIN_FILE, write_explanations
    from shared.models import config_dict, model_kind
    from shared.onnx_export import export_onnx

    kind = model_kind(model)
    cfg = config_dict(model)
    if cfg["n_items"] != vocab.n_items:
        raise VocabError(f"model scores {cfg['n_items']} items but vocab has {vocab.n_items}")
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        model = model.eval()
        torch.save(model.state_dict(), tmp / WEIGHTS_FILE)
        top_k = export_onnx(model, tmp / ONNX_FILE)
        write_explanations(model, tmp / EXPLAIN_FILE)
        _write_file(tmp / VOCAB_FILE, vocab.to_json())
        _write_file(tmp / CONFIG_FILE, json.dumps({"kind": kind, "model": cfg}, indent=2))
        files = {
            name: sha256_file(tmp / name)
            for name in (ONNX_FILE, WEIGHTS_FILE, VOCAB_FILE, CONFIG_FILE, EXPLAIN_FILE)
        }
        meta = ModelMetadata(
            version=version or new_version(files[WEIGHTS_FILE]),
            kind=kind,
            n_items=vocab.n_items,
            max_len=int(cfg.get("max_len", 50)),
            top_k=top_k,
            vocab_sha256=vocab.sha256,
            files=files,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            privacy=privacy or PrivacyStatement(),
            metrics=dict(metrics or {}),
            parent=parent,
            round=round,
            extra=dict(extra or {}),
            n_behaviours=int(cfg.get("n_behaviours", 0) or 0),
        )
        _write_file(tmp / METADATA_FILE, json.dumps(meta.to_dict(), indent=2))
        _fsync_dir(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; an existing ``dst`` is swapped out first, then removed."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        dst.rename(old)
    src.rename(dst)
    _fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_metadata(model_dir: Path) -> ModelMetadata:
    """Parse ``metadata.json`` without checking the other files."""
    path = model_dir / METADATA_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ModelError(f"{model_dir} is not a model directory (no {METADATA_FILE})") from err
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object")
    return ModelMetadata.from_dict(data)


def verify_model_dir(model_dir: Path) -> ModelMetadata:
    """Metadata of a model directory whose every file matches its recorded sha256."""
    meta = read_metadata(model_dir)
    for name, expected in meta.files.items():
        path = model_dir / name
        if not path.is_file():
            raise ModelError(f"{model_dir}: {name} is missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ModelError(
                f"{model_dir}: {name} is corrupt (sha256 {actual[:12]} != {expected[:12]})"
            )
    vocab = ItemVocab.load(model_dir / VOCAB_FILE)
    if vocab.sha256 != meta.vocab_sha256 or vocab.n_items != meta.n_items:
        raise ModelError(f"{model_dir}: vocabulary does not match the model's metadata")
    return meta


def load_model_dir(model_dir: Path) -> tuple[nn.Module, ItemVocab, ModelMetadata]:
    """The torch model (eval mode), its vocabulary and metadata, after verification."""
    import torch

    from shared.models import build_model

    meta = verify_model_dir(model_dir)
    vocab = ItemVocab.load(model_dir / VOCAB_FILE)
    try:
        cfg = json.loads((model_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        model = build_model(cfg["kind"], cfg["model"])
        state = torch.load(model_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (KeyError, json.JSONDecodeError, RuntimeError) as err:
        raise ModelError(f"{model_dir}: cannot rebuild the model: {err}") from err
    return model.eval(), vocab, meta
