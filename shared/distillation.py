"""Knowledge distillation: a compact student (the edge's GRU) learns from a larger teacher.

Hinton et al., "Distilling the Knowledge in a Neural Network" (2015): at every training
position the student minimises

    (1 - alpha) * CE(student logits, next item)
    + alpha * T^2 * KL(softmax(teacher logits / T) || softmax(student logits / T))

over the whole catalogue. The teacher's soft targets say which *other* items were also
likely next, a signal the one observed item does not carry; the T^2 factor keeps the two
terms' gradients on the same scale as T changes. The teacher (e.g. the Transformer,
`shared.models.sasrec`) runs frozen, in eval mode, on exactly the student's inputs.

`distill_loss_backward` has the same contract as `shared.training.chunked_loss_backward`
(the logits exist one chunk of targets at a time) and is what `train_model` calls when it
is given a teacher. Distillation is centralized training on data one party holds (a site,
or a public/consented log): it is not part of the federated DP path, whose privacy
accounting covers the federated rounds only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shared.errors import ConfigError


@dataclass(frozen=True)
class DistillConfig:
    """How much of the loss comes from the teacher, and how soft its targets are."""

    alpha: float = 0.5  # weight of the teacher term (0 = plain training, 1 = teacher only)
    temperature: float = 2.0  # T > 1 softens both distributions

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"distillation alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ConfigError(f"distillation temperature must be > 0, got {self.temperature}")


def check_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """The teacher must score the same catalogue and read at least the student's history."""
    s_cfg, t_cfg = getattr(student, "config", None), getattr(teacher, "config", None)
    if s_cfg is None or t_cfg is None:
        raise ConfigError("student and teacher must be models of shared.models")
    if t_cfg.n_items != s_cfg.n_items:
        raise ConfigError(
            f"the teacher scores {t_cfg.n_items} items, the student {s_cfg.n_items}: "
            "distillation needs the same catalogue"
        )
    if t_cfg.max_len < s_cfg.max_len:
        raise ConfigError(
            f"the teacher reads {t_cfg.max_len} events, fewer than the student's {s_cfg.max_len}"
        )


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    config: DistillConfig,
) -> torch.Tensor:
    """Summed loss over N targets: (N, V) student and teacher logits, (N,) item indices."""
    t = config.temperature
    hard = F.cross_entropy(student_logits, targets, reduction="sum")
    soft_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)  # (N, V)
    soft_student = F.log_softmax(student_logits.float() / t, dim=-1)  # (N, V)
    kl = F.kl_div(soft_student, soft_teacher, log_target=True, reduction="sum")
    return (1.0 - config.alpha) * hard + config.alpha * (t * t) * kl


def distill_loss_backward(
    student: nn.Module,
    teacher: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
    config: DistillConfig,
) -> float:
    """Back-propagate the mean `distillation_loss` into the student, ``chunk`` targets at once.

    inputs, targets (B, T) int64 (0 = padding). Returns the mean loss per target.
    """
    from shared.training import chunked_loss_backward  # training imports this module

    mask = targets > 0  # (B, T)
    with torch.no_grad():
        teacher_states = teacher.encode(inputs)[mask]  # type: ignore[operator]  # (N, H_t)

    def chunk_loss(logits: torch.Tensor, wanted: torch.Tensor, rows: slice) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher.head(teacher_states[rows])  # type: ignore[operator]
        return distillation_loss(logits, teacher_logits, wanted, config)

    return chunked_loss_backward(student, inputs, targets, chunk, chunk_loss=chunk_loss)
