"""What every distillation method is made of: the data it trains on and the loss it applies.

A method is one small class in its own module (`methods/kd.py`, `methods/gkd.py`, ...). It says:

- which rows the training set holds (`uses_fixed_responses`: prompt + fixed response, the teacher's or the
  data set's; `paired_rounds`: (teacher response, student response) pairs regenerated every round; or its own
  rows, built by `build_rows` -- step-by-step's rationales);
- how one row becomes the sequences the models score (`sequences`: one, or two forming a second group, e.g. the
  rejected responses of a pair or the rationale task);
- how each micro-batch is drawn (`draw`): the fixed rows as they are, or fresh data from the current student, a
  replay buffer or the joint speculative decoder (the shared machinery comes in through the `sampler`);
- the loss (`compute_loss`), from the student's and the teacher's scores over the response tokens, through
  `divergence_loss` and `token_log_probs` (fused chunked losses by default, plain full logits for reference).

A method's module also holds its options (`Options`, a dataclass of `options.opt` fields: default, help text,
accepted range), its data needs (`uses_fixed_responses`, `paired_rounds`, `needs_teacher`, `vision`,
`uses_teacher_rows`), the checks across its options (`config_checks`) and its ablation variants (`ablations`).
The registry (`methods.METHODS`, every module of this package), the config schema (`config.MethodSection`), the
command-line flags, the vision support list and `distillm compare`'s variants and token accounting are derived
from these: adding a method is adding its module (and its test).

The trainer (`training.trainer.DistillTrainer`) and the pipeline do the rest, the same for every method.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, Sequence, Union

import torch

from ..options import opt

from ..losses import divergences as plain
from ..losses.divergences import IGNORE_INDEX, per_sequence_mean
from ..losses.fused import (HeadInputs, TopKTeacher, dense_teacher_logprobs, fused_token_log_probs,
                            fused_weighted_divergence, mixture_weight, with_actual_token)
from ..crosstok.losses import CrossTeacher, aligned_span_log_probs, cross_divergence_loss

if TYPE_CHECKING:
    from ..config import RunConfig

#: what a model's scores over the response columns are given as: full logits [N, R, V] (the plain path), or the
#: last hidden states [N, R, H] with the output head (the fused path: logits are formed a chunk at a time)
Scores = Union[torch.Tensor, HeadInputs, TopKTeacher]


@dataclass
class LossInputs:
    """One micro-batch as a method's loss sees it.

    Rows 0..n_first-1 of every tensor are the first group of sequences (e.g. prompt + teacher response), the
    rest the second group (e.g. prompt + student response), if the method has one. `student` and `teacher` are
    the models' scores over the R response columns: logits [N, R, V] (`--loss-impl plain`) or `HeadInputs`
    (hidden states [N, R, H], head weight, bias; `--loss-impl fused`, the default), which the fused losses turn
    into logits a chunk of tokens at a time. A method never looks inside: it calls `divergence_loss` and
    `token_log_probs` below, which take either. `targets` [N, R] are the response tokens (-100 elsewhere).
    `counts` = (units, tokens of the first group, tokens of the second group, non-empty first-group sequences,
    non-empty second-group sequences, units whose sequences are all non-empty) of the WHOLE optimizer step (all
    micro-batches, all processes), where a unit is one first-group sequence (one prompt): dividing by them makes
    micro-batch losses add up to the loss of the whole batch. An empty response carries no tokens, so it is left
    out of every mean: per-sequence means divide by the non-empty sequences of their group (`sequence_count`),
    pair losses by the units whose responses are all non-empty. (A 3-entry `counts` from older callers stands
    for no empty responses: the units.) `vocab_size`: the real vocabulary (heads and logits
    may be padded beyond it); `chunk_size`: tokens per chunk of the fused path (None: sized to ~64 MiB).
    """

    student: Scores
    teacher: Scores | None
    targets: torch.Tensor
    n_first: int
    counts: Sequence[float] | torch.Tensor
    step: int = 0
    total_steps: int = 0
    vocab_size: int | None = None
    chunk_size: int | None = None

    @property
    def fused(self) -> bool:
        return isinstance(self.student, HeadInputs)

    @property
    def student_logits(self) -> torch.Tensor:
        return self.student

    @property
    def teacher_logits(self) -> torch.Tensor | None:
        return self.teacher

    @property
    def mask(self) -> torch.Tensor:
        return self.targets != IGNORE_INDEX

    @property
    def first(self) -> slice:
        return slice(0, self.n_first)

    @property
    def second(self) -> slice:
        return slice(self.n_first, self.targets.shape[0])


@dataclass
class TeacherGroups:
    """Teacher scores given per group of sequences (rows [0, n_first) and [n_first, N)), when the two come in
    different forms: e.g. a top-k teacher cache for the fixed responses, a live teacher pass for the fresh ones."""

    first: Scores
    second: Scores | None
    n_first: int


def _rows(scores, rows: slice):
    if isinstance(scores, CrossTeacher):  # a teacher with another tokenizer (crosstok)
        return scores.rows(rows)
    if isinstance(scores, TeacherGroups):
        n, stop = scores.n_first, rows.stop
        if rows.start in (0, None) and stop == n:
            return scores.first
        if rows.start == n and scores.second is not None:
            return scores.second
        raise ValueError(f"teacher scores come per group: ask for rows [0, {n}) or [{n}, N), not {rows}")
    if isinstance(scores, HeadInputs):
        return HeadInputs(scores.hidden[rows], scores.weight, scores.bias)
    if isinstance(scores, TopKTeacher):
        return scores._replace(logprobs=scores.logprobs[rows], indices=scores.indices[rows],
                               target=None if scores.target is None else scores.target[rows])
    return scores[rows]


def _plain_logits(scores, vocab_size: int | None, student: torch.Tensor | None = None,
                  divergence: str | None = None) -> torch.Tensor:
    """Full logits [..., V]; a top-k teacher spelled out in full (losses.fused.dense_teacher_logprobs)."""
    if isinstance(scores, TopKTeacher):  # the plain (reference) path spells the distribution out in full
        return dense_teacher_logprobs(scores, vocab_size, student, divergence)
    return scores if vocab_size is None else scores[..., :vocab_size]


def _topk_token_log_probs(scores: TopKTeacher, targets: torch.Tensor, vocab: int, temperature: float):
    """log p_tau(y) of the top-k-plus-tail distribution, without spelling it out: its log-probs are the k stored
    ones and `tail` on V - k tokens; at temperature tau they are renormalised after dividing by tau. A token
    outside the top k takes the exact log-prob `scores.target` where the teacher sent it (a vLLM server does),
    else the tail's share."""
    present = scores.indices >= 0  # an id of -1 is no entry (losses.fused.with_actual_token)
    values = scores.logprobs.float().masked_fill(~present, float("-inf"))
    rest = (vocab - present.sum(-1)).clamp_min(1).float()
    mass = torch.maximum(1.0 - values.exp().sum(-1), torch.finfo(values.dtype).tiny * rest)
    tail = torch.log(mass / rest)
    safe = targets.clamp_min(0).unsqueeze(-1)
    hit = (scores.indices.long() == safe) & present
    outside = tail if scores.target is None else scores.target.float()
    own = torch.where(hit.any(-1), torch.where(hit, values, 0.0).sum(-1), outside)
    parts = [values / temperature]
    if vocab > values.shape[-1]:
        parts.append((torch.log(rest) + tail / temperature).unsqueeze(-1))
    norm = torch.logsumexp(torch.cat(parts, -1), -1)
    return torch.where(targets != IGNORE_INDEX, own / temperature - norm, torch.zeros_like(own))


# per-token divergences on full logits, by name (weight: a of skl/srkl, b of jsd; detach: whether the student inside
# the skew mixture is detached, None = the functions' defaults: SKL not detached, SRKL detached)
PLAIN_DIVERGENCES = {
    "fkl": lambda s, t, w, tau, detach=None: plain.forward_kl(s, t, temperature=tau),
    "rkl": lambda s, t, w, tau, detach=None: plain.reverse_kl(s, t, temperature=tau),
    "skl": lambda s, t, w, tau, detach=None: plain.skew_forward_kl(
        s, t, w, temperature=tau, detach_student_in_mixture=bool(detach)),
    "srkl": lambda s, t, w, tau, detach=None: plain.skew_reverse_kl(
        s, t, w, temperature=tau, detach_student_in_mixture=detach is None or detach),
    "jsd": lambda s, t, w, tau, detach=None: plain.generalized_jsd(s, t, w, temperature=tau),
    "tvd": lambda s, t, w, tau, detach=None: plain.total_variation(s, t, temperature=tau),
}


def divergence_loss(batch: LossInputs, name: str, rows: slice, token_weights: torch.Tensor, *,
                    weight: float | torch.Tensor | None = None, temperature: float = 1.0,
                    detach_student_in_mixture: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, d): L = sum_n w_n d_n over the response tokens of `rows` (w = `token_weights` [n, R], 0 off the mask)
    and the per-token divergence d [n, R] (detached, 0 off the mask). `name`: fkl, rkl, skl, srkl, jsd or tvd
    (as in losses.divergences; `weight` is a of skl/srkl, b of jsd, a float or per row). Fused inputs go
    through `losses.fused.fused_weighted_divergence` (never more than a chunk's logits alive), logits through
    the plain functions; both give the same L and gradients. `detach_student_in_mixture` (skl/srkl): None = the
    functions' defaults (SKL: not detached, SRKL: detached, as DistiLLM-2's code)."""
    mask = batch.mask[rows]
    if name not in PLAIN_DIVERGENCES:
        raise ValueError(f"Unknown divergence '{name}': use {', '.join(PLAIN_DIVERGENCES)}.")
    student, teacher = _rows(batch.student, rows), _rows(batch.teacher, rows)
    if isinstance(teacher, TopKTeacher):  # the actual token's exact log-prob, where sent, as a (k+1)-th entry
        teacher = with_actual_token(teacher, batch.targets[rows])
    if isinstance(teacher, CrossTeacher):  # another tokenizer: the aligned losses of crosstok.losses
        return cross_divergence_loss(student, teacher, batch.targets[rows], token_weights, name, weight=weight,
                                     temperature=temperature, detach_student_in_mixture=detach_student_in_mixture)
    if batch.fused:
        loss, values = fused_weighted_divergence(
            name, student, teacher, token_weights, **mixture_weight(name, weight), mask=mask, temperature=temperature,
            vocab_size=batch.vocab_size, chunk_size=batch.chunk_size,
            detach_student_in_mixture=detach_student_in_mixture)
        return loss, values.detach()
    student_logits = _plain_logits(student, batch.vocab_size)
    values = PLAIN_DIVERGENCES[name](student_logits, _plain_logits(teacher, batch.vocab_size, student_logits, name),
                                     weight, temperature, detach_student_in_mixture)
    keep = mask & (token_weights != 0)
    loss = torch.where(keep, token_weights.to(values.dtype) * values, torch.zeros_like(values)).sum()
    return loss, torch.where(mask, values, torch.zeros_like(values)).detach()


def token_log_probs(batch: LossInputs, who: str, rows: slice, *, temperature: float = 1.0) -> torch.Tensor:
    """log q(y_n) (who='student') or log p(y_n) (who='teacher') of the response tokens of `rows`, [n, R], 0 off
    the mask; differentiable for the student. Fused inputs go through `losses.fused.fused_token_log_probs`."""
    scores = batch.student if who == "student" else batch.teacher
    if isinstance(scores, TeacherGroups) and rows == slice(None):
        first = token_log_probs(batch, who, batch.first, temperature=temperature)
        return torch.cat([first, token_log_probs(batch, who, batch.second, temperature=temperature)])
    scores = _rows(scores, rows)
    targets = batch.targets[rows]
    if isinstance(scores, CrossTeacher):  # the teacher's log-prob of each aligned span, at its last student column
        return aligned_span_log_probs(scores.scores, scores.targets, scores.groups, "teacher", targets.shape,
                                      temperature=temperature, vocab_size=scores.vmap.teacher_size,
                                      chunk_size=batch.chunk_size)
    if isinstance(scores, TopKTeacher):
        return _topk_token_log_probs(scores, targets, batch.vocab_size or int(scores.indices.max()) + 1,
                                     temperature)
    if batch.fused:
        return fused_token_log_probs(scores, targets, temperature=temperature, vocab_size=batch.vocab_size,
                                     chunk_size=batch.chunk_size)
    return plain.token_log_probs(_plain_logits(scores, batch.vocab_size), targets, temperature=temperature)


def sequence_count(counts, group: int) -> float:
    """How many sequences of `group` (0: first, 1: second) the step's per-sequence mean divides by: the non-empty
    ones (an empty response has no tokens to average), at least 1. 3-entry counts (no such entry): the units."""
    return max(float(counts[3 + group] if len(counts) > 3 else counts[0]), 1.0)


def unit_count(counts) -> float:
    """How many units (prompts) a per-unit loss divides by: those whose responses are all non-empty, at least 1."""
    return max(float(counts[5] if len(counts) > 5 else counts[0]), 1.0)


def group_weights(mask: torch.Tensor, counts, group: int, reduction: str, scale: float = 1.0) -> torch.Tensor:
    """Per-token weights [n, R] that reduce a group's per-token values as the optimizer step wants them:
    'seq_mean' -> sum of per-sequence means / the group's non-empty sequences; 'token_mean' -> sum over tokens /
    that group's tokens. An empty sequence has no tokens, hence no weight, and is not counted."""
    mask = mask.float()
    if reduction == "seq_mean":
        return scale * mask / (mask.sum(-1, keepdim=True).clamp_min(1.0) * sequence_count(counts, group))
    if reduction == "token_mean":
        return scale * mask / max(float(counts[1 + group]), 1.0)
    raise ValueError(f"Unknown reduction '{reduction}': use seq_mean or token_mean.")


def reduce_group(values: torch.Tensor, mask: torch.Tensor, counts, group: int, reduction: str) -> torch.Tensor:
    """Sum of per-token `values` [n, R] of one group, normalised by the optimizer step's counts:
    'seq_mean' -> sum of per-sequence means / the group's non-empty sequences; 'token_mean' -> sum over tokens /
    that group's tokens."""
    values = torch.where(mask, values, torch.zeros_like(values))
    if reduction == "seq_mean":
        return per_sequence_mean(values, mask).sum() / sequence_count(counts, group)
    if reduction == "token_mean":
        return values.sum() / max(float(counts[1 + group]), 1.0)
    raise ValueError(f"Unknown reduction '{reduction}': use seq_mean or token_mean.")


def sequence_sums(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Sum over sequences of each sequence's mean of `values` (for logging per-unit means)."""
    return per_sequence_mean(torch.where(mask, values, torch.zeros_like(values)).detach(), mask).sum().item()


class Sampler(Protocol):
    """Fresh data for the rows of a micro-batch, made from the live student (see training.sources)."""

    def student(self, rows: list[dict]) -> list[dict]: ...

    def speculative(self, rows: list[dict], top_k: int) -> list[dict]: ...


@dataclass
class NoOptions:
    """A method without options of its own."""


@dataclass
class CommonOptions:
    """Options several methods share (config section `method`)."""

    fixed_responses: str = opt("teacher", "Fixed (off-policy) responses of kd, imitkd, gkd and distillm: 'teacher' (sampled once from the teacher) or 'dataset' (the prompt file's response / last assistant message).", choices=("teacher", "dataset"))


class Method:
    """Base class: fixed rows as they are, one sequence per row. Subclasses set the class attributes and
    override what differs."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    #: the method's own options: a dataclass of `opt` fields, flat config keys and flags of section `method`.
    #: Names are unique across all methods: method-specific ones carry the method's prefix (v1_, gkd_, ...).
    Options: ClassVar[type] = NoOptions
    #: place in listings (--method choices, compare's tables); a new method without one comes after these
    rank: ClassVar[int] = 100
    #: runs on vision-language models (the rows carry the prompt's image)
    vision: ClassVar[bool] = False
    #: the paper's ablation variants of the method: name -> option overrides (each a cell of `distillm compare`)
    ablations: ClassVar[dict[str, dict]] = {}
    #: the rows of the ablation's table: (label, variant name or the method's own name)
    ablation_rows: ClassVar[list[tuple[str, str]]] = []
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

    @classmethod
    def config_checks(cls, config) -> list[tuple[bool, str]]:
        """Checks across the method's options, [(ok, message)] (each option's own range is its `opt`)."""
        return []

    @classmethod
    def uses_teacher_rows(cls, config) -> bool:
        """Whether the method trains on the shared teacher responses (a part of its generation budget in
        `distillm compare`)."""
        return cls.uses_fixed_responses and config.method.fixed_responses == "teacher"

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
        rows = batch.first
        mask = batch.mask[rows]
        weights = group_weights(mask, batch.counts, 0, self.reduction)
        loss, values = divergence_loss(batch, self.divergence_name, rows, weights,
                                       weight=self.beta() if self.divergence_name == "jsd" else None,
                                       temperature=self.temperature)
        return loss, {"units": float(batch.n_first), self.divergence_name: sequence_sums(values, mask)}, {}
