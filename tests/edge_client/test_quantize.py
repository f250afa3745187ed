"""int8 serving: the quantized copy is built once, cached, verified, and falls back to fp32."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from edge_kit import client, live_server, settings_for, write_model

from edge_client import quantize
from edge_client.inference import ModelServer, load_model, probe_overlap
from edge_client.quantize import INT8_FILE, INT8_STAMP, QuantizationError
from shared.artifacts import verify_model_dir


def test_int8_copy_is_served_cached_and_ranks_like_fp32(site: Path) -> None:
    # Arrange
    write_model(site / "models", "v1", n_items=300)
    version_dir = site / "models" / "v1"
    # Act
    first = load_model(version_dir, quantize="int8")
    built_at = (version_dir / INT8_FILE).stat().st_mtime_ns
    second = load_model(version_dir, quantize="int8")
    fp32 = load_model(version_dir)
    # Assert
    assert first.precision == second.precision == "int8" and fp32.precision == "fp32"
    assert (version_dir / INT8_FILE).stat().st_mtime_ns == built_at  # reused, not rebuilt
    stamp = json.loads((version_dir / INT8_STAMP).read_text())
    assert stamp["source_sha256"] == verify_model_dir(version_dir).files["model.onnx"]
    assert (version_dir / INT8_FILE).stat().st_size < (version_dir / "model.onnx").stat().st_size
    assert probe_overlap(fp32, first) >= 0.7
    verify_model_dir(version_dir)  # the published files are untouched


def test_a_stale_or_corrupt_cache_is_rebuilt(site: Path) -> None:
    # Arrange: a cached copy whose bytes no longer match its stamp
    write_model(site / "models", "v1")
    version_dir = site / "models" / "v1"
    load_model(version_dir, quantize="int8")
    good = (version_dir / INT8_FILE).read_bytes()
    (version_dir / INT8_FILE).write_bytes(good[: len(good) // 2])
    # Act
    model = load_model(version_dir, quantize="int8")
    # Assert
    assert model.precision == "int8"
    assert (version_dir / INT8_FILE).read_bytes() == good  # deterministic rebuild


def test_a_failing_quantization_falls_back_to_fp32_with_a_log_line(
    site: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Arrange: failure injection (the quantizer itself raising)
    write_model(site / "models", "v1")

    def broken(_: bytes) -> bytes:
        raise QuantizationError("quantize_dynamic failed: injected")

    monkeypatch.setattr(quantize, "quantize_bytes", broken)
    server = ModelServer(site / "models", quantize="int8")
    # Act
    with caplog.at_level(logging.WARNING, logger="edge_client.inference"):
        outcome = server.check()
    # Assert
    assert outcome.status == "swapped"
    assert server.current is not None and server.current.precision == "fp32"
    assert "int8 copy of v1 not used, serving fp32" in caplog.text


def test_an_unloadable_cached_copy_is_rebuilt(site: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Arrange: garbage that matches its own stamp (a cache someone rewrote by hand)
    write_model(site / "models", "v1")
    version_dir = site / "models" / "v1"
    load_model(version_dir, quantize="int8")
    good = (version_dir / INT8_FILE).read_bytes()
    garbage = b"not an onnx graph"
    stamp = json.loads((version_dir / INT8_STAMP).read_text())
    stamp["sha256"] = hashlib.sha256(garbage).hexdigest()
    (version_dir / INT8_FILE).write_bytes(garbage)
    (version_dir / INT8_STAMP).write_text(json.dumps(stamp))
    # Act
    with caplog.at_level(logging.WARNING, logger="edge_client.inference"):
        model = load_model(version_dir, quantize="int8")
    # Assert
    assert model.precision == "int8"
    assert "cannot load the int8 copy" in caplog.text and "rebuilding it" in caplog.text
    assert (version_dir / INT8_FILE).read_bytes() == good


def test_the_service_serves_int8_when_configured(site: Path) -> None:
    # Arrange
    write_model(site / "models", "v1")
    with live_server(settings_for(site, quantize="int8")) as base, client(base) as c:
        deadline = time.monotonic() + 20
        while c.get("/v1/model").json()["mode"] != "model" and time.monotonic() < deadline:
            time.sleep(0.05)
        # Act
        model = c.get("/v1/model").json()
        c.post(
            "/v1/events",
            json={
                "event_id": "e1",
                "user_id": "u1",
                "item_id": "i3",
                "event_type": "view",
                "timestamp": int(time.time()),
            },
        )
        answer = c.get("/v1/users/u1/recommendations", params={"k": 5}).json()
    # Assert
    assert model["precision"] == "int8"
    assert answer["source"] == "model" and len(answer["items"]) == 5
    assert np.all(np.diff([i["score"] for i in answer["items"]]) <= 0)
