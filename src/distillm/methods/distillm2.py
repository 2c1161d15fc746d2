"""DistiLLM-2: CALD on (teacher response, fresh student response) pairs, curriculum skew, b ramp.

Data: pairs, batched on-policy -- the teacher's response (chosen, generated once) and the student's (rejected,
regenerated from the current student at the start of every round by the pipeline); a batch holds the B chosen
sequences followed by the B rejected ones.
Loss: `losses.cald`: (2 - b) SKL_{a_t} on the teacher responses + b SRKL_{a_s} on the student responses, b ramped
by `b_schedule`, the skews set per sample by `curriculum_skew`. This module keeps the run state the loss needs:
the running reference gaps of the curriculum, updated once per optimizer step so that splitting a batch into
more gradient-accumulation micro-batches changes nothing.
Options (`Options`, config section `method`): skew, skew_min, skew_max, curriculum, gap_momentum, b_ramp, b_start,
b_end, ramp_fraction; the paper's ablations (`ablations`, Table 6) are --no-curriculum (constant a) and --no-b-ramp
(constant b). Earlier names, still accepted with a warning: alpha0, alpha_min, alpha_max (section `loss`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import opt
from ..losses.cald import b_schedule, curriculum_skew
from ..losses.divergences import per_sequence_mean
from .base import LossInputs, Method, divergence_loss, group_weights, sequence_sums, token_log_probs


class DistiLLM2(Method):
    name = "distillm2"
    summary = "CALD: skew KL on teacher responses + skew reverse KL on fresh student responses, curriculum a, b ramp"
    paired_rounds = True
    rank = 0
    vision = True

    @dataclass
    class Options:
        skew: float = opt(0.1, "distillm2: base skew a0 (the skew a of a sample whose gap equals the running reference gap).", ge=0, lt=1, aliases=("alpha0",), formerly="loss")
        skew_min: float = opt(0.01, "distillm2: lower clamp of the curriculum skew a.", ge=0, lt=1, aliases=("alpha_min",), formerly="loss")
        skew_max: float = opt(0.5, "distillm2: upper clamp of the curriculum skew a.", ge=0, lt=1, aliases=("alpha_max",), formerly="loss")
        curriculum: bool = opt(True, "distillm2: per-sample curriculum skew a (off: constant a = --skew).", formerly="loss")
        gap_momentum: float = opt(0.9, "distillm2: momentum of the running reference gap of the curriculum.", ge=0, lt=1, formerly="loss")
        b_ramp: bool = opt(True, "distillm2: ramp b (weight of SRKL; SKL gets 2 - b) from b-start to b-end (off: b = b-start).", formerly="loss")
        b_start: float = opt(1.0, "distillm2: b at the start of training.", ge=0, le=2, formerly="loss")
        b_end: float = opt(1.5, "distillm2: b at the end of the ramp.", ge=0, le=2, formerly="loss")
        ramp_fraction: float = opt(0.5, "distillm2: fraction of the training steps over which b ramps.", ge=0, le=1, formerly="loss")

    #: the ablation of DistiLLM-2's components (paper Table 6); "all" is the method itself
    ablations = {
        "contrastive": {"method": "distillm2", "curriculum": False, "b_ramp": False},
        "contrastive+b_ramp": {"method": "distillm2", "curriculum": False, "b_ramp": True},
        "contrastive+curriculum": {"method": "distillm2", "curriculum": True, "b_ramp": False},
    }
    #: the rows of the ablation table, in order: the last, "all", is the method itself
    ablation_rows = [("contrastive loss only", "contrastive"), ("+ b ramp", "contrastive+b_ramp"),
                     ("+ curriculum a", "contrastive+curriculum"), ("all (DistiLLM-2)", "distillm2")]

    @classmethod
    def config_checks(cls, config):
        o = config.method
        return [(o.skew_min <= o.skew <= o.skew_max, "need 0 <= skew_min <= skew <= skew_max < 1")]

    @classmethod
    def uses_teacher_rows(cls, config) -> bool:
        return True  # the chosen responses are the teacher's

    def __init__(self, config):
        super().__init__(config)
        self.opt = config.method
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
        skew_t = skew_s = torch.full((n,), o.skew, device=batch.targets.device)
        if o.curriculum:
            with torch.no_grad():  # geometric-mean probabilities of each response under teacher (p) and student (q)
                lp = {who: per_sequence_mean(token_log_probs(batch, who, slice(None), temperature=tau), mask).exp()
                      for who, in (("teacher",), ("student",))}
                gap_t = lp["teacher"][chosen] - lp["student"][chosen]  # how far the student lags on the teacher's
                gap_s = lp["student"][rejected] - lp["teacher"][rejected]  # how overconfident it is on its own
            skew_t = curriculum_skew(gap_t, self.gap_ref["t"], skew=o.skew, skew_min=o.skew_min,
                                     skew_max=o.skew_max)
            skew_s = curriculum_skew(gap_s, self.gap_ref["s"], skew=o.skew, skew_min=o.skew_min,
                                     skew_max=o.skew_max)
            self._pending["t"].extend(gap_t.tolist())
            self._pending["s"].extend(gap_s.tolist())
        b = b_schedule(batch.step, batch.total_steps, b_start=o.b_start, b_end=o.b_end,
                       ramp_fraction=o.ramp_fraction, ramp=o.b_ramp)
        # (2 - b) SKL_{a_t} on the teacher's responses + b SRKL_{a_s} (q inside the mixture detached) on the
        # student's, each reduced per response then over the step's pairs (or over the step's tokens)
        w_t = group_weights(mask[chosen], batch.counts, 0, self.reduction, scale=2.0 - b)
        w_s = group_weights(mask[rejected], batch.counts, 1, self.reduction, scale=b)
        skl_loss, skl = divergence_loss(batch, "skl", chosen, w_t, weight=skew_t, temperature=tau)
        srkl_loss, srkl = divergence_loss(batch, "srkl", rejected, w_s, weight=skew_s, temperature=tau)
        metrics = {
            "units": float(n),
            "skl": sequence_sums(skl, mask[chosen]),
            "srkl": sequence_sums(srkl, mask[rejected]),
            "skew_t": skew_t.sum().item(),
            "skew_s": skew_s.sum().item(),
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
