"""DPO-style distillation loss (DPKD): the teacher's response preferred over the student's, with the teacher as
the reference model.

    L = -log sigmoid(beta * [(log q(y_t) - log q(y_s)) - (log p(y_t) - log p(y_s))])

where log q(y), log p(y) are the length-normalised (mean per-token) log-probabilities of a response under the
student q and the teacher p. The student gains by raising the teacher's response and lowering its own more than
the teacher itself separates them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpkd_logits(student_chosen: torch.Tensor, student_rejected: torch.Tensor, teacher_chosen: torch.Tensor,
                teacher_rejected: torch.Tensor, *, beta: float = 0.2) -> torch.Tensor:
    """The [B] preference margins beta * [(q_c - q_r) - (p_c - p_r)] from mean token log-probs [B] each."""
    return beta * ((student_chosen - student_rejected) - (teacher_chosen - teacher_rejected).detach())


def dpkd_loss(student_chosen: torch.Tensor, student_rejected: torch.Tensor, teacher_chosen: torch.Tensor,
              teacher_rejected: torch.Tensor, *, beta: float = 0.2) -> torch.Tensor:
    """[B] per-pair losses -log sigmoid(margin) (softplus(-margin), stable for any margin)."""
    return F.softplus(-dpkd_logits(student_chosen, student_rejected, teacher_chosen, teacher_rejected, beta=beta))
