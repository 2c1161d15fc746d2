"""`CrossDistillTrainer`: `DistillTrainer` whose teacher reads its own tokenization of each batch.

The student side is unchanged (the batch's input_ids / labels are the student's). The teacher runs on the
`teacher_*` keys the `CrossCollator` adds, under torch.inference_mode, and its scores reach the method as a
`crosstok.losses.CrossTeacher` (its hidden states + head on the fused path, its logits on the plain path, its
targets, the micro-batch's alignment groups and the vocabulary map); `methods.base.divergence_loss` and
`token_log_probs` turn those into the aligned losses. With `--teacher-cache exact` the teacher's hidden states on
its own (fixed) responses come from the cache, which is keyed by the teacher's ids (`teacher_scores`).
"""

from __future__ import annotations

import torch

from ..losses.fused import HeadInputs
from ..training.fused_inputs import fused_inputs
from ..training.collate import response_logits
from ..training.trainer import DistillTrainer
from .data import CrossSetup, groups_from_batch, teacher_batch
from .losses import CrossTeacher


def teacher_scores(teacher, batch: dict, setup: CrossSetup, *, fused: bool = True, cache=None) -> CrossTeacher:
    """The teacher's CrossTeacher for a collated cross batch (no gradient). `cache`: an exact
    `training.teacher_cache.TeacherCache` built over the teacher's own responses in its tokens (keyed by the
    teacher's ids): the rows it holds come from it, the others (student responses re-tokenized for the teacher)
    from one teacher pass over just those rows."""
    inputs = teacher_batch(batch)
    if cache is not None:
        scores, targets = cache.model_scores(teacher, inputs, fused=fused, vocab_size=setup.vmap.teacher_size)
        return CrossTeacher(scores, targets, groups_from_batch(batch), setup.vmap.to(targets.device),
                            uld_weight=setup.uld_weight, merge_weight=setup.uld_weight)
    with torch.inference_mode():
        if fused:
            out = fused_inputs(teacher, inputs)
            scores, targets = out.head, out.labels
        else:
            scores, targets = response_logits(teacher, inputs, setup.vmap.teacher_size)
    if isinstance(scores, HeadInputs):
        scores = HeadInputs(scores.hidden.clone(), scores.weight, scores.bias)
    else:
        scores = scores.clone()
    return CrossTeacher(scores, targets.clone(), groups_from_batch(batch), setup.vmap.to(targets.device),
                        uld_weight=setup.uld_weight, merge_weight=setup.uld_weight)


class CrossDistillTrainer(DistillTrainer):
    def __init__(self, *, cross: CrossSetup, **kwargs):
        super().__init__(**kwargs)
        self.cross = cross

    def teacher_scores(self, inputs):
        return teacher_scores(self.teacher, inputs, self.cross, fused=self.loss_impl == "fused",
                              cache=self.teacher_cache)
