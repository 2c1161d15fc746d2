"""KD: forward KL, KL(p || q), on fixed responses (the teacher's, or ground truth with fixed_responses=dataset).

Data: the fixed rows, the same every round (off-policy). Loss: token-level FKL, reduced per the `reduction`
option. The classic word-level knowledge distillation of a sequence model.
"""

from __future__ import annotations

from .base import DivergenceMethod


class KD(DivergenceMethod):
    name = "kd"
    summary = "forward KL on fixed responses (teacher's or the data set's)"
    divergence_name = "fkl"
    rank = 2
    vision = True
