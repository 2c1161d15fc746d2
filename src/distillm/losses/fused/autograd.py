"""The engine of the fused losses: chunking, the head matmuls, and the two autograd Functions (per-token
values with an exact backward for any upstream gradient; a weighted sum whose gradient is computed in the
forward). See `losses.fused`."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

TOPK_TAILS = ("uniform", "student", "power")


def resolve_tail(tail: str, divergence: str | None = None) -> str:
    """A top-k teacher's tail treatment, checked ("uniform", "student" or "power"; the same for every divergence: see
    TopKTeacher for the measurements behind that)."""
    if tail not in TOPK_TAILS:
        raise ValueError(f"top-k teacher tail must be one of {', '.join(TOPK_TAILS)}, got {tail!r}")
    return tail


class HeadInputs(NamedTuple):
    """What the output head needs: last hidden states [..., H], head weight [V, H] and optional bias [V]."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None


class TopKTeacher(NamedTuple):
    """An approximate teacher: its k most likely tokens' log-probabilities [..., k] and ids [..., k] per
    position. The fused losses rebuild a full distribution from it, a chunk at a time: the k stored log-probs,
    and the tail mass T = 1 - sum_k p (at least the smallest normal float) over the other V - k tokens, spread

    - tail="student": in proportion to the student's own probabilities there, p_j = T q_j / Q with
      Q = sum_{j not in top-k} q_j, taken as a constant for the gradient. For every divergence here (each term
      is 1-homogeneous in (p_j, q_j)) this gives exactly the value and gradient of the divergence between the
      two distributions coarse-grained to k + 1 outcomes (the top-k tokens and one tail bucket holding T and
      Q): no guess about how the teacher spreads its tail, and the student's own tail shape is left alone.
      Rows whose student puts no mass on the tail (Q = 0) fall back to the even spread;
    - tail="power" (the pipeline's default, --teacher-topk-tail): in proportion to q_j ** g, g per row the
      least-squares slope of log p on log q over the known entries, clamped to [0, 2] (`power_exponents`; g = 0
      is the even spread, g = 1 the student's proportions); the teacher, g included, is a constant for the
      gradient. A heuristic without the bucket form's exactness;
    - tail="uniform" (this class's default): evenly, T / (V - k) each.

    Gradient relative error against the exact teacher at k = 64 (benchmarks/bench_topk_teacher.py,
    SmolLM2-135M, 8 teacher responses; docs/cluster-teacher.md), SKL / SRKL (a = 0.1), uniform, student, power:
    the default int4 student 5.7% / 14%, 1.9% / 6.9%, 1.3% / 2.7%; a 26-layer student 2.0% / 4.9%, 3.7% / 10%,
    1.0% / 2.6%; a distant, untrained 10-layer student 11% / 34%, 7.9% / 17%, 14% / 41% (no tail is accurate
    there).

    Pass it as `teacher` to any fused divergence. The divergences themselves do not read `target`;
    `with_actual_token` turns it into a (k+1)-th known entry first (`methods.base.divergence_loss` does)."""

    logprobs: Tensor
    indices: Tensor
    tail: str = "uniform"
    #: optional log-probs [...] of the actual next token at each position (a vLLM server sends them with the
    #: top-k): `methods.base.token_log_probs` uses them for tokens outside the top-k instead of the tail's share,
    #: and `divergence_loss` adds them as a known entry (`with_actual_token`)
    target: Tensor | None = None


class ChunkProblem(NamedTuple):
    """Everything the chunk loop needs, flattened: rows [K] are the token indices into the N flat positions."""

    kernel: Callable
    temperature: float
    vocab: int
    chunk_size: int
    rows: Tensor
    n: int
    out_dtype: torch.dtype
    topk_tail: str = "student"  # a TopKTeacher's tail treatment (see TopKTeacher)


def _student_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, idx: Tensor, vocab: int) -> Tensor:
    return F.linear(hidden.index_select(0, idx), weight[:vocab], None if bias is None else bias[:vocab])


def _teacher_logits(teacher: tuple, idx: Tensor, vocab: int, student_logits: Tensor | None = None,
                    tail: str = "student") -> Tensor | None:
    """teacher = (logits [N, V_t] or None, hidden [N, H_t] or None, weight or None, bias or None); a top-k
    teacher comes as (None, log-probs [N, k], ids [N, k] (an integer 'weight'), None), its tail spread in
    proportion to `student_logits` (the chunk's [C, V]) when given, else evenly."""
    logits, hidden, weight, bias = teacher
    if logits is not None:
        return logits.index_select(0, idx)[:, :vocab]
    if hidden is not None and not weight.is_floating_point():
        return topk_logprobs(hidden.index_select(0, idx), weight.index_select(0, idx), vocab, student_logits,
                             tail=tail)
    if hidden is not None:
        return _student_logits(hidden, weight, bias, idx, vocab)
    return None


def power_exponents(logprobs: Tensor, log_q_known: Tensor, fallback: float = 1.0, max_power: float = 2.0) -> Tensor:
    """Per row [C], the least-squares slope g of log p on log q over the known entries [C, k] (the teacher's
    log-probs `logprobs`, the student's `log_q_known` of the same tokens; entries where either is -inf are left
    out), clamped to [0, max_power]: the exponent of the "power" tail, p_j proportional to q_j ** g off the known
    tokens. Rows with fewer than two usable entries or no spread in log q get `fallback`."""
    use = torch.isfinite(logprobs) & torch.isfinite(log_q_known)
    n = use.sum(-1, keepdim=True)
    x = torch.where(use, log_q_known, 0.0)
    y = torch.where(use, logprobs, 0.0)
    x = torch.where(use, x - x.sum(-1, keepdim=True) / n.clamp_min(1), 0.0)
    y = torch.where(use, y - y.sum(-1, keepdim=True) / n.clamp_min(1), 0.0)
    sxx = (x * x).sum(-1)
    slope = (x * y).sum(-1) / sxx.clamp_min(torch.finfo(sxx.dtype).tiny)
    ok = (n.squeeze(-1) >= 2) & (sxx > 0)
    return torch.where(ok, slope.clamp(0.0, max_power), torch.full_like(slope, fallback))


def topk_logprobs(logprobs: Tensor, indices: Tensor, vocab: int, student_logits: Tensor | None = None, *,
                  tail: str = "student") -> Tensor:
    """[C, V] log-probabilities: the known ones where given (entries with a negative id are no entry: see
    `with_actual_token`), the tail mass T = 1 - sum of the known p (at least the smallest normal float) on the
    other tokens. With `student_logits` [C, >= V] (q their softmax), spread as `tail` says:
    "student": in proportion to the student's probabilities there (log p_j = log T + log q_j - log Q, Q the
    student's mass off the known tokens); "power": in proportion to q_j ** g, g per row the least-squares slope
    of log p on log q over the known entries, in [0, 2] (`power_exponents`; g = 0 is the even spread, g = 1 the
    student's). Rows where the student has no mass off the known tokens get the even spread, and so does every
    row without `student_logits`: T / (V - known) each. No gradient flows through it."""
    wide = logprobs.dtype == torch.float64 or (student_logits is not None and student_logits.dtype == torch.float64)
    dtype = torch.float64 if wide else torch.float32
    indices = indices.long()
    present = indices >= 0
    logprobs = logprobs.to(dtype).masked_fill(~present, float("-inf"))
    slots = torch.where(present, indices, vocab)  # absent entries go to a spare column, dropped below
    c = logprobs.shape[0]
    rest = (vocab - present.sum(-1)).clamp_min(1).to(dtype)  # tokens off the known ones, per row
    tiny = torch.finfo(dtype).tiny
    log_mass = torch.log(torch.maximum(1.0 - logprobs.exp().sum(-1), tiny * rest))
    uniform = (log_mass - torch.log(rest)).unsqueeze(-1)
    if student_logits is None:
        dense = uniform.expand(c, vocab + 1).clone()
        return dense.scatter_(1, slots, logprobs)[:, :vocab]
    with torch.no_grad():
        log_q = torch.log_softmax(student_logits[:, :vocab].detach().to(dtype), dim=-1)
        top = torch.zeros(c, vocab + 1, dtype=torch.bool, device=log_q.device).scatter_(1, slots, True)[:, :vocab]
        if tail == "power":  # q ** g (a token the student gives probability 0 stays at 0, whatever g)
            known_q = log_q.gather(1, indices.clamp_min(0)).masked_fill(~present, float("-inf"))
            power = power_exponents(logprobs, known_q).unsqueeze(-1)
            log_q = torch.where(torch.isneginf(log_q), log_q, log_q * power)
        log_q_tail = log_q.masked_fill_(top, float("-inf"))
        log_tail = torch.logsumexp(log_q_tail, dim=-1, keepdim=True)  # log Q; -inf where the student has none
        empty = torch.isneginf(log_tail)
        dense = log_q_tail.add_(log_mass.unsqueeze(-1) - log_tail.masked_fill(empty, 0.0))
        dense = torch.cat([torch.where(empty, uniform, dense), uniform], -1)
        return dense.scatter_(1, slots, logprobs)[:, :vocab]


def dense_teacher_logprobs(scores: TopKTeacher, vocab_size: int, student_logits: Tensor | None = None,
                           divergence: str | None = None) -> Tensor:
    """A top-k teacher spelled out in full, [..., V] log-probabilities: its known entries, and the tail spread as
    its `tail` says for `divergence` (evenly, or guided by the `student_logits` for the student / power tails).
    The plain (reference) losses and the served teacher's held-out figures both read a top-k teacher so."""
    lead, k = scores.logprobs.shape[:-1], scores.logprobs.shape[-1]
    tail = resolve_tail(scores.tail, divergence)
    guide = None
    if tail != "uniform" and student_logits is not None:
        guide = student_logits[..., :vocab_size].reshape(-1, vocab_size)
    dense = topk_logprobs(scores.logprobs.reshape(-1, k), scores.indices.reshape(-1, k), vocab_size, guide,
                          tail=tail)
    return dense.reshape(*lead, vocab_size)


def with_actual_token(teacher: TopKTeacher, targets: Tensor) -> TopKTeacher:
    """The top-k teacher with one more known entry per position: the actual next token `targets` [...] (-100:
    none) with its exact log-prob `teacher.target` [...] (a vLLM server sends it beside the top-k), where that
    token is outside the top-k. The result has k + 1 entries per position; the extra one has id -1 (no entry)
    where the token is inside the top-k, masked (-100), or where `teacher.target` is None (then the teacher is
    returned unchanged). The tail (either treatment) then spreads T = 1 - sum_k p - p(actual) over the other
    V - k - 1 tokens: the teacher's probability of a token the student sampled (SRKL's responses) is known
    exactly instead of guessed from the tail. A pure function; `target` is kept."""
    if teacher.target is None:
        return teacher
    values, ids = teacher.logprobs, teacher.indices.long()
    if targets.shape != values.shape[:-1] or teacher.target.shape != targets.shape:
        raise ValueError(f"actual tokens {tuple(targets.shape)} and their log-probs {tuple(teacher.target.shape)} "
                         f"must both be the top-k teacher's leading shape {tuple(values.shape[:-1])}")
    targets = targets.to(ids.device).long()
    inside = (ids == targets.clamp_min(0).unsqueeze(-1)).any(-1)
    extra = (targets >= 0) & ~inside
    extra_ids = torch.where(extra, targets, -1).unsqueeze(-1).to(teacher.indices.dtype)
    own = teacher.target.to(device=values.device, dtype=values.dtype)
    extra_values = torch.where(extra, own, torch.full_like(own, float("-inf"))).unsqueeze(-1)
    return teacher._replace(logprobs=torch.cat([values, extra_values], -1),
                            indices=torch.cat([teacher.indices, extra_ids], -1))


def _chunk_extra(extra: Tensor | float | None, idx: Tensor):
    return extra.index_select(0, idx) if isinstance(extra, Tensor) else extra


def _chunks(prob: ChunkProblem):
    for start in range(0, prob.rows.numel(), prob.chunk_size):
        yield prob.rows[start:start + prob.chunk_size]


def _chunk(prob: ChunkProblem, hidden, weight, bias, teacher, extra, idx: Tensor, need_grad: bool):
    """Values [C] of one chunk of rows and dd/dz [C, V] w.r.t. its student logits (None: not wanted, or d does
    not depend on the student)."""
    with torch.no_grad():
        s = _student_logits(hidden, weight, bias, idx, prob.vocab)
        t = _teacher_logits(teacher, idx, prob.vocab, None if prob.topk_tail == "uniform" else s, prob.topk_tail)
        return prob.kernel(s, t, _chunk_extra(extra, idx), prob.temperature, need_grad)


class _Accumulator:
    """Gradients of the student's hidden states, head weight and bias, summed chunk by chunk."""

    def __init__(self, prob: ChunkProblem, hidden: Tensor, weight: Tensor, bias: Tensor | None, needs: tuple):
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.prob, self.hidden, self.weight = prob, hidden, weight
        self.need_h, self.need_w, self.need_b = needs
        self.grad_h = torch.zeros_like(hidden) if self.need_h else None
        self.grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if self.need_w else None
        self.grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if self.need_b else None

    def add(self, idx: Tensor, grad_logits: Tensor) -> None:
        """grad_logits [C, V]: the loss's gradient w.r.t. the chunk's logits (upstream gradient included)."""
        vocab = self.prob.vocab
        g = grad_logits.to(self.weight.dtype)  # what the plain path's linear layer receives
        if self.need_h:
            self.grad_h.index_copy_(0, idx, g @ self.weight[:vocab])
        if self.need_w:
            h = self.hidden.index_select(0, idx)
            self.grad_w[:vocab].addmm_(g.t().to(self.grad_w.dtype), h.to(self.grad_w.dtype))
        if self.need_b:
            self.grad_b[:vocab] += grad_logits.sum(0).to(self.grad_b.dtype)

    def result(self, bias: Tensor | None):
        grad_w = None if self.grad_w is None else self.grad_w.to(self.weight.dtype)
        grad_b = None if self.grad_b is None else self.grad_b.to(bias.dtype)
        return self.grad_h, grad_w, grad_b


class FusedPerToken(torch.autograd.Function):
    """Per-token values [N] (0 off the rows). When the head weight and bias need a gradient, the backward
    recomputes each chunk's logits. When only the hidden states do (a frozen head), the forward keeps
    dd_n/dh_n [N, H] instead (exact for any upstream gradient, since dL/dh_n = g_n dd_n/dh_n) and nothing is
    recomputed."""

    @staticmethod
    def forward(ctx, prob: ChunkProblem, hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, extra):
        teacher = (t_logits, t_hidden, t_weight, t_bias)
        need_h, need_w, need_b = ctx.needs_input_grad[1:4]
        frozen_head = need_h and not (need_w or need_b)
        out = torch.zeros(prob.n, dtype=prob.out_dtype, device=hidden.device)
        acc = _Accumulator(prob, hidden, weight, bias, (True, False, False)) if frozen_head else None
        for idx in _chunks(prob):
            values, grad = _chunk(prob, hidden, weight, bias, teacher, extra, idx, need_grad=frozen_head)
            out.index_copy_(0, idx, values.to(out.dtype))
            if grad is not None:
                acc.add(idx, grad)
            del values, grad
        ctx.prob = prob
        ctx.extra_scalar = None if isinstance(extra, Tensor) else extra
        ctx.frozen_head = frozen_head
        if frozen_head:
            ctx.save_for_backward(acc.grad_h)
        else:
            ctx.save_for_backward(hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias,
                                  extra if isinstance(extra, Tensor) else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        nothing = (None, None, None, None, None)
        if ctx.frozen_head:
            (dd_dh,) = ctx.saved_tensors
            return (None, dd_dh * grad_out.unsqueeze(-1).to(dd_dh.dtype), None, None, *nothing)
        prob = ctx.prob
        hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, extra = ctx.saved_tensors
        extra = ctx.extra_scalar if extra is None else extra
        teacher = (t_logits, t_hidden, t_weight, t_bias)
        acc = _Accumulator(prob, hidden, weight, bias, ctx.needs_input_grad[1:4])
        for idx in _chunks(prob):
            _, grad = _chunk(prob, hidden, weight, bias, teacher, extra, idx, need_grad=True)
            if grad is not None:
                acc.add(idx, grad.mul_(grad_out.index_select(0, idx).unsqueeze(-1).to(grad.dtype)))
            del grad
        return (None, *acc.result(bias), *nothing)


class FusedWeighted(torch.autograd.Function):
    """L = sum_n w_n d_n with the gradient computed in the forward pass; also returns d (non-differentiable)."""

    @staticmethod
    def forward(ctx, prob: ChunkProblem, token_weights, hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias,
                extra):
        teacher = (t_logits, t_hidden, t_weight, t_bias)
        needs = ctx.needs_input_grad[2:5]
        out = torch.zeros(prob.n, dtype=prob.out_dtype, device=hidden.device)
        acc = _Accumulator(prob, hidden, weight, bias, needs)
        for idx in _chunks(prob):
            values, grad = _chunk(prob, hidden, weight, bias, teacher, extra, idx, need_grad=any(needs))
            out.index_copy_(0, idx, values.to(out.dtype))
            if grad is not None:
                acc.add(idx, grad.mul_(token_weights.index_select(0, idx).unsqueeze(-1).to(grad.dtype)))
            del values, grad
        # 0 * inf would be nan: positions with weight 0 do not enter the sum
        loss = torch.where(token_weights != 0, token_weights.to(out.dtype) * out, 0.0).sum()
        ctx.save_for_backward(*acc.result(bias))
        ctx.mark_non_differentiable(out)
        return loss, out

    @staticmethod
    def backward(ctx, grad_loss, grad_values):
        scaled = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
        return (None, None, *scaled, None, None, None, None, None)
