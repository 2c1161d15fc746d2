"""Token-level divergences between a teacher (p) and a student (q), computed from logits.

With p = softmax(teacher_logits / tau) and q = softmax(student_logits / tau), per token (sum over v):

    FKL        sum_v p log(p / q)
    RKL        sum_v q log(q / p)
    SKL_a      sum_v p log(p / m1),   m1 = a p + (1 - a) q
    SRKL_a     sum_v q log(q / m2),   m2 = (1 - a) p + a q
    JSD_b      b KL(p || m) + (1 - b) KL(q || m),   m = b p + (1 - b) q   (b = 0 -> FKL, b = 1 -> RKL)
    TVD        0.5 sum_v |p - q|
    acceptance sum_v min(p, q) = 1 - TVD

Everything is computed in log space (log_softmax, logsumexp for mixtures). Terms whose weight is an exact
zero probability (logit -inf) contribute 0 with finite gradients; the masking uses torch.where on *safe*
inputs so that no `0 * inf` / `0 * nan` reaches the forward or backward pass. Values are true KLs (entropy
term included). Inputs of lower precision are upcast to float32 (float64 stays float64).

Reductions over tokens (`per_sequence_mean`, `reduce_tokens`) live here too.
"""
from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100
REDUCTIONS = ("seq_mean", "token_mean", "sum", "none")

__all__ = [
    "forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "generalized_jsd",
    "total_variation", "acceptance_rate", "token_log_probs", "per_sequence_mean", "reduce_tokens",
]


# ----------------------------------------------------------------------------------------------- helpers
def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.dtype != torch.float64:
        logits = logits.float()
    return torch.log_softmax(logits / temperature, dim=-1)


def _weight(w: float | Tensor, name: str, allow_one: bool, like: Tensor) -> Tensor:
    """Validate a skew/mix weight and shape it to broadcast against [..., V] log-probs (detached)."""
    if isinstance(w, Tensor):
        w = w.detach().to(device=like.device, dtype=like.dtype)
        if w.dim() > 1 or (w.dim() == 1 and w.shape[0] != like.shape[0]):
            raise ValueError(f"{name} must be a float or a tensor of shape [B]={like.shape[0]}, got {tuple(w.shape)}")
        w = w.reshape(w.shape + (1,) * (like.dim() - w.dim()))
    else:
        w = torch.tensor(float(w), device=like.device, dtype=like.dtype)
    bad = (w < 0) | (w > 1) | torch.isnan(w) | ((w == 1) & (not allow_one))
    if bool(bad.any()):
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {w.flatten().tolist()}")
    return w


def _log_mix(w: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    """log(w * a + (1 - w) * b) from log a, log b; w may be 0 or 1, a and b may have zeros."""
    x = torch.log(w) + log_a  # log(0) = -inf is fine: logsumexp ignores it
    y = torch.log1p(-w) + log_b
    both_zero = torch.isneginf(x) & torch.isneginf(y)
    x, y = torch.where(both_zero, 0.0, x), torch.where(both_zero, 0.0, y)  # keep the backward NaN-free
    out = torch.logsumexp(torch.stack((x, y)), dim=0)
    return torch.where(both_zero, float("-inf"), out)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """sum_v a log(a / b) with 0 log 0 = 0 (b = 0 where a > 0 gives +inf, the true value).

    Every branch of every torch.where gets safe (finite) inputs, so the backward is NaN-free whatever the
    upstream gradient: a term a log(a / 0) = +inf is a constant (no gradient from it), so a position whose value
    is +inf but which a mask or a zero weight leaves out contributes exactly 0 to the gradient (an upstream 0
    times a finite local derivative), and one left in gives the gradient of its finite terms (docs/numerics.md).
    """
    support = ~torch.isneginf(log_a)
    infinite = support & torch.isneginf(log_b)
    finite = support & ~infinite
    log_a = torch.where(finite, log_a, 0.0)
    log_b = torch.where(finite, log_b, 0.0)
    terms = torch.where(finite, log_a.exp() * (log_a - log_b), 0.0)
    return torch.where(infinite, float("inf"), terms).sum(-1)


# ------------------------------------------------------------------------------------------- divergences
def forward_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """FKL = sum_v p log(p / q), shape [...]."""
    return _kl(_log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature))


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """RKL = sum_v q log(q / p), shape [...]. +inf where q > 0 on a token with p = 0."""
    return _kl(_log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature))


def skew_forward_kl(student_logits: Tensor, teacher_logits: Tensor, alpha: float | Tensor, *,
                    temperature: float = 1.0, detach_student_in_mixture: bool = False) -> Tensor:
    """SKL_alpha = sum_v p log(p / m1), m1 = alpha p + (1 - alpha) q; alpha in [0, 1) (float or [B]).

    alpha = 0 is exactly FKL. alpha is a constant for the gradient (detached). The student enters SKL only
    through m1, so detach_student_in_mixture=True leaves the value but removes every gradient.
    """
    log_p = _log_probs(teacher_logits, temperature)
    log_q = _log_probs(student_logits, temperature)
    a = _weight(alpha, "alpha", allow_one=False, like=log_p)
    log_m = _log_mix(a, log_p, log_q.detach() if detach_student_in_mixture else log_q)
    return _kl(log_p, log_m)


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, alpha: float | Tensor, *,
                    temperature: float = 1.0, detach_student_in_mixture: bool = True) -> Tensor:
    """SRKL_alpha = sum_v q log(q / m2), m2 = (1 - alpha) p + alpha q; alpha in [0, 1) (float or [B]).

    By default the q inside m2 is detached (as in the released DistiLLM-2 code); the outer q is not.
    alpha = 0 is exactly RKL. alpha is a constant for the gradient (detached).
    """
    log_p = _log_probs(teacher_logits, temperature)
    log_q = _log_probs(student_logits, temperature)
    a = _weight(alpha, "alpha", allow_one=False, like=log_p)
    log_m = _log_mix(a, log_q.detach() if detach_student_in_mixture else log_q, log_p)
    return _kl(log_q, log_m)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float | Tensor, *,
                    temperature: float = 1.0) -> Tensor:
    """JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q; beta in [0, 1].

    The formula is identically 0 at beta = 0 and beta = 1; JSD_beta / beta -> FKL as beta -> 0 and
    JSD_beta / (1 - beta) -> RKL as beta -> 1. Following the spec ("limits up to scale, define them so"),
    beta == 0 returns forward_kl and beta == 1 returns reverse_kl (per sequence when beta is a [B] tensor).
    The value is therefore discontinuous at the end points by design.
    """
    log_p = _log_probs(teacher_logits, temperature)
    log_q = _log_probs(student_logits, temperature)
    b = _weight(beta, "beta", allow_one=True, like=log_p)
    is_fkl, is_rkl = b == 0, b == 1
    if bool(is_fkl.all()):
        return _kl(log_p, log_q)
    if bool(is_rkl.all()):
        return _kl(log_q, log_p)
    b_mid = torch.where(is_fkl | is_rkl, 0.5, b)  # keep the unused branch finite
    log_m = _log_mix(b_mid, log_p, log_q)
    b_tok = b_mid.squeeze(-1)
    out = b_tok * _kl(log_p, log_m) + (1 - b_tok) * _kl(log_q, log_m)
    if bool(is_fkl.any()):
        out = torch.where(is_fkl.squeeze(-1), _kl(log_p, log_q), out)
    if bool(is_rkl.any()):
        out = torch.where(is_rkl.squeeze(-1), _kl(log_q, log_p), out)
    return out


def total_variation(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """TVD = 0.5 sum_v |p - q|, in [0, 1]."""
    p = _log_probs(teacher_logits, temperature).exp()
    q = _log_probs(student_logits, temperature).exp()
    return 0.5 * (p - q).abs().sum(-1)


def acceptance_rate(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """sum_v min(p, q) = 1 - TVD: expected acceptance of the student as a speculative-decoding draft."""
    p = _log_probs(teacher_logits, temperature).exp()
    q = _log_probs(student_logits, temperature).exp()
    return torch.minimum(p, q).sum(-1)


def token_log_probs(logits: Tensor, labels: Tensor, *, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / tau)[label] per position, [B, T]; 0 where label == -100 (labels pre-aligned)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = (logits if logits.dtype == torch.float64 else logits.float()) / temperature
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, 0).long().unsqueeze(-1)
    lp = logits.gather(-1, safe).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.where(valid, lp, 0.0)


# -------------------------------------------------------------------------------------------- reductions
def per_sequence_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of values [B, T] over the masked tokens of each sequence -> [B]; 0 for an empty sequence."""
    mask = mask.bool()
    total = torch.where(mask, values, 0.0).sum(-1)
    return total / mask.sum(-1).clamp(min=1).to(total.dtype)


def reduce_tokens(values: Tensor, mask: Tensor, reduction: str = "seq_mean") -> Tensor:
    """Reduce per-token values [B, T] over the masked tokens.

    seq_mean: mean per sequence, then mean over the sequences with at least one token (default);
    token_mean: mean over all masked tokens of the batch; sum: sum over masked tokens;
    none: values with unmasked positions set to 0. An all-masked batch gives 0 (zero gradient).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid options: {', '.join(REDUCTIONS)}")
    mask = mask.bool()
    masked = torch.where(mask, values, 0.0)
    if reduction == "none":
        return masked
    if reduction == "sum":
        return masked.sum()
    if reduction == "token_mean":
        return masked.sum() / mask.sum().clamp(min=1).to(masked.dtype)
    n_seq = mask.any(-1).sum().clamp(min=1).to(masked.dtype)
    return per_sequence_mean(values, mask).sum() / n_seq
