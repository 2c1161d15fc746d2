"""GKD (generalised knowledge distillation, Agarwal et al.): generalised JSD on a mixture of on-policy and
fixed data.

Data: with probability `gkd_lambda` (lambda, default 0.5) a micro-batch's responses are sampled afresh from the
current student; otherwise the fixed responses are used. Loss: token-level generalised JSD_b with b = `jsd_beta`
(default 0.5; b -> 0 is forward KL, b -> 1 reverse KL, see losses.divergences.generalized_jsd).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..options import opt
from .base import DivergenceMethod


class GKD(DivergenceMethod):
    name = "gkd"
    summary = "generalised JSD_b; on-policy student samples with probability lambda, else fixed data"
    divergence_name = "jsd"
    sources = ("fixed", "student")
    rank = 5
    vision = True

    @dataclass
    class Options:
        jsd_beta: float = opt(0.5, "gkd (and speculative-kd with --skd-loss jsd): b of the generalised JSD (0 -> forward KL, 1 -> reverse KL).", ge=0, le=1)
        gkd_lambda: float = opt(0.5, "gkd: probability that a batch is sampled on-policy from the current student (else fixed data).", ge=0, le=1)

    def draw(self, rows, sampler, rng, step, total_steps):
        if rng.random() < self.config.method.gkd_lambda:
            return sampler.student(rows), "student"
        return rows, "fixed"
