"""The ONNX Runtime model server of a site, with verified hot swap of model versions.

A site's ``models/`` directory holds complete model directories (`shared.artifacts`) named
by version, and ``models/CURRENT``, a text file naming the version to serve (replaced
atomically by `set_current_version`). `ModelServer.check` notices a new CURRENT cheaply (one
``stat``), loads the named version beside the one being served — sha256 of every file,
vocabulary against metadata, graph inputs and outputs, and smoke inferences that prove the
graph scores exactly the vocabulary's items — and only then swaps one reference. Requests
that already hold the old `LoadedModel` finish on it; a version that fails any check is
rejected with a log line and the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edge_client.errors import EdgeError, ModelRejectedError
from edge_client.explain import ItemExplainer
from edge_client.quantize import Precision, QuantizationError, int8_copy
from shared.artifacts import ONNX_FILE, VOCAB_FILE, ModelMetadata, verify_model_dir
from shared.errors import ModelError, VocabError
from shared.events import EVENT_TYPE_CODES
from shared.explanations import EXPLAIN_FILE, read_explanations
from shared.sequences import behaviour_tokens, pad_left, serving_input
from shared.vocab import PAD_INDEX, ItemVocab

log = logging.getLogger(__name__)

CURRENT_FILE = "CURRENT"
# The serving graph's names, as `shared.onnx_export` defines them (a test checks they agree);
# not imported from there because that module loads torch, which serving never needs.
INPUT_NAMES = ("items", "exclude")
OUTPUT_NAMES = ("scores", "item_ids")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
_NO_EXCLUDE = np.zeros((1, 1), dtype=np.int64)
# An int8 copy must rank like its fp32 graph: mean top-10 overlap on probe histories.
MIN_INT8_OVERLAP = 0.7
INT8_PROBES = 32

SwapStatus = Literal["swapped", "unchanged", "rejected", "no-model"]


def check_version_name(version: str) -> str:
    """``version`` if it is a safe directory name (no path separators, no ``..``)."""
    if not _VERSION_RE.fullmatch(version) or ".." in version:
        raise ModelRejectedError(
            f"{version!r} is not a valid model version (1-128 of A-Z a-z 0-9 _ . + -)"
        )
    return version


def read_current_version(models_dir: Path) -> str | None:
    """The version ``models/CURRENT`` names, or None when there is no CURRENT file."""
    path = models_dir / CURRENT_FILE
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise ModelRejectedError(f"cannot read {path}: {err}") from err
    return check_version_name(text)


def set_current_version(models_dir: Path, version: str) -> None:
    """Make ``version`` (an existing model directory) the one to serve, atomically.

    The new CURRENT is written to a temporary file, fsynced and renamed over the old one,
    so a reader sees the old name or the new one, never a partial file.
    """
    check_version_name(version)
    if not (models_dir / version).is_dir():
        raise EdgeError(f"{models_dir / version} is not a model directory")
    tmp = models_dir / f".{CURRENT_FILE}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(version + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(models_dir / CURRENT_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(models_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def session_options(intra_op_threads: int = 1) -> Any:
    """ONNX Runtime options for serving: sequential, ``intra_op_threads`` threads, quiet."""
    import onnxruntime as ort

    if intra_op_threads < 1:
        raise EdgeError("intra_op_threads must be at least 1")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning worker threads would take CPU from the HTTP loop on a small edge box.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A verified model ready to rank: its ORT session, vocabulary and metadata."""

    version: str
    path: Path
    metadata: ModelMetadata
    session: Any  # onnxruntime.InferenceSession (thread-safe run())
    item_ids: tuple[str, ...]  # raw id of vocab index i is item_ids[i - 1]
    index: dict[str, int]
    loaded_at: float
    precision: str = "fp32"  # "int8" when the quantized copy serves
    explainer: ItemExplainer | None = None  # None: a directory without explain.npz

    @property
    def max_len(self) -> int:
        """How many recent events the model reads."""
        return self.metadata.max_len

    @property
    def top_k(self) -> int:
        """How many items one inference returns at most."""
        return self.metadata.top_k

    def model_input(self, events: Sequence[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
        """Known items of ``(item_id, event_type)`` events, oldest first, and the graph input.

        The first array holds the vocab indices of the known items. The second is what the
        graph reads for them: the same indices, or for a multi-behaviour model their
        `shared.sequences.behaviour_tokens` (an unknown event type gets code 0).
        """
        get = self.index.get
        n = len(events)
        indices = np.fromiter((get(item, PAD_INDEX) for item, _ in events), np.int64, count=n)
        known = indices != PAD_INDEX
        items = indices[known]
        if not self.metadata.n_behaviours:
            return items, items
        codes = np.fromiter((EVENT_TYPE_CODES.get(kind, 0) for _, kind in events), np.int64, n)
        return items, behaviour_tokens(items, codes[known], self.metadata.n_items)

    def known(self, raw_ids: Collection[str]) -> np.ndarray:
        """Vocabulary indices of the ids the model knows, in order (unknown ids dropped)."""
        get = self.index.get
        return np.fromiter(
            (i for i in (get(r, PAD_INDEX) for r in raw_ids) if i != PAD_INDEX), dtype=np.int64
        )

    def rank(self, history: np.ndarray, exclude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores (K,) and vocab indices (K,) of the best next items after ``history``.

        ``history`` holds vocab indices oldest first; it is cut and left-padded exactly as in
        training (`shared.sequences.serving_input`). Items in ``exclude`` score -inf.
        """
        items = serving_input(history, self.max_len)  # (1, T)
        excl = exclude.reshape(1, -1) if len(exclude) else _NO_EXCLUDE  # (1, E)
        scores, ids = self.session.run(OUTPUT_NAMES, {"items": items, "exclude": excl})
        return scores[0], ids[0]

    def rank_many(
        self, histories: Sequence[np.ndarray], excludes: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """`rank` for several shoppers in one ORT run: scores (B, K), indices (B, K).

        Each row equals `rank` of that shopper alone (the padding contract is per row; the
        exclusion lists are right-padded with 0, the padding index, which is never an answer).
        """
        items = pad_left(list(histories), self.max_len)  # (B, T)
        width = max(1, max(len(e) for e in excludes))
        excl = np.zeros((len(excludes), width), dtype=np.int64)  # (B, E)
        for row, e in enumerate(excludes):
            excl[row, : len(e)] = e
        scores, ids = self.session.run(OUTPUT_NAMES, {"items": items, "exclude": excl})
        return scores, ids


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_model(
    model_dir: Path, *, intra_op_threads: int = 1, quantize: Precision = "none"
) -> LoadedModel:
    """Verify, load and smoke-test one model directory; `ModelRejectedError` on any fault.

    With ``quantize="int8"`` the int8 copy (`edge_client.quantize`) serves when it passes
    the same checks and ranks like the fp32 graph; otherwise fp32 serves (logged).
    """
    import onnxruntime as ort

    try:
        meta = verify_model_dir(model_dir)
        # Read each file once and check the bytes actually loaded, so a file replaced after
        # verification cannot slip in.
        onnx_bytes = (model_dir / ONNX_FILE).read_bytes()
        vocab_bytes = (model_dir / VOCAB_FILE).read_bytes()
        if _sha256(onnx_bytes) != meta.files.get(ONNX_FILE):
            raise ModelRejectedError(f"{model_dir}: {ONNX_FILE} changed while loading")
        if _sha256(vocab_bytes) != meta.files.get(VOCAB_FILE):
            raise ModelRejectedError(f"{model_dir}: {VOCAB_FILE} changed while loading")
        vocab = ItemVocab.from_json(vocab_bytes.decode("utf-8"))
    except (ModelError, VocabError, OSError, UnicodeDecodeError) as err:
        raise ModelRejectedError(f"rejected {model_dir}: {err}") from err
    if vocab.sha256 != meta.vocab_sha256 or vocab.n_items != meta.n_items:
        raise ModelRejectedError(f"rejected {model_dir}: vocabulary does not match metadata")
    if meta.max_len < 1 or not 1 <= meta.top_k <= meta.n_items:
        raise ModelRejectedError(f"rejected {model_dir}: max_len/top_k out of range")
    try:
        session = ort.InferenceSession(
            onnx_bytes,
            sess_options=session_options(intra_op_threads),
            providers=["CPUExecutionProvider"],
        )
    except Exception as err:  # ORT raises its own exception types for invalid graphs
        raise ModelRejectedError(
            f"rejected {model_dir}: ONNX Runtime cannot load it: {err}"
        ) from err
    model = LoadedModel(
        version=meta.version,
        path=model_dir,
        metadata=meta,
        session=session,
        item_ids=vocab.item_ids,
        index={raw: i + 1 for i, raw in enumerate(vocab.item_ids)},
        loaded_at=time.time(),
    )
    _smoke_test(model)
    # After the graph's own checks, so that a vocabulary mismatch is reported as such.
    model = dataclasses.replace(model, explainer=_load_explainer(model_dir, meta))
    if quantize == "int8":
        return _int8_or_fp32(model, onnx_bytes, intra_op_threads)
    return model


def _load_explainer(model_dir: Path, meta: ModelMetadata) -> ItemExplainer | None:
    """The directory's attribution tables (bytes re-hashed), or None when it has none."""
    expected = meta.files.get(EXPLAIN_FILE)
    if expected is None:
        return None
    try:
        data = (model_dir / EXPLAIN_FILE).read_bytes()
        if _sha256(data) != expected:
            raise ModelRejectedError(f"rejected {model_dir}: {EXPLAIN_FILE} changed while loading")
        context, target = read_explanations(data, meta.n_items)
    except (ModelError, OSError) as err:
        raise ModelRejectedError(f"rejected {model_dir}: {err}") from err
    return ItemExplainer(context=context, target=target)


def _int8_or_fp32(model: LoadedModel, onnx_bytes: bytes, intra_op_threads: int) -> LoadedModel:
    """The verified int8 copy of ``model``, or ``model`` itself when the copy fails a check.

    A cached copy that fails is rebuilt once from the verified fp32 bytes before giving up.
    """
    try:
        quantized, cached, overlap = _checked_int8(model, onnx_bytes, intra_op_threads, False)
    except (QuantizationError, ModelRejectedError) as err:
        try:
            log.warning("int8 copy of %s failed (%s); rebuilding it", model.version, err)
            quantized, cached, overlap = _checked_int8(model, onnx_bytes, intra_op_threads, True)
        except (QuantizationError, ModelRejectedError) as err2:
            log.warning("int8 copy of %s not used, serving fp32: %s", model.version, err2)
            return model
    log.info(
        "serving the int8 copy of %s (%s; top-10 overlap with fp32 on probes %.2f)",
        model.version,
        "cached" if cached else "built now",
        overlap,
    )
    return quantized


def _checked_int8(
    model: LoadedModel, onnx_bytes: bytes, intra_op_threads: int, rebuild: bool
) -> tuple[LoadedModel, bool, float]:
    """The int8 copy (cached unless ``rebuild``) after the serving checks and the probe."""
    import onnxruntime as ort

    data, cached = int8_copy(model.path, onnx_bytes, rebuild=rebuild)
    try:
        session = ort.InferenceSession(
            data,
            sess_options=session_options(intra_op_threads),
            providers=["CPUExecutionProvider"],
        )
    except Exception as err:  # ORT raises its own exception types for invalid graphs
        raise QuantizationError(f"ONNX Runtime cannot load the int8 copy: {err}") from err
    quantized = dataclasses.replace(model, session=session, precision="int8")
    _smoke_test(quantized)
    overlap = probe_overlap(model, quantized)
    if overlap < MIN_INT8_OVERLAP:
        raise QuantizationError(
            f"the int8 copy ranks unlike fp32 (mean top-10 overlap {overlap:.2f} on "
            f"{INT8_PROBES} probe histories < {MIN_INT8_OVERLAP})"
        )
    return quantized, cached, overlap


def probe_overlap(reference: LoadedModel, other: LoadedModel, n: int = INT8_PROBES) -> float:
    """Mean top-10 overlap of two graphs over the same vocabulary on seeded probe histories."""
    rng = np.random.default_rng(0)
    n_items, max_len = reference.metadata.n_items, reference.max_len
    histories = [
        rng.integers(1, n_items + 1, size=int(rng.integers(1, max_len + 1))).astype(np.int64)
        for _ in range(n)
    ]
    excludes = [np.zeros(0, dtype=np.int64)] * n
    _, ids_a = reference.rank_many(histories, excludes)
    _, ids_b = other.rank_many(histories, excludes)
    k = min(10, ids_a.shape[1])
    overlaps = [
        len(set(a[:k].tolist()) & set(b[:k].tolist())) / k
        for a, b in zip(ids_a, ids_b, strict=True)
    ]
    return float(np.mean(overlaps))


def _smoke_test(model: LoadedModel) -> None:
    """Prove the graph honours the serving contract for exactly this vocabulary."""
    where = f"rejected {model.path}"
    inputs = {i.name: i.type for i in model.session.get_inputs()}
    outputs = [o.name for o in model.session.get_outputs()]
    if set(inputs) != set(INPUT_NAMES) or set(outputs) != set(OUTPUT_NAMES):
        raise ModelRejectedError(
            f"{where}: graph has inputs {sorted(inputs)} and outputs {outputs}, expected "
            f"{list(INPUT_NAMES)} and {list(OUTPUT_NAMES)}"
        )
    if any(t != "tensor(int64)" for t in inputs.values()):
        raise ModelRejectedError(f"{where}: graph inputs must be int64, got {inputs}")
    n, k = model.metadata.n_items, model.top_k
    try:
        scores, ids = model.rank(np.array([n], dtype=np.int64), np.zeros(0, dtype=np.int64))
        # Excluding every vocabulary item must leave nothing to recommend: a graph over a
        # larger catalogue than the vocabulary still returns finite scores here, and one
        # over a smaller catalogue fails to scatter the exclusions at all.
        all_items = np.arange(1, n + 1, dtype=np.int64)
        left, _ = model.rank(np.array([1], dtype=np.int64), all_items)
    except Exception as err:  # ORT raises its own exception types at run time
        raise ModelRejectedError(
            f"{where}: smoke inference failed (can the graph read all {n} items of its "
            f"vocabulary? vocab mismatch): {err}"
        ) from err
    if scores.shape != (k,) or ids.shape != (k,) or ids.dtype != np.int64:
        raise ModelRejectedError(
            f"{where}: smoke inference gave shapes {scores.shape}/{ids.shape}, expected ({k},)"
        )
    if not np.all(np.isfinite(scores)) or np.any(np.diff(scores) > 0):
        raise ModelRejectedError(f"{where}: smoke inference scores are not finite/descending")
    if ids.min() < 1 or ids.max() > n:
        raise ModelRejectedError(
            f"{where}: graph returns item indices outside 1..{n}: vocab mismatch"
        )
    if np.any(np.isfinite(left)):
        raise ModelRejectedError(
            f"{where}: graph scores more items than its vocabulary ({n}): vocab mismatch"
        )


@dataclass(frozen=True)
class Rejection:
    """The last version that failed to load, why, and when."""

    version: str
    reason: str
    at: float


@dataclass(frozen=True)
class SwapOutcome:
    """What a check or reload did."""

    status: SwapStatus
    version: str | None
    reason: str = ""


class ModelServer:
    """Serves the version named by ``models_dir/CURRENT``; swaps to a new one when verified.

    ``current`` is read without locks (one attribute load). Loads are serialised by a lock
    and happen beside the served model, so serving never waits for a load.
    """

    def __init__(
        self,
        models_dir: Path,
        *,
        intra_op_threads: int = 1,
        quantize: Precision = "none",
        on_swap: Callable[[LoadedModel], None] | None = None,
        on_reject: Callable[[Rejection], None] | None = None,
    ) -> None:
        self.models_dir = Path(models_dir)
        self.intra_op_threads = intra_op_threads
        self.quantize: Precision = quantize
        self._on_swap = on_swap
        self._on_reject = on_reject
        self._current: LoadedModel | None = None
        self._rejection: Rejection | None = None
        self._stamp: tuple[int, int, int] | None = None
        self._lock = threading.Lock()

    @property
    def current(self) -> LoadedModel | None:
        """The model being served, or None (popularity mode)."""
        return self._current

    @property
    def last_rejection(self) -> Rejection | None:
        """The most recent version that was refused, if any."""
        return self._rejection

    def _current_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = (self.models_dir / CURRENT_FILE).stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def check(self) -> SwapOutcome:
        """Swap to the version CURRENT names if CURRENT changed since the last check.

        Costs one ``stat`` when nothing changed; a rejected version is not retried until
        CURRENT changes again (or `reload` is called).
        """
        return self._refresh(force=False)

    def reload(self) -> SwapOutcome:
        """Re-read CURRENT now and load what it names, retrying a rejected version."""
        return self._refresh(force=True)

    def _refresh(self, *, force: bool) -> SwapOutcome:
        with self._lock:
            served = self._current.version if self._current else None
            stamp = self._current_stamp()
            if stamp == self._stamp and not force:
                return SwapOutcome("unchanged" if served else "no-model", served)
            self._stamp = stamp
            try:
                version = read_current_version(self.models_dir)
            except ModelRejectedError as err:
                return self._reject("CURRENT", str(err))
            if version is None:
                return SwapOutcome("unchanged" if served else "no-model", served)
            if version == served:
                return SwapOutcome("unchanged", served)
            try:
                model = load_model(
                    self.models_dir / version,
                    intra_op_threads=self.intra_op_threads,
                    quantize=self.quantize,
                )
            except ModelRejectedError as err:
                return self._reject(version, str(err))
            if model.version != version:
                return self._reject(
                    version, f"its metadata says version {model.version!r}, not {version!r}"
                )
            self._current = model  # the swap: one reference assignment
            log.info("serving model %s (was %s)", version, served or "popularity")
            if self._on_swap is not None:
                self._on_swap(model)
            return SwapOutcome("swapped", version)

    def _reject(self, version: str, reason: str) -> SwapOutcome:
        self._rejection = Rejection(version, reason, time.time())
        served = self._current.version if self._current else None
        log.warning(
            "model %s rejected, still serving %s: %s", version, served or "popularity", reason
        )
        if self._on_reject is not None:
            self._on_reject(self._rejection)
        return SwapOutcome("rejected", served, reason)


_Pending = tuple["LoadedModel", np.ndarray, np.ndarray, "asyncio.Future[Any]"]


class RankBatcher:
    """Coalesces `LoadedModel.rank` calls of concurrent requests into shared ORT runs.

    One worker takes everything queued, groups it by model (a request that started before a
    swap finishes on its model) and runs each group as one batch on a dedicated thread, so
    the event loop keeps parsing requests and reading the store while ORT computes; what
    arrives meanwhile forms the next batch. At low load a batch is a single request, run
    inline; under load the catalogue-sized output layer is read once per batch instead of
    once per request.
    """

    def __init__(self, max_batch: int = 32, *, threaded: bool = True) -> None:
        if max_batch < 1:
            raise EdgeError("max_batch must be at least 1")
        self.max_batch = max_batch
        self._pending: list[_Pending] = []
        self._worker: asyncio.Task[None] | None = None
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort") if threaded else None
        )
        self.batches = 0
        self.ranked = 0

    async def rank(
        self, model: LoadedModel, history: np.ndarray, exclude: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scores (K,) and vocab indices (K,) for one shopper, as `LoadedModel.rank`."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[np.ndarray, np.ndarray]] = loop.create_future()
        self._pending.append((model, history, exclude, future))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            await asyncio.sleep(0)  # requests that became ready this turn join the batch
            pending, self._pending = self._pending, []
            groups: dict[int, list[_Pending]] = {}
            for entry in pending:
                if not entry[3].done():  # the client may have gone away
                    groups.setdefault(id(entry[0]), []).append(entry)
            for entries in groups.values():
                for start in range(0, len(entries), self.max_batch):
                    chunk = entries[start : start + self.max_batch]
                    model = chunk[0][0]
                    args = ([e[1] for e in chunk], [e[2] for e in chunk])
                    try:
                        # A lone request runs inline: a thread hand-off would only add its
                        # wake-up latency, and nobody is waiting for the loop meanwhile.
                        if self._executor is None or (len(chunk) == 1 and not self._pending):
                            scores, ids = model.rank_many(*args)
                        else:
                            scores, ids = await loop.run_in_executor(
                                self._executor, model.rank_many, *args
                            )
                    except Exception as err:  # ORT run-time errors go to each waiting request
                        for e in chunk:
                            if not e[3].done():
                                e[3].set_exception(err)
                        continue
                    self.batches += 1
                    self.ranked += len(chunk)
                    for row, e in enumerate(chunk):
                        if not e[3].done():
                            e[3].set_result((scores[row], ids[row]))

    def close(self) -> None:
        """Stop the inference thread (pending work is finished first)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)


def installed_versions(models_dir: Path) -> Sequence[str]:
    """Names of the version directories under ``models_dir`` (complete ones only)."""
    if not models_dir.is_dir():
        return []
    with contextlib.suppress(OSError):
        return sorted(
            p.name
            for p in models_dir.iterdir()
            if p.is_dir() and _VERSION_RE.fullmatch(p.name) and (p / "metadata.json").is_file()
        )
    return []
