"""DPKD: distillation as preference optimisation, the teacher as the reference model.

Data: pairs, as in DistiLLM-2 -- the teacher's response (chosen, generated once) and the current student's
response (rejected, regenerated at the start of every round). Loss (losses.preference.dpkd_loss):
-log sigmoid(beta [(log q(y_t) - log q(y_s)) - (log p(y_t) - log p(y_s))]) with length-normalised log-probs and
beta = `dpkd_beta` (0.2), averaged over pairs (a pair with an empty response is left out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import opt
from ..losses.divergences import per_sequence_mean
from ..losses.preference import dpkd_logits, dpkd_loss
from .base import LossInputs, Method, token_log_probs, unit_count


class DPKD(Method):
    name = "dpkd"
    summary = "DPO-style: teacher response preferred over the student's, teacher as reference"
    paired_rounds = True
    rank = 7
    vision = True

    @dataclass
    class Options:
        dpkd_beta: float = opt(0.2, "dpkd: beta of the DPO-style loss.", gt=0)

    @classmethod
    def uses_teacher_rows(cls, config) -> bool:
        return True  # the chosen responses are the teacher's

    def build_rows(self, ctx) -> list[dict]:
        return ctx.teacher_rows()  # the chosen responses are the teacher's, whatever fixed_responses says

    def sequences(self, row):
        return [(row["prompt_ids"], row["chosen_ids"]), (row["prompt_ids"], row["rejected_ids"])]

    def compute_loss(self, batch: LossInputs):
        mask, t, every = batch.mask, self.temperature, slice(None)
        q = per_sequence_mean(token_log_probs(batch, "student", every, temperature=t), mask)
        with torch.no_grad():
            p = per_sequence_mean(token_log_probs(batch, "teacher", every, temperature=t), mask)
        c, r = batch.first, batch.second
        beta = self.config.method.dpkd_beta
        losses = dpkd_loss(q[c], q[r], p[c], p[r], beta=beta)
        margins = dpkd_logits(q[c], q[r], p[c], p[r], beta=beta).detach()
        # a pair with an empty response has no length-normalised log-prob on that side: it is left out (no loss,
        # not counted), as empty responses are everywhere (methods.base.LossInputs)
        full = mask[c].any(-1) & mask[r].any(-1)
        loss = torch.where(full, losses, torch.zeros_like(losses)).sum() / unit_count(batch.counts)
        metrics = {"units": float(batch.n_first), "dpkd": losses.detach().sum().item(),
                   "margin": margins.sum().item(), "accuracy": (margins > 0).float().sum().item()}
        return loss, metrics, {}
