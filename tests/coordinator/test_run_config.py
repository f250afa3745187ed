"""RunConfig: pyproject defaults, types, ranges and the SecAgg+/app-mode guards."""

import dataclasses
import itertools
import tomllib
from pathlib import Path

import pytest

from coordinator.errors import RunConfigError
from coordinator.run_config import RunConfig

REPO = Path(__file__).resolve().parents[2]


def test_pyproject_declares_every_key_with_the_dataclass_default() -> None:
    # Arrange
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    # Act
    cfg = RunConfig.from_mapping(declared)
    # Assert: same keys, and the pyproject values are the dataclass defaults
    assert set(declared) == {f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)}
    assert cfg == RunConfig()


def test_round_trip_through_kebab_case() -> None:
    cfg = RunConfig(num_rounds=7, strategy="fedtrimmedavg", trim_beta=0.1)
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg


def test_int_widens_to_float_but_not_the_reverse() -> None:
    assert RunConfig.from_mapping({"round-timeout": 30}).round_timeout == 30.0
    with pytest.raises(RunConfigError, match="num-rounds must be an integer"):
        RunConfig.from_mapping({"num-rounds": 2.5})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"no-such-key": 1}, "unknown run-config key"),
        ({"strategy": "fedsgd"}, "strategy must be one of"),
        ({"secagg": 1}, "secagg must be true or false"),
        ({"quorum": 3, "min-sites": 2}, "quorum"),
        ({"fraction-train": 1.5}, "fraction-train"),
        ({"app-target-delta": 0.0}, "app-target-delta"),
        ({"model-config": "[1, 2]"}, "JSON object"),
        ({"model-config": "{oops"}, "not valid JSON"),
        ({"trim-beta": 0.5}, "trim-beta"),
        ({"privacy-mode": "none", "local-optimizer": "lion"}, "local-optimizer must be"),
        ({"privacy-mode": "none", "local-steps": -1}, "local-steps must be >= 0"),
        ({"privacy-mode": "store", "local-steps": 1}, "do not apply to privacy-mode 'store'"),
        ({"privacy-mode": "store", "local-optimizer": "sgd"}, "its steps are DP-SGD's"),
        ({"item-attributes": "data/attrs.json"}, "item-attributes must be an absolute path"),
    ],
)
def test_bad_values_name_the_key(values: dict[str, object], message: str) -> None:
    with pytest.raises(RunConfigError, match=message):
        RunConfig.from_mapping(values)


def test_secagg_needs_an_odd_number_of_shares() -> None:
    # An even share count fails silently in Flower (every client errors, the round
    # "completes"), so it is refused up front.
    with pytest.raises(RunConfigError, match="odd"):
        RunConfig(secagg=True, secagg_num_shares=4)
    with pytest.raises(RunConfigError, match="threshold"):
        RunConfig(secagg=True, secagg_num_shares=3, secagg_threshold=3)
    assert RunConfig(secagg=True, secagg_num_shares=5, secagg_threshold=3).secagg


def test_app_mode_excludes_secagg_and_robust_aggregation() -> None:
    with pytest.raises(RunConfigError, match="secagg"):
        RunConfig(privacy_mode="app", secagg=True)
    with pytest.raises(RunConfigError, match="fedavg"):
        RunConfig(privacy_mode="app", strategy="fedmedian")


def test_state_dir_defaults_to_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDREC_STATE_DIR", str(tmp_path))
    cfg = RunConfig()
    assert cfg.registry_path == tmp_path / "coordinator" / "coordinator.db"
    assert RunConfig(state_dir=str(tmp_path / "x")).model_store == tmp_path / "x/coordinator/models"


def test_cosine_schedule_decays_from_lr_to_the_floor_over_the_run() -> None:
    # Arrange
    cosine = RunConfig(num_rounds=5, learning_rate=0.01, lr_schedule="cosine", lr_min_ratio=0.1)
    # Act
    rates = [cosine.round_learning_rate(i) for i in range(1, 6)]
    # Assert: lr in round 1, the floor in the last, halfway at the middle, never rising
    assert rates[0] == pytest.approx(0.01) and rates[-1] == pytest.approx(0.001)
    assert rates[2] == pytest.approx(0.0055)
    assert all(a > b for a, b in itertools.pairwise(rates))
    assert RunConfig(learning_rate=0.01).round_learning_rate(3) == 0.01  # constant
    continuous = dataclasses.replace(cosine, mode="continuous")
    assert continuous.round_learning_rate(5) == 0.01  # no last round to decay towards
    with pytest.raises(RunConfigError, match="lr-schedule"):
        RunConfig.from_mapping({"lr-schedule": "linear"})
    with pytest.raises(RunConfigError, match="lr-min-ratio"):
        RunConfig.from_mapping({"lr-min-ratio": 1.5})
