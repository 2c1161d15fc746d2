"""Trainer callbacks: the batched on-policy refresh of student responses, and the method's per-step hook."""

from __future__ import annotations

from typing import Callable

import torch

from transformers import TrainerCallback

from ..faults import fault_point


class OnPolicyRoundCallback(TrainerCallback):
    """At the start of every epoch (a "round"), regenerate the student's responses with the current student and
    swap them into the training set. `refresh(round_index, model)` does the generation (cached on disk, so a
    resumed run reuses the data its round already produced) and returns the new pair rows."""

    def __init__(self, dataset, refresh: Callable[[int, object], list[dict]], model_for_generation=None):
        self.dataset = dataset
        self.refresh = refresh
        # a context manager yielding the student ready to generate (DistillTrainer.model_for_generation: the
        # unwrapped model, ZeRO-3 shards gathered); None: the callback's `model` as it is
        self.model_for_generation = model_for_generation

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        steps_per_round = max(state.max_steps // max(int(state.num_train_epochs), 1), 1)
        round_index = state.global_step // steps_per_round
        if self.model_for_generation is None:
            self.dataset.replace_rows(self.refresh(round_index, model))
            return
        with self.model_for_generation() as student:
            self.dataset.replace_rows(self.refresh(round_index, student))


class MethodStepCallback(TrainerCallback):
    """After every optimizer step: `method.on_step_end(step)` (e.g. to update the curriculum's reference), and the
    validation loss when the method asks for it (distillm v1 adapts its student-data probability to it)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        method = self.trainer.method
        method.on_step_end(state.global_step)
        if method.validation_due(state.global_step):
            loss = self.trainer.validation_loss()
            if loss is not None:
                method.observe_validation(loss, state.global_step)
                self.trainer.log_once["validation_loss"] = round(loss, 6)  # goes into this step's log entry
        fault_point("train_step")  # reliability tests: a kill after the step, before its checkpoint


class NonFiniteGuard(TrainerCallback):
    """Skips an optimizer step whose gradients are not finite (a NaN/inf loss gives such gradients): just before
    the optimizer steps, every gradient is dropped (AdamW then leaves each parameter and its moments untouched).
    Counted in the log (`skipped_nonfinite`); after `max_in_a_row` such steps in a row, training stops with a
    checkpoint and the trainer records which batch it was (see DistillTrainer.nonfinite_stop)."""

    def __init__(self, trainer, max_in_a_row: int):
        self.trainer = trainer
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.skipped = 0
        self._skip_this_step = False

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        params = [p for p in self.trainer.model.parameters() if p.grad is not None]
        finite = all(bool(torch.isfinite(p.grad).all()) for p in params)
        self._skip_this_step = not finite
        if not finite:
            for p in params:
                p.grad = None

    def on_step_end(self, args, state, control, **kwargs):
        if not self._skip_this_step:
            self.in_a_row = 0
            return
        self._skip_this_step = False
        self.in_a_row += 1
        self.skipped += 1
        self.trainer.log_once["skipped_nonfinite"] = self.skipped
        if self.in_a_row >= self.max_in_a_row:
            self.trainer.nonfinite_stop = {"step": state.global_step, "in_a_row": self.in_a_row,
                                           "batch_ids": list(self.trainer.last_batch_ids)}
            control.should_save = True
            control.should_training_stop = True
