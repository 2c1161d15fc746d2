"""DistiLLM-2: CALD on (teacher response, fresh student response) pairs, curriculum skew, b ramp.

Data: paired, batched on-policy -- each round the student's responses are regenerated from the current student
(the pipeline does that); a batch holds the B "chosen" rows (prompt + teacher response) followed by the B
"rejected" rows (prompt + student response).
Loss: `losses.cald`. This module only keeps the run state the loss needs: the running reference gaps of the
curriculum, updated once per optimizer step so that splitting a batch into more gradient-accumulation
micro-batches changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses.cald import b_schedule, cald_terms, combine_cald, curriculum_alpha, sequence_mean_logprob
from ..losses.divergences import IGNORE_INDEX


@dataclass
class DistiLLM2Options:
    alpha0: float = 0.1
    alpha_min: float = 0.01
    alpha_max: float = 0.5
    curriculum: bool = True
    gap_momentum: float = 0.9
    b_ramp: bool = True
    b_start: float = 1.0
    b_end: float = 1.5
    ramp_fraction: float = 0.5
    reduction: str = "seq_mean"
    temperature: float = 1.0


class DistiLLM2:
    name = "distillm2"

    def __init__(self, options: DistiLLM2Options):
        if options.reduction not in ("seq_mean", "token_mean"):
            raise ValueError(f"loss reduction must be seq_mean or token_mean, got '{options.reduction}'")
        self.opt = options
        self.gap_ref = {"t": None, "s": None}  # running reference gaps (teacher side, student side)
        self._pending = {"t": [], "s": []}  # this optimizer step's gaps, folded in by on_step_end

    # ------------------------------------------------------------------ loss
    def compute_loss(self, student_logits, teacher_logits, targets, *, step, total_steps, normalizer):
        """Loss of one micro-batch, already divided by the global batch's counts `normalizer` =
        (pairs, chosen tokens, rejected tokens), so micro-batch losses add up to the batch loss.
        Returns (loss, metric sums over this micro-batch's pairs, gauges such as b)."""
        o = self.opt
        n = targets.shape[0] // 2
        mask = targets != IGNORE_INDEX
        chosen, rejected = slice(0, n), slice(n, 2 * n)
        alpha_t = alpha_s = torch.full((n,), o.alpha0, device=targets.device)
        with torch.no_grad():
            lp = {who: sequence_mean_logprob(logits, targets, mask, temperature=o.temperature).exp()
                  for who, logits in (("p", teacher_logits), ("q", student_logits))}
            gap_t = lp["p"][chosen] - lp["q"][chosen]  # how far the student lags on the teacher's response
            gap_s = lp["q"][rejected] - lp["p"][rejected]  # how overconfident it is on its own response
        if o.curriculum:
            alpha_t = curriculum_alpha(gap_t, self.gap_ref["t"], alpha0=o.alpha0, alpha_min=o.alpha_min,
                                       alpha_max=o.alpha_max)
            alpha_s = curriculum_alpha(gap_s, self.gap_ref["s"], alpha0=o.alpha0, alpha_min=o.alpha_min,
                                       alpha_max=o.alpha_max)
            self._pending["t"].extend(gap_t.tolist())
            self._pending["s"].extend(gap_s.tolist())
        terms = cald_terms(
            student_logits[chosen], teacher_logits[chosen], mask[chosen], alpha_t,
            student_logits[rejected], teacher_logits[rejected], mask[rejected], alpha_s,
            temperature=o.temperature,
        )
        b = b_schedule(step, total_steps, b_start=o.b_start, b_end=o.b_end, ramp_fraction=o.ramp_fraction,
                       ramp=o.b_ramp)
        loss = combine_cald(terms, mask[chosen], mask[rejected], b=b, reduction=o.reduction, counts=normalizer)
        metrics = {
            "pairs": float(n),
            "skl": terms.skl.detach().sum().item(),
            "srkl": terms.srkl.detach().sum().item(),
            "alpha_t": alpha_t.sum().item(),
            "alpha_s": alpha_s.sum().item(),
        }
        return loss, metrics, {"b": b}

    # ------------------------------------------------------------------ run state
    def on_step_end(self) -> None:
        """Fold this optimizer step's gaps into the running reference (a mean over recent batches)."""
        m = self.opt.gap_momentum
        for side, gaps in self._pending.items():
            if not gaps:
                continue
            batch_gap = sum(max(g, 1e-6) for g in gaps) / len(gaps)
            ref = self.gap_ref[side]
            self.gap_ref[side] = batch_gap if ref is None else m * ref + (1 - m) * batch_gap
            gaps.clear()

    def state_dict(self) -> dict:
        return {"gap_ref": dict(self.gap_ref)}

    def load_state_dict(self, state: dict) -> None:
        self.gap_ref = dict(state["gap_ref"])
