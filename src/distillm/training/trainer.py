"""`DistillTrainer`: transformers.Trainer with a frozen teacher and a distillation method's loss.

The Trainer keeps what it does well (optimizer, LR schedule, gradient accumulation, checkpoints and resume,
logging to TensorBoard/W&B through `report_to`, accelerate for devices and processes). This subclass adds:

- the teacher: frozen, in eval mode, no gradients, no optimizer state, forwarded under `torch.no_grad`;
- logits only over the response columns of the (left-padded) batch, sliced to the tokenizer's real vocabulary,
  so models whose embedding matrices are padded to different sizes are compared over real tokens only;
- exact gradient accumulation: the loss of each micro-batch is divided by the counts (pairs, tokens) of the
  whole optimizer-step batch, summed over processes, so splitting a batch differently changes nothing;
- per-step logging of the method's metrics (loss, SKL, SRKL, mean skews, b) and its run state in checkpoints.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..errors import DistillmError
from ..io import atomic_write_json
from .callbacks import MethodStepCallback
from .collate import IGNORE, response_logits

METHOD_STATE_FILE = "distillm_method_state.json"


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


class DistillTrainer(Trainer):
    # compute_loss already divides by the whole accumulated batch's counts
    loss_is_scaled_for_ga = True

    def __init__(self, *, teacher: torch.nn.Module, method, vocab_size: int, **kwargs):
        super().__init__(**kwargs)
        self.teacher = freeze(teacher).to(self.args.device)
        self.method = method
        self.add_callback(MethodStepCallback(method))
        self.vocab_size = vocab_size
        self._metric_sums: dict[str, float] = defaultdict(float)
        self._gauges: dict[str, float] = {}

    # ------------------------------------------------------------------ loss normalisation
    def _get_num_items_in_batch(self, batch_samples, device):
        """(pairs, chosen tokens, rejected tokens) of the whole optimizer step, summed over processes."""
        counts = torch.zeros(3, dtype=torch.float64)
        for batch in batch_samples:
            labels = batch["labels"]
            n = labels.shape[0] // 2
            counts += torch.tensor([n, (labels[:n] != IGNORE).sum().item(), (labels[n:] != IGNORE).sum().item()],
                                   dtype=torch.float64)
        counts = counts.to(device)
        if self.args.world_size > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return counts

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if num_items_in_batch is None:  # e.g. called outside the training loop
            num_items_in_batch = self._get_num_items_in_batch([inputs], inputs["labels"].device)
        student_logits, targets = response_logits(model, inputs, self.vocab_size)
        # no_grad, not inference_mode: the teacher's logits are saved for the loss's backward pass
        with torch.no_grad():
            teacher_logits, _ = response_logits(self.teacher, inputs, self.vocab_size)
        loss, metric_sums, gauges = self.method.compute_loss(
            student_logits, teacher_logits, targets,
            step=self.state.global_step, total_steps=self.state.max_steps, normalizer=num_items_in_batch,
        )
        if model.training:
            for key, value in metric_sums.items():
                self._metric_sums[key] += value
            self._gauges.update(gauges)
        # DDP averages gradients over processes while the loss was normalised by the global counts.
        loss = loss * self.args.world_size
        return (loss, None) if return_outputs else loss

    # ------------------------------------------------------------------ logging and state
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._metric_sums.get("pairs"):
            sums = self._metric_sums
            if self.args.world_size > 1:
                keys = sorted(sums)
                total = self.accelerator.reduce(torch.tensor([sums[k] for k in keys], device=self.args.device),
                                                reduction="sum")
                sums = dict(zip(keys, total.tolist()))
            pairs = sums.pop("pairs")
            logs.update({key: round(value / pairs, 6) for key, value in sums.items()})
            logs.update({key: round(value, 6) for key, value in self._gauges.items()})
            self._metric_sums.clear()
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            if os.path.isdir(folder):
                # written last and atomically: its presence marks the checkpoint as complete (see last_complete_checkpoint)
                atomic_write_json(os.path.join(folder, METHOD_STATE_FILE), self.method.state_dict())

    def train(self, resume_from_checkpoint=None, **kwargs):
        if isinstance(resume_from_checkpoint, str):
            path = os.path.join(resume_from_checkpoint, METHOD_STATE_FILE)
            if not os.path.isfile(path):
                raise DistillmError(f"{resume_from_checkpoint} is incomplete (no {METHOD_STATE_FILE}): it was cut off "
                                    "while being written. Delete it to resume from the previous checkpoint.")
            with open(path) as handle:
                self.method.load_state_dict(json.load(handle))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


def last_complete_checkpoint(folder: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` in `folder` that was written to the end (it holds the method state, which
    DistillTrainer writes last); a checkpoint cut off mid-write is passed over."""
    if not os.path.isdir(folder):
        return None
    steps = []
    for name in os.listdir(folder):
        prefix, _, step = name.partition("-")
        path = os.path.join(folder, name)
        if prefix == PREFIX_CHECKPOINT_DIR and step.isdigit() and os.path.isfile(os.path.join(path, METHOD_STATE_FILE)):
            steps.append((int(step), path))
    return max(steps)[1] if steps else None
