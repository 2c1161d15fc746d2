"""Cross-tokenizer losses: pure functions of the two models' scores on aligned positions.

Notation: a micro-batch has N sequences; the student's response tokens lie in the last R_s columns of its
left-padded batch, the teacher's (the same texts, in its own tokenization) in the last R_t columns of its batch.
`AlignedGroups` lists, for every group of the byte alignment (`crosstok.align`), its row, its start and end
columns on each side and whether it is 1:1. p_g, q_g are the teacher's and the student's next-token
distributions (temperature tau) at the group's START column: both condition on the same text (the prompt, each
in its own format, plus the response bytes before the group).

Per group g (d_g, placed at the student's start column; every other column holds 0):

- 1:1 group (the spans coincide):
      d_g = D(P_g || Q_g) + lambda * ULD(p_g|unmatched, q_g|unmatched)
  P_g = (p_g(t_1), ..., p_g(t_K), p_g(rest)), Q_g likewise with the student's ids s_k: the distributions on the
  shared vocabulary (`vocab.VocabMap`: teacher id t_k and student id s_k stand for the same bytes) plus one
  bucket holding each side's remaining mass (so P_g, Q_g are distributions and D is any of the divergences of
  `losses.divergences`, skews and mixtures included). The mass outside the shared vocabulary is compared by ULD.
- merged group (one token against several): GOLD-style merge by the chain rule. The multi-token side's
  probability of "first token v, then the group's remaining tokens" is p_g(v) * prod_k p(y_k | ...) (the
  actual continuation within the group); its log is log p_g(v) + c_g with c_g = sum of the continuation's
  log-probs. The two merged vectors index different units, so only ULD compares them:
      d_g = lambda_merge * ULD(p_g * e^{c^T_g}, q_g * e^{c^S_g})
  (c = 0 for a side with one token; gradients flow through q_g and through the student's continuation).
- ULD(a, b) (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation
  Loss", arXiv:2402.12030): both vectors sorted in decreasing order, the shorter padded with zeros,
  sum_i |a_(i) - b_(i)| -- the Wasserstein-1 distance between the sorted probability vectors with unit cost.

With identical tokenizers every group is 1:1, the shared vocabulary is all of it and both buckets and the
ULD term are empty: d_g is exactly D(p_g || q_g), the same-tokenizer loss (tested).

Sequence side (`span_log_probs`): log P(group's bytes) = sum of the log-probs of the side's tokens in the group
(the chain rule), placed at the group's LAST student column; summed over a response it is the log-probability
of the whole response text under that model, so the teacher's and the student's are comparable whatever the
tokenization (DistiLLM-2's curriculum gaps, DPO-style sequence log-probs).

Served teacher (`topk_group_values`, a `TopKTeacher`: top-K log-probs + ids in the TEACHER's vocabulary per
teacher response column, plus each actual token's exact log-prob, as vLLM's prompt_logprobs give them): the
1:1 term is the same divergence on a coarser partition -- the known teacher tokens (top-K + the actual one) that
map to shared student ids, and ONE bucket holding everything else on each side. That partition coarsens the
one above, so by the data-processing inequality the value is a LOWER BOUND of the full-distribution d_g,
equal to it when the known tokens include every shared token (K = V_t) and in general iff p/q is the same on
every token the bucket merges (e.g. a teacher with no mass outside its known shared tokens). ULD terms read the
teacher's known probabilities and take its unknown ones as 0: each is off by at most the unknown mass
R = 1 - sum of the known probabilities (ULD of sorted vectors is 1-Lipschitz in L1), 2R under `uld_top_k` (its
tail entry moves by up to R too). Merged spans' continuations need only the
actual tokens' log-probs, which the server gives exactly; so do the span log-probs (`span_log_probs`).

Memory: only the start positions need full distributions. They are processed a chunk of groups at a time, each
chunk under activation checkpointing (recomputed in the backward): at most one chunk's [C, V_t] + [C, V_s]
logits and their temporaries are alive, never [N, R, V]. The continuation log-probs go through the fused
chunked `fused_token_log_probs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..losses import divergences as plain
from ..losses.divergences import IGNORE_INDEX
from ..losses.fused import HeadInputs, TopKTeacher, fused_token_log_probs, with_actual_token
from .vocab import VocabMap

#: bytes of fp32 logits per chunk of group starts (teacher + student rows), as the fused losses' CHUNK_BYTES
CHUNK_BYTES = 16 * 2**20  # the kernel keeps ~10 temporaries of this size (sort, exp, index_select)

# on the shared-vocabulary log-probs (already at temperature tau); detach: as methods.base.divergence_loss (None:
# the functions' defaults, SKL not detached, SRKL detached)
DIVERGENCES = {
    "fkl": lambda s, t, w, d=None: plain.forward_kl(s, t),
    "rkl": lambda s, t, w, d=None: plain.reverse_kl(s, t),
    "skl": lambda s, t, w, d=None: plain.skew_forward_kl(s, t, w, detach_student_in_mixture=bool(d)),
    "srkl": lambda s, t, w, d=None: plain.skew_reverse_kl(s, t, w, detach_student_in_mixture=d is None or d),
    "jsd": lambda s, t, w, d=None: plain.generalized_jsd(s, t, w),
    "tvd": lambda s, t, w, d=None: plain.total_variation(s, t),
}


class AlignedGroups(NamedTuple):
    """The groups of a micro-batch's alignments, as column indices into the response grids (all [G] long,
    `one_to_one` [G] bool). Columns: [t_start, t_end) on the teacher's R_t columns, [s_start, s_end) on the
    student's R_s columns."""

    row: Tensor
    t_start: Tensor
    t_end: Tensor
    s_start: Tensor
    s_end: Tensor
    one_to_one: Tensor

    def select(self, keep: Tensor) -> "AlignedGroups":
        return AlignedGroups(*(x[keep] for x in self))

    def to(self, device) -> "AlignedGroups":
        return AlignedGroups(*(x.to(device) for x in self))


# ----------------------------------------------------------------------------------------------- pure functions


#: ULD in training compares each side's ULD_TOP_K largest probabilities (see `uld_distance`): a full sort of
#: 216k unmatched Gemma probabilities per position costs more than the teacher's head matmul on a CPU
ULD_TOP_K = 1024


def uld_distance(a: Tensor, b: Tensor, top_k: int | None = None) -> Tensor:
    """ULD: sum_i |a_(i) - b_(i)| of the two probability vectors [M, A], [M, B] sorted in decreasing order, the
    shorter padded with zeros (a_(i), b_(i): i-th largest). [M]; differentiable in both.

    `top_k`: only each side's k largest are sorted and compared, and the remaining masses (the tails) are
    compared as one entry, |sum of a's tail - sum of b's tail| (a lower bound of the exact value, off by at most
    the two tails' masses; exact when both vectors have at most k entries)."""
    if top_k is not None and max(a.shape[-1], b.shape[-1]) > top_k:
        a_top = a.topk(min(top_k, a.shape[-1]), dim=-1).values
        b_top = b.topk(min(top_k, b.shape[-1]), dim=-1).values
        tails = (a.sum(-1) - a_top.sum(-1)) - (b.sum(-1) - b_top.sum(-1))
        return uld_distance(a_top, b_top) + tails.abs()
    a = a.sort(dim=-1, descending=True).values
    b = b.sort(dim=-1, descending=True).values
    n = min(a.shape[-1], b.shape[-1])
    out = (a[..., :n] - b[..., :n]).abs().sum(-1)
    return out + a[..., n:].sum(-1) + b[..., n:].sum(-1)


def shared_log_probs(log_probs: Tensor, ids: Tensor, unmatched: Tensor) -> Tensor:
    """[M, K + 1]: the log-probs of the shared ids, then log of the remaining (unmatched) mass (-inf if none)."""
    rest = (torch.logsumexp(log_probs.index_select(-1, unmatched), -1) if unmatched.numel()
            else torch.full(log_probs.shape[:-1], float("-inf"), dtype=log_probs.dtype, device=log_probs.device))
    return torch.cat([log_probs.index_select(-1, ids), rest.unsqueeze(-1)], -1)


def group_values(name: str, student_logits: Tensor, teacher_logits: Tensor, one_to_one: Tensor, s_cont: Tensor,
                 t_cont: Tensor, vmap: VocabMap, *, weight: float | Tensor | None = None, temperature: float = 1.0,
                 uld_weight: float = 1.0, merge_weight: float = 1.0,
                 detach_student_in_mixture: bool | None = None, uld_top_k: int | None = None) -> Tensor:
    """d_g of the module docstring for M groups: `student_logits` [M, V_s] and `teacher_logits` [M, V_t] at the
    groups' start positions, `one_to_one` [M], continuation log-probs `s_cont`, `t_cont` [M] (0 for 1:1
    groups), `weight`: a of skl/srkl, b of jsd (float or [M]). Differentiable in the student's inputs."""
    if name not in DIVERGENCES:
        raise ValueError(f"Unknown divergence '{name}' across tokenizers: use {', '.join(DIVERGENCES)}.")
    s_lp = plain._log_probs(student_logits[..., :vmap.student_size], temperature)
    t_lp = plain._log_probs(teacher_logits[..., :vmap.teacher_size], temperature).detach()
    t_ids, s_ids = vmap.teacher_ids.to(s_lp.device), vmap.student_ids.to(s_lp.device)
    t_un, s_un = vmap.unmatched("teacher").to(s_lp.device), vmap.unmatched("student").to(s_lp.device)
    if weight is None:
        weight = 0.5 if name == "jsd" else 0.1
    out = torch.zeros(s_lp.shape[0], dtype=s_lp.dtype, device=s_lp.device)
    one = one_to_one.nonzero().squeeze(-1)
    if one.numel():
        w = weight.index_select(0, one) if isinstance(weight, Tensor) and weight.dim() == 1 else weight
        s_one, t_one = s_lp.index_select(0, one), t_lp.index_select(0, one)
        values = DIVERGENCES[name](shared_log_probs(s_one, s_ids, s_un), shared_log_probs(t_one, t_ids, t_un), w,
                                   detach_student_in_mixture)
        if t_un.numel() or s_un.numel():
            values = values + uld_weight * uld_distance(t_one.index_select(-1, t_un).exp(),
                                                        s_one.index_select(-1, s_un).exp(), uld_top_k)
        out = out.index_put((one,), values.to(out.dtype))
    many = (~one_to_one).nonzero().squeeze(-1)
    if many.numel():
        merged = uld_distance((t_lp.index_select(0, many) + t_cont.detach().index_select(0, many).unsqueeze(-1)).exp(),
                              (s_lp.index_select(0, many) + s_cont.index_select(0, many).unsqueeze(-1)).exp(),
                              uld_top_k)
        out = out.index_put((many,), (merge_weight * merged).to(out.dtype))
    return out


def _teacher_to_student(vmap: VocabMap, device) -> Tensor:
    """[V_t] long: the student id of each teacher id in the shared vocabulary, -1 for the others."""
    table = torch.full((vmap.teacher_size,), -1, dtype=torch.long, device=device)
    return table.index_put_((vmap.teacher_ids.to(device),), vmap.student_ids.to(device))


def topk_group_values(name: str, student_logits: Tensor, teacher_logprobs: Tensor, teacher_ids: Tensor,
                      one_to_one: Tensor, s_cont: Tensor, t_cont: Tensor, vmap: VocabMap, *,
                      weight: float | Tensor | None = None, temperature: float = 1.0, uld_weight: float = 1.0,
                      merge_weight: float = 1.0, detach_student_in_mixture: bool | None = None,
                      uld_top_k: int | None = None) -> Tensor:
    """d_g of `group_values` for M groups whose teacher is known only on some tokens (a served teacher's top-K
    and the actual token): `teacher_logprobs` [M, W] (temperature 1) of the teacher ids `teacher_ids` [M, W]
    (-1: no entry; ids unique per row), the student's `student_logits` [M, V_s].

    1:1 groups: D(P || Q) on the coarse-grained outcomes: the known teacher ids t that are in the shared
    vocabulary (each with p(t), and q(s(t)) for its student id s(t)), then one bucket: the teacher's
    1 - sum of those p (at least the smallest normal float: a top-K that rounds to 1 leaves its bucket > 0),
    the student's exact remaining mass (a logsumexp of its other log-probs). Where the student's bucket is empty
    and the teacher's is within the rounding of its sum (W * eps of its dtype), both are left out. A lower bound
    of `group_values`' D term (data-processing inequality), equal to it when every shared teacher id is known.
    Plus uld_weight * ULD(teacher's unmatched probabilities, the unknown ones as 0; the student's unmatched).
    Merged groups: merge_weight * ULD(p * e^{c^T}, q * e^{c^S}), the teacher's unknown p as 0.
    Each ULD term is off the full-distribution one by at most the teacher's unknown mass R (1 - sum of its known
    p; 2R under `uld_top_k`). Differentiable in the student's inputs; the teacher is a constant."""
    if name not in DIVERGENCES:
        raise ValueError(f"Unknown divergence '{name}' across tokenizers: use {', '.join(DIVERGENCES)}.")
    if temperature != 1.0:
        raise ValueError(f"a top-k teacher's log-probs are at temperature 1; the coarse-grained cross-tokenizer loss "
                         f"cannot rescale them to temperature {temperature} (its bucket's tempered mass is unknown)")
    s_lp = plain._log_probs(student_logits[..., :vmap.student_size], temperature)
    device, dtype = s_lp.device, s_lp.dtype
    ids = teacher_ids.to(device).long()
    present = ids >= 0
    t_lp = teacher_logprobs.detach().to(device=device, dtype=dtype).masked_fill(~present, float("-inf"))
    s_of = _teacher_to_student(vmap, device)[ids.clamp_min(0)].masked_fill(~present, -1)
    shared = s_of >= 0
    # the teacher's probabilities over its whole vocabulary, its unknown ones as 0 (a spare column for no entry)
    slots = torch.where(present, ids, vmap.teacher_size)
    t_dense = torch.zeros(ids.shape[0], vmap.teacher_size + 1, dtype=dtype, device=device)
    t_dense = t_dense.scatter(1, slots, t_lp.exp())[:, :vmap.teacher_size]
    if weight is None:
        weight = 0.5 if name == "jsd" else 0.1
    out = torch.zeros(s_lp.shape[0], dtype=dtype, device=device)
    one = one_to_one.to(device).nonzero().squeeze(-1)
    if one.numel():
        w = weight.index_select(0, one) if isinstance(weight, Tensor) and weight.dim() == 1 else weight
        s_one, t_one, s_ids, keep = (x.index_select(0, one) for x in (s_lp, t_lp, s_of, shared))
        t_known = torch.where(keep, t_one, float("-inf"))
        s_known = torch.where(keep, s_one.gather(1, s_ids.clamp_min(0)), float("-inf"))
        # teacher's bucket: 1 - sum of its known shared p, summed in float64
        mass = 1.0 - t_known.double().exp().sum(-1)
        rounding = keep.sum(-1).clamp_min(1).double() * torch.finfo(teacher_logprobs.dtype).eps
        t_bucket = torch.log(mass.clamp_min(torch.finfo(dtype).tiny)).to(dtype)
        spare = s_one.shape[-1]  # no entry: a spare column, dropped
        taken = torch.zeros(s_one.shape[0], spare + 1, dtype=torch.bool, device=device)
        taken = taken.scatter(1, torch.where(keep, s_ids, spare), True)[:, :spare]
        s_bucket = torch.logsumexp(s_one.masked_fill(taken, float("-inf")), -1)
        empty = torch.isneginf(s_bucket) & (mass <= rounding)
        t_bucket = t_bucket.masked_fill(empty, float("-inf"))
        values = DIVERGENCES[name](torch.cat([s_known, s_bucket.unsqueeze(-1)], -1),
                                   torch.cat([t_known, t_bucket.unsqueeze(-1)], -1), w, detach_student_in_mixture)
        t_un, s_un = vmap.unmatched("teacher").to(device), vmap.unmatched("student").to(device)
        if t_un.numel() or s_un.numel():
            values = values + uld_weight * uld_distance(t_dense.index_select(0, one).index_select(-1, t_un),
                                                        s_one.index_select(-1, s_un).exp(), uld_top_k)
        out = out.index_put((one,), values.to(out.dtype))
    many = (~one_to_one.to(device)).nonzero().squeeze(-1)
    if many.numel():
        t_part = t_dense.index_select(0, many) * t_cont.detach().to(dtype).index_select(0, many).exp().unsqueeze(-1)
        merged = uld_distance(t_part, (s_lp.index_select(0, many) + s_cont.index_select(0, many).unsqueeze(-1)).exp(),
                              uld_top_k)
        out = out.index_put((many,), (merge_weight * merged).to(out.dtype))
    return out


def span_log_probs(token_log_probs: Tensor, start: Tensor, end: Tensor, row: Tensor) -> Tensor:
    """sum of `token_log_probs` [N, R] over columns [start, end) of `row`, per group [G] (the chain rule)."""
    csum = F.pad(token_log_probs.cumsum(-1), (1, 0))
    return csum[row, end] - csum[row, start]


# ----------------------------------------------------------------------------------------------- scores


def _head_rows(scores, row: Tensor, col: Tensor) -> Tensor:
    """Logits [M, V] at (row, col) of scores given as HeadInputs or full logits [N, R, V]."""
    if isinstance(scores, HeadInputs):
        hidden = scores.hidden[row, col]
        return F.linear(hidden, scores.weight, scores.bias)
    return scores[row, col]


def token_log_probs(scores, targets: Tensor, *, temperature: float = 1.0, vocab_size: int | None = None,
                    chunk_size: int | None = None) -> Tensor:
    """log-prob of each target [N, R] (0 off the mask): fused and chunked for HeadInputs, plain for logits, the
    exact actual-token log-probs of a served `TopKTeacher` (`target`, temperature 1 only)."""
    if isinstance(scores, TopKTeacher):
        _check_topk(scores, temperature)
        return torch.where(targets != IGNORE_INDEX, scores.target.to(targets.device).float(), 0.0)
    if isinstance(scores, HeadInputs):
        return fused_token_log_probs(scores, targets, temperature=temperature, vocab_size=vocab_size,
                                     chunk_size=chunk_size)
    logits = scores if vocab_size is None else scores[..., :vocab_size]
    return plain.token_log_probs(logits, targets, temperature=temperature)


def _check_topk(scores: TopKTeacher, temperature: float) -> None:
    if scores.target is None:
        raise ValueError("a top-k teacher across tokenizers needs the actual tokens' log-probs (TopKTeacher.target, "
                         "which a vLLM server sends): merged spans and span log-probs are built from them")
    if temperature != 1.0:
        raise ValueError(f"a top-k teacher's log-probs are at temperature 1; the cross-tokenizer loss cannot rescale "
                         f"them to temperature {temperature}")


def default_chunk(vmap: VocabMap) -> int:
    return max(1, CHUNK_BYTES // (4 * (vmap.teacher_size + vmap.student_size)))


def aligned_divergence(name: str, student, teacher, student_targets: Tensor, teacher_targets: Tensor,
                       groups: AlignedGroups, vmap: VocabMap, *, weight: float | Tensor | None = None,
                       temperature: float = 1.0, uld_weight: float = 1.0, merge_weight: float = 1.0,
                       chunk_size: int | None = None, detach_student_in_mixture: bool | None = None,
                       uld_top_k: int | None = ULD_TOP_K) -> Tensor:
    """Per-student-column values [N, R_s]: d_g at each group's start column, 0 elsewhere. `student`, `teacher`:
    HeadInputs (hidden [N, R, H] + head) or logits [N, R, V]; targets [N, R] (-100 off the response).
    `weight` may be per row ([N]). Chunks of groups are checkpointed (see the module docstring). `teacher` may
    also be a served teacher's `TopKTeacher` [N, R_t, k] with its actual tokens' log-probs (`topk_group_values`:
    the coarse-grained form, a lower bound; temperature 1 only)."""
    n, r_s = student_targets.shape
    topk = isinstance(teacher, TopKTeacher)
    if topk:  # the actual token at each start column becomes a known entry (its exact log-prob)
        _check_topk(teacher, temperature)
        teacher = with_actual_token(teacher, teacher_targets.to(teacher.logprobs.device))
    device = student_targets.device
    out = torch.zeros(n, r_s, dtype=torch.float32, device=device)
    if groups.row.numel() == 0:
        return out + 0.0 * _touch(student)
    # continuation log-probs: only the tokens after a group's first one are scored (none for 1:1 groups)
    # (chunks sized like the group chunks: the fused default, 64 MiB of logits, is 64 rows at V = 262k)
    s_chunk = chunk_size or max(1, CHUNK_BYTES // (4 * vmap.student_size))
    t_chunk = chunk_size or max(1, CHUNK_BYTES // (4 * vmap.teacher_size))
    s_tok = token_log_probs(student, _continuations(student_targets, groups.row, groups.s_start, groups.s_end),
                            temperature=temperature, vocab_size=vmap.student_size, chunk_size=s_chunk)
    with torch.no_grad():
        t_tok = token_log_probs(teacher, _continuations(teacher_targets, groups.row, groups.t_start, groups.t_end),
                                temperature=temperature, vocab_size=vmap.teacher_size, chunk_size=t_chunk)
    s_cont = span_log_probs(s_tok, groups.s_start + 1, groups.s_end, groups.row)
    t_cont = span_log_probs(t_tok, groups.t_start + 1, groups.t_end, groups.row)
    w_rows = weight[groups.row] if isinstance(weight, Tensor) and weight.dim() == 1 else weight
    size = chunk_size or default_chunk(vmap)
    values = []
    for start in range(0, groups.row.numel(), size):
        sl = slice(start, start + size)
        w = w_rows[sl] if isinstance(w_rows, Tensor) and w_rows.dim() == 1 else w_rows

        def chunk(s_logits_src, cont, sl=sl, w=w):
            # the teacher's rows are formed here, so a checkpointed chunk keeps none of them for the backward
            # (it recomputes them): only the chunk being computed holds [C, V_t] logits
            s_logits = _head_rows(s_logits_src, groups.row[sl], groups.s_start[sl]) \
                if isinstance(s_logits_src, HeadInputs) else s_logits_src
            if topk:
                at = (groups.row[sl], groups.t_start[sl])
                return topk_group_values(name, s_logits, teacher.logprobs[at], teacher.indices[at],
                                         groups.one_to_one[sl], cont, t_cont[sl], vmap, weight=w,
                                         temperature=temperature, uld_weight=uld_weight, merge_weight=merge_weight,
                                         detach_student_in_mixture=detach_student_in_mixture, uld_top_k=uld_top_k)
            with torch.no_grad():
                t_logits = _head_rows(teacher, groups.row[sl], groups.t_start[sl]).float()
            return group_values(name, s_logits, t_logits, groups.one_to_one[sl], cont, t_cont[sl], vmap, weight=w,
                                temperature=temperature, uld_weight=uld_weight, merge_weight=merge_weight,
                                detach_student_in_mixture=detach_student_in_mixture, uld_top_k=uld_top_k)

        if isinstance(student, HeadInputs):
            src = HeadInputs(student.hidden, student.weight, student.bias)
            if torch.is_grad_enabled() and (student.hidden.requires_grad or student.weight.requires_grad):
                values.append(checkpoint(lambda h, w_, b_, c, f=chunk: f(HeadInputs(h, w_, b_), c), src.hidden,
                                         src.weight, src.bias, s_cont[sl], use_reentrant=False))
            else:
                values.append(chunk(src, s_cont[sl]))
        else:
            values.append(chunk(student[groups.row[sl], groups.s_start[sl]], s_cont[sl]))
    return out.index_put((groups.row, groups.s_start), torch.cat(values).float())


def _continuations(targets: Tensor, row: Tensor, start: Tensor, end: Tensor) -> Tensor:
    """`targets` kept at the columns start+1 .. end-1 of each group, -100 elsewhere."""
    lens = (end - start - 1).clamp_min(0)
    out = torch.full_like(targets, IGNORE_INDEX)
    total = int(lens.sum())
    if total:
        gi = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens)
        first = torch.cumsum(lens, 0) - lens
        cols = start[gi] + 1 + torch.arange(total, device=lens.device) - first[gi]
        out[row[gi], cols] = targets[row[gi], cols]
    return out


def _touch(scores) -> Tensor:
    """A zero that depends on the student's inputs (so an empty alignment still yields a graph)."""
    if isinstance(scores, HeadInputs):
        return scores.hidden.sum() * 0.0
    return scores.sum() * 0.0


def aligned_span_log_probs(scores, targets: Tensor, groups: AlignedGroups, side: str, student_shape,
                           *, temperature: float = 1.0, vocab_size: int | None = None,
                           chunk_size: int | None = None) -> Tensor:
    """[N, R_s]: each group's log-probability under `side`'s model (sum over its tokens in the group), at the
    group's last student column; 0 elsewhere. Differentiable for the student."""
    tok = token_log_probs(scores, targets, temperature=temperature, vocab_size=vocab_size, chunk_size=chunk_size)
    start, end = (groups.t_start, groups.t_end) if side == "teacher" else (groups.s_start, groups.s_end)
    spans = span_log_probs(tok, start, end, groups.row)
    out = torch.zeros(student_shape, dtype=spans.dtype, device=spans.device)
    return out.index_put((groups.row, groups.s_end - 1), spans)


@dataclass
class CrossTeacher:
    """The teacher's scores in cross-tokenizer mode, as a method's loss receives them (`LossInputs.teacher`):
    its scores over ITS response columns, its targets, the alignment groups of the micro-batch (rows index
    the whole batch) and the vocabulary map. `methods.base.divergence_loss` / `token_log_probs` hand it to
    `cross_divergence_loss` / `cross_token_log_probs`."""

    scores: object  # HeadInputs, logits [N, R_t, V_t], or a served teacher's TopKTeacher [N, R_t, k]
    targets: Tensor
    groups: AlignedGroups
    vmap: VocabMap
    uld_weight: float = 1.0
    merge_weight: float = 1.0

    def rows(self, rows: slice) -> "CrossTeacher":
        start = rows.start or 0
        stop = self.targets.shape[0] if rows.stop is None else rows.stop
        keep = (self.groups.row >= start) & (self.groups.row < stop)
        g = self.groups.select(keep)
        g = g._replace(row=g.row - start)
        scores = self.scores
        if isinstance(scores, HeadInputs):
            scores = HeadInputs(scores.hidden[start:stop], scores.weight, scores.bias)
        elif isinstance(scores, TopKTeacher):
            scores = scores._replace(logprobs=scores.logprobs[start:stop], indices=scores.indices[start:stop],
                                     target=None if scores.target is None else scores.target[start:stop])
        else:
            scores = scores[start:stop]
        return CrossTeacher(scores, self.targets[start:stop], g, self.vmap, self.uld_weight, self.merge_weight)


def cross_divergence_loss(student, teacher: CrossTeacher, student_targets: Tensor, token_weights: Tensor, name: str,
                          *, weight=None, temperature: float = 1.0, chunk_size: int | None = None,
                          detach_student_in_mixture: bool | None = None) -> tuple[Tensor, Tensor]:
    """(L, d) as `methods.base.divergence_loss`: L = sum w * d over the student's columns, d [n, R_s] detached."""
    values = aligned_divergence(name, student, teacher.scores, student_targets, teacher.targets, teacher.groups,
                                teacher.vmap, weight=weight, temperature=temperature, uld_weight=teacher.uld_weight,
                                merge_weight=teacher.merge_weight, chunk_size=chunk_size,
                                detach_student_in_mixture=detach_student_in_mixture)
    mask = student_targets != IGNORE_INDEX
    keep = mask & (token_weights != 0)
    loss = torch.where(keep, token_weights.to(values.dtype) * values, torch.zeros_like(values)).sum()
    return loss, torch.where(mask, values, torch.zeros_like(values)).detach()
