"""The public API of the fused losses: `fused_divergence`, `fused_weighted_divergence`, the named wrappers
and `fused_token_log_probs`, with their argument checks (see `losses.fused`)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from ..divergences import IGNORE_INDEX
from .autograd import ChunkProblem, FusedPerToken, FusedWeighted, HeadInputs, TopKTeacher, resolve_tail
from .kernels import CHUNK_BYTES, check_weight, divergence_kernel, log_prob_kernel

def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about CHUNK_BYTES (at least 1 token)."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


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
            if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= vocab):
                raise ValueError(f"top-k teacher ids must be in [0, {vocab}) (or -1: no entry, see with_actual_token)")
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
    prob = ChunkProblem(kernel, float(temperature), vocab, int(chunk_size), rows, n, out_dtype, topk_tail)
    return prob, (flat_hidden, weight, bias), t_tuple, extra, lead


#: the divergences with a mixture weight, and its name: the skew a of SKL/SRKL, the b of the generalized JSD
MIXTURE_WEIGHTS = {"skl": "alpha", "srkl": "alpha", "jsd": "beta"}


def mixture_weight(divergence: str, value) -> dict:
    """The keyword argument that passes `value` as `divergence`'s mixture weight: {'alpha': value} for skl/srkl
    (the skew a), {'beta': value} for jsd (its b), {} for the divergences without one (value is not used)."""
    name = MIXTURE_WEIGHTS.get(divergence)
    return {} if name is None else {name: value}


def _mixture(divergence: str, alpha, beta, weight, function: str):
    """The mixture weight of `divergence` from alpha= / beta= (or the deprecated weight=), checked."""
    if weight is not None:
        if alpha is not None or beta is not None:
            raise TypeError(f"{function}: pass alpha= or beta=, not also weight=")
        warnings.warn(f"{function}(..., weight=) is deprecated: pass alpha= (the skew a of skl/srkl) or beta= (the "
                      "b of jsd)", DeprecationWarning, stacklevel=3)
        alpha, beta = (None, weight) if divergence == "jsd" else (weight, None)
        if divergence not in MIXTURE_WEIGHTS:  # as before: a weight given to a divergence without one is unused
            return None
    name = MIXTURE_WEIGHTS.get(divergence)
    given = {key: value for key, value in (("alpha", alpha), ("beta", beta)) if value is not None}
    if any(key != name for key in given):
        takes = f"takes {name}=" if name else "takes no mixture weight"
        raise ValueError(f"{divergence} {takes}, got {', '.join(f'{key}=' for key in given)}")
    if name is None:
        return None
    value = given.get(name)
    if value is None:
        raise ValueError(f"{divergence} needs its mixture weight {name}= ("
                         + ("the skew a" if name == "alpha" else "its b") + ")")
    check_weight(value, name, allow_one=divergence == "jsd")
    return value


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


def fused_divergence(
    divergence: str, student: HeadInputs, teacher: HeadInputs | Tensor, weight: float | Tensor | None = None, *,
    alpha: float | Tensor | None = None, beta: float | Tensor | None = None, mask: Tensor | None = None,
    positions: Tensor | None = None, temperature: float = 1.0, vocab_size: int | None = None,
    chunk_size: int | None = None, detach_student_in_mixture: bool | None = None,
) -> Tensor:
    """Per-token divergence d_n [...] (the leading shape of student.hidden) from hidden states and heads.

    divergence: one of DIVERGENCES ('fkl', 'rkl', 'skl', 'srkl', 'jsd', 'tvd', 'acceptance'), defined as in
    `divergences.py`. alpha: the skew a of SKL/SRKL; beta: the b of JSD (as the plain functions name them;
    `mixture_weight(divergence, value)` picks the keyword): a float, a per-token tensor (shape of the leading
    dims) or a per-row tensor [B]; a constant for the gradient. weight (deprecated): either of them.
    teacher: HeadInputs (hidden [..., H_t], weight [V_t, H_t], bias) or logits / log-probs [..., V_t]; no
    gradient flows to it. mask (bool, leading shape) or positions (flat indices) select the tokens computed;
    others are 0 with no gradient. vocab_size: only the first vocab_size rows of the heads (and entries of
    teacher logits) are the vocabulary; padded rows beyond get no logits and zero gradient.
    detach_student_in_mixture: None = the plain functions' defaults (SKL False, SRKL True).
    Exact for any upstream gradient; the backward recomputes each chunk's logits.
    """
    weight = _mixture(divergence, alpha, beta, weight, "fused_divergence")
    kernel = divergence_kernel(divergence, detach_student_in_mixture)
    prob, (h, w, b), t, extra, lead = _prepare(student, teacher, weight, mask, positions, temperature, vocab_size,
                                               chunk_size, kernel, True, MIXTURE_WEIGHTS.get(divergence, "weight"),
                                               divergence)
    return _reshape_out(FusedPerToken.apply(prob, h, w, b, *t, extra), lead)


def fused_weighted_divergence(
    divergence: str, student: HeadInputs, teacher: HeadInputs | Tensor, token_weights: Tensor,
    weight: float | Tensor | None = None, *, alpha: float | Tensor | None = None, beta: float | Tensor | None = None,
    mask: Tensor | None = None, positions: Tensor | None = None, temperature: float = 1.0,
    vocab_size: int | None = None, chunk_size: int | None = None, detach_student_in_mixture: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """(L, d): L = sum_n w_n d_n (a scalar with gradient) and the per-token values d [...] (no gradient).

    token_weights w: per-token weights of the leading shape (e.g. 1 / (tokens of the sequence x sequences) for
    the sequence mean, 1 / tokens for the token mean, times a loss coefficient); tokens outside mask/positions
    or with weight 0 do not count. The gradient of L is computed during this call, chunk by chunk (no
    recomputation in the backward), which is the fast path for training. Other arguments (alpha, the skew a of
    SKL/SRKL; beta, the b of JSD) as `fused_divergence`.
    """
    weight = _mixture(divergence, alpha, beta, weight, "fused_weighted_divergence")
    kernel = divergence_kernel(divergence, detach_student_in_mixture)
    prob, (h, w, b), t, extra, lead = _prepare(student, teacher, weight, mask, positions, temperature, vocab_size,
                                               chunk_size, kernel, True, MIXTURE_WEIGHTS.get(divergence, "weight"),
                                               divergence)
    if token_weights.shape != lead:
        raise ValueError(f"token_weights must have shape {tuple(lead)}, got {tuple(token_weights.shape)}")
    tw = token_weights.detach().reshape(prob.n)
    loss, values = FusedWeighted.apply(prob, tw, h, w, b, *t, extra)
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
    return fused_divergence("skl", student, teacher, alpha=alpha, detach_student_in_mixture=detach_student_in_mixture,
                            **kwargs)


def fused_skew_reverse_kl(student: HeadInputs, teacher: HeadInputs | Tensor, alpha: float | Tensor, *,
                          detach_student_in_mixture: bool = True, **kwargs) -> Tensor:
    """Per-token SRKL_a = sum_v q log(q / m2), m2 = (1 - a) p + a q; the q inside m2 detached by default."""
    return fused_divergence("srkl", student, teacher, alpha=alpha, detach_student_in_mixture=detach_student_in_mixture,
                            **kwargs)


def fused_generalized_jsd(student: HeadInputs, teacher: HeadInputs | Tensor, beta: float | Tensor,
                          **kwargs) -> Tensor:
    """Per-token JSD_b = b KL(p || m) + (1 - b) KL(q || m), m = b p + (1 - b) q; b = 0 is FKL, b = 1 RKL."""
    return fused_divergence("jsd", student, teacher, beta=beta, **kwargs)


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
                                               chunk_size, log_prob_kernel, False, "labels")
    return _reshape_out(FusedPerToken.apply(prob, h, w, b, *t, extra), lead)
