"""Knowledge distillation: the loss, its chunked backward, training with a teacher, the CLI."""

import copy
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F
from typer.testing import CliRunner

from shared.artifacts import read_metadata
from shared.cli import app
from shared.distillation import (
    DistillConfig,
    check_teacher,
    distill_loss_backward,
    distillation_loss,
)
from shared.errors import ConfigError
from shared.models import build_model
from shared.synth import SynthConfig, generate_synthetic
from shared.training import TrainConfig, prepare_split, train_model

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


def gru(n_items: int = 30, dim: int = 8, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("gru", {"n_items": n_items, "dim": dim, "hidden": dim, "max_len": 6})


def test_the_loss_is_cross_entropy_at_alpha_0_and_zero_kl_on_the_teacher_itself() -> None:
    # Arrange
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 11), torch.randn(5, 11)
    targets = torch.tensor([1, 2, 3, 4, 5])
    # Act
    hard = distillation_loss(student, teacher, targets, DistillConfig(alpha=0.0))
    self_kl = distillation_loss(teacher, teacher, targets, DistillConfig(alpha=1.0))
    soft = distillation_loss(student, teacher, targets, DistillConfig(alpha=1.0, temperature=3))
    # Assert
    torch.testing.assert_close(hard, F.cross_entropy(student, targets, reduction="sum"))
    assert float(self_kl) == pytest.approx(0.0, abs=1e-5)
    p = F.softmax(teacher / 3, dim=-1)
    manual = 9 * (p * (p.log() - F.log_softmax(student / 3, dim=-1))).sum()
    torch.testing.assert_close(soft, manual)
    with pytest.raises(ConfigError, match="alpha"):
        DistillConfig(alpha=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        DistillConfig(temperature=0)


@settings(max_examples=20, deadline=None)
@given(chunk=st.integers(1, 40), alpha=st.floats(0, 1), temperature=st.floats(0.5, 4))
def test_chunked_backward_gives_the_gradients_of_the_whole_loss(
    chunk: int, alpha: float, temperature: float
) -> None:
    # Arrange
    student, teacher = gru(seed=1), gru(dim=12, seed=2)
    student.eval(), teacher.eval()  # no dropout: both passes see the same function
    inputs = torch.tensor([[0, 3, 4, 5, 6], [1, 2, 3, 4, 5], [0, 0, 0, 7, 8]])
    targets = torch.tensor([[0, 4, 5, 6, 7], [2, 3, 4, 5, 6], [0, 0, 0, 8, 9]])
    config = DistillConfig(alpha, temperature)
    reference = copy.deepcopy(student)
    # Act
    loss = distill_loss_backward(student, teacher, inputs, targets, chunk, config)
    mask = targets > 0
    logits = reference(inputs)[mask]
    with torch.no_grad():
        teacher_logits = teacher(inputs)[mask]
    whole = distillation_loss(logits, teacher_logits, targets[mask], config) / int(mask.sum())
    whole.backward()  # type: ignore[no-untyped-call]
    # Assert
    assert loss == pytest.approx(float(whole.detach()), rel=1e-5)
    for (name, p), q in zip(student.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is not trained


def test_a_teacher_must_share_the_catalogue_and_read_enough_history() -> None:
    with pytest.raises(ConfigError, match="same catalogue"):
        check_teacher(gru(n_items=30), gru(n_items=31))
    long_student = build_model("gru", {"n_items": 30, "dim": 8, "hidden": 8, "max_len": 20})
    with pytest.raises(ConfigError, match="fewer than the student"):
        check_teacher(long_student, gru())


def test_training_with_alpha_1_pulls_the_student_towards_the_teacher() -> None:
    # Arrange: a teacher trained on synthetic data; two untrained students of another size
    dataset = generate_synthetic(
        SynthConfig(n_sites=1, shoppers_per_site=200, n_items=40, n_categories=4)
    )
    vocab, split = prepare_split(dataset.events)
    config = TrainConfig(epochs=3, batch_size=64, patience=5, device="cpu", threads=1)
    teacher = build_model("gru", {"n_items": vocab.n_items, "dim": 16, "max_len": 10})
    train_model(teacher, split, config)
    frozen = copy.deepcopy(teacher.state_dict())

    def kl_to_teacher(student: torch.nn.Module) -> float:
        student.eval()
        x = torch.tensor([[0, 0, 1, 2, 3], [4, 5, 6, 7, 8]])
        with torch.no_grad():
            p = F.log_softmax(teacher(x), dim=-1)
            q = F.log_softmax(student(x), dim=-1)
        return float(F.kl_div(q, p, log_target=True, reduction="batchmean"))

    students = [gru(n_items=vocab.n_items, dim=8, seed=3) for _ in range(2)]
    before = kl_to_teacher(students[0])
    # Act
    train_model(students[0], split, config, teacher=teacher, distill=DistillConfig(alpha=1.0))
    train_model(students[1], split, config)
    # Assert: matching the teacher is what it learned, better than training alone does
    distilled, alone = kl_to_teacher(students[0]), kl_to_teacher(students[1])
    assert distilled < before and distilled < alone
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, frozen[key])
    with pytest.raises(ConfigError, match="popularity"):
        pop = build_model("pop", {"n_items": vocab.n_items, "max_len": 10})
        train_model(pop, split, config, teacher=teacher)


def test_fedrec_train_with_a_teacher_records_it_and_refuses_another_catalogue(
    tmp_path: Path,
) -> None:
    # Arrange: a small S3-Rec file and a teacher trained on it
    dataset = generate_synthetic(SynthConfig(n_sites=1, shoppers_per_site=80, n_items=50))
    lines = [
        " ".join([f"u{u}", *g["item_id"].astype(str)])
        for u, g in dataset.events.groupby("user_id", sort=True)
    ]
    data = tmp_path / "d.txt"
    data.write_text("\n".join(lines) + "\n")
    other = tmp_path / "other.txt"
    other.write_text("\n".join(line.replace(" ", " x") for line in lines) + "\n")  # new ids
    common = ["--format", "s3rec", "--epochs", "1", "--max-len", "8", "--device", "cpu", "--json"]
    teacher = runner.invoke(
        app, ["train", "--data", str(data), "--model", "gru", "--dim", "12", *common,
              "--out", str(tmp_path / "t")],
    )  # fmt: skip
    assert teacher.exit_code == 0, teacher.output
    # Act
    student = runner.invoke(
        app, ["train", "--data", str(data), "--model", "gru", "--dim", "8", *common,
              "--out", str(tmp_path / "s"), "--teacher", str(tmp_path / "t"),
              "--distill-alpha", "0.7", "--distill-temperature", "1.5"],
    )  # fmt: skip
    mismatch = runner.invoke(
        app, ["train", "--data", str(other), "--model", "gru", *common,
              "--out", str(tmp_path / "x"), "--teacher", str(tmp_path / "t")],
    )  # fmt: skip
    bad_alpha = runner.invoke(
        app, ["train", "--data", str(data), "--model", "gru", *common,
              "--out", str(tmp_path / "y"), "--teacher", str(tmp_path / "t"),
              "--distill-alpha", "2"],
    )  # fmt: skip
    # Assert
    assert student.exit_code == 0, student.output
    assert json.loads(student.stdout.strip().splitlines()[-1])["distilled_from"] == str(
        tmp_path / "t"
    )
    recorded = read_metadata(tmp_path / "s").extra["distillation"]
    assert (recorded["teacher_kind"], recorded["alpha"], recorded["temperature"]) == (
        "gru",
        0.7,
        1.5,
    )
    assert mismatch.exit_code == 1 and "another catalogue" in mismatch.output
    assert bad_alpha.exit_code == 1 and "alpha" in bad_alpha.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
