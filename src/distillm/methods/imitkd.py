"""ImitKD: forward KL on the student's own responses (imitation learning against the teacher).

Data: each micro-batch's prompts are answered afresh by the current student (on-policy); with probability
`imitkd_fixed_fraction` a batch uses the fixed responses instead (a mixture with off-policy data, 0 by default).
Loss: token-level FKL, KL(p || q), on those responses: the teacher corrects every step the student takes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..options import opt
from .base import DivergenceMethod


class ImitKD(DivergenceMethod):
    name = "imitkd"
    summary = "forward KL on fresh student responses (optionally mixed with fixed ones)"
    divergence_name = "fkl"
    sources = ("fixed", "student")
    rank = 4
    vision = True

    @dataclass
    class Options:
        imitkd_fixed_fraction: float = opt(0.0, "imitkd: probability that a batch uses the fixed responses instead of fresh student samples.", ge=0, le=1)

    @classmethod
    def uses_teacher_rows(cls, config) -> bool:
        return config.method.imitkd_fixed_fraction > 0

    def draw(self, rows, sampler, rng, step, total_steps):
        if rng.random() < self.config.method.imitkd_fixed_fraction:
            return rows, "fixed"
        return sampler.student(rows), "student"
