"""DistiLLM (v1, Ko et al. 2024): skew KL or skew reverse KL with adaptive off-policy student data.

Data, decided per micro-batch (u, v uniform draws from the step's seeded RNG):
- with probability tau (the "threshold"), the batch uses student-generated outputs: with probability
  fresh(step) -- decaying linearly from `v1_fresh_start` to `v1_fresh_end` over training -- they are generated
  afresh from the current student and pushed to the replay buffer (capacity `v1_buffer_capacity`), otherwise
  drawn from the buffer (fresh anyway while the buffer holds fewer responses than the batch needs);
- otherwise the batch uses the fixed responses (the teacher's, or the data set's with fixed_responses=dataset).
tau starts at `v1_threshold_init` (0.0) and rises by `v1_threshold_step` (0.1, at most 1) each time the
validation loss -- this loss on held-out teacher responses, measured every `v1_val_interval` optimizer steps --
is higher than at the previous measurement: when the student stops improving on fixed data, it gets more of its
own outputs.
Loss: SKL_a (default) or SRKL_a with a = `v1_skew` (0.1; formerly `v1_alpha`), as the released DistiLLM v1 code computes them
(distillm/losses.py, skewed_forward_kl / skewed_reverse_kl): the student inside the mixture is NOT detached (in
SRKL either: unlike DistiLLM-2, whose code detaches it), and the loss is the mean over all response tokens of the
optimizer step (a token mean: `--reduction` does not apply to this method). One difference in value only: v1's
skewed_forward_kl is the cross-entropy -sum_v p log m1 (no teacher-entropy term); ours is the true KL, which is
larger by the teacher's entropy, a constant for the student: the gradients are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.replay import ReplayBuffer
from ..options import opt
from .base import LossInputs, Method, divergence_loss, group_weights, sequence_sums


class DistiLLMv1(Method):
    name = "distillm"
    summary = "v1: skew KL / skew reverse KL, adaptive off-policy student data with a replay buffer"
    uses_validation = True
    sources = ("fixed", "fresh", "replay")
    rank = 1
    vision = True

    @dataclass
    class Options:
        v1_loss: str = opt("skl", "distillm (v1): skl (skew KL) or srkl (skew reverse KL).", choices=("skl", "srkl"))
        v1_skew: float = opt(0.1, "distillm (v1): the skew a of SKL / SRKL.", ge=0, lt=1, aliases=("v1_alpha",))
        v1_threshold_init: float = opt(0.0, "distillm (v1): initial probability tau that a batch uses student outputs (fresh or replayed).", ge=0, le=1)
        v1_threshold_step: float = opt(0.1, "distillm (v1): tau rises by this much each time the validation loss rises.", ge=0, le=1)
        v1_fresh_start: float = opt(1.0, "distillm (v1): probability that a student-output batch is freshly generated (and pushed to the replay buffer) rather than replayed, at the start of training.", ge=0, le=1)
        v1_fresh_end: float = opt(0.2, "distillm (v1): that probability at the end of training (linear decay).", ge=0, le=1)
        v1_buffer_capacity: int = opt(1000, "distillm (v1): replay buffer capacity (responses; the oldest are replaced).", ge=1)
        v1_val_interval: int = opt(10, "distillm (v1): optimizer steps between validation-loss measurements that adapt tau.", ge=1)

    def __init__(self, config):
        super().__init__(config)
        o = config.method
        self.loss_name, self.skew = o.v1_loss, o.v1_skew
        self.threshold = o.v1_threshold_init
        self.buffer = ReplayBuffer(o.v1_buffer_capacity)
        self.last_validation: float | None = None
        self.validations: list[tuple[int, float, float]] = []  # (step, validation loss, tau after it)

    # ------------------------------------------------------------------ data
    def fresh_probability(self, step: int, total_steps: int) -> float:
        o = self.config.method
        progress = min(max(step / total_steps, 0.0), 1.0) if total_steps > 0 else 0.0
        return o.v1_fresh_start + (o.v1_fresh_end - o.v1_fresh_start) * progress

    def draw(self, rows, sampler, rng, step, total_steps):
        u, v = rng.random(), rng.random()  # both drawn every time: one batch's choice never shifts another's
        if u >= self.threshold:
            return rows, "fixed"
        if v < self.fresh_probability(step, total_steps) or len(self.buffer) < len(rows):
            fresh = sampler.student(rows)
            self.buffer.push(fresh)
            return fresh, "fresh"
        return self.buffer.sample(len(rows), rng), "replay"

    # ------------------------------------------------------------------ loss
    def compute_loss(self, batch: LossInputs):
        mask = batch.mask
        # token mean over the step, student not detached in the mixture: as the released v1 code (module docstring)
        weights = group_weights(mask, batch.counts, 0, "token_mean")
        loss, values = divergence_loss(batch, self.loss_name, batch.first, weights, weight=self.skew,
                                       temperature=self.temperature, detach_student_in_mixture=False)
        metrics = {"units": float(batch.n_first), self.loss_name: sequence_sums(values, mask)}
        return loss, metrics, {"tau": self.threshold, "buffer": float(len(self.buffer))}

    # ------------------------------------------------------------------ adaptive threshold
    def validation_due(self, step: int) -> bool:
        return step > 0 and step % self.config.method.v1_val_interval == 0

    def observe_validation(self, loss: float, step: int) -> None:
        if self.last_validation is not None and loss > self.last_validation:
            self.threshold = min(1.0, round(self.threshold + self.config.method.v1_threshold_step, 10))
        self.last_validation = loss
        self.validations.append((step, loss, self.threshold))

    def state_dict(self) -> dict:
        return {"threshold": self.threshold, "last_validation": self.last_validation,
                "validations": self.validations, "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.threshold, self.last_validation = state["threshold"], state["last_validation"]
        self.validations = [tuple(v) for v in state["validations"]]
        self.buffer.load_state_dict(state["buffer"])
