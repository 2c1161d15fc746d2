"""What every distillation method is made of: the data it trains on and the loss it applies.

A method is one small class in its own module (`methods/kd.py`, `methods/gkd.py`, ...). It says:

- which rows the training set holds (`uses_fixed_responses`: prompt + fixed response, the teacher's or the
  data set's; `paired_rounds`: (teacher response, student response) pairs regenerated every round; or its own
  rows, built by `build_rows` -- step-by-step's rationales);
- how one row becomes the sequences the models score (`sequences`: one, or two forming a second group, e.g. the
  rejected responses of a pair or the rationale task);
- how each micro-batch is drawn (`draw`): the fixed rows as they are, or fresh data from the current student, a
  replay buffer or the joint speculative decoder (the shared machinery comes in through the `sampler`);
- the loss (`compute_loss`), from the student's and the teacher's logits over the response tokens.

The trainer (`training.trainer.DistillTrainer`) and the pipeline do the rest, the same for every method.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, Sequence

import torch

from ..losses.divergences import (
    IGNORE_INDEX, forward_kl, generalized_jsd, per_sequence_mean, reverse_kl, total_variation,
)

if TYPE_CHECKING:
    from ..config import RunConfig


@dataclass
class LossInputs:
    """One micro-batch as a method's loss sees it.

    Rows 0..n_first-1 of every tensor are the first group of sequences (e.g. prompt + teacher response), the
    rest the second group (e.g. prompt + student response), if the method has one. Logits are [N, R, V] over the
    R response columns, `targets` [N, R] the response tokens (-100 elsewhere). `counts` = (units, tokens of the
    first group, tokens of the second group) of the WHOLE optimizer step (all micro-batches, all processes),
    where a unit is one first-group sequence (one prompt): dividing by them makes micro-batch losses add up to
    the loss of the whole batch.
    """

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None
    targets: torch.Tensor
    n_first: int
    counts: Sequence[float] | torch.Tensor
    step: int = 0
    total_steps: int = 0

    @property
    def mask(self) -> torch.Tensor:
        return self.targets != IGNORE_INDEX

    @property
    def first(self) -> slice:
        return slice(0, self.n_first)

    @property
    def second(self) -> slice:
        return slice(self.n_first, self.targets.shape[0])


def reduce_group(values: torch.Tensor, mask: torch.Tensor, counts, group: int, reduction: str) -> torch.Tensor:
    """Sum of per-token `values` [n, R] of one group, normalised by the optimizer step's counts:
    'seq_mean' -> sum of per-sequence means / units; 'token_mean' -> sum over tokens / that group's tokens."""
    values = torch.where(mask, values, torch.zeros_like(values))
    if reduction == "seq_mean":
        return per_sequence_mean(values, mask).sum() / max(float(counts[0]), 1.0)
    if reduction == "token_mean":
        return values.sum() / max(float(counts[1 + group]), 1.0)
    raise ValueError(f"Unknown reduction '{reduction}': use seq_mean or token_mean.")


def sequence_sums(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Sum over sequences of each sequence's mean of `values` (for logging per-unit means)."""
    return per_sequence_mean(torch.where(mask, values, torch.zeros_like(values)).detach(), mask).sum().item()


def divergence(name: str, student_logits, teacher_logits, *, temperature: float = 1.0, beta: float = 0.5):
    """Per-token divergence by name: fkl, rkl, jsd (generalised, b = beta) or tvd."""
    if name == "fkl":
        return forward_kl(student_logits, teacher_logits, temperature=temperature)
    if name == "rkl":
        return reverse_kl(student_logits, teacher_logits, temperature=temperature)
    if name == "jsd":
        return generalized_jsd(student_logits, teacher_logits, beta, temperature=temperature)
    if name == "tvd":
        return total_variation(student_logits, teacher_logits, temperature=temperature)
    raise ValueError(f"Unknown divergence '{name}': use fkl, rkl, jsd or tvd.")


class Sampler(Protocol):
    """Fresh data for the rows of a micro-batch, made from the live student (see training.sources)."""

    def student(self, rows: list[dict]) -> list[dict]: ...

    def speculative(self, rows: list[dict], top_k: int) -> list[dict]: ...


class Method:
    """Base class: fixed rows as they are, one sequence per row. Subclasses set the class attributes and
    override what differs."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    #: the training set holds prompt + fixed response rows (teacher's, or the data set's with fixed_responses=dataset)
    uses_fixed_responses: ClassVar[bool] = True
    #: the training set holds (teacher response, student response) pairs, the student's regenerated every round
    paired_rounds: ClassVar[bool] = False
    #: the loss needs the teacher's logits (SFT-style methods do not run the teacher while training)
    needs_teacher: ClassVar[bool] = True
    #: where `draw` may take a micro-batch from (each logged as the fraction `source_<name>`; empty: not logged)
    sources: ClassVar[tuple[str, ...]] = ()
    #: the method adapts to a validation loss on held-out fixed responses (see `validation_due`)
    uses_validation: ClassVar[bool] = False

    def __init__(self, config: "RunConfig"):
        self.config = config
        self.reduction = config.loss.reduction
        self.temperature = config.loss.loss_temperature

    @staticmethod
    def sum_over_processes(values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of `values` over the processes of a distributed run (the trainer replaces this with
        an all-reduce when there are several); run state built from it is the same on every process and the
        same as in a one-process run with the same global batch."""
        return values

    # ------------------------------------------------------------------ data
    def build_rows(self, ctx) -> list[dict]:
        """The rows of the training set (a `pipeline.DataContext` gives access to prompts and the teacher)."""
        return ctx.fixed_rows() if self.uses_fixed_responses else ctx.prompt_rows()

    def sequences(self, row: dict) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, response ids) of the sequences one row contributes: the first group, then, for methods
        with two groups, the second."""
        return [(row["prompt_ids"], row["response_ids"])]

    def draw(self, rows: list[dict], sampler: Sampler, rng: random.Random, step: int,
             total_steps: int) -> tuple[list[dict], str]:
        """The rows this micro-batch trains on, and the name of their source (logged as a fraction)."""
        return rows, "fixed"

    # ------------------------------------------------------------------ loss
    def compute_loss(self, batch: LossInputs) -> tuple[torch.Tensor, dict[str, float], dict[str, float]]:
        """(loss already divided by the step's counts, metric sums over this micro-batch's units -- logged as
        per-unit means, must include 'units' -- and gauges logged as they are)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ run state (saved in checkpoints)
    def on_step_end(self, step: int) -> None:
        """Called after every optimizer step."""

    def validation_due(self, step: int) -> bool:
        """Whether the trainer should measure the validation loss after this step (distillm v1 adapts to it)."""
        return False

    def observe_validation(self, loss: float, step: int) -> None:
        """The validation loss the trainer measured, when `validation_due` asked for it."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class DivergenceMethod(Method):
    """A divergence between teacher and student on the tokens of one group of responses."""

    divergence_name: ClassVar[str] = "fkl"

    def beta(self) -> float:
        return self.config.method.jsd_beta

    def compute_loss(self, batch: LossInputs):
        mask = batch.mask
        values = divergence(self.divergence_name, batch.student_logits, batch.teacher_logits,
                            temperature=self.temperature, beta=self.beta())
        loss = reduce_group(values, mask, batch.counts, 0, self.reduction)
        return loss, {"units": float(batch.n_first), self.divergence_name: sequence_sums(values, mask)}, {}
