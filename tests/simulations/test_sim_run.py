"""`fedrec sim run` end to end: Flower's simulation engine, real sites, files, no leftovers."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from simulations.runner import METRIC_KEYS

pytestmark = [pytest.mark.slow, pytest.mark.integration]

FEDREC = str(Path(sys.executable).parent / "fedrec")


def processes_of(run_dir: Path, ray_tmp: str) -> list[str]:
    """Live processes whose FLWR_HOME or Ray temp dir belongs to this run."""
    flwr_home = str((run_dir / "flwr").resolve())
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if env.get("FLWR_HOME") == flwr_home or env.get("RAY_TMPDIR") == ray_tmp:
            found.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])[:120]}")
    return found


@pytest.fixture(scope="module")
def store_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One tiny store-mode run through the CLI, shared by the tests of this module."""
    # A long run directory (pytest's): Ray's temp dir must move elsewhere and come back.
    out = tmp_path_factory.mktemp("sim") / "run"
    argv = [
        FEDREC, "sim", "run", "--data", "synth", "--sites", "2", "--rounds", "2",
        "--privacy", "store", "--epsilon", "8", "--synth-shoppers", "12", "--synth-items", "30",
        "--model-config", '{"dim": 8, "hidden": 8, "max_len": 10}', "--out", str(out), "--json",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=400, check=False)
    return out, done


def test_sim_run_store_mode_writes_every_file_and_leaves_nothing_running(
    store_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    out, done = store_run

    # Assert: exit status, summary, per-round metrics
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    for line in lines:
        assert tuple(line) == METRIC_KEYS
        assert line["status"] == "completed" and line["sites_accepted"] == 2
        assert 0.0 <= line["ndcg@10"] <= 1.0 and line["bytes_sent"] > 0
        assert 0.0 < line["epsilon_max"] <= 8.0
    assert lines[1]["epsilon_max"] > lines[0]["epsilon_max"]
    # every site evaluated every shopper: federated evaluation = the global test metric
    assert lines[-1]["fed_ndcg@10"] == pytest.approx(lines[-1]["ndcg@10"], abs=1e-6)
    assert summary["final"]["epsilon_max"] <= 8.0 and summary["rounds_completed"] == 2

    # the run directory: config, report with figures, final model (ONNX), sites
    config = json.loads((out / "config.json").read_text())
    assert config["run_config"]["privacy-mode"] == "store"
    assert config["privacy"]["noise_multiplier"] > 0
    report = (out / "report.md").read_text()
    assert "NDCG@10" in report and "ndcg_vs_round.png" in report
    for png in ("ndcg_vs_round.png", "epsilon_vs_round.png", "bytes_per_round.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from shared.artifacts import verify_model_dir

    meta = verify_model_dir(out / "model")
    assert meta.privacy.epsilon is not None and meta.privacy.epsilon <= 8.0
    import onnxruntime as ort

    ort.InferenceSession(str(out / "model" / "model.onnx"), providers=["CPUExecutionProvider"])
    from edge_client.privacy_ledger import PrivacyLedger
    from edge_client.store import EventStore

    n_events = 0
    for site in ("site-000", "site-001"):
        store = EventStore(out / "state" / "sites" / site / "site.db", create=False)
        n_events += store.count_events()
        store.close()
        with PrivacyLedger(out / "state" / "sites" / site / "site.db") as ledger:
            rounds = ledger.history()
            assert len(rounds) == 2 and rounds[-1].epsilon_budget == 8.0  # the site's budget
    assert n_events == config["dataset"]["events"]

    # Flower and Ray kept their state in the run directory; nothing keeps running
    assert (out / "flwr" / "config.toml").is_file()
    assert (out / "ray").is_dir() and any((out / "ray").iterdir())
    assert not processes_of(out, config["engine"]["ray_tmpdir"])
    assert not psutil.Process(os.getpid()).children(recursive=True)


def test_the_demo_serves_a_site_and_shows_the_real_time_effect(
    store_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    import io

    from rich.console import Console

    from simulations.demo import DEMO_SHOPPER, show_site

    out, done = store_run
    assert done.returncode == 0, done.stderr[-3000:]
    text = io.StringIO()

    shown = show_site(out, "site-000", console=Console(file=text, width=120))

    assert shown["before"]["source"] == "popularity" and shown["after"]["source"] == "model"
    assert shown["after"]["user_id"] == DEMO_SHOPPER and len(shown["posted"]) == 3
    assert shown["before"]["items"] != shown["after"]["items"]
    printed = text.getvalue()
    assert "before any event" in printed and "after 3 events" in printed
    assert not psutil.Process(os.getpid()).children(recursive=True)  # the service stopped
    from edge_client.store import EventStore

    store = EventStore(out / "state" / "sites" / "site-000" / "site.db", create=False)
    try:
        assert len(store.history(DEMO_SHOPPER, 10)) == 3  # the posted events were stored
    finally:
        store.close()


def test_sim_run_refuses_bad_input_with_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from shared.cli import app
    from shared.errors import FedrecError

    done = subprocess.run(
        [FEDREC, "sim", "run", "--out", str(tmp_path / "o"), "--privacy", "central"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert "privacy must be one of" in done.stderr and "Traceback" not in done.stderr
    bad = [
        (["--data", str(tmp_path / "missing.csv")], "no data at"),
        (["--privacy", "app", "--strategy", "fedadam"], "fedavg"),
        (["--sites", "2", "--synth-shoppers", "3", "--set", "no-such-key=1"], "no-such-key"),
        (["--sites", "9", "--split", "uniform", "--synth-shoppers", "3", "--synth-items", "30",
          "--data", "synth", "--model-config", "[1]"], "JSON object"),
    ]  # fmt: skip
    runner = CliRunner()
    for i, (args, message) in enumerate(bad):
        result = runner.invoke(app, ["sim", "run", "--out", str(tmp_path / f"o{i}"), *args])
        assert isinstance(result.exception, FedrecError), (args, result.output)
        assert message in str(result.exception)


def test_sim_run_distributed_mode_sums_noisy_shares_under_secagg(tmp_path: Path) -> None:
    # Arrange: three sites (SecAgg+ needs three shares), two rounds at epsilon 8
    out = tmp_path / "run"
    argv = [
        FEDREC, "sim", "run", "--data", "synth", "--sites", "3", "--rounds", "2",
        "--privacy", "distributed", "--epsilon", "8", "--synth-shoppers", "12",
        "--synth-items", "30", "--model-config", '{"dim": 8, "hidden": 8, "max_len": 10}',
        "--keep-models", "--out", str(out), "--json",
    ]  # fmt: skip
    # Act
    done = subprocess.run(argv, capture_output=True, text=True, timeout=400, check=False)
    # Assert: both rounds completed with every site inside the budget
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    config = json.loads((out / "config.json").read_text())
    assert config["run_config"]["secagg"] is True
    assert config["run_config"]["privacy-mode"] == "distributed"
    sigma, q = config["privacy"]["noise_multiplier"], config["privacy"]["sample_rate"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(x["status"], x["sites_accepted"]) for x in lines] == [("completed", 3)] * 2
    assert 0.0 < summary["final"]["epsilon_max"] <= 8.0
    # every ledger, the coordinator's and each site's, holds one step (sigma, q) per round
    from coordinator.distributed_dp import ledger_path
    from edge_client.privacy_ledger import PrivacyLedger

    state = out / "state"
    with PrivacyLedger(ledger_path(state)) as ledger:
        steps = ledger.mechanisms()
    assert len(steps) == 2
    for step in steps:
        assert step.noise_multiplier == pytest.approx(sigma, rel=1e-6)
        assert step.sample_rate == pytest.approx(q, rel=1e-6) and step.steps == 1
    for site in ("site-000", "site-001", "site-002"):
        with PrivacyLedger(state / "sites" / site / "site.db") as ledger:
            assert len(ledger.mechanisms()) == 2
            assert ledger.spent().epsilon_prv == pytest.approx(summary["final"]["epsilon_max"])
    # SecAgg+ really aggregated: each round's model differs from the one before it
    import torch

    from coordinator.registry import Registry

    registry = Registry(state / "coordinator" / "coordinator.db", create=False)
    versions = sorted(
        (m for m in registry.models() if m.round is not None), key=lambda m: m.round or 0
    )
    parent = registry.model(versions[0].parent) if versions[0].parent else None
    registry.close()
    chain = ([parent] if parent is not None else []) + versions
    weights = [torch.load(Path(m.path) / "weights.pt", weights_only=True) for m in chain]
    assert len(versions) == 2
    for before, after in itertools.pairwise(weights):
        assert any(not torch.equal(before[k], after[k]) for k in after)
