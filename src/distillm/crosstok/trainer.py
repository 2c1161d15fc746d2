"""`CrossDistillTrainer`: `DistillTrainer` whose teacher reads its own tokenization of each batch.

The student side is unchanged (the batch's input_ids / labels are the student's). The teacher runs on the
`teacher_*` keys the `CrossCollator` adds, under torch.inference_mode, and its scores reach the method as a
`crosstok.losses.CrossTeacher` (its hidden states + head on the fused path, its logits on the plain path, its
targets, the micro-batch's alignment groups and the vocabulary map); `methods.base.divergence_loss` and
`token_log_probs` turn those into the aligned losses. With `--teacher-cache exact` the teacher's hidden states on
its own (fixed) responses come from the cache, which is keyed by the teacher's ids (`teacher_scores`); with
`--teacher-cache topk` its top-k log-probs + ids and the actual tokens' log-probs do (the rows the cache lacks are
turned into that form from a live teacher pass), and the loss is the top-K one of --teacher-url. With
--teacher-url the teacher's side of each batch is scored by the server (`CrossRemoteScores`: top-K log-probs in the
teacher's vocabulary + the actual tokens' exact log-probs), and the aligned losses take their top-K form
(`crosstok.losses.topk_group_values`).
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
    """The teacher's CrossTeacher for a collated cross batch (no gradient). `cache`: a
    `training.teacher_cache.TeacherCache` built over the teacher's own responses in its tokens (keyed by the
    teacher's ids): the rows it holds come from it, the others (student responses re-tokenized for the teacher)
    from one teacher pass over just those rows. Exact cache: hidden states / logits; top-k cache: a TopKTeacher
    with the actual tokens' log-probs, as `CrossRemoteScores` gives."""
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


class CrossRemoteScores:
    """A served teacher (`teacher.remote.RemoteScores` over the TEACHER's vocabulary) for cross-tokenizer batches:
    it sends the teacher's side of each batch (`teacher_batch`: its prompt rendering, its ids) and hands the
    result to the loss as a `CrossTeacher` whose scores are the `TopKTeacher`. Its counters (`rows`, `tokens`,
    `client`, `k`) are the wrapped service's."""

    def __init__(self, service, setup: CrossSetup):
        self.service, self.setup = service, setup

    def __getattr__(self, name):
        return getattr(self.service, name)

    def prefetch(self, batch: dict) -> None:
        self.service.prefetch(teacher_batch(batch))

    def scores(self, trainer, inputs: dict) -> CrossTeacher:
        side = teacher_batch(inputs)
        topk = self.service.scores(trainer, side)
        labels = side["labels"]
        targets = labels[:, -topk.logprobs.shape[1]:]
        return CrossTeacher(topk, targets, groups_from_batch(inputs), self.setup.vmap.to(labels.device),
                            uld_weight=self.setup.uld_weight, merge_weight=self.setup.uld_weight)

    def close(self) -> None:
        self.service.close()


class CrossDistillTrainer(DistillTrainer):
    def __init__(self, *, cross: CrossSetup, **kwargs):
        super().__init__(**kwargs)
        self.cross = cross

    def teacher_scores(self, inputs):
        if self.teacher_service is not None:  # --teacher-url: the server scores the teacher's side
            return self.teacher_service.scores(self, inputs)
        return teacher_scores(self.teacher, inputs, self.cross, fused=self.loss_impl == "fused",
                              cache=self.teacher_cache)
