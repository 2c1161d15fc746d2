"""The per-chunk kernels of the fused losses: each divergence's values and its gradient w.r.t. the
student's log-probabilities, in closed form, on one chunk of tokens (see `losses.fused`)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

DIVERGENCES = ("fkl", "rkl", "skl", "srkl", "jsd", "tvd", "acceptance")
# A chunk's student logits take about this many bytes (fp32); the kernels hold several such temporaries. Tuned on
# a 2-core CPU (benchmarks/bench_loss.py): 110 tokens at V = 151,936 and 341 at V = 49,152; bigger chunks were
# at most ~10-15% faster and proportionally bigger.
CHUNK_BYTES = 64 * 2**20


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


def divergence_kernel(divergence: str, detach_student_in_mixture: bool | None) -> Callable:
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


def log_prob_kernel(s: Tensor, t: None, labels: Tensor, tau: float, need_grad: bool):
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


def check_weight(w, name: str, allow_one: bool) -> None:
    values = w.detach().flatten() if isinstance(w, Tensor) else torch.tensor([float(w)])
    bad = (values < 0) | (values > 1) | torch.isnan(values) | ((values == 1) & (not allow_one))
    if bool(bad.any()):
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {values[bad][:8].tolist()}")
