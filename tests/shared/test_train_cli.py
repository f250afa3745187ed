"""`fedrec train` / `fedrec evaluate` through the real root app (typer's CliRunner)."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shared.artifacts import read_metadata, verify_model_dir
from shared.cli import app
from shared.synth import SynthConfig, generate_synthetic
from shared.train_cli import JSON_KEYS

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def s3rec_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small S3-Rec sequence file made from the synthetic log's views."""
    dataset = generate_synthetic(
        SynthConfig(
            n_sites=1, shoppers_per_site=120, n_items=80, n_categories=4, events_per_shopper=12
        )
    )
    views = dataset.events[dataset.events["event_type"] == "view"]
    lines = [
        " ".join([f"u{user}", *group["item_id"].astype(str)])
        for user, group in views.groupby("user_id", sort=True)
    ]
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _last_json(stdout: str) -> dict:  # type: ignore[type-arg]
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["pop", "mf"])
def test_train_json_then_evaluate(kind: str, s3rec_file: Path, tmp_path: Path) -> None:
    # Arrange
    out = tmp_path / kind
    # Act
    result = runner.invoke(
        app,
        f"train --data {s3rec_file} --format s3rec --model {kind} --out {out} --epochs 2 "
        "--dim 8 --max-len 10 --device cpu --json".split(),
    )
    # Assert
    assert result.exit_code == 0, result.output
    metrics = _last_json(result.stdout)
    assert set(JSON_KEYS) <= set(metrics)
    assert 0.0 <= metrics["ndcg@10"] <= metrics["hr@10"] <= 1.0
    evaluable = sum(len(line.split()) >= 4 for line in s3rec_file.read_text().splitlines())
    assert metrics["n_users"] == evaluable and metrics["train_seconds"] >= 0
    meta = verify_model_dir(out)
    assert meta.kind == kind and meta.max_len == 10
    assert meta.metrics["test_ndcg@10"] == pytest.approx(metrics["ndcg@10"])

    evaluated = runner.invoke(
        app, f"evaluate --model-dir {out} --data {s3rec_file} --format s3rec --json".split()
    )
    assert evaluated.exit_code == 0, evaluated.output
    again = _last_json(evaluated.stdout)
    assert again["ndcg@10"] == pytest.approx(metrics["ndcg@10"])  # same data, same model
    assert again["train_seconds"] == pytest.approx(metrics["train_seconds"], abs=0.01)


def test_train_prints_a_table_without_json(s3rec_file: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        f"train -d {s3rec_file} -f s3rec -m gru -o {tmp_path / 'g'} --epochs 1 --dim 8 "
        "--max-len 8".split(),
    )
    assert result.exit_code == 0, result.output
    assert "NDCG@10" in result.stdout and "best epoch 1" in result.stdout
    assert read_metadata(tmp_path / "g").extra["train_config"]["epochs"] == 1


def test_evaluate_sampled_mode(s3rec_file: Path, tmp_path: Path) -> None:
    runner.invoke(
        app,
        ["train", "-d", str(s3rec_file), "-f", "s3rec", "-m", "pop", "-o", str(tmp_path / "p")],
    )
    result = runner.invoke(
        app,
        f"evaluate --model-dir {tmp_path / 'p'} -d {s3rec_file} -f s3rec --mode sampled "
        "--json".split(),
    )
    # 80 items are too few for 99 negatives: a clear error, not a crash
    assert result.exit_code == 1
    assert "too small" in result.output or "negatives" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "/nonexistent/x.txt", "--format", "s3rec", "--model", "gru"], "does not exist"),
        (["--format", "parquetz", "--model", "gru"], "unknown format"),
        (["--format", "s3rec", "--model", "lstm"], "unknown model"),
        (["--format", "s3rec", "--model", "gru", "--lr", "-1"], "--lr"),
        (["--format", "s3rec", "--model", "gru", "--device", "tpu"], "--device"),
        (["--format", "s3rec", "--model", "mf", "--behaviours"], "--behaviours needs"),
    ],
)
def test_bad_train_input_is_one_clear_error(
    args: list[str], message: str, s3rec_file: Path, tmp_path: Path
) -> None:
    if "--data" not in args:
        args = ["--data", str(s3rec_file), *args]
    result = runner.invoke(app, ["train", *args, "--out", str(tmp_path / "m")])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "m").exists()


def test_empty_and_malformed_data_are_clear_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = runner.invoke(
        app, ["train", "-d", str(empty), "-f", "s3rec", "-m", "pop", "-o", str(tmp_path / "m")]
    )
    assert result.exit_code == 1 and "error" in result.output
    short = tmp_path / "short.txt"
    short.write_text("u1 1 2\nu2 3 4\n")  # nobody has the 3 events leave-one-out needs
    result = runner.invoke(
        app, ["train", "-d", str(short), "-f", "s3rec", "-m", "pop", "-o", str(tmp_path / "m")]
    )
    assert result.exit_code == 1 and "3 events" in result.output


def test_evaluate_refuses_a_corrupt_model_dir(s3rec_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "p"
    runner.invoke(app, ["train", "-d", str(s3rec_file), "-f", "s3rec", "-m", "pop", "-o", str(out)])
    (out / "weights.pt").write_bytes(b"not weights")
    result = runner.invoke(
        app, ["evaluate", "--model-dir", str(out), "-d", str(s3rec_file), "-f", "s3rec"]
    )
    assert result.exit_code == 1 and "corrupt" in result.output
    missing = runner.invoke(
        app, ["evaluate", "--model-dir", str(tmp_path / "no"), "-d", str(s3rec_file), "-f", "s3rec"]
    )
    assert missing.exit_code == 1 and "not a model directory" in missing.output


def test_train_a_multi_behaviour_gru_on_typed_events(tmp_path: Path) -> None:
    # Arrange: the synthetic log with its event types, as a canonical events file
    from shared.readers import write_events

    dataset = generate_synthetic(
        SynthConfig(
            n_sites=1, shoppers_per_site=80, n_items=60, n_categories=4, events_per_shopper=10
        )
    )
    data = write_events(dataset.events, tmp_path / "events.csv")
    out = tmp_path / "mb"
    # Act
    result = runner.invoke(
        app,
        f"train --data {data} --format events --model gru --out {out} --epochs 1 --dim 8 "
        "--max-len 10 --device cpu --behaviours --repeats --json".split(),
    )
    evaluated = runner.invoke(
        app, f"evaluate --model-dir {out} --data {data} --format events --json".split()
    )
    # Assert: the directory says what the graph reads; evaluation feeds it tokens
    assert result.exit_code == 0, result.output
    meta = verify_model_dir(out)
    assert meta.n_behaviours == 5
    assert evaluated.exit_code == 0, evaluated.output
    assert 0.0 <= _last_json(evaluated.stdout)["ndcg@10"] <= 1.0
