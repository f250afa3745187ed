"""`fedrec edge`: import, status, forget, retention and serve's refusal of unsafe tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from edge_kit import write_model
from typer.testing import CliRunner

from edge_client.cli import app as edge_app
from shared.cli import app

runner = CliRunner()


@pytest.fixture
def taobao_file(tmp_path: Path) -> Path:
    # Taobao UserBehavior rows: user,item,category,behaviour,unix seconds (2017-11-25..12-03)
    rows = [
        "1,101,9,pv,1511572000",
        "1,102,9,pv,1511572060",
        "1,102,9,cart,1511572120",
        "1,102,9,buy,1511572180",
        "2,101,9,pv,1511572000",
        "2,103,8,fav,1511573000",
        "3,101,9,pv,1511574000",
    ]
    path = tmp_path / "UserBehavior.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_import_status_forget_and_retention(tmp_path: Path, taobao_file: Path) -> None:
    db = tmp_path / "site" / "site.db"
    models = tmp_path / "site" / "models"
    write_model(models, "v1")
    # Act
    first = runner.invoke(
        app, ["edge", "import", str(taobao_file), "-f", "taobao", "--db", str(db), "--json"]
    )
    again = runner.invoke(
        app, ["edge", "import", str(taobao_file), "-f", "taobao", "--db", str(db), "--json"]
    )
    status = runner.invoke(
        app, ["edge", "status", "--db", str(db), "--model-dir", str(models), "--json"]
    )
    table = runner.invoke(app, ["edge", "status", "--db", str(db), "--model-dir", str(models)])
    forget = runner.invoke(app, ["edge", "forget", "1", "--db", str(db), "--json"])
    keep = runner.invoke(
        app, ["edge", "retention", "--db", str(db), "--max-events-per-user", "1", "--json"]
    )
    # Assert
    assert first.exit_code == 0, first.output
    assert (json.loads(first.stdout)["accepted"], json.loads(again.stdout)["duplicates"]) == (7, 7)
    assert json.loads(first.stdout)["cleaning"]["rows_in"] == 7
    info = json.loads(status.stdout)
    assert (info["store"]["events"], info["store"]["shoppers"], info["store"]["items"]) == (7, 3, 3)
    assert info["model"]["current"] == "v1" and info["model"]["installed"] == ["v1"]
    assert table.exit_code == 0 and "shoppers" in table.stdout and "v1" in table.stdout
    assert json.loads(forget.stdout) == {"user_id": "1", "deleted_events": 4}
    assert json.loads(keep.stdout) == {"deleted_by_age": 0, "deleted_by_cap": 1}


def test_import_shows_progress_and_the_cleaning_report(tmp_path: Path, taobao_file: Path) -> None:
    result = runner.invoke(
        app, ["edge", "import", str(taobao_file), "-f", "taobao", "--db", str(tmp_path / "s.db")]
    )
    assert result.exit_code == 0, result.output
    assert "cleaning: 7 rows in" in result.stdout
    assert "stored (new)" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["edge", "status", "--db", "{tmp}/missing.db"], "does not exist"),
        (["edge", "forget", "u1", "--db", "{tmp}/missing.db"], "does not exist"),
        (["edge", "import", "{tmp}/missing.csv", "--db", "{tmp}/s.db"], "does not exist"),
        (["edge", "import", "{tmp}", "-f", "nope", "--db", "{tmp}/s.db"], "unknown format"),
        (["edge", "retention", "--db", "{tmp}/s.db"], "give --max-age-days"),
        (["edge", "serve", "--db", "{tmp}/s.db", "--model-dir", "{tmp}/m"], "refusing to start"),
        (["edge", "serve", "--db", "{tmp}/notadb", "--dev"], "file is not a database"),
    ],
)
def test_bad_invocations_exit_1_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.delenv("FEDREC_EDGE_ADMIN_TOKEN", raising=False)
    (tmp_path / "s.db").touch()
    (tmp_path / "notadb").write_bytes(b"not sqlite at all" * 100)
    result = runner.invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 1
    assert message in result.output


def test_every_edge_command_has_help_with_an_example() -> None:
    for command in edge_app.registered_commands:
        name = command.name or (command.callback.__name__ if command.callback else "")
        result = runner.invoke(app, ["edge", name.rstrip("_"), "--help"])
        assert result.exit_code == 0, name
        assert "Example:" in result.stdout, name
