"""`fedrec data` through the real top-level app: synth, stats, clean, and bad input."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shared.cli import app
from shared.data_cli import app as data_app
from shared.readers import read_dataset

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
runner = CliRunner()


def _run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    code, stdout, stderr = _run(
        "data",
        "synth",
        "--out",
        str(out),
        "--sites",
        "2",
        "--shoppers",
        "30",
        "--seed",
        "3",
        "--json",
    )
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["users"] == 60 and summary["sites"] == 2
    assert Path(summary["files"]["events"]).name == "events.parquet"
    return out


def test_synth_prints_a_table_by_default(tmp_path: Path) -> None:
    code, stdout, _ = _run(
        "data",
        "synth",
        "--out",
        str(tmp_path),
        "--sites",
        "1",
        "--shoppers",
        "5",
        "--format",
        "csv",
    )
    assert code == 0
    assert "users" in stdout and "wrote events" in stdout
    assert (tmp_path / "events.csv").is_file() and (tmp_path / "catalogue.csv").is_file()


def test_stats_json_matches_the_library(synth_dir: Path) -> None:
    code, stdout, _ = _run("data", "stats", str(synth_dir), "--format", "events", "--json")
    assert code == 0
    stats = json.loads(stdout)
    ds = read_dataset(synth_dir, "events")
    assert (stats["users"], stats["items"], stats["events"]) == (
        ds.n_users,
        ds.n_items,
        len(ds.events),
    )
    assert sum(stats["event_types"].values()) == stats["events"]
    assert stats["cleaning"]["rows_dropped"] == 0
    assert stats["time_first"] < stats["time_last"]


def test_stats_table_shows_the_cleaning_report(synth_dir: Path) -> None:
    code, stdout, _ = _run(
        "data", "stats", str(synth_dir), "--format", "events", "--max-per-minute", "10"
    )
    assert code == 0
    assert "bot_shopper" in stdout and "> 10 per 60 s" in stdout


def test_clean_writes_a_readable_events_file_and_a_report(synth_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "clean.jsonl"
    code, stdout, _ = _run(
        "data",
        "clean",
        str(synth_dir),
        "--format",
        "events",
        "--out",
        str(out),
        "--collapse-repeats",
        "--json",
    )
    assert code == 0
    result = json.loads(stdout)
    report = json.loads((tmp_path / "clean.cleaning.json").read_text())
    assert report == result["cleaning"]
    assert report["dropped"]["collapsed_repeat"] > 0  # carts after views of the same item
    back = read_dataset(out, "events")
    assert len(back.events) == result["rows"] == report["rows_out"]


@pytest.mark.parametrize(
    "args",
    [
        ("data", "stats", "/nonexistent/events.csv", "--format", "events"),
        ("data", "stats", ".", "--format", "csv"),
        ("data", "stats", ".", "--format", "events", "--max-per-day", "-1"),
        ("data", "clean", ".", "--format", "events", "--out", "x.xlsx"),
        ("data", "synth", "--out", "unused", "--items", "3"),
        ("data", "synth", "--out", "unused", "--format", "xlsx"),
    ],
)
def test_bad_input_is_one_red_line_and_exit_1(
    args: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, list(args), env={"COLUMNS": "40"})  # narrow: must not wrap
    code, stdout, stderr = result.exit_code, result.stdout, result.stderr
    assert code == 1
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert stdout == ""
    assert not (tmp_path / "unused").exists()  # nothing written


def test_bad_file_error_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "e.csv"
    bad.write_text("user_id,item_id,event_type,timestamp\nu,i,view,noon\n")
    code, _, stderr = _run("data", "stats", str(bad), "--format", "events")
    assert code == 1
    assert "e.csv:2: timestamp 'noon'" in stderr


def test_every_command_has_help_with_an_example() -> None:
    for command in data_app.registered_commands:
        assert command.callback is not None and "Example:" in (command.callback.__doc__ or "")
    code, stdout, _ = _run("data", "-h")
    assert code == 0 and all(c in stdout for c in ("synth", "stats", "clean"))


@pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} (real datasets) not present")
def test_stats_on_the_real_taobao_head() -> None:
    code, stdout, _ = _run(
        "data",
        "stats",
        str(DATA / "taobao_userbehavior" / "UserBehavior_head.csv"),
        "--format",
        "taobao",
        "--json",
    )
    assert code == 0
    stats = json.loads(stdout)
    assert (stats["users"], stats["events"]) == (814, 84_252)
    assert stats["cleaning"]["dropped"]["outside_window"] == 35
