"""The tail of a top-k teacher (losses.fused.TopKTeacher, tail="student"): the teacher's tail mass
T = 1 - sum_k p spread over the other tokens in proportion to the student's own probabilities.

Checked, values and gradients, against two brute-force references written here:
- the bucket form: both distributions coarse-grained to k + 1 outcomes (the top-k tokens, and one tail bucket with
  the teacher's T and the student's Q = sum of its probabilities off the top-k), the plain divergence of those
  by autograd (temperature 1; the two are the same function for every divergence here, see TopKTeacher);
- the dense form: the teacher's full distribution written out row by row in a Python loop (log p_j = log T +
  log q_j - log Q off the top-k, q the detached student), the plain divergence of it at any temperature;
and the edge cases: -inf student logits, masked positions, empty sequences, k = V (the exact teacher), a student
with no tail mass, through the fused path and the plain path of the methods (`divergence_loss`).
"""

from __future__ import annotations

import math

import pytest
import torch

from distillm.losses import divergences as D
from distillm.losses.fused import (HeadInputs, TopKTeacher, fused_divergence, fused_weighted_divergence,
                                   mixture_weight)
from distillm.methods.base import LossInputs, divergence_loss
from tolerances import head_loss_atols

PLAIN = {
    "fkl": (None, lambda s, t, w, tau: D.forward_kl(s, t, temperature=tau)),
    "rkl": (None, lambda s, t, w, tau: D.reverse_kl(s, t, temperature=tau)),
    "skl": (0.1, lambda s, t, w, tau: D.skew_forward_kl(s, t, w, temperature=tau)),
    "srkl": (0.1, lambda s, t, w, tau: D.skew_reverse_kl(s, t, w, temperature=tau)),
    "jsd": (0.5, lambda s, t, w, tau: D.generalized_jsd(s, t, w, temperature=tau)),
    "tvd": (None, lambda s, t, w, tau: D.total_variation(s, t, temperature=tau)),
}


def problem(seed, n=9, h=6, v=23, k=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype, requires_grad=True)
    head = torch.randn(v, h, generator=g, dtype=dtype, requires_grad=True)
    teacher_logits = 2 * torch.randn(n, v, generator=g, dtype=dtype)
    top = torch.log_softmax(teacher_logits, -1).topk(k)
    token_weights = torch.rand(n, generator=g, dtype=dtype)
    return hidden, head, teacher_logits, top, token_weights


def bucket_reference(name, student_logits, top):
    """The plain divergence between the two distributions over k + 1 outcomes (top-k tokens + one tail bucket)."""
    weight, fn = PLAIN[name]
    log_q = torch.log_softmax(student_logits, -1)
    in_top = torch.zeros_like(log_q, dtype=torch.bool).scatter_(1, top.indices, True)
    off_top = log_q.masked_fill(in_top, float("-inf"))
    none = torch.isneginf(off_top).all(-1, keepdim=True)  # no student tail mass: the bucket is an exact 0
    log_q_tail = torch.logsumexp(off_top.masked_fill(none, 0.0), -1, keepdim=True).masked_fill(none, float("-inf"))
    student = torch.cat([log_q.gather(1, top.indices), log_q_tail], -1)
    teacher_tail = torch.log1p(-top.values.exp().sum(-1, keepdim=True))
    teacher = torch.cat([top.values, teacher_tail], -1)
    return fn(student, teacher, weight, 1.0)


def dense_teacher(student_logits, top):
    """The teacher's full log-probs, row by row: top-k as given, log T + log q_j - log Q elsewhere (q detached)."""
    log_q = torch.log_softmax(student_logits.detach(), -1)
    out = torch.empty_like(log_q)
    for row in range(log_q.shape[0]):
        rest = [j for j in range(log_q.shape[1]) if j not in set(top.indices[row].tolist())]
        mass = 1 - sum(math.exp(x) for x in top.values[row].tolist())
        tail_q = sum(math.exp(log_q[row, j].item()) for j in rest)
        for j in rest:
            out[row, j] = math.log(mass) + log_q[row, j].item() - math.log(tail_q)
        out[row, top.indices[row]] = top.values[row]
    return out


def assert_matches(loss, grads, ref, ref_grads, hidden, head, token_weights, teacher_logits, temperature=1.0):
    # float64 fused head vs a plain reference, coefficients token_weights (tolerances.head_loss_atols)
    loss_atol, grad_atol = head_loss_atols(HeadInputs(hidden, head), teacher_logits, n=hidden.shape[0], loss=ref,
                                           upstream=float(token_weights.abs().sum()), temperature=temperature,
                                           dtype=hidden.dtype)
    torch.testing.assert_close(loss, ref, rtol=0, atol=loss_atol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=grad_atol)


@pytest.mark.parametrize("name", list(PLAIN))
@pytest.mark.parametrize("k", [1, 5, 22])
def test_student_tail_is_the_one_bucket_divergence(name, k):
    hidden, head, teacher_logits, top, token_weights = problem(k, k=k)
    weight = PLAIN[name][0]
    loss, _ = fused_weighted_divergence(name, HeadInputs(hidden, head), TopKTeacher(top.values, top.indices, "student"),
                                        token_weights, **mixture_weight(name, weight), chunk_size=4)
    grads = torch.autograd.grad(loss, (hidden, head))
    ref = (token_weights * bucket_reference(name, hidden @ head.t(), top)).sum()
    ref_grads = torch.autograd.grad(ref, (hidden, head))
    assert_matches(loss, grads, ref, ref_grads, hidden, head, token_weights, teacher_logits)


@pytest.mark.parametrize("name", ["fkl", "skl", "srkl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_student_tail_is_the_dense_proportional_teacher(name, temperature):
    """The per-token path (`fused_divergence`, backward by recomputation) against the dense teacher written out,
    with the teacher constant for the gradient, at temperature 1 and 2."""
    hidden, head, teacher_logits, top, token_weights = problem(3, k=4)
    weight, fn = PLAIN[name]
    values = fused_divergence(name, HeadInputs(hidden, head), TopKTeacher(top.values, top.indices, "student"),
                              **mixture_weight(name, weight), temperature=temperature, chunk_size=3)
    loss = (token_weights * values).sum()
    grads = torch.autograd.grad(loss, (hidden, head))
    student_logits = hidden @ head.t()
    ref = (token_weights * fn(student_logits, dense_teacher(student_logits, top), weight, temperature)).sum()
    ref_grads = torch.autograd.grad(ref, (hidden, head))
    assert_matches(loss, grads, ref, ref_grads, hidden, head, token_weights, teacher_logits, temperature)


@pytest.mark.parametrize("name", ["fkl", "skl", "srkl"])
def test_k_equal_to_vocab_is_the_exact_teacher(name):
    hidden, head, teacher_logits, top, token_weights = problem(5, v=11, k=11)
    weight, fn = PLAIN[name]
    loss, _ = fused_weighted_divergence(name, HeadInputs(hidden, head), TopKTeacher(top.values, top.indices, "student"),
                                        token_weights, **mixture_weight(name, weight), chunk_size=4)
    grads = torch.autograd.grad(loss, (hidden, head))
    ref = (token_weights * fn(hidden @ head.t(), teacher_logits, weight, 1.0)).sum()
    ref_grads = torch.autograd.grad(ref, (hidden, head))
    assert_matches(loss, grads, ref, ref_grads, hidden, head, token_weights, teacher_logits)


def test_masked_positions_and_empty_sequences_contribute_nothing():
    """[B=3, R=4]: row 1 is an empty sequence (all masked), rows 0 and 2 have padding. Masked positions carry
    garbage teacher entries (log-probs 0 = probability 1 on token 0, twice: an invalid distribution) and give
    0, with no gradient; the rest equals the bucket reference over the real positions only."""
    hidden, head, teacher_logits, top, _ = problem(7, n=12, k=3)
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    values, ids = top.values.clone().reshape(3, 4, 3), top.indices.clone().reshape(3, 4, 3)
    values[~mask], ids[~mask] = 0.0, 0
    token_weights = mask.double() / mask.sum()
    h3 = hidden.reshape(3, 4, -1)
    loss, per_token = fused_weighted_divergence("srkl", HeadInputs(h3, head), TopKTeacher(values, ids, "student"),
                                                token_weights, alpha=0.1, mask=mask, chunk_size=2)
    grads = torch.autograd.grad(loss, (hidden, head))
    assert torch.isfinite(loss) and bool((per_token[~mask] == 0).all())
    keep = mask.reshape(-1).nonzero().squeeze(1)
    kept_top = torch.return_types.topk((top.values[keep], top.indices[keep]))
    ref = bucket_reference("srkl", hidden[keep] @ head.t(), kept_top).sum() / mask.sum()
    ref_grads = torch.autograd.grad(ref, (hidden, head))
    assert_matches(loss, grads, ref, ref_grads, hidden, head, token_weights.reshape(-1), teacher_logits)
    dead = (~mask).reshape(-1)
    assert bool((grads[0][dead] == 0).all())  # no gradient at masked positions (row 1: the empty sequence)


def test_neg_inf_student_logits_are_exact_zeros():
    """Student logits -inf (q = 0) on some tail tokens: the teacher puts no tail mass there either (p_j = T q_j /
    Q = 0), the divergences stay finite and equal the bucket reference. A bias of -inf stands for the -inf."""
    hidden, head, teacher_logits, top, token_weights = problem(11, k=4)
    in_top = torch.zeros(23, dtype=torch.bool)
    in_top[top.indices.reshape(-1)] = True
    bias = torch.zeros(23, dtype=torch.float64)
    bias[(~in_top).nonzero().squeeze(1)[:3]] = float("-inf")  # three tokens off every row's top-k
    for name in ("fkl", "skl", "srkl", "rkl"):
        weight = PLAIN[name][0]
        loss, _ = fused_weighted_divergence(name, HeadInputs(hidden, head, bias),
                                            TopKTeacher(top.values, top.indices, "student"), token_weights,
                                            **mixture_weight(name, weight))
        grads = torch.autograd.grad(loss, (hidden, head))
        ref = (token_weights * bucket_reference(name, hidden @ head.t() + bias, top)).sum()
        ref_grads = torch.autograd.grad(ref, (hidden, head))
        assert torch.isfinite(loss)
        assert_matches(loss, grads, ref, ref_grads, hidden, head, token_weights,
                       torch.where(torch.isfinite(teacher_logits), teacher_logits, 0.0))


def test_student_without_tail_mass_falls_back_to_the_even_spread():
    """A row where the student gives every non-top-k token probability 0 (Q = 0) while the teacher has tail mass
    T > 0: forward KL is +inf there (as the bucket form: T log(T / 0)), a constant with no gradient; no NaN."""
    hidden, head, teacher_logits, top, token_weights = problem(13, n=2, k=3)
    ids = torch.tensor([[0, 1, 2], [0, 1, 2]])
    values = torch.log(torch.tensor([[0.5, 0.3, 0.1], [0.5, 0.3, 0.1]], dtype=torch.float64))
    bias = torch.full((23,), float("-inf"), dtype=torch.float64)
    bias[:3] = 0.0
    values_fkl = fused_divergence("fkl", HeadInputs(hidden, head, bias), TopKTeacher(values, ids, "student"))
    assert bool(torch.isinf(values_fkl).all())
    loss = fused_divergence("srkl", HeadInputs(hidden, head, bias), TopKTeacher(values, ids, "student"),
                            alpha=0.1).sum()
    grads = torch.autograd.grad(loss, (hidden, head))
    ref = bucket_reference("srkl", hidden @ head.t() + bias, torch.return_types.topk((values, ids))).sum()
    ref_grads = torch.autograd.grad(ref, (hidden, head))
    assert_matches(loss, grads, ref, ref_grads, hidden, head, torch.ones(2, dtype=torch.float64), teacher_logits)


@pytest.mark.parametrize("tail", ["student", "uniform"])
@pytest.mark.parametrize("name", ["skl", "srkl", "fkl"])
def test_plain_path_of_the_methods_matches_the_fused_one(name, tail):
    """`divergence_loss` on full logits (the plain path) spells the same teacher out: same loss and gradient."""
    hidden, head, teacher_logits, top, _ = problem(17, n=8, k=4)
    weight = PLAIN[name][0]
    targets = torch.zeros(2, 4, dtype=torch.long)
    targets[0, 0] = -100
    mask = targets != -100
    token_weights = mask.double() / mask.sum()
    teacher = TopKTeacher(top.values.reshape(2, 4, 4), top.indices.reshape(2, 4, 4), tail)
    results = []
    for fused in (True, False):
        student = HeadInputs(hidden.reshape(2, 4, -1), head) if fused else (hidden @ head.t()).reshape(2, 4, -1)
        batch = LossInputs(student, teacher, targets, 2, (2, int(mask.sum()), 0), vocab_size=23)
        loss, _ = divergence_loss(batch, name, slice(0, 2), token_weights, weight=weight)
        results.append((loss, torch.autograd.grad(loss, (hidden, head))))
    (loss, grads), (ref, ref_grads) = results
    assert_matches(loss, grads, ref, ref_grads, hidden, head, token_weights.reshape(-1), teacher_logits)


def test_unknown_tail_is_refused():
    hidden, head, _, top, token_weights = problem(1)
    with pytest.raises(ValueError, match="tail must be one of"):
        fused_weighted_divergence("fkl", HeadInputs(hidden, head), TopKTeacher(top.values, top.indices, "flat"),
                                  token_weights)


def test_default_tail_is_the_even_spread():
    hidden, head, _, top, token_weights = problem(19, k=4)
    for name in ("fkl", "srkl"):
        weight = PLAIN[name][0]
        mix = mixture_weight(name, weight)
        default, _ = fused_weighted_divergence(name, HeadInputs(hidden, head), TopKTeacher(top.values, top.indices),
                                               token_weights, **mix)
        uniform, _ = fused_weighted_divergence(name, HeadInputs(hidden, head),
                                               TopKTeacher(top.values, top.indices, "uniform"), token_weights, **mix)
        student, _ = fused_weighted_divergence(name, HeadInputs(hidden, head),
                                               TopKTeacher(top.values, top.indices, "student"), token_weights, **mix)
        assert default.item() == uniform.item() != student.item()
