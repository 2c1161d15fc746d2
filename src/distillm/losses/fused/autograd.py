"""The engine of the fused losses: chunking, the head matmuls, and the two autograd Functions (per-token
values with an exact backward for any upstream gradient; a weighted sum whose gradient is computed in the
forward). See `losses.fused`."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

class HeadInputs(NamedTuple):
    """What the output head needs: last hidden states [..., H], head weight [V, H] and optional bias [V]."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None


class TopKTeacher(NamedTuple):
    """An approximate teacher: its k most likely tokens' log-probabilities [..., k] and ids [..., k] per
    position. The fused losses rebuild a full distribution from it, a chunk at a time: the k stored log-probs,
    and the tail mass 1 - sum_k p spread evenly over the other V - k tokens (at least the smallest normal
    float, so no token has probability exactly 0). Pass it as `teacher` to any fused divergence."""

    logprobs: Tensor
    indices: Tensor


class ChunkProblem(NamedTuple):
    """Everything the chunk loop needs, flattened: rows [K] are the token indices into the N flat positions."""

    kernel: Callable
    temperature: float
    vocab: int
    chunk_size: int
    rows: Tensor
    n: int
    out_dtype: torch.dtype


def _student_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, idx: Tensor, vocab: int) -> Tensor:
    return F.linear(hidden.index_select(0, idx), weight[:vocab], None if bias is None else bias[:vocab])


def _teacher_logits(teacher: tuple, idx: Tensor, vocab: int) -> Tensor | None:
    """teacher = (logits [N, V_t] or None, hidden [N, H_t] or None, weight or None, bias or None); a top-k
    teacher comes as (None, log-probs [N, k], ids [N, k] (an integer 'weight'), None)."""
    logits, hidden, weight, bias = teacher
    if logits is not None:
        return logits.index_select(0, idx)[:, :vocab]
    if hidden is not None and not weight.is_floating_point():
        return topk_logprobs(hidden.index_select(0, idx), weight.index_select(0, idx), vocab)
    if hidden is not None:
        return _student_logits(hidden, weight, bias, idx, vocab)
    return None


def topk_logprobs(logprobs: Tensor, indices: Tensor, vocab: int) -> Tensor:
    """[C, V] log-probabilities: the top-k ones where given, the tail mass spread evenly over the rest."""
    logprobs = logprobs if logprobs.dtype == torch.float64 else logprobs.float()
    k = logprobs.shape[-1]
    tiny = torch.finfo(logprobs.dtype).tiny
    tail = (1.0 - logprobs.exp().sum(-1)).clamp_min(tiny * max(vocab - k, 1)) / max(vocab - k, 1)
    dense = tail.log().unsqueeze(-1).expand(logprobs.shape[0], vocab).clone()
    return dense.scatter_(1, indices.long(), logprobs)


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
        t = _teacher_logits(teacher, idx, prob.vocab)
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
