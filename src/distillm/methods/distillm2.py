"""DistiLLM-2: CALD on (teacher response, fresh student response) pairs, curriculum skew, b ramp.

Data: pairs, batched on-policy -- the teacher's response (chosen, generated once) and the student's (rejected,
regenerated from the current student at the start of every round by the pipeline); a batch holds the B chosen
sequences followed by the B rejected ones.
Loss: `losses.cald`: (2 - b) SKL_{a_t} on the teacher responses + b SRKL_{a_s} on the student responses, b ramped
by `b_schedule`, the skews set per sample by `curriculum_alpha`. This module keeps the run state the loss needs:
the running reference gaps of the curriculum, updated once per optimizer step so that splitting a batch into
more gradient-accumulation micro-batches changes nothing.
Options (config section `loss`): alpha0, alpha_min, alpha_max, curriculum, gap_momentum, b_ramp, b_start, b_end,
ramp_fraction; the paper's ablations are --no-curriculum (constant a) and --no-b-ramp (constant b).
"""

from __future__ import annotations

import torch

from ..losses.cald import b_schedule, curriculum_alpha
from ..losses.divergences import per_sequence_mean
from .base import LossInputs, Method, divergence_loss, group_weights, sequence_sums, token_log_probs


class DistiLLM2(Method):
    name = "distillm2"
    summary = "CALD: skew KL on teacher responses + skew reverse KL on fresh student responses, curriculum a, b ramp"
    paired_rounds = True

    def __init__(self, config):
        super().__init__(config)
        self.opt = config.loss
        self.gap_ref = {"t": None, "s": None}  # running reference gaps (teacher side, student side)
        self._pending = {"t": [], "s": []}  # this optimizer step's gaps, folded in by on_step_end

    def build_rows(self, ctx) -> list[dict]:
        return ctx.teacher_rows()  # the chosen responses are the teacher's, whatever fixed_responses says

    def sequences(self, row):
        return [(row["prompt_ids"], row["chosen_ids"]), (row["prompt_ids"], row["rejected_ids"])]

    # ------------------------------------------------------------------ loss
    def compute_loss(self, batch: LossInputs):
        o, tau = self.opt, self.temperature
        n = batch.n_first
        mask = batch.mask
        chosen, rejected = batch.first, batch.second
        alpha_t = alpha_s = torch.full((n,), o.alpha0, device=batch.targets.device)
        if o.curriculum:
            with torch.no_grad():  # geometric-mean probabilities of each response under teacher (p) and student (q)
                lp = {who: per_sequence_mean(token_log_probs(batch, who, slice(None), temperature=tau), mask).exp()
                      for who, in (("teacher",), ("student",))}
                gap_t = lp["teacher"][chosen] - lp["student"][chosen]  # how far the student lags on the teacher's
                gap_s = lp["student"][rejected] - lp["teacher"][rejected]  # how overconfident it is on its own
            alpha_t = curriculum_alpha(gap_t, self.gap_ref["t"], alpha0=o.alpha0, alpha_min=o.alpha_min,
                                       alpha_max=o.alpha_max)
            alpha_s = curriculum_alpha(gap_s, self.gap_ref["s"], alpha0=o.alpha0, alpha_min=o.alpha_min,
                                       alpha_max=o.alpha_max)
            self._pending["t"].extend(gap_t.tolist())
            self._pending["s"].extend(gap_s.tolist())
        b = b_schedule(batch.step, batch.total_steps, b_start=o.b_start, b_end=o.b_end,
                       ramp_fraction=o.ramp_fraction, ramp=o.b_ramp)
        # (2 - b) SKL_{a_t} on the teacher's responses + b SRKL_{a_s} (q inside the mixture detached) on the
        # student's, each reduced per response then over the step's pairs (or over the step's tokens)
        w_t = group_weights(mask[chosen], batch.counts, 0, self.reduction, scale=2.0 - b)
        w_s = group_weights(mask[rejected], batch.counts, 1, self.reduction, scale=b)
        skl_loss, skl = divergence_loss(batch, "skl", chosen, w_t, weight=alpha_t, temperature=tau)
        srkl_loss, srkl = divergence_loss(batch, "srkl", rejected, w_s, weight=alpha_s, temperature=tau)
        metrics = {
            "units": float(n),
            "skl": sequence_sums(skl, mask[chosen]),
            "srkl": sequence_sums(srkl, mask[rejected]),
            "alpha_t": alpha_t.sum().item(),
            "alpha_s": alpha_s.sum().item(),
        }
        return skl_loss + srkl_loss, metrics, {"b": b}

    # ------------------------------------------------------------------ run state
    def on_step_end(self, step: int = 0) -> None:
        """Fold this optimizer step's gaps into the running reference (a mean over recent batches)."""
        if not self.opt.curriculum:
            return
        m = self.opt.gap_momentum
        # (sum of gaps, count) per side, summed over processes: every process folds in the whole step's batch
        local = [[sum(max(g, 1e-6) for g in self._pending[side]), len(self._pending[side])] for side in ("t", "s")]
        totals = self.sum_over_processes(torch.tensor(local, dtype=torch.float64)).tolist()
        for side, (total, count) in zip(("t", "s"), totals):
            self._pending[side].clear()
            if not count:
                continue
            batch_gap = total / count
            ref = self.gap_ref[side]
            self.gap_ref[side] = batch_gap if ref is None else m * ref + (1 - m) * batch_gap

    def state_dict(self) -> dict:
        return {"gap_ref": dict(self.gap_ref)}

    def load_state_dict(self, state: dict) -> None:
        self.gap_ref = dict(state["gap_ref"])
