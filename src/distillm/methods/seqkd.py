"""SeqKD: supervised fine-tuning on the teacher's responses.

Data: the teacher's sampled responses (fixed, generated once). Loss: the negative log-likelihood of the response
tokens under the student (cross-entropy with the sampled token), reduced per the `reduction` option. The teacher
is not run while training: this is the cheapest method per step.
"""

from __future__ import annotations

from .base import LossInputs, Method, reduce_group, sequence_sums, token_log_probs


def response_nll(batch: LossInputs, rows: slice, group: int, reduction: str, temperature: float = 1.0):
    """(loss, per-token NLL) of the response tokens of `rows` of the batch."""
    mask = batch.mask[rows]
    nll = -token_log_probs(batch, "student", rows, temperature=temperature)
    return reduce_group(nll, mask, batch.counts, group, reduction), nll, mask


class SeqKD(Method):
    name = "seqkd"
    summary = "SFT (NLL) on the teacher's responses; no teacher pass while training"
    needs_teacher = False
    rank = 3
    vision = True

    @classmethod
    def uses_teacher_rows(cls, config) -> bool:
        return True  # by definition the teacher's outputs

    def build_rows(self, ctx) -> list[dict]:
        return ctx.teacher_rows()  # by definition the teacher's outputs, whatever fixed_responses says

    def compute_loss(self, batch: LossInputs):
        loss, nll, mask = response_nll(batch, batch.first, 0, self.reduction)
        return loss, {"units": float(batch.n_first), "nll": sequence_sums(nll, mask)}, {}
