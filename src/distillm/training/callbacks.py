"""Trainer callbacks: the batched on-policy refresh of student responses, the method's per-step hook, the
non-finite step guard and the console's one line per logging step."""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, TextIO

import torch

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..testing.faults import fault_point


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


class StepLineCallback(TrainerCallback):
    """One plain console line per logging step, in place of transformers' ProgressCallback / PrinterCallback
    (which print each log dict inside the tqdm bars):

        step 12/48  loss 2.91  skl 1.41  srkl 1.49  a_t 0.09  a_s 0.09  b 1.25  lr 1.2e-04  3.1 s/step

    The loss comes first, then the method's metrics in the order the log has them, then the learning rate,
    gradient norm and the mean seconds per optimizer step since the previous line. Between logging steps, a
    progress line (`step 30/48 ... s/step, ~2 min left`) comes at most every `heartbeat_s` seconds, so long
    steps (fresh generation, big batches) still show that training moves. The end of training gets one summary
    line. Only the main process prints. The logs themselves (trainer.state.log_history, hence
    logs/train_log.jsonl) are unchanged."""

    SKIP = {"epoch", "total_flos", "train_samples_per_second", "train_steps_per_second"}
    TAIL = ("learning_rate", "grad_norm")  # printed after the method's metrics
    SHORT = {"skew_t": "a_t", "skew_s": "a_s", "learning_rate": "lr", "grad_norm": "grad",
             "validation_loss": "val_loss", "skipped_nonfinite": "skipped", "generated_student_tokens": "gen_student",
             "generated_teacher_tokens": "gen_teacher"}

    def __init__(self, stream: TextIO | None = None, heartbeat_s: float = 60.0):
        self.stream = stream
        self.heartbeat_s = heartbeat_s
        self._since = (0.0, 0)  # (time, step) of the previous logging line
        self._printed = 0.0

    def _print(self, line: str) -> None:
        print(line, file=self.stream or sys.stdout, flush=True)
        self._printed = time.monotonic()

    @staticmethod
    def number(key: str, value) -> str:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return str(value)
        if key == "learning_rate":
            return f"{value:.1e}"
        if isinstance(value, int) or (math.isfinite(value) and value == int(value) and abs(value) < 1e6):
            return str(int(value))
        return f"{value:.3g}"

    def format_line(self, logs: dict, step: int, max_steps: int, seconds_per_step: float | None) -> str:
        parts = [f"step {step}/{max_steps}"]
        keys = [k for k in logs if k not in self.SKIP and k not in self.TAIL and k != "loss"]
        for key in (["loss"] if "loss" in logs else []) + keys + [k for k in self.TAIL if k in logs]:
            name = self.SHORT.get(key, key.removeprefix("source_") if key.startswith("source_") else key)
            parts.append(f"{name} {self.number(key, logs[key])}")
        if seconds_per_step is not None:
            parts.append(f"{seconds_per_step:.3g} s/step")
        return "  ".join(parts)

    def on_train_begin(self, args, state, control, **kwargs):
        self._since = (time.monotonic(), state.global_step)
        self._printed = self._since[0]

    def _rate(self, step: int) -> float | None:
        start, first = self._since
        return (time.monotonic() - start) / (step - first) if step > first else None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "train_runtime" in logs:  # the summary transformers logs at the end of train()
            self._print(f"done: {state.global_step} steps in {logs['train_runtime']:.0f} s, "
                        f"mean loss {self.number('train_loss', logs.get('train_loss', float('nan')))}")
            return
        self._print(self.format_line(logs, state.global_step, state.max_steps, self._rate(state.global_step)))
        self._since = (time.monotonic(), state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or time.monotonic() - self._printed < self.heartbeat_s:
            return
        rate = self._rate(state.global_step)
        left = "" if rate is None else f", ~{rate * (state.max_steps - state.global_step) / 60:.0f} min left"
        self._print(f"step {state.global_step}/{state.max_steps}  "
                    f"({'-' if rate is None else f'{rate:.3g}'} s/step{left})")


def use_step_lines(trainer, **kwargs) -> StepLineCallback:
    """Replace the trainer's ProgressCallback / PrinterCallback (log dicts printed in tqdm bars) by a
    StepLineCallback; returns it."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    callback = StepLineCallback(**kwargs)
    trainer.add_callback(callback)
    return callback
