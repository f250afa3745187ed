"""int8 serving: a dynamically quantized copy of a model version, built once and cached.

With ``FEDREC_EDGE_QUANTIZE=int8`` the edge serves ``model.int8.onnx`` instead of
``model.onnx``: ONNX Runtime's ``quantize_dynamic`` with QInt8 weights (the embedding
``Gather`` and the output ``MatMul``/``Gemm`` become 8-bit; the GRU op has no integer kernel
and stays fp32; activations are quantized per call). The copy is made from the exact
``model.onnx`` bytes that passed verification, written next to them in the version's
directory with a stamp (``model.int8.json``: sha256 of the fp32 source and of the copy, the
ORT version, the weight type), and reused on the next load only if both hashes still match.
The model directory's own ``metadata.json`` is never touched: the copy is a cache, not part of
the published version, and it is rebuilt whenever it is missing, stale or corrupt.

The caller (`edge_client.inference.load_model`) verifies the copy like any model (serving
contract, smoke inferences) and checks that it ranks like the fp32 graph on probe histories;
any failure falls back to fp32 with a log line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Literal

from edge_client.errors import EdgeError

log = logging.getLogger(__name__)

Precision = Literal["none", "int8"]
INT8_FILE = "model.int8.onnx"
INT8_STAMP = "model.int8.json"
WEIGHT_TYPE = "QInt8"


class QuantizationError(EdgeError):
    """The int8 copy of a model cannot be built, read or trusted."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def quantize_bytes(onnx_bytes: bytes) -> bytes:
    """``quantize_dynamic(QInt8)`` of a serving graph given as bytes; the int8 graph's bytes."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    root.addFilter(_no_preprocessing_advice)
    try:
        model = onnx.load_from_string(onnx_bytes)
        with tempfile.TemporaryDirectory(prefix="fedrec-int8-") as tmp:
            out = Path(tmp) / INT8_FILE
            quantize_dynamic(model, out, weight_type=QuantType.QInt8)
            return out.read_bytes()
    except Exception as err:  # onnx and ORT raise many unrelated types
        raise QuantizationError(f"quantize_dynamic failed: {err}") from err
    finally:
        root.removeFilter(_no_preprocessing_advice)


def _no_preprocessing_advice(record: logging.LogRecord) -> bool:
    """Drop ORT's "consider pre-processing" warning, logged on the root logger every call.

    Pre-processing (symbolic shape inference, graph fusions) targets CNN-style graphs; the
    serving graph's quantizable ops (Gather, MatMul/Gemm) are found without it.
    """
    return "consider to run pre-processing" not in record.getMessage()


def _read_cached(model_dir: Path, source_sha256: str) -> bytes | None:
    """The cached copy when its stamp matches this source and its bytes their hash."""
    try:
        stamp = json.loads((model_dir / INT8_STAMP).read_text(encoding="utf-8"))
        data = (model_dir / INT8_FILE).read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict):
        return None
    wanted = {
        "source_sha256": source_sha256,
        "sha256": _sha256(data),
        "onnxruntime": _ort_version(),
        "weight_type": WEIGHT_TYPE,
    }
    if any(stamp.get(k) != v for k, v in wanted.items()):
        return None
    return data


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def int8_copy(model_dir: Path, onnx_bytes: bytes, *, rebuild: bool = False) -> tuple[bytes, bool]:
    """The int8 graph of verified fp32 ``onnx_bytes`` and whether it came from the cache.

    A fresh copy is cached in ``model_dir`` (written atomically: the graph, then its stamp);
    when the directory is not writable the copy is used from memory and rebuilt next time.
    ``rebuild`` ignores the cache (its copy failed a check).
    """
    source = _sha256(onnx_bytes)
    cached = None if rebuild else _read_cached(model_dir, source)
    if cached is not None:
        return cached, True
    data = quantize_bytes(onnx_bytes)
    stamp: dict[str, Any] = {
        "source_sha256": source,
        "sha256": _sha256(data),
        "onnxruntime": _ort_version(),
        "weight_type": WEIGHT_TYPE,
    }
    try:
        _write_atomic(model_dir / INT8_FILE, data)
        _write_atomic(model_dir / INT8_STAMP, json.dumps(stamp, indent=2).encode())
    except OSError as err:
        log.warning("cannot cache the int8 copy in %s (%s); using it from memory", model_dir, err)
    return data, False
