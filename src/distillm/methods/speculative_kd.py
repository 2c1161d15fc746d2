"""Speculative KD (Xu et al.): distil on sequences the student and teacher decode together.

Data: every micro-batch's prompts are answered afresh by joint decoding (generation.speculative): the current
student proposes each token; the teacher keeps it if it is among the teacher's top-K (`skd_top_k`, default 25)
next tokens, else replaces it with its own sample. The student thus trains on its own tokens where they are good
enough and on the teacher's where they are not. Loss: a token-level divergence on those responses, `skd_loss`
(fkl by default; rkl, jsd with b = `jsd_beta`, or tvd). The fraction of replaced tokens is logged.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..options import opt
from .base import DivergenceMethod


class SpeculativeKD(DivergenceMethod):
    name = "speculative-kd"
    summary = "divergence on jointly decoded responses (student proposes, teacher keeps its top-K)"
    uses_fixed_responses = False  # the training set holds prompts only
    sources = ("speculative",)
    rank = 8

    @dataclass
    class Options:
        skd_top_k: int = opt(25, "speculative-kd: the teacher keeps a student token if it is in the teacher's top-K, else samples its own.", ge=1)
        skd_loss: str = opt("fkl", "speculative-kd: loss on the jointly decoded responses: fkl, rkl, jsd (b = --jsd-beta) or tvd.", choices=("fkl", "rkl", "jsd", "tvd"))

    def __init__(self, config):
        super().__init__(config)
        self.divergence_name = config.method.skd_loss
        self.replaced_tokens = 0
        self.decoded_tokens = 0

    def draw(self, rows, sampler, rng, step, total_steps):
        decoded = sampler.speculative(rows, self.config.method.skd_top_k)
        self.replaced_tokens += sum(sum(row["replaced"]) for row in decoded)
        self.decoded_tokens += sum(len(row["replaced"]) for row in decoded)
        return decoded, "speculative"

    def compute_loss(self, batch):
        loss, metrics, gauges = super().compute_loss(batch)
        gauges["replaced_fraction"] = self.replaced_tokens / max(self.decoded_tokens, 1)
        return loss, metrics, gauges

    def state_dict(self) -> dict:
        return {"replaced_tokens": self.replaced_tokens, "decoded_tokens": self.decoded_tokens}

    def load_state_dict(self, state: dict) -> None:
        self.replaced_tokens, self.decoded_tokens = state["replaced_tokens"], state["decoded_tokens"]
