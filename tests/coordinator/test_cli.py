"""`fedrec coordinator`: JSON output, tables, publish/rollback, clear errors."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.registry import ModelVersion, Registry, RoundSummary, SiteResult
from shared.cli import app

runner = CliRunner()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    registry = Registry(tmp_path / "coordinator" / "coordinator.db")
    run = registry.start_run(
        4, {"num-rounds": 1}, mode="rounds", privacy_mode="store", strategy="fedavg", secagg=False
    )
    rid = registry.start_round(run, 1, 2, 1000)
    registry.record_site_result(
        rid,
        SiteResult(
            "store-a", 7, "train", "accepted", num_examples=5, epsilon=0.9, epsilon_budget=8.0
        ),
    )
    for name, rnd, parent in (("v-seed", None, None), ("v-r1", 1, "v-seed")):
        registry.add_model(
            ModelVersion(
                name,
                rnd,
                parent,
                "0" * 64,
                str(tmp_path / name),
                "gru",
                10,
                run_id=run,
                epsilon_max=0.9 if rnd else None,
            )
        )
    registry.publish("v-seed")
    registry.publish("v-r1")
    registry.finish_round(
        rid, RoundSummary("completed", 2, 1, 1, 0, 0, 1, 1000, 500, 2.0, model_version="v-r1")
    )
    registry.finish_run(run, "completed")
    registry.close()
    return tmp_path


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["coordinator", *args])
    return result.exit_code, result.output


@pytest.mark.parametrize(
    "command", [["status"], ["models", "list"], ["privacy"], ["models", "show", "v-r1"]]
)
def test_json_output_is_valid_json(state: Path, command: list[str]) -> None:
    code, out = invoke(*command, "--json", "--state-dir", str(state))
    assert code == 0, out
    json.loads(out)


def test_status_json_reports_sites_and_rounds(state: Path) -> None:
    _, out = invoke("status", "--json", "--state-dir", str(state))
    report = json.loads(out)
    assert report["rounds"]["total"] == 1
    assert report["published_version"] == "v-r1"
    assert report["sites"][0]["site"] == "store-a"
    assert report["sites"][0]["epsilon_spent"] == 0.9


def test_tables_render(state: Path) -> None:
    code, out = invoke("status", "--state-dir", str(state))
    assert code == 0 and "store-a" in out
    code, out = invoke("models", "list", "--state-dir", str(state))
    assert code == 0 and "v-r1" in out


def test_publish_then_rollback(state: Path) -> None:
    code, out = invoke("models", "rollback", "--json", "--state-dir", str(state))
    assert code == 0, out
    assert json.loads(out)["version"] == "v-seed"
    code, out = invoke("models", "publish", "v-r1", "--state-dir", str(state))
    assert code == 0 and "v-r1" in out
    assert Registry(state / "coordinator" / "coordinator.db").published().version == "v-r1"  # type: ignore[union-attr]


def test_unknown_version_and_missing_registry_fail_cleanly(state: Path, tmp_path: Path) -> None:
    # The `fedrec` entry point turns FedrecError into one red line and exit 1.
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "fedrec"
    result = subprocess.run(
        [str(exe), "coordinator", "models", "show", "nope", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "unknown model version 'nope'" in result.stderr
    result = subprocess.run(
        [str(exe), "coordinator", "status", "--state-dir", str(tmp_path / "empty")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "no coordinator registry" in result.stderr
    assert not (tmp_path / "empty").exists()


def test_every_command_has_an_example() -> None:
    for args in (
        ["status"],
        ["privacy"],
        ["run"],
        ["models", "list"],
        ["models", "show"],
        ["models", "publish"],
        ["models", "rollback"],
    ):
        code, out = invoke(*args, "--help")
        assert code == 0 and "Example:" in out, args


def test_demo_sites_are_written_once(tmp_path: Path) -> None:
    from edge_client.store import EventStore

    code, out = invoke(
        "demo-sites", "--sites", "2", "--shoppers", "6", "--state-dir", str(tmp_path)
    )
    assert code == 0, out
    for i in range(2):
        store = EventStore(tmp_path / "sites" / f"site-{i:03d}" / "site.db", create=False)
        assert store.count_events() > 0
        store.close()
    assert (tmp_path / "sites" / "catalogue.json").is_file()
    code, _ = invoke("demo-sites", "--sites", "2", "--state-dir", str(tmp_path))
    assert code != 0  # never mixed into existing sites
