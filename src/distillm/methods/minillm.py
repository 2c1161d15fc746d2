"""MiniLLM: reverse KL, KL(q || p), on the student's own samples.

Data: every micro-batch's prompts are answered afresh by the current student (on-policy). Loss: token-level RKL
on those responses, the mode-seeking objective: the student is pushed off tokens the teacher finds unlikely.
The original optimises sequence-level RKL with a policy gradient (length normalisation, teacher-mixed sampling,
PPO-style clipping); this is its token-level form, as the DistiLLM-2 paper evaluates it.
"""

from __future__ import annotations

from .base import DivergenceMethod


class MiniLLM(DivergenceMethod):
    name = "minillm"
    summary = "reverse KL on fresh student samples (token-level form)"
    divergence_name = "rkl"
    rank = 6
    vision = True
    sources = ("student",)
    uses_fixed_responses = False  # the training set holds prompts only

    def draw(self, rows, sampler, rng, step, total_steps):
        return sampler.student(rows), "student"
