"""The runner's parts: registry -> metrics.jsonl lines, run config, sampling, calibration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from coordinator.registry import Registry, RoundSummary
from coordinator.run_config import RunConfig
from shared.errors import ConfigError
from simulations.errors import SimulationError
from simulations.partition import partition_uniform
from simulations.runner import (
    METRIC_KEYS,
    SimConfig,
    build_run_config,
    finished_rounds,
    metrics_line,
    prepare_out,
    read_registry,
    sampling,
    training_shoppers_per_site,
)


def _record_round(reg: Registry, run_id: int, number: int, eps: float | None) -> None:
    round_id = reg.start_round(run_id, number, 3, 1000)
    reg.finish_round(
        round_id,
        RoundSummary(
            status="completed",
            sites_asked=3,
            sites_answered=3,
            sites_accepted=2,
            sites_rejected=0,
            sites_refused=1,
            sites_failed=0,
            bytes_down=1000,
            bytes_up=400,
            seconds=2.5,
            train_metrics={"train-loss": 4.5 - number},
            model_version=f"v{number}",
            epsilon_max=eps,
            epsilon_mean=None if eps is None else eps / 2,
        ),
    )
    reg.add_round_bytes(round_id, 500, 200)
    reg.set_round_eval_metrics(round_id, {"hr@10": 0.2, "ndcg@10": 0.1})


def test_registry_rounds_become_metrics_lines_with_every_key(tmp_path: Path) -> None:
    db = tmp_path / "coordinator.db"
    reg = Registry(db)
    run_id = reg.start_run(
        1, {}, mode="rounds", privacy_mode="store", strategy="fedavg", secagg=False
    )
    _record_round(reg, run_id, 1, 2.0)
    _record_round(reg, run_id, 2, 3.5)

    rounds, run = read_registry(db)
    running = finished_rounds(rounds, run_over=False)
    reg.finish_run(run_id, "completed")
    rounds, run = read_registry(db)
    reg.close()
    line = metrics_line(rounds[1], {"hr@10": 0.3, "ndcg@10": 0.15}, 9.0)

    assert running == [1]  # round 2 may still be evaluating while the run goes on
    assert finished_rounds(rounds, run_over=run is not None and run["status"] != "running") == [
        1,
        2,
    ]
    assert tuple(line) == METRIC_KEYS
    assert line["round"] == 2 and line["status"] == "completed"
    assert line["loss"] == pytest.approx(2.5)
    assert (line["ndcg@10"], line["fed_ndcg@10"]) == (0.15, pytest.approx(0.1))
    assert (line["epsilon_max"], line["epsilon_mean"]) == (3.5, 1.75)
    assert (line["bytes_down"], line["bytes_up"], line["bytes_sent"]) == (1500, 600, 2100)
    assert (line["sites_accepted"], line["sites_refused"]) == (2, 1)
    json.dumps(line, allow_nan=False)  # strict JSON: no NaN or Infinity


def test_a_missing_registry_reads_as_nothing_yet(tmp_path: Path) -> None:
    assert read_registry(tmp_path / "none.db") == ([], None)
    (tmp_path / "half.db").write_bytes(b"")
    assert read_registry(tmp_path / "half.db") == ([], None)


def test_non_private_rounds_have_null_epsilon() -> None:
    row = {
        "number": 1,
        "status": "missed-quorum",
        "train_metrics": {},
        "eval_metrics": {},
        "bytes_down": 10,
        "bytes_up": 0,
        "epsilon_max": None,
        "epsilon_mean": None,
        "seconds": 1.0,
        "sites_asked": 2,
        "sites_accepted": 0,
        "sites_refused": 0,
        "sites_rejected": 0,
        "sites_failed": 2,
        "model_version": None,
    }

    line = metrics_line(row, None, 1.0)

    assert line["epsilon_max"] is None and line["ndcg@10"] is None and line["loss"] is None


@pytest.mark.parametrize("privacy", ["none", "store", "app", "distributed"])
def test_run_config_is_one_the_server_app_accepts(privacy: str, tmp_path: Path) -> None:
    config = SimConfig(privacy=privacy, sites=10, sites_per_round=4, rounds=5)  # type: ignore[arg-type]

    values = build_run_config(
        config, n_sites=10, catalogue=tmp_path / "c.json", state_dir=tmp_path, noise_multiplier=1.5
    )
    parsed = RunConfig.from_mapping(values)

    assert parsed.num_rounds == 5 and parsed.min_sites == 4
    assert parsed.fraction_train == pytest.approx(0.4)
    assert parsed.privacy_mode == privacy
    if privacy == "store":
        assert parsed.noise_multiplier == 1.5
    if privacy == "app":
        assert parsed.app_noise_multiplier == 1.5 and parsed.app_population == 10
        assert parsed.quorum == 4 and parsed.app_max_epsilon >= config.epsilon
    if privacy == "distributed":
        # every site of a round holds a share of the noise: all of them must answer
        assert parsed.noise_multiplier == 1.5 and parsed.secagg and parsed.quorum == 4
        assert parsed.secagg_max_weight == 1000.0  # no site is larger than the default


def test_distributed_secagg_range_holds_the_largest_site(tmp_path: Path) -> None:
    # A site with more shoppers than secagg-max-weight refuses every round (its share could
    # overflow SecAgg+'s range): Beauty's largest of 10 Dirichlet sites has 5,032.
    config = SimConfig(privacy="distributed", sites=10)
    kwargs = {"catalogue": tmp_path / "c.json", "state_dir": tmp_path, "noise_multiplier": 1.0}

    values = build_run_config(config, n_sites=10, max_site_shoppers=5032, **kwargs)
    chosen = SimConfig(privacy="distributed", sites=10, run_config={"secagg-max-weight": 5000})
    overridden = build_run_config(chosen, n_sites=10, max_site_shoppers=5032, **kwargs)

    assert RunConfig.from_mapping(values).secagg_max_weight == 5032.0
    assert RunConfig.from_mapping(overridden).secagg_max_weight == 5000.0


def test_distributed_needs_three_sites_a_round_and_fedavg(tmp_path: Path) -> None:
    config = SimConfig(privacy="distributed", sites=2)

    with pytest.raises(SimulationError, match="at least 3 sites"):
        build_run_config(
            config, n_sites=2, catalogue=tmp_path / "c.json", state_dir=tmp_path, noise_multiplier=1
        )
    with pytest.raises(ConfigError, match="fedavg"):
        SimConfig(privacy="distributed", strategy="fedmedian")


def test_run_config_errors_name_the_key(tmp_path: Path) -> None:
    config = SimConfig(run_config={"no-such-key": 1})

    with pytest.raises(SimulationError, match="no-such-key"):
        build_run_config(
            config, n_sites=3, catalogue=tmp_path, state_dir=tmp_path, noise_multiplier=1.0
        )


def test_sampling_defaults_to_every_site_and_evaluates_like_it_trains() -> None:
    assert sampling(SimConfig(), 7) == (7, 1.0, 1.0)
    assert sampling(SimConfig(sites_per_round=10, eval_fraction=0.5), 100) == (10, 0.1, 0.5)
    assert sampling(SimConfig(sites_per_round=50), 20) == (20, 1.0, 1.0)


def test_training_shoppers_are_counted_per_site() -> None:
    from shared.sequences import build_sequences, leave_one_out
    from shared.synth import SynthConfig, generate_synthetic
    from simulations.sites import catalogue_of

    data = generate_synthetic(SynthConfig(n_sites=2, shoppers_per_site=15, n_items=40, seed=1))
    vocab = catalogue_of(data.events)
    split = leave_one_out(build_sequences(data.events, vocab))
    part = partition_uniform(data.events["user_id"].unique(), 3, seed=0)

    counts = training_shoppers_per_site(split, part)

    assert counts.sum() == int((np.asarray(split.train.lengths) >= 2).sum()) == 30
    assert counts.tolist() == part.sizes().tolist()


def test_config_errors_and_non_empty_out(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="privacy"):
        SimConfig(privacy="central")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="fedavg"):
        SimConfig(privacy="app", strategy="fedadam")
    with pytest.raises(ConfigError, match="epsilon"):
        SimConfig(epsilon=-1)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "x").write_text("x")
    with pytest.raises(SimulationError, match="not empty"):
        prepare_out(tmp_path / "old")
    assert prepare_out(tmp_path / "new").is_dir()


def test_path_valued_sets_are_made_absolute_or_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ServerApp runs in Flower's app directory: a relative path given on the command
    # line would be read from there and fail only after the data has been split.
    (tmp_path / "attrs.json").write_text("{}")
    monkeypatch.chdir(tmp_path)

    given = {"item-attributes": "attrs.json", "frozen": "head.weight"}
    config = SimConfig(run_config=given)

    assert config.run_config["item-attributes"] == str(tmp_path.resolve() / "attrs.json")
    assert config.run_config["frozen"] == "head.weight"
    assert given["item-attributes"] == "attrs.json"  # the caller's mapping is not changed
    with pytest.raises(ConfigError, match=r"item-attributes=missing\.json: no such file"):
        SimConfig(run_config={"item-attributes": "missing.json"})


def test_store_calibration_is_within_the_budget_and_tight() -> None:
    from edge_client.dp_sgd import sampling_plan
    from edge_client.privacy_ledger import Mechanism, compose
    from simulations.privacy import store_noise_multiplier

    sizes = [40, 55, 300]  # the smallest site has the largest sampling rate
    sigma = store_noise_multiplier(4.0, 1e-5, 3, sizes, 32, 1.0)
    q, steps = sampling_plan(40, 32, 1.0)

    def spent(s: float) -> float:
        return compose([Mechanism(s, q, steps)] * 3, 1e-5).epsilon_prv

    assert spent(sigma) <= 4.0
    assert spent(sigma * 0.98) > 4.0  # not wastefully large


def test_app_calibration_matches_flowers_accountant() -> None:
    from simulations.privacy import app_epsilon, app_noise_multiplier

    sigma = app_noise_multiplier(8.0, 1e-5, 10, sample_size=5, population=50)

    assert app_epsilon(sigma, 10, 1e-5, 5, 50) <= 8.0
    assert app_epsilon(sigma * 0.99, 10, 1e-5, 5, 50) > 8.0
    assert math.isfinite(sigma) and sigma > 1.0


@pytest.mark.parametrize("popularity_noise", [0.0, 10.0])
def test_distributed_calibration_is_within_the_budget_and_tight(popularity_noise: float) -> None:
    from edge_client.privacy_ledger import Mechanism, compose
    from simulations.privacy import distributed_noise_multiplier

    sigma = distributed_noise_multiplier(4.0, 1e-5, 20, 0.05, popularity_noise=popularity_noise)
    before = [Mechanism(popularity_noise, 1.0, 1)] if popularity_noise else []

    def spent(s: float) -> float:
        return compose([*before, Mechanism(s, 0.05, 20)], 1e-5).epsilon_prv

    assert spent(sigma) <= 4.0
    assert spent(sigma * 0.98) > 4.0  # not wastefully large


def test_distributed_calibration_refuses_a_release_that_spends_the_budget() -> None:
    from simulations.privacy import distributed_noise_multiplier

    with pytest.raises(SimulationError, match="popularity release alone"):
        distributed_noise_multiplier(1.0, 1e-5, 5, 0.1, popularity_noise=0.5)


def test_memory_sampler_sums_the_whole_process_tree() -> None:
    import subprocess
    import sys
    import time

    from simulations.memory import MemorySampler, own_tree, tree_memory

    hold = "import time; b = bytearray(150 * 2**20); b[::4096] = b'x' * (len(b) // 4096); "
    child = subprocess.Popen([sys.executable, "-c", hold + "time.sleep(30)"])
    try:
        time.sleep(1.5)
        alone = tree_memory([child.pid])
        with MemorySampler(own_tree, interval=0.1) as sampler:
            time.sleep(0.5)
        peak = sampler.peak
    finally:
        child.kill()
        child.wait()

    assert alone[0] > 150 * 2**20 and alone[2] == 1
    assert peak.samples >= 2 and peak.processes >= 2
    assert peak.rss_bytes >= alone[0] and peak.pss_bytes > 150 * 2**20
    assert peak.others_pss_bytes > 150 * 2**20  # the child, without the sampling process


def test_a_failed_run_names_the_sites_refusals(tmp_path: Path) -> None:
    # A refused SecAgg+ share is only a dropout to Flower; the reason is in the site's log.
    from simulations.runner import site_refusals

    log = tmp_path / "flwr-run.log"
    log.write_text(
        "INFO: round 1\n"
        "(ClientAppActor pid=1) 12/04/2026 21:13:32:WARNING:site site-000 refuses round 1: "
        "the site has 1667 shoppers; a share fits SecAgg+'s range for at most 1000\n"
        "(ClientAppActor pid=2) WARNING:site site-003 refuses round 1: "
        "the site has 1041 shoppers; a share fits SecAgg+'s range for at most 1000\n"
        "WARNING:site site-004 refuses round 2: privacy budget exceeded: 8.1 > 8\n"
    )

    reasons = site_refusals(log)

    assert reasons == [
        "site-000: the site has 1667 shoppers; a share fits SecAgg+'s range for at most 1000",
        "site-004: privacy budget exceeded: 8.1 > 8",
    ]
    assert site_refusals(tmp_path / "missing.log") == []
