"""Fused, chunked distillation losses: the divergences of `divergences.py` computed from last hidden states and
output-head weights, a chunk of tokens at a time, so that no more than one chunk's logits per model is alive.

With h_n the student's last hidden state of response token n, W [V, H] its output head (b its bias) and the
teacher's logits z^T_n either given or computed the same way from the teacher's hidden state and head:

    z^S_n = W h_n + b,   q_n = softmax(z^S_n / tau),   p_n = softmax(z^T_n / tau)
    d_n   = D(p_n, q_n)                       (D: FKL, RKL, SKL_a, SRKL_a, JSD_b, TVD, acceptance; see divergences)

The full [N, V] logits are never built. The tokens are split into chunks of C rows; for each chunk the C x V
student and teacher logits are formed, the chunk's values and their gradient w.r.t. the student logits are
computed in closed form (the kernels below; one pass of a few elementwise ops instead of autograd through the
plain functions, which is several times slower on CPU), and the chunk's logits are freed. With g_n the upstream
gradient of d_n and G_n = g_n dd_n/dz^S_n (a [V] row):

    dL/dh_n = G_n W,    dL/dW = sum_n G_n^T h_n,    dL/db = sum_n G_n

The conventions are those of `divergences.py` (true KLs with the entropy term, 0 log 0 = 0, -inf logits as exact
zeros, a = 0 / b = 0 / b = 1 end points, a and b constants for the gradient), and the tests check every value
and gradient against the plain functions on full logits.

Two entry points share this machinery:

- `fused_divergence` (and the named wrappers `fused_forward_kl`, ...) returns the per-token values [...] with a
  backward that is exact for *any* upstream gradient (per-token weights, per-sequence means, anything). Its
  backward recomputes each chunk's logits (one more head matmul per model than the plain path); with a frozen
  head (only the hidden states need a gradient) the forward keeps dd_n/dh_n [N, H] instead.
- `fused_weighted_divergence` takes the per-token weights w_n up front and returns L = sum_n w_n d_n (plus the
  per-token values, detached). It computes the gradient during the forward pass, chunk by chunk, and keeps only
  dL/dh [N, H], dL/dW [V, H], dL/db [V]; the backward scales them. No recomputation: use it for training,
  where the weights (1 / tokens of the sequence / sequences, loss coefficients) are known before the backward.

`fused_token_log_probs` gives log q(y_n) of given target ids the same way (NLL/SFT, the curriculum gaps of
DistiLLM-2, DPO-style sequence log-probs). `fused_inputs` turns a transformers causal LM and a batch into the
hidden states of the response positions and the head.

Memory: the forward and the backward hold at most one chunk's student and teacher logits and the kernel's
temporaries on them (a small multiple of C x V); what is saved for the backward is the inputs
themselves (hidden states, head weights, teacher logits if those were given), or, for the weighted form, the
gradients [N, H] and [V, H]. Nothing of size N x V is saved or created.

Precision: the head matmul runs in the inputs' dtype (like the model's lm_head); the divergence upcasts to
float32 as the plain functions do. Head-weight gradients are accumulated over chunks in float32 (float64 for
float64 inputs) and cast to the weight's dtype at the end. The teacher side never gets a gradient (its inputs
are used as constants), nor do a and b.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .divergences import IGNORE_INDEX

__all__ = [
    "DIVERGENCES", "HeadInputs", "TopKTeacher", "FusedBatch", "default_chunk_size", "fused_divergence", "fused_weighted_divergence",
    "fused_forward_kl", "fused_reverse_kl", "fused_skew_forward_kl", "fused_skew_reverse_kl",
    "fused_generalized_jsd", "fused_total_variation", "fused_acceptance_rate", "fused_token_log_probs",
    "fused_inputs", "topk_logprobs",
]

TOPK_TAILS = ("uniform", "student")


def resolve_tail(tail: str, divergence: str | None = None) -> str:
    """A top-k teacher's tail treatment, checked ("uniform" or "student"; the same for every divergence: see
    TopKTeacher for the measurements behind that)."""
    if tail not in TOPK_TAILS:
        raise ValueError(f"top-k teacher tail must be one of {', '.join(TOPK_TAILS)}, got {tail!r}")
    return tail


DIVERGENCES = ("fkl", "rkl", "skl", "srkl", "jsd", "tvd", "acceptance")
# A chunk's student logits take about this many bytes (fp32); the kernels hold several such temporaries. Tuned on
# a 2-core CPU (benchmarks/bench_loss.py): 110 tokens at V = 151,936 and 341 at V = 49,152; bigger chunks were
# at most ~10-15% faster and proportionally bigger.
CHUNK_BYTES = 64 * 2**20


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
    - tail="uniform" (the default): evenly, T / (V - k) each.

    Which is closer to the exact teacher depends on the student, not on the divergence (benchmarks/
    bench_topk_teacher.py, SmolLM2-135M, k = 64; docs/cluster-teacher.md): for a student close to the teacher
    (26 of its 30 layers) the even spread gives the smaller gradient error for FKL, SKL and SRKL (SKL 2.6% vs
    4.8%, SRKL 6.0% vs 14.6%); for a distant one (10 layers, 99% of its mass off the teacher's top-64) the
    student's proportions do (SKL 12% vs 16%, SRKL 25% vs 41%), though neither is accurate there.

    Pass it as `teacher` to any fused divergence (the divergences do not use `target`)."""

    logprobs: Tensor
    indices: Tensor
    tail: str = "uniform"
    #: optional log-probs [...] of the actual next token at each position (a vLLM server sends them with the
    #: top-k): `methods.base.token_log_probs` uses them for tokens outside the top-k instead of the tail's share
    target: Tensor | None = None


class FusedBatch(NamedTuple):
    """`fused_inputs`' result: the head inputs of the response positions ([B, R, H]), the target ids there
    ([B, R], -100 where a row's response is shorter) and the mask of real response tokens ([B, R])."""

    head: HeadInputs
    labels: Tensor
    mask: Tensor


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about CHUNK_BYTES (at least 1 token)."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


# ------------------------------------------------------------------------------------------ per-chunk kernels
# Each kernel takes the chunk's log-probabilities log p, log q [C, V] (float32 or float64) and the chunk's weight
# (a, b: a float or a [C, 1] column) and returns the values [C] and r = dd/d(log q) [C, V] (None when d does not
# depend on the student, or when no gradient is wanted), taking log q as free coordinates. The chain rule
# through log q = s - logsumexp(s), s = z / tau, then gives dd/dz = (r - q sum_v r) / tau (`_logits_grad`).
# r, worked out per divergence (m the mixture, terms with a zero weight in front are 0):
#   FKL   r = -p                           RKL   r = q (log q - log p + 1)
#   SKL   r = -p (1 - a) q / m1            SRKL  r = q (log q - log m2 + 1) [- a q^2 / m2 if q is not detached]
#   JSD   r = (1 - b) q (log q - log m)    (the terms through m cancel: b p + (1 - b) q = m)
#   TVD   r = 0.5 sign(q - p) q            acceptance  r = q [q < p] (+ q / 2 where q = p, as torch.minimum)
# Values follow divergences.py: 0 log 0 = 0, a zero of the second argument under a positive first gives +inf.
# Such a +inf term is a constant for the gradient (r = 0 there, `_constant_infinite`), as in divergences._kl.

def _terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """a (log a - log b) elementwise, 0 where a = 0."""
    a = log_a.exp()
    return (a * (log_a - log_b)).masked_fill_(a == 0, 0.0)


def _log_weight(w, like: Tensor) -> tuple[Tensor, Tensor]:
    """log w and log(1 - w) for a float or a [C] weight, shaped to broadcast against [C, V]."""
    w = torch.as_tensor(w, dtype=like.dtype, device=like.device)
    if w.dim() == 1:
        w = w.unsqueeze(-1)
    return torch.log(w), torch.log1p(-w)


def _constant_infinite(values: Tensor, r: Tensor | None, log_a: Tensor, log_b: Tensor) -> Tensor | None:
    """r with 0 at the entries whose term a log(a / b) is +inf (a > 0, b = 0): such a term is a constant, as in
    divergences._kl, so it gives no gradient (and no inf/NaN that an upstream 0 would turn into NaN). Only rows
    whose value is +inf are looked at (none, in the usual case: one check on [C])."""
    if r is None or bool(torch.isfinite(values).all()):
        return r
    infinite = ~torch.isneginf(log_a) & torch.isneginf(log_b)
    return r.masked_fill_(infinite, 0.0)


def _fkl(log_p, log_q, w, detach, need_grad):
    values = _terms(log_p, log_q).sum(-1)
    return values, _constant_infinite(values, -log_p.exp() if need_grad else None, log_p, log_q)


def _rkl(log_p, log_q, w, detach, need_grad):
    terms = _terms(log_q, log_p)
    values = terms.sum(-1)
    return values, _constant_infinite(values, terms.add_(log_q.exp()) if need_grad else None, log_q, log_p)


def _skl(log_p, log_q, w, detach, need_grad):
    log_a, log_1ma = _log_weight(w, log_p)
    log_m = torch.logaddexp(log_a + log_p, log_1ma + log_q)
    values = _terms(log_p, log_m).sum(-1)
    if detach or not need_grad:
        return values, None
    p = log_p.exp()
    r = (log_1ma + log_q - log_m).exp_().mul_(p).neg_()
    return values, _constant_infinite(values, r.masked_fill_(p == 0, 0.0), log_p, log_m)


def _srkl(log_p, log_q, w, detach, need_grad):
    log_a, log_1ma = _log_weight(w, log_p)
    log_m = torch.logaddexp(log_1ma + log_p, log_a + log_q)
    terms = _terms(log_q, log_m)
    values = terms.sum(-1)
    if not need_grad:
        return values, None
    q = log_q.exp()
    r = terms.add_(q)
    if not detach:
        r.sub_((log_a + log_q - log_m).exp_().mul_(q).masked_fill_(q == 0, 0.0))
    return values, _constant_infinite(values, r, log_q, log_m)


def _jsd_mix(log_p, log_q, b, need_grad):
    log_b, log_1mb = _log_weight(b, log_p)
    log_m = torch.logaddexp(log_b + log_p, log_1mb + log_q)
    b = torch.as_tensor(b, dtype=log_p.dtype, device=log_p.device)
    terms_q = _terms(log_q, log_m)
    values = b * _terms(log_p, log_m).sum(-1) + (1 - b) * terms_q.sum(-1)
    if not need_grad:
        return values, None
    return values, terms_q.mul_(1 - b if b.dim() == 0 else (1 - b).unsqueeze(-1))


def _jsd(log_p, log_q, w, detach, need_grad):
    """b = 0 is FKL and b = 1 is RKL (per row when b is a column), as generalized_jsd defines them."""
    if not isinstance(w, Tensor):
        if w == 0:
            return _fkl(log_p, log_q, w, detach, need_grad)
        if w == 1:
            return _rkl(log_p, log_q, w, detach, need_grad)
        return _jsd_mix(log_p, log_q, w, need_grad)
    is_fkl, is_rkl = w == 0, w == 1
    values, r = _jsd_mix(log_p, log_q, torch.where(is_fkl | is_rkl, 0.5, w), need_grad)
    for rows, kernel in ((is_fkl, _fkl), (is_rkl, _rkl)):
        if bool(rows.any()):
            rows = rows.nonzero().squeeze(1)
            v_end, r_end = kernel(log_p[rows], log_q[rows], None, detach, need_grad)
            values[rows] = v_end
            if need_grad:
                r[rows] = r_end
    return values, r


def _tvd(log_p, log_q, w, detach, need_grad):
    p, q = log_p.exp(), log_q.exp()
    diff = q - p
    values = diff.abs().sum(-1).mul_(0.5)
    return values, (diff.sign_().mul_(q).mul_(0.5) if need_grad else None)


def _acceptance(log_p, log_q, w, detach, need_grad):
    p, q = log_p.exp(), log_q.exp()
    values = torch.minimum(p, q).sum(-1)
    if not need_grad:
        return values, None
    share = (q < p).to(q.dtype).add_((q == p).to(q.dtype), alpha=0.5)
    return values, share.mul_(q)


KERNELS = {"fkl": _fkl, "rkl": _rkl, "skl": _skl, "srkl": _srkl, "jsd": _jsd, "tvd": _tvd,
           "acceptance": _acceptance}


def _log_softmax(logits: Tensor, tau: float) -> Tensor:
    z = logits if logits.dtype == torch.float64 else logits.float()
    return torch.log_softmax(z / tau if tau != 1.0 else z, dim=-1)


def _logits_grad(r: Tensor, log_q: Tensor, tau: float) -> Tensor:
    """dd/dz = (r - q sum_v r) / tau, in place on r."""
    r.addcmul_(log_q.exp(), r.sum(-1, keepdim=True), value=-1.0)
    return r.div_(tau) if tau != 1.0 else r


def _divergence_kernel(divergence: str, detach_student_in_mixture: bool | None) -> Callable:
    """(student_logits [C, V], teacher_logits [C, V], weight, tau, need_grad) -> (values [C], dd/dz or None)."""
    if divergence not in KERNELS:
        raise ValueError(f"unknown divergence {divergence!r}; valid options: {', '.join(DIVERGENCES)}")
    kernel = KERNELS[divergence]
    detach = {"skl": False, "srkl": True}.get(divergence, False)
    if detach_student_in_mixture is not None:
        detach = detach_student_in_mixture

    def run(s, t, w, tau, need_grad):
        log_q, log_p = _log_softmax(s, tau), _log_softmax(t, tau)
        if log_p.dtype != log_q.dtype:  # a float64 side makes the pair float64, as in the plain functions
            log_p, log_q = log_p.double(), log_q.double()
        values, r = kernel(log_p, log_q, w, detach, need_grad)
        return values, (None if r is None else _logits_grad(r, log_q, tau))

    return run


def _log_prob_kernel(s: Tensor, t: None, labels: Tensor, tau: float, need_grad: bool):
    """log q(y) = s_y - logsumexp(s), s = z / tau; d/dz = (onehot(y) - q) / tau."""
    idx = labels.long().unsqueeze(-1)
    if not need_grad:  # no [C, V] log-softmax written out: s_y / tau - logsumexp(s / tau)
        z = s if s.dtype == torch.float64 else s.float()
        z = z / tau if tau != 1.0 else z
        return z.gather(-1, idx).squeeze(-1) - torch.logsumexp(z, dim=-1), None
    log_q = _log_softmax(s, tau)
    values = log_q.gather(-1, idx).squeeze(-1)
    grad = log_q.exp_().neg_().scatter_add_(-1, idx, torch.ones_like(idx, dtype=log_q.dtype))
    return values, (grad.div_(tau) if tau != 1.0 else grad)


def _check_weight(w, name: str, allow_one: bool) -> None:
    values = w.detach().flatten() if isinstance(w, Tensor) else torch.tensor([float(w)])
    bad = (values < 0) | (values > 1) | torch.isnan(values) | ((values == 1) & (not allow_one))
    if bool(bad.any()):
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {values[bad][:8].tolist()}")


# --------------------------------------------------------------------------------------------- the engine
class _Problem(NamedTuple):
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


def _teacher_logits(teacher: tuple, idx: Tensor, vocab: int, student_logits: Tensor | None = None) -> Tensor | None:
    """teacher = (logits [N, V_t] or None, hidden [N, H_t] or None, weight or None, bias or None); a top-k
    teacher comes as (None, log-probs [N, k], ids [N, k] (an integer 'weight'), None), its tail spread in
    proportion to `student_logits` (the chunk's [C, V]) when given, else evenly."""
    logits, hidden, weight, bias = teacher
    if logits is not None:
        return logits.index_select(0, idx)[:, :vocab]
    if hidden is not None and not weight.is_floating_point():
        return topk_logprobs(hidden.index_select(0, idx), weight.index_select(0, idx), vocab, student_logits)
    if hidden is not None:
        return _student_logits(hidden, weight, bias, idx, vocab)
    return None


def topk_logprobs(logprobs: Tensor, indices: Tensor, vocab: int, student_logits: Tensor | None = None) -> Tensor:
    """[C, V] log-probabilities: the top-k ones where given, the tail mass T = 1 - sum_k p (at least the smallest
    normal float) on the other tokens: in proportion to the student's probabilities there when `student_logits`
    [C, >= V] are given (log p_j = log T + log q_j - log Q, Q the student's tail mass; evenly in rows where
    Q = 0), else evenly (T / (V - k) each). No gradient flows through it."""
    wide = logprobs.dtype == torch.float64 or (student_logits is not None and student_logits.dtype == torch.float64)
    dtype = torch.float64 if wide else torch.float32
    logprobs = logprobs.to(dtype)
    indices = indices.long()
    c, k = logprobs.shape
    rest = max(vocab - k, 1)
    tiny = torch.finfo(dtype).tiny
    log_mass = torch.log((1.0 - logprobs.exp().sum(-1)).clamp_min(tiny * rest))
    uniform = (log_mass - math.log(rest)).unsqueeze(-1)
    if student_logits is None:
        dense = uniform.expand(c, vocab).clone()
        return dense.scatter_(1, indices, logprobs)
    with torch.no_grad():
        log_q = torch.log_softmax(student_logits[:, :vocab].detach().to(dtype), dim=-1)
        top = torch.zeros(c, vocab, dtype=torch.bool, device=log_q.device).scatter_(1, indices, True)
        log_q_tail = log_q.masked_fill_(top, float("-inf"))
        log_tail = torch.logsumexp(log_q_tail, dim=-1, keepdim=True)  # log Q; -inf where the student has none
        empty = torch.isneginf(log_tail)
        dense = log_q_tail.add_(log_mass.unsqueeze(-1) - log_tail.masked_fill(empty, 0.0))
        dense = torch.where(empty, uniform, dense)
        return dense.scatter_(1, indices, logprobs)


def _chunk_extra(extra: Tensor | float | None, idx: Tensor):
    return extra.index_select(0, idx) if isinstance(extra, Tensor) else extra


def _chunks(prob: _Problem):
    for start in range(0, prob.rows.numel(), prob.chunk_size):
        yield prob.rows[start:start + prob.chunk_size]


def _chunk(prob: _Problem, hidden, weight, bias, teacher, extra, idx: Tensor, need_grad: bool):
    """Values [C] of one chunk of rows and dd/dz [C, V] w.r.t. its student logits (None: not wanted, or d does
    not depend on the student)."""
    with torch.no_grad():
        s = _student_logits(hidden, weight, bias, idx, prob.vocab)
        t = _teacher_logits(teacher, idx, prob.vocab, s if prob.topk_tail == "student" else None)
        return prob.kernel(s, t, _chunk_extra(extra, idx), prob.temperature, need_grad)


class _Accumulator:
    """Gradients of the student's hidden states, head weight and bias, summed chunk by chunk."""

    def __init__(self, prob: _Problem, hidden: Tensor, weight: Tensor, bias: Tensor | None, needs: tuple):
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


class _FusedPerToken(torch.autograd.Function):
    """Per-token values [N] (0 off the rows). When the head weight and bias need a gradient, the backward
    recomputes each chunk's logits. When only the hidden states do (a frozen head), the forward keeps
    dd_n/dh_n [N, H] instead (exact for any upstream gradient, since dL/dh_n = g_n dd_n/dh_n) and nothing is
    recomputed."""

    @staticmethod
    def forward(ctx, prob: _Problem, hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, extra):
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


class _FusedWeighted(torch.autograd.Function):
    """L = sum_n w_n d_n with the gradient computed in the forward pass; also returns d (non-differentiable)."""

    @staticmethod
    def forward(ctx, prob: _Problem, token_weights, hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias,
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


# ------------------------------------------------------------------------------------------ argument handling
def _prepare(student: HeadInputs, teacher, extra, mask, positions, temperature, vocab_size, chunk_size,
             kernel, needs_teacher: bool, extra_name: str, divergence: str | None = None):
    """Validate and flatten; returns (problem, student tensors, teacher tuple, extra, leading shape)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    hidden, weight, bias = student
    lead = hidden.shape[:-1]
    n = lead.numel()
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"student head weight must be [V, {hidden.shape[-1]}], got {tuple(weight.shape)}")
    vocab = weight.shape[0] if vocab_size is None else int(vocab_size)
    if not 0 < vocab <= weight.shape[0]:
        raise ValueError(f"vocab_size must be in [1, {weight.shape[0]}] (the student head's rows), got {vocab}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"student bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    flat_hidden = hidden.reshape(n, hidden.shape[-1])

    t_tuple = (None, None, None, None)
    topk_tail = "student"
    if needs_teacher:
        if isinstance(teacher, HeadInputs):
            t_hidden, t_weight, t_bias = (None if x is None else x.detach() for x in teacher)
            if t_hidden.shape[:-1] != lead:
                raise ValueError(f"teacher hidden states {tuple(t_hidden.shape)} do not match the student's {tuple(hidden.shape)}")
            if t_weight.shape[0] < vocab or t_weight.shape[1] != t_hidden.shape[-1]:
                raise ValueError(f"teacher head weight {tuple(t_weight.shape)} must be [>= {vocab}, {t_hidden.shape[-1]}]")
            if vocab_size is None and t_weight.shape[0] != vocab:
                raise ValueError(f"teacher and student heads have {t_weight.shape[0]} and {vocab} rows: pass vocab_size")
            t_tuple = (None, t_hidden.reshape(n, t_hidden.shape[-1]), t_weight, t_bias)
        elif isinstance(teacher, TopKTeacher):
            values, ids = teacher.logprobs.detach(), teacher.indices.detach()
            if values.shape[:-1] != lead or ids.shape != values.shape:
                raise ValueError(f"top-k teacher log-probs {tuple(values.shape)} and ids {tuple(ids.shape)} must "
                                 f"both be [{', '.join(map(str, lead))}, k]")
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
                raise ValueError(f"top-k teacher ids must be in [0, {vocab})")
            k = values.shape[-1]
            t_tuple = (None, values.reshape(n, k), ids.reshape(n, k), None)
            topk_tail = resolve_tail(teacher.tail, divergence)
        elif isinstance(teacher, Tensor):
            t_logits = teacher.detach()
            if t_logits.shape[:-1] != lead or t_logits.shape[-1] < vocab:
                raise ValueError(f"teacher logits {tuple(t_logits.shape)} must be [{', '.join(map(str, lead))}, >= {vocab}]")
            if vocab_size is None and t_logits.shape[-1] != vocab:
                raise ValueError(f"teacher logits have {t_logits.shape[-1]} entries, the student head {vocab}: pass vocab_size")
            t_tuple = (t_logits.reshape(n, t_logits.shape[-1]), None, None, None)
        else:
            raise TypeError("teacher must be HeadInputs(hidden, weight, bias), TopKTeacher(logprobs, indices) or a "
                            "tensor of logits / log-probs")

    rows = _rows(lead, n, mask, positions, hidden.device)
    if isinstance(extra, Tensor):
        extra = _per_token(extra, lead, n, extra_name)
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    wide = torch.float64 in (hidden.dtype, weight.dtype) or any(
        t is not None and t.dtype == torch.float64 for t in t_tuple)
    out_dtype = torch.float64 if wide else torch.float32
    prob = _Problem(kernel, float(temperature), vocab, int(chunk_size), rows, n, out_dtype, topk_tail)
    return prob, (flat_hidden, weight, bias), t_tuple, extra, lead


def _check_divergence_weight(divergence: str, weight) -> None:
    if divergence in ("skl", "srkl", "jsd"):
        if weight is None:
            raise ValueError(f"{divergence} needs its weight (a for skl/srkl, b for jsd)")
        _check_weight(weight, "beta" if divergence == "jsd" else "alpha", allow_one=divergence == "jsd")


def _rows(lead: torch.Size, n: int, mask: Tensor | None, positions: Tensor | None, device) -> Tensor:
    if mask is not None and positions is not None:
        raise ValueError("pass a mask or positions, not both")
    if mask is not None:
        if mask.shape != lead:
            raise ValueError(f"mask must have the hidden states' leading shape {tuple(lead)}, got {tuple(mask.shape)}")
        return mask.reshape(n).bool().nonzero().squeeze(1).to(device)
    if positions is not None:
        positions = positions.reshape(-1).long().to(device)
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= n):
            raise ValueError(f"positions must index the {n} flattened tokens")
        return positions
    return torch.arange(n, device=device)


def _per_token(x: Tensor, lead: torch.Size, n: int, name: str) -> Tensor:
    """A per-token [*lead] or per-row [lead[0]] tensor (as the plain functions take) -> flat [N], detached."""
    x = x.detach()
    if x.shape == lead:
        return x.reshape(n)
    if x.dim() == 1 and len(lead) >= 1 and x.shape[0] == lead[0]:
        return x.reshape((lead[0],) + (1,) * (len(lead) - 1)).expand(lead).reshape(n)
    if x.dim() == 0:
        return x.expand(n)
    raise ValueError(f"{name} must be a float, a per-token tensor {tuple(lead)} or a per-row tensor "
                     f"[{lead[0] if len(lead) else 1}], got {tuple(x.shape)}")


def _reshape_out(flat: Tensor, lead: torch.Size) -> Tensor:
    return flat.reshape(lead)


# --------------------------------------------------------------------------------------------- public API
def fused_divergence(
    divergence: str, student: HeadInputs, teacher: HeadInputs | Tensor, weight: float | Tensor | None = None, *,
    mask: Tensor | None = None, positions: Tensor | None = None, temperature: float = 1.0,
    vocab_size: int | None = None, chunk_size: int | None = None, detach_student_in_mixture: bool | None = None,
) -> Tensor:
    """Per-token divergence d_n [...] (the leading shape of student.hidden) from hidden states and heads.

    divergence: one of DIVERGENCES ('fkl', 'rkl', 'skl', 'srkl', 'jsd', 'tvd', 'acceptance'), defined as in
    `divergences.py`. weight: a of SKL/SRKL or b of JSD, a float, a per-token tensor (shape of the leading
    dims) or a per-row tensor [B] (as the plain functions take); a constant for the gradient.
    teacher: HeadInputs (hidden [..., H_t], weight [V_t, H_t], bias) or logits / log-probs [..., V_t]; no
    gradient flows to it. mask (bool, leading shape) or positions (flat indices) select the tokens computed;
    others are 0 with no gradient. vocab_size: only the first vocab_size rows of the heads (and entries of
    teacher logits) are the vocabulary; padded rows beyond get no logits and zero gradient.
    detach_student_in_mixture: None = the plain functions' defaults (SKL False, SRKL True).
    Exact for any upstream gradient; the backward recomputes each chunk's logits.
    """
    _check_divergence_weight(divergence, weight)
    kernel = _divergence_kernel(divergence, detach_student_in_mixture)
    prob, (h, w, b), t, extra, lead = _prepare(student, teacher, weight, mask, positions, temperature, vocab_size,
                                               chunk_size, kernel, True, "weight", divergence)
    return _reshape_out(_FusedPerToken.apply(prob, h, w, b, *t, extra), lead)


def fused_weighted_divergence(
    divergence: str, student: HeadInputs, teacher: HeadInputs | Tensor, token_weights: Tensor,
    weight: float | Tensor | None = None, *, mask: Tensor | None = None, positions: Tensor | None = None,
    temperature: float = 1.0, vocab_size: int | None = None, chunk_size: int | None = None,
    detach_student_in_mixture: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """(L, d): L = sum_n w_n d_n (a scalar with gradient) and the per-token values d [...] (no gradient).

    token_weights w: per-token weights of the leading shape (e.g. 1 / (tokens of the sequence x sequences) for
    the sequence mean, 1 / tokens for the token mean, times a loss coefficient); tokens outside mask/positions
    or with weight 0 do not count. The gradient of L is computed during this call, chunk by chunk (no
    recomputation in the backward), which is the fast path for training. Other arguments as `fused_divergence`.
    """
    _check_divergence_weight(divergence, weight)
    kernel = _divergence_kernel(divergence, detach_student_in_mixture)
    prob, (h, w, b), t, extra, lead = _prepare(student, teacher, weight, mask, positions, temperature, vocab_size,
                                               chunk_size, kernel, True, "weight", divergence)
    if token_weights.shape != lead:
        raise ValueError(f"token_weights must have shape {tuple(lead)}, got {tuple(token_weights.shape)}")
    tw = token_weights.detach().reshape(prob.n)
    loss, values = _FusedWeighted.apply(prob, tw, h, w, b, *t, extra)
    return loss, _reshape_out(values, lead)


def fused_forward_kl(student: HeadInputs, teacher: HeadInputs | Tensor, **kwargs) -> Tensor:
    """Per-token FKL = sum_v p log(p / q) [...]; keyword arguments as `fused_divergence`."""
    return fused_divergence("fkl", student, teacher, **kwargs)


def fused_reverse_kl(student: HeadInputs, teacher: HeadInputs | Tensor, **kwargs) -> Tensor:
    """Per-token RKL = sum_v q log(q / p) [...]."""
    return fused_divergence("rkl", student, teacher, **kwargs)


def fused_skew_forward_kl(student: HeadInputs, teacher: HeadInputs | Tensor, alpha: float | Tensor, *,
                          detach_student_in_mixture: bool = False, **kwargs) -> Tensor:
    """Per-token SKL_a = sum_v p log(p / m1), m1 = a p + (1 - a) q; a in [0, 1), float, per token or per row."""
    return fused_divergence("skl", student, teacher, alpha, detach_student_in_mixture=detach_student_in_mixture,
                            **kwargs)


def fused_skew_reverse_kl(student: HeadInputs, teacher: HeadInputs | Tensor, alpha: float | Tensor, *,
                          detach_student_in_mixture: bool = True, **kwargs) -> Tensor:
    """Per-token SRKL_a = sum_v q log(q / m2), m2 = (1 - a) p + a q; the q inside m2 detached by default."""
    return fused_divergence("srkl", student, teacher, alpha, detach_student_in_mixture=detach_student_in_mixture,
                            **kwargs)


def fused_generalized_jsd(student: HeadInputs, teacher: HeadInputs | Tensor, beta: float | Tensor,
                          **kwargs) -> Tensor:
    """Per-token JSD_b = b KL(p || m) + (1 - b) KL(q || m), m = b p + (1 - b) q; b = 0 is FKL, b = 1 RKL."""
    return fused_divergence("jsd", student, teacher, beta, **kwargs)


def fused_total_variation(student: HeadInputs, teacher: HeadInputs | Tensor, **kwargs) -> Tensor:
    """Per-token TVD = 0.5 sum_v |p - q|."""
    return fused_divergence("tvd", student, teacher, **kwargs)


def fused_acceptance_rate(student: HeadInputs, teacher: HeadInputs | Tensor, **kwargs) -> Tensor:
    """Per-token sum_v min(p, q) = 1 - TVD (expected speculative-decoding acceptance)."""
    return fused_divergence("acceptance", student, teacher, **kwargs)


def fused_token_log_probs(head: HeadInputs, labels: Tensor, *, temperature: float = 1.0,
                          vocab_size: int | None = None, chunk_size: int | None = None) -> Tensor:
    """log softmax(z / tau)[y_n] per position [...] for target ids labels [...]; 0 where labels == -100.

    z = W h + b is never built in full. Differentiable w.r.t. the hidden states, weight and bias (exact for
    any upstream gradient); for a teacher call it under torch.no_grad(). Labels must be < vocab_size.
    """
    lead = head.hidden.shape[:-1]
    if labels.shape != lead:
        raise ValueError(f"labels must have shape {tuple(lead)}, got {tuple(labels.shape)}")
    vocab = head.weight.shape[0] if vocab_size is None else int(vocab_size)
    valid = labels != IGNORE_INDEX
    if bool(valid.any()) and (int(labels[valid].min()) < 0 or int(labels[valid].max()) >= vocab):
        raise ValueError(f"labels must be -100 or in [0, {vocab})")
    prob, (h, w, b), t, extra, lead = _prepare(head, None, labels, valid, None, temperature, vocab_size,
                                               chunk_size, _log_prob_kernel, False, "labels")
    return _reshape_out(_FusedPerToken.apply(prob, h, w, b, *t, extra), lead)


# ------------------------------------------------------------------------------------ transformers models
def fused_inputs(model, batch: dict[str, Tensor], *, ignore_index: int = IGNORE_INDEX,
                 extra_inputs: tuple[str, ...] = ()) -> FusedBatch:
    """Hidden states and head of a transformers causal LM at the positions that predict the response tokens.

    The fused counterpart of `training.collate.response_logits`: the batch is left-padded (input_ids,
    attention_mask, position_ids, labels with -100 off the responses), so every response lies in the last R
    columns (R = the longest response) and is predicted by the hidden states of columns -(R + 1) .. -2. The
    model runs its own forward (so wrappers -- PEFT, DDP -- see the call) with `logits_to_keep=R + 1`; a
    forward pre-hook on the output head (`model.get_output_embeddings()`, tied or not) keeps the hidden
    states it receives (the final normed states of those R + 1 columns, [B, R + 1, H]) and hands the head an
    empty slice instead, so no [B, R + 1, V] logits are built. Pass `vocab_size` (the tokenizer's real
    vocabulary) to the losses when the head is padded. Gradients flow as usual: run the teacher's call under
    torch.no_grad() or torch.inference_mode().

    Models that change their logits after the head (Gemma-2's final soft-capping, a logit scale) are
    refused: the fused losses assume logits = W h + b. `extra_inputs`: further batch keys passed on to the
    forward when present (e.g. a vision-language batch's pixel_values).
    """
    core = getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module
    config = getattr(core, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"{type(core).__name__} has {attr}={value}: its logits are not W h + b, "
                             "fused losses do not support it")
    head = core.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(core).__name__} has no output embedding layer with a weight")
    labels = batch["labels"]
    width = max(int((labels != ignore_index).sum(-1).max().item()), 1)
    kept: list[Tensor] = []

    def keep_hidden(module, args, kwargs):
        if args:
            kept.append(args[0])
            return (args[0][..., :0, :],) + tuple(args[1:]), kwargs  # the head sees no positions: [B, 0, V]
        name = next(iter(kwargs))  # called with its input as a keyword
        kept.append(kwargs[name])
        return args, {**kwargs, name: kwargs[name][..., :0, :]}

    handle = head.register_forward_pre_hook(keep_hidden, with_kwargs=True)
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              position_ids=batch.get("position_ids"), logits_to_keep=width + 1, use_cache=False,
              **{key: batch[key] for key in extra_inputs if key in batch})
    finally:
        handle.remove()
    if len(kept) != 1 or kept[0].shape[-2] != width + 1:
        raise ValueError(f"{type(core).__name__} did not call its output head once on the last {width + 1} "
                         "positions: fused losses need a causal LM that supports logits_to_keep")
    hidden = kept[0][:, :-1]
    labels = labels[:, -width:]
    return FusedBatch(HeadInputs(hidden, head.weight, getattr(head, "bias", None)), labels, labels != ignore_index)
