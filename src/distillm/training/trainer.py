"""`DistillTrainer`: transformers.Trainer with a frozen teacher and a distillation method's loss.

The Trainer keeps what it does well (optimizer, LR schedule, gradient accumulation, checkpoints and resume,
logging to TensorBoard/W&B through `report_to`, accelerate for devices and processes). This subclass adds:

- the method (`distillm.methods`): it draws each micro-batch (fixed rows, or fresh data from the live student
  through an `OnlineSampler`, see `get_batch_samples`) and computes the loss from the models' logits;
- the teacher: frozen, in eval mode, no gradients, no optimizer state, forwarded under `torch.inference_mode`
  (`torch.no_grad` when sharded) and not at all for methods that do not need it, e.g. SeqKD, nor for sequences
  a `teacher_cache` holds; placed for the run's engine by `prepare_teacher` (as TRL places its reference
  models): a replica on each device under DDP, sharded for inference under DeepSpeed ZeRO-3 and FSDP, never
  wrapped for training;
- fresh student data drawn inside training (on-policy methods) from the student unwrapped for generation
  (TRL's `unwrap_model_for_generation`: gathers ZeRO-3 shards, pauses gradient checkpointing);
- scores only over the response columns of the (left-padded) batch: by default (`loss_impl="fused"`) the
  models' final hidden states there and their output heads, which the fused losses turn into logits a chunk
  of tokens at a time (no [N, R, V] logits of either model), or (`loss_impl="plain"`, the reference, and the
  path under DeepSpeed/FSDP, whose sharded head weights exist only inside the module's forward) full logits;
  either way over the tokenizer's real vocabulary only, so models whose embedding matrices are padded to
  different sizes are compared over real tokens only;
- exact gradient accumulation: the loss of each micro-batch is divided by the counts (prompts, tokens) of the
  whole optimizer-step batch, summed over processes, so splitting a batch differently changes nothing;
- per-step logging of the method's metrics (e.g. SKL, SRKL, mean skews, b for DistiLLM-2), of where the
  step's batches came from (`source_fixed`, `source_student`, ...) and, for methods that draw fresh data, of the
  tokens generated for them since the previous entry (`generated_student_tokens`, `generated_teacher_tokens`:
  the sum over the log is the run's on-the-fly generation budget), and the method's run state in checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter, defaultdict

import torch
from safetensors import safe_open
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from ..errors import DistillmError
from ..testing.faults import fault_point, poison_loss
from ..io import atomic_write_json
from ..losses.fused import HeadInputs
from .fused_inputs import fused_inputs
from ..methods.base import LossInputs, Scores
from ..models import eval_mode
from .callbacks import MethodStepCallback, NonFiniteGuard, use_step_lines
from .collate import IGNORE, IMAGE_INPUTS, response_logits

METHOD_STATE_FILE = "distillm_method_state.json"
logger = logging.getLogger("distillm")


def local_counts(batch_samples) -> torch.Tensor:
    """(prompts, first-group tokens, second-group tokens, non-empty first-group responses, non-empty second-group
    responses, prompts whose responses are all non-empty) of this process's micro-batches (see
    methods.base.LossInputs: an empty response carries no tokens and is left out of every mean)."""
    counts = torch.zeros(6, dtype=torch.float64)
    for batch in batch_samples:
        labels = batch["labels"]
        n = int(batch["n_first"])
        full_first, full_second = (labels[:n] != IGNORE).any(-1), (labels[n:] != IGNORE).any(-1)
        full_units = full_first & full_second if full_second.numel() else full_first
        counts += torch.tensor([n, (labels[:n] != IGNORE).sum().item(), (labels[n:] != IGNORE).sum().item(),
                                full_first.sum().item(), full_second.sum().item(), full_units.sum().item()],
                               dtype=torch.float64)
    return counts


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def teacher_placement(accelerator) -> str:
    """How the teacher is placed under `accelerator`'s engine: 'deepspeed' (ZeRO-3: sharded; ZeRO-1/2: a stage-0
    replica), 'fsdp' (sharded, no optimizer) or 'device' (moved to this process's device; DDP and single
    process). The teacher is never wrapped for training: it has no gradients and no optimizer state."""
    if getattr(accelerator, "is_deepspeed_enabled", False):
        return "deepspeed"
    if getattr(accelerator, "is_fsdp2", False) or getattr(accelerator, "is_fsdp_enabled", False) or \
            getattr(accelerator.state, "fsdp_plugin", None) is not None:
        return "fsdp"
    return "device"


def prepare_teacher(teacher: torch.nn.Module | None, accelerator) -> torch.nn.Module | None:
    """The frozen teacher, placed for inference as `teacher_placement` says (TRL's `prepare_deepspeed` /
    `prepare_fsdp`, the functions TRL uses for its reference and teacher models). None (a teacher served by
    --teacher-url, no teacher model in this process) stays None."""
    if teacher is None:
        return None
    teacher = freeze(teacher)
    placement = teacher_placement(accelerator)
    if placement == "deepspeed":
        from trl.models.utils import prepare_deepspeed  # optional: TRL (heavy)

        return prepare_deepspeed(teacher, accelerator)
    if placement == "fsdp":
        from trl.models.utils import prepare_fsdp  # optional: TRL (heavy)

        return prepare_fsdp(teacher, accelerator)
    return teacher.to(accelerator.device)


class DistillTrainer(Trainer):
    # compute_loss already divides by the whole accumulated batch's counts
    loss_is_scaled_for_ga = True

    def __init__(self, *, teacher: torch.nn.Module | None, method, vocab_size: int, sampler=None,
                 validation_rows: list[dict] | None = None, max_nonfinite_steps: int = 3, loss_impl: str = "fused",
                 loss_chunk_size: int | None = None, teacher_cache=None, teacher_service=None, **kwargs):
        super().__init__(**kwargs)
        if loss_impl not in ("fused", "plain"):
            raise DistillmError(f"loss_impl must be fused or plain, got {loss_impl!r}")
        self.sharded = teacher_placement(self.accelerator) != "device"
        if self.sharded and loss_impl == "fused":
            # ZeRO-3 / FSDP gather a module's weights only inside its forward: the fused losses, which apply the
            # heads themselves, would see shards. The plain path calls the heads as modules.
            logger.warning("loss_impl=fused is not supported under DeepSpeed/FSDP (sharded output heads): using the "
                           "plain loss path.")
            loss_impl = "plain"
        if self.sharded and teacher_cache is not None:
            raise DistillmError("--teacher-cache is not supported under DeepSpeed/FSDP (the teacher's head is sharded); "
                                "run without it, or with DDP / one process.")
        self.loss_impl = loss_impl
        self.loss_chunk_size = loss_chunk_size
        self.teacher_cache = teacher_cache  # training.teacher_cache.TeacherCache or None
        self.teacher_service = teacher_service  # teacher.remote.RemoteScores (--teacher-url) or None
        self.teacher = prepare_teacher(teacher, self.accelerator)
        self.method = method
        if self.args.world_size > 1:  # the method's run state (e.g. curriculum gaps) is summed over processes
            method.sum_over_processes = lambda values: self.accelerator.reduce(
                values.to(self.args.device), reduction="sum").cpu()
        self.sampler = sampler  # training.sources.OnlineSampler, for methods that draw fresh data
        self.validation_rows = validation_rows or []
        self.add_callback(MethodStepCallback(self))
        self.nonfinite_guard = NonFiniteGuard(self, max_nonfinite_steps)
        self.add_callback(self.nonfinite_guard)
        use_step_lines(self)  # one console line per logging step, not the log dicts inside tqdm bars
        self.nonfinite_stop: dict | None = None  # set when the guard stopped training
        self.last_batch_ids: list[str] = []  # prompt ids of the latest optimizer step's rows (for error messages)
        self.vocab_size = vocab_size
        self._metric_sums: dict[str, float] = defaultdict(float)
        self._gauges: dict[str, float] = {}
        self._sources: Counter = Counter()
        self._generated_logged: Counter = Counter()  # the sampler's counts at the previous log entry
        self.log_once: dict[str, float] = {}  # added to the next log entry only (e.g. a validation loss)

    # ------------------------------------------------------------------ data: the method draws each micro-batch
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The optimizer step's micro-batches, each as the method draws it (fixed rows, or fresh responses from
        the live student), then counted for the loss normalisation."""
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        self.last_batch_ids = []
        batch_samples = [self._draw(batch, index) for index, batch in enumerate(batch_samples)]
        if self.teacher_service is not None and self.method.needs_teacher:
            for batch in batch_samples:  # the server scores the step's next micro-batches while one trains
                self.teacher_service.prefetch(batch)
        return batch_samples, self._get_num_items_in_batch(batch_samples, device)

    def _draw(self, batch: dict, micro_index: int) -> dict:
        rows = [self.train_dataset.rows[i] for i in batch["row_index"].tolist()]
        step = self.state.global_step
        # one RNG per (seed, step, micro-batch, process): a resumed run makes the same choices from its step on
        rng = random.Random(f"{self.args.seed}:{step}:{micro_index}:{self.args.process_index}")
        if self.sampler is None or not self.method.sources:  # the method never samples: no unwrapping needed
            drawn, source = self.method.draw(rows, None, rng, step, self.state.max_steps)
        else:
            seed = rng.getrandbits(31)
            with self.model_for_generation() as student:
                drawn, source = self.method.draw(rows, self.sampler.bound(student, seed), rng, step,
                                                 self.state.max_steps)
        self._sources[source] += 1
        self.last_batch_ids.extend(str(row.get("id")) for row in drawn)
        if drawn is rows:
            return batch
        fresh = self.data_collator(drawn)
        return {key: value.to(batch["input_ids"].device) for key, value in fresh.items()}

    def model_for_generation(self):
        """Context manager: the student, unwrapped and ready to generate (TRL's `unwrap_model_for_generation`)."""
        from trl.models.utils import unwrap_model_for_generation  # optional: TRL (heavy)

        return unwrap_model_for_generation(self.model_wrapped, self.accelerator)

    # ------------------------------------------------------------------ loss normalisation
    def _get_num_items_in_batch(self, batch_samples, device):
        """`local_counts` of the whole optimizer step, summed over processes."""
        counts = local_counts(batch_samples).to(device)
        if self.args.world_size > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return counts

    def scores(self, model, inputs, fused: bool | None = None) -> tuple[Scores, torch.Tensor]:
        """A model's scores over the batch's response columns and the response tokens [N, R]: hidden states and
        head (fused) or logits [N, R, V] (plain)."""
        if fused or (fused is None and self.loss_impl == "fused"):
            fused = fused_inputs(model, inputs, extra_inputs=IMAGE_INPUTS)
            return fused.head, fused.labels
        return response_logits(model, inputs, self.vocab_size)

    def teacher_scores(self, inputs) -> Scores:
        """The teacher's scores, from the cache where it holds them, else from a teacher pass under
        torch.inference_mode (no autograd records at all). The (small) result is cloned out of inference mode
        so the loss may keep it for its backward pass."""
        if self.teacher_service is not None:
            return self.teacher_service.scores(self, inputs)
        if self.teacher_cache is not None:
            return self.teacher_cache.scores(self, inputs)
        return self.run_teacher(inputs)

    def run_teacher(self, inputs, fused: bool | None = None) -> Scores:
        if self.teacher is None:
            raise DistillmError("No local teacher in this process (the teacher is served by --teacher-url): its "
                                "scores come from the server only.")
        with torch.no_grad() if self.sharded else torch.inference_mode():
            scores, _ = self.scores(self.teacher, inputs, fused)
        if isinstance(scores, HeadInputs):
            return HeadInputs(scores.hidden.clone(), scores.weight, scores.bias)
        return scores.clone()

    def method_inputs(self, model, inputs, counts) -> LossInputs:
        """The models' scores over the batch's response tokens, as the method's loss takes them."""
        student, targets = self.scores(model, inputs)
        teacher = self.teacher_scores(inputs) if self.method.needs_teacher else None
        return LossInputs(student, teacher, targets, int(inputs["n_first"]), counts, step=self.state.global_step,
                          total_steps=self.state.max_steps, vocab_size=self.vocab_size,
                          chunk_size=self.loss_chunk_size)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if num_items_in_batch is None:  # e.g. called outside the training loop
            num_items_in_batch = self._get_num_items_in_batch([inputs], inputs["labels"].device)
        loss, metric_sums, gauges = self.method.compute_loss(self.method_inputs(model, inputs, num_items_in_batch))
        if model.training:
            loss = poison_loss(loss, self.state.global_step + 1)  # reliability tests (DISTILLM_FAULT); else a no-op
            for key, value in metric_sums.items():
                self._metric_sums[key] += value
            self._gauges.update(gauges)
        # DDP averages gradients over processes while the loss was normalised by the global counts.
        loss = loss * self.args.world_size
        return (loss, None) if return_outputs else loss

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        """The method's loss on the validation rows (held-out fixed responses), student in eval mode."""
        if not self.validation_rows:
            return None
        size = self.args.per_device_train_batch_size
        total, units = 0.0, 0
        model = self.accelerator.unwrap_model(self.model)
        with eval_mode(model):
            for start in range(0, len(self.validation_rows), size):
                rows = self.validation_rows[start:start + size]
                batch = {k: v.to(self.args.device) for k, v in self.data_collator(rows).items()}
                loss, _, _ = self.method.compute_loss(self.method_inputs(model, batch, local_counts([batch])))
                total += loss.item() * len(rows)
                units += len(rows)
        return total / max(units, 1)

    # ------------------------------------------------------------------ logging and state
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._metric_sums.get("units"):
            sums = self._metric_sums
            if self.args.world_size > 1:
                keys = sorted(sums)
                total = self.accelerator.reduce(torch.tensor([sums[k] for k in keys], device=self.args.device),
                                                reduction="sum")
                sums = dict(zip(keys, total.tolist()))
            units = sums.pop("units")
            logs.update({key: round(value / units, 6) for key, value in sums.items()})
            logs.update({key: round(value, 6) for key, value in self._gauges.items()})
            total = max(sum(self._sources.values()), 1)
            logs.update({f"source_{name}": round(self._sources[name] / total, 4) for name in self.method.sources})
            if self.method.sources and self.sampler is not None:
                generated = Counter(self.sampler.generated)
                for who in ("student", "teacher"):
                    logs[f"generated_{who}_tokens"] = generated[who] - self._generated_logged[who]
                self._generated_logged = generated
            logs.update(self.log_once)
            self._metric_sums.clear()
            self._sources.clear()
            self.log_once.clear()
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            if os.path.isdir(folder):
                fault_point("checkpoint")  # reliability tests: a kill with the checkpoint half written
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


    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume's weight loading. transformers reads a checkpoint's safetensors with `load_state_dict(strict=False)`,
        but models whose weights transformers converts on loading (LLaVA and other vision-language models, fused
        MoE experts) are saved in their original key format, which that call would skip without a word -- the run
        would go on from the initial weights (transformers issues #43701, #40187). Such a checkpoint is loaded with
        `from_pretrained`, which converts."""
        model = self.model if model is None else model
        unwrapped = self.accelerator.unwrap_model(model)
        saved = checkpoint_weight_names(resume_from_checkpoint)
        if saved and not self.is_fsdp_enabled and not saved <= set(unwrapped.state_dict()):
            dtype = next(unwrapped.parameters()).dtype
            loaded = type(unwrapped).from_pretrained(resume_from_checkpoint, dtype=dtype, use_safetensors=True)
            unwrapped.load_state_dict(loaded.state_dict(), strict=True)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)


def checkpoint_weight_names(folder: str | os.PathLike) -> set[str]:
    """The tensor names of a checkpoint's safetensors weights (one file or an index of shards); empty if none."""
    single, index = os.path.join(folder, SAFE_WEIGHTS_NAME), os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        with safe_open(single, "pt") as handle:
            return set(handle.keys())
    if os.path.isfile(index):
        with open(index) as handle:
            return set(json.load(handle)["weight_map"])
    return set()


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
