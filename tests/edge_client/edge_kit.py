"""Helpers of the edge tests: tiny real models, real uvicorn servers on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn

from edge_client.inference import set_current_version
from edge_client.service.app import create_app
from edge_client.settings import EdgeSettings
from shared.artifacts import ModelMetadata, save_model_dir
from shared.models import build_model
from shared.vocab import ItemVocab

TOKEN = "test-admin-token-0123456789"
N_ITEMS = 40
MAX_LEN = 8


def item_vocab(n_items: int = N_ITEMS) -> ItemVocab:
    return ItemVocab([f"i{i}" for i in range(1, n_items + 1)])


def make_model(seed: int = 0, n_items: int = N_ITEMS) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(
        "gru", {"n_items": n_items, "max_len": MAX_LEN, "dim": 8, "hidden": 8, "dropout": 0.0}
    ).eval()


def write_model(
    models_dir: Path, version: str, seed: int = 0, n_items: int = N_ITEMS, current: bool = True
) -> torch.nn.Module:
    """A real tiny GRU saved as models_dir/version (optionally made CURRENT)."""
    model = make_model(seed, n_items)
    save_model_dir(models_dir / version, model, item_vocab(n_items), version=version)
    if current:
        set_current_version(models_dir, version)
    return model


def rehash(model_dir: Path) -> None:
    """Rewrite metadata.json so its hashes match the files as they are now."""
    meta_path = model_dir / "metadata.json"
    data: dict[str, Any] = json.loads(meta_path.read_text())
    for name in data["files"]:
        data["files"][name] = hashlib.sha256((model_dir / name).read_bytes()).hexdigest()
    vocab = ItemVocab.load(model_dir / "vocab.json")
    data["vocab_sha256"] = vocab.sha256
    data["n_items"] = vocab.n_items
    ModelMetadata.from_dict(data)
    meta_path.write_text(json.dumps(data))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def settings_for(site: Path, **overrides: Any) -> EdgeSettings:
    values: dict[str, Any] = {
        "db": site / "site.db",
        "model_dir": site / "models",
        "admin_token": TOKEN,
        "poll_interval_s": 0.2,
    }
    values.update(overrides)
    return EdgeSettings(**values)


@contextmanager
def live_server(settings: EdgeSettings) -> Iterator[str]:
    """A real uvicorn on 127.0.0.1 in a thread of this process; always stopped."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def client(base: str) -> httpx.Client:
    return httpx.Client(base_url=base, timeout=30)
