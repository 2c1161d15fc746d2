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
                                   mixture_weight, power_exponents, with_actual_token)
from distillm.methods.base import LossInputs, divergence_loss, token_log_probs
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


# --- the actual token's exact log-prob as a (k+1)-th known entry (losses.fused.with_actual_token) -------------------


def actual_problem(seed, n=12, v=23, k=4):
    """A top-k teacher with the actual next token's exact log-prob: positions 0-3 have it inside the top-k, 4-9
    outside, 10-11 are masked (-100)."""
    hidden, head, teacher_logits, top, token_weights = problem(seed, n=n, v=v, k=k)
    log_p = torch.log_softmax(teacher_logits, -1)
    g = torch.Generator().manual_seed(seed + 1000)
    targets = torch.empty(n, dtype=torch.long)
    for row in range(n):
        ids = set(top.indices[row].tolist())
        pool = sorted(ids) if row < 4 else [j for j in range(v) if j not in ids]
        targets[row] = pool[int(torch.randint(len(pool), (1,), generator=g))]
    targets[10:] = -100
    own = log_p.gather(1, targets.clamp_min(0).unsqueeze(1)).squeeze(1)
    return hidden, head, teacher_logits, top, token_weights, targets, own


def dense_actual_teacher(student_logits, top, targets, own, tail):
    """The teacher's full log-probs written out row by row: the top-k and (where outside it) the actual token as
    given, the rest T = 1 - sum of those spread evenly or in proportion to the detached student's probabilities."""
    log_q = torch.log_softmax(student_logits.detach(), -1)
    v = log_q.shape[1]
    out = torch.empty_like(log_q)
    for row in range(log_q.shape[0]):
        known = dict(zip(top.indices[row].tolist(), top.values[row].tolist()))
        if int(targets[row]) >= 0 and int(targets[row]) not in known:
            known[int(targets[row])] = float(own[row])
        rest = [j for j in range(v) if j not in known]
        mass = 1 - sum(math.exp(x) for x in known.values())
        tail_q = sum(math.exp(log_q[row, j].item()) for j in rest)
        for j in range(v):
            if j in known:
                out[row, j] = known[j]
            elif tail == "uniform":
                out[row, j] = math.log(mass) - math.log(len(rest))
            else:
                out[row, j] = math.log(mass) + log_q[row, j].item() - math.log(tail_q)
    return out


def fused_and_plain(name, hidden, head, teacher, targets, token_weights, temperature=1.0, bias=None):
    """(loss, grads) through `divergence_loss`, fused and plain: the path every method takes."""
    weight = PLAIN[name][0]
    n = hidden.shape[0]
    results = []
    for fused in (True, False):
        logits = hidden @ head.t() + (0 if bias is None else bias)
        student = HeadInputs(hidden.reshape(1, n, -1), head, bias) if fused else logits.reshape(1, n, -1)
        batch = LossInputs(student, teacher, targets.reshape(1, n), 1, (1, int((targets >= 0).sum()), 0),
                           vocab_size=head.shape[0])
        loss, _ = divergence_loss(batch, name, slice(0, 1), token_weights.reshape(1, n), weight=weight,
                                  temperature=temperature)
        results.append((loss, torch.autograd.grad(loss, (hidden, head))))
    return results


def reshaped(top, targets, own, tail):
    n, k = top.values.shape
    return TopKTeacher(top.values.reshape(1, n, k), top.indices.reshape(1, n, k), tail, own.reshape(1, n))


@pytest.mark.parametrize("tail", ["uniform", "student"])
@pytest.mark.parametrize("name", ["fkl", "skl", "srkl", "rkl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_actual_token_is_a_known_entry_of_the_teacher(name, tail, temperature):
    """Fused and plain paths of `divergence_loss` against the dense teacher with k + 1 known entries."""
    hidden, head, teacher_logits, top, _, targets, own = actual_problem(23)
    mask = targets >= 0
    token_weights = mask.double() / mask.sum()
    weight, fn = PLAIN[name]
    student_logits = hidden @ head.t()
    dense = dense_actual_teacher(student_logits, top, targets, own, tail)
    values = fn(student_logits, dense, weight, temperature)
    ref = torch.where(mask, token_weights * values, 0.0).sum()
    ref_grads = torch.autograd.grad(ref, (hidden, head))
    for loss, grads in fused_and_plain(name, hidden, head, reshaped(top, targets, own, tail), targets, token_weights,
                                       temperature):
        assert_matches(loss, grads, ref, ref_grads, hidden, head, token_weights, teacher_logits, temperature)


def test_actual_token_changes_the_loss_only_where_it_is_outside_the_top_k():
    """The known entry differs from the tail's guess (so the reference above tells the two apart), and where the
    actual token is inside the top-k (or the teacher sent no log-prob for it) the result is the top-k teacher's,
    bit for bit."""
    hidden, head, teacher_logits, top, _, targets, own = actual_problem(29)
    inside = torch.zeros_like(targets, dtype=torch.bool)
    inside[:4] = True
    token_weights = inside.double()
    for tail in ("uniform", "student"):
        for name in ("fkl", "srkl"):
            plain_top = TopKTeacher(top.values.reshape(1, 12, 4), top.indices.reshape(1, 12, 4), tail)
            (a, ga), (b, gb) = fused_and_plain(name, hidden, head, reshaped(top, targets, own, tail),
                                               torch.where(inside, targets, -100), token_weights)
            (c, gc), (d, gd) = fused_and_plain(name, hidden, head, plain_top, torch.where(inside, targets, -100),
                                               token_weights)
            assert a.item() == c.item() and b.item() == d.item()
            assert all(torch.equal(x, y) for x, y in zip(ga + gb, gc + gd))
            # outside the top-k the extra entry matters: the result moves off the top-k teacher's
            outside = (~inside) & (targets >= 0)
            (e, _), _ = fused_and_plain(name, hidden, head, reshaped(top, targets, own, tail), targets,
                                        outside.double())
            (f, _), _ = fused_and_plain(name, hidden, head, plain_top, targets, outside.double())
            assert abs(e.item() - f.item()) > 1e-3 * abs(f.item())


def test_with_actual_token_entries():
    hidden, head, teacher_logits, top, _, targets, own = actual_problem(31)
    teacher = TopKTeacher(top.values, top.indices, "uniform", own)
    out = with_actual_token(teacher, targets)
    assert out.logprobs.shape == (12, 5) and out.indices.shape == (12, 5) and out.target is own
    assert bool((out.indices[:4, -1] == -1).all()) and bool(torch.isneginf(out.logprobs[:4, -1]).all())
    assert torch.equal(out.indices[4:10, -1], targets[4:10]) and torch.equal(out.logprobs[4:10, -1], own[4:10])
    assert bool((out.indices[10:, -1] == -1).all())  # masked positions get no entry
    assert torch.equal(out.logprobs[:, :4], top.values) and torch.equal(out.indices[:, :4], top.indices)
    no_target = TopKTeacher(top.values, top.indices, "uniform")
    assert with_actual_token(no_target, targets) is no_target
    with pytest.raises(ValueError, match="leading shape"):
        with_actual_token(teacher, targets[:5])


def test_actual_token_with_k_equal_to_vocab_is_the_exact_teacher():
    hidden, head, teacher_logits, top, token_weights = problem(37, v=11, k=11)
    targets = torch.arange(9) % 11
    own = torch.log_softmax(teacher_logits, -1).gather(1, targets.unsqueeze(1)).squeeze(1)
    for name in ("fkl", "skl", "srkl"):
        weight, fn = PLAIN[name]
        ref = (token_weights * fn(hidden @ head.t(), teacher_logits, weight, 1.0)).sum()
        ref_grads = torch.autograd.grad(ref, (hidden, head))
        for tail in ("uniform", "student"):
            for loss, grads in fused_and_plain(name, hidden, head, reshaped(top, targets, own, tail), targets,
                                               token_weights):
                assert_matches(loss, grads, ref, ref_grads, hidden, head, token_weights, teacher_logits)


def test_actual_token_with_neg_inf_logits_and_zero_probability():
    """Student logits -inf on some tail tokens (q = 0), and actual tokens the teacher gives probability 0
    (log-prob -inf, an exact known zero): finite, and equal to the dense reference."""
    hidden, head, teacher_logits, top, _, targets, own = actual_problem(41)
    own = own.clone()
    own[4:6] = float("-inf")
    mask = targets >= 0
    token_weights = mask.double() / mask.sum()
    in_top = torch.zeros(23, dtype=torch.bool)
    in_top[top.indices.reshape(-1)] = True
    in_top[targets[mask]] = True
    bias = torch.zeros(23, dtype=torch.float64)
    bias[(~in_top).nonzero().squeeze(1)[:2]] = float("-inf")
    # (not FKL with the even tail: p > 0 where q = 0 makes it +inf, in the reference too)
    for tail, name in [("uniform", "skl"), ("uniform", "srkl"), ("student", "fkl"), ("student", "skl"),
                       ("student", "srkl")]:
            weight, fn = PLAIN[name]
            student_logits = hidden @ head.t() + bias
            dense = dense_actual_teacher(student_logits, top, targets, own, tail)
            values = fn(student_logits, dense, weight, 1.0)
            ref = torch.where(mask, token_weights * values, 0.0).sum()
            ref_grads = torch.autograd.grad(ref, (hidden, head))
            for loss, grads in fused_and_plain(name, hidden, head, reshaped(top, targets, own, tail), targets,
                                               token_weights, bias=bias):
                assert torch.isfinite(loss)
                assert_matches(loss, grads, ref, ref_grads, hidden, head, token_weights,
                               torch.where(torch.isfinite(teacher_logits), teacher_logits, 0.0))


def test_actual_token_masked_positions_and_empty_sequences_contribute_nothing():
    """[B=3, R=4], row 1 empty: masked positions carry garbage (log-prob 0 on token 0, an actual-token log-prob 0)
    and contribute 0 with no gradient; the rest equals the dense reference over the real positions."""
    hidden, head, teacher_logits, top, _, targets, own = actual_problem(43)
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    targets = torch.where(mask.reshape(-1), targets.clamp_min(0), -100)
    values, ids, own3 = top.values.clone(), top.indices.clone(), own.clone()
    dead = ~mask.reshape(-1)
    values[dead], ids[dead], own3[dead] = 0.0, 0, 0.0
    token_weights = mask.double() / mask.sum()
    teacher = TopKTeacher(values.reshape(3, 4, 4), ids.reshape(3, 4, 4), "student", own3.reshape(3, 4))
    for fused in (True, False):
        logits = hidden @ head.t()
        student = HeadInputs(hidden.reshape(3, 4, -1), head) if fused else logits.reshape(3, 4, -1)
        batch = LossInputs(student, teacher, targets.reshape(3, 4), 3, (3, int(mask.sum()), 0), vocab_size=23)
        loss, per_token = divergence_loss(batch, "srkl", slice(0, 3), token_weights, weight=0.1)
        grads = torch.autograd.grad(loss, (hidden, head))
        assert torch.isfinite(loss) and bool((per_token[~mask] == 0).all())
        keep = (~dead).nonzero().squeeze(1)
        kept_top = torch.return_types.topk((top.values[keep], top.indices[keep]))
        kept_logits = hidden[keep] @ head.t()
        dense = dense_actual_teacher(kept_logits, kept_top, targets[keep], own[keep], "student")
        ref = D.skew_reverse_kl(kept_logits, dense, 0.1).sum() / mask.sum()
        ref_grads = torch.autograd.grad(ref, (hidden, head))
        assert_matches(loss, grads, ref, ref_grads, hidden, head, token_weights.reshape(-1), teacher_logits)
        assert bool((grads[0][dead] == 0).all())


def test_token_log_probs_read_the_extra_entry():
    """`token_log_probs` of an augmented teacher (an id of -1 = no entry) is the actual token's exact log-prob."""
    hidden, head, teacher_logits, top, _, targets, own = actual_problem(47)
    teacher = with_actual_token(reshaped(top, targets, own, "uniform"), targets.reshape(1, 12))
    batch = LossInputs(HeadInputs(hidden.reshape(1, 12, -1), head), teacher, targets.reshape(1, 12), 1, (1, 10, 0),
                       vocab_size=23)
    got = token_log_probs(batch, "teacher", slice(0, 1)).reshape(-1)
    assert torch.isfinite(got).all()
    # float32: own rounded (|own| eps / 2), minus a log-normaliser of k + 2 terms that is 0 up to (k + 2) eps
    atol = torch.finfo(torch.float32).eps * (float(own[:10].abs().max()) + 6)
    torch.testing.assert_close(got[:10].double(), own[:10], rtol=0, atol=atol)
    assert bool((got[10:] == 0).all())


# --- the "power" tail: p_j proportional to q_j ** g off the known tokens, g fitted per row to the known entries ------


def power_dense_teacher(student_logits, top, targets=None, own=None):
    """The teacher's full log-probs, row by row in plain Python: the known entries as given (top-k, and the actual
    token where outside it), g = the least-squares slope of log p on log q over the known entries with both
    finite, clamped to [0, 2] (1 with fewer than two or no spread in log q), the rest T q_j ** g / sum q ** g."""
    log_q = torch.log_softmax(student_logits.detach(), -1)
    v = log_q.shape[1]
    out = torch.empty_like(log_q)
    for row in range(log_q.shape[0]):
        known = dict(zip(top.indices[row].tolist(), top.values[row].tolist()))
        if targets is not None and int(targets[row]) >= 0 and int(targets[row]) not in known:
            known[int(targets[row])] = float(own[row])
        pairs = [(log_q[row, j].item(), lp) for j, lp in known.items()
                 if math.isfinite(lp) and math.isfinite(log_q[row, j].item())]
        g = 1.0
        if len(pairs) >= 2:
            mx = sum(x for x, _ in pairs) / len(pairs)
            my = sum(y for _, y in pairs) / len(pairs)
            sxx = sum((x - mx) ** 2 for x, _ in pairs)
            if sxx > 0:
                g = min(max(sum((x - mx) * (y - my) for x, y in pairs) / sxx, 0.0), 2.0)
        rest = [j for j in range(v) if j not in known]
        mass = 1 - sum(math.exp(x) for x in known.values())
        weights = {j: (math.exp(g * log_q[row, j].item()) if math.isfinite(log_q[row, j].item()) else 0.0)
                   for j in rest}
        total = sum(weights.values())
        for j in range(v):
            if j in known:
                out[row, j] = known[j]
            elif weights[j] == 0.0:
                out[row, j] = float("-inf")
            else:
                out[row, j] = math.log(mass) + math.log(weights[j]) - math.log(total)
    return out


@pytest.mark.parametrize("name", ["fkl", "skl", "srkl", "rkl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("actual", [False, True])
def test_power_tail_matches_the_dense_reference(name, temperature, actual):
    """Fused (`fused_divergence`, per token, and `divergence_loss`) and plain paths against the row-by-row
    dense teacher, with and without the actual token as a known entry."""
    hidden, head, teacher_logits, top, _, targets, own = actual_problem(53, k=5)
    mask = targets >= 0
    token_weights = mask.double() / mask.sum()
    weight, fn = PLAIN[name]
    student_logits = hidden @ head.t()
    dense = power_dense_teacher(student_logits, top, targets if actual else None, own)
    ref = torch.where(mask, token_weights * fn(student_logits, dense, weight, temperature), 0.0).sum()
    ref_grads = torch.autograd.grad(ref, (hidden, head))
    teacher = reshaped(top, targets, own, "power")
    if not actual:
        teacher = teacher._replace(target=None)
    for loss, grads in fused_and_plain(name, hidden, head, teacher, targets, token_weights, temperature):
        assert_matches(loss, grads, ref, ref_grads, hidden, head, token_weights, teacher_logits, temperature)
    if not actual:
        values = fused_divergence(name, HeadInputs(hidden, head), TopKTeacher(top.values, top.indices, "power"),
                                  **mixture_weight(name, weight), temperature=temperature, chunk_size=5)
        loss = torch.where(mask, token_weights * values, 0.0).sum()
        assert_matches(loss, torch.autograd.grad(loss, (hidden, head)), ref, ref_grads, hidden, head,
                       token_weights, teacher_logits, temperature)


def test_power_exponents_fit_and_fallbacks():
    """An exact power law is recovered; clamped to [0, 2]; one usable entry, or no spread in log q: the fallback."""
    log_q = torch.log(torch.tensor([[0.4, 0.2, 0.1], [0.4, 0.2, 0.1], [0.4, 0.2, 0.1], [0.3, 0.3, 0.3],
                                    [0.4, 0.2, 0.1]], dtype=torch.float64))
    log_p = torch.stack([0.5 * log_q[0] - 0.3, 3.0 * log_q[1], -1.0 * log_q[2], log_q[3],
                         torch.tensor([-1.0, float("-inf"), float("-inf")], dtype=torch.float64)])
    g = power_exponents(log_p, log_q)
    torch.testing.assert_close(g[0], torch.tensor(0.5, dtype=torch.float64), rtol=0, atol=1e-12)
    assert g[1].item() == 2.0 and g[2].item() == 0.0 and g[3].item() == 1.0 and g[4].item() == 1.0


def test_power_tail_edge_cases():
    """k = V: the exact teacher. k = 1: no fit, g = 1, the student tail bit for bit. -inf student logits: those
    tokens get teacher probability 0 and everything stays finite (the dense reference). Masked positions and an
    empty sequence: nothing, and no gradient."""
    hidden, head, teacher_logits, top, token_weights = problem(59, v=11, k=11)
    for name in ("fkl", "srkl"):
        weight, fn = PLAIN[name]
        loss, _ = fused_weighted_divergence(name, HeadInputs(hidden, head), TopKTeacher(top.values, top.indices,
                                            "power"), token_weights, **mixture_weight(name, weight), chunk_size=4)
        ref = (token_weights * fn(hidden @ head.t(), teacher_logits, weight, 1.0)).sum()
        assert_matches(loss, torch.autograd.grad(loss, (hidden, head)), ref,
                       torch.autograd.grad(ref, (hidden, head)), hidden, head, token_weights, teacher_logits)

    hidden, head, teacher_logits, top, token_weights = problem(61, k=1)
    power, _ = fused_weighted_divergence("srkl", HeadInputs(hidden, head), TopKTeacher(top.values, top.indices,
                                         "power"), token_weights, alpha=0.1)
    student, _ = fused_weighted_divergence("srkl", HeadInputs(hidden, head), TopKTeacher(top.values, top.indices,
                                           "student"), token_weights, alpha=0.1)
    assert power.item() == student.item()

    hidden, head, teacher_logits, top, token_weights = problem(67, k=4)
    in_top = torch.zeros(23, dtype=torch.bool)
    in_top[top.indices.reshape(-1)] = True
    bias = torch.zeros(23, dtype=torch.float64)
    bias[(~in_top).nonzero().squeeze(1)[:3]] = float("-inf")
    for name in ("fkl", "skl", "srkl"):
        weight, fn = PLAIN[name]
        loss, _ = fused_weighted_divergence(name, HeadInputs(hidden, head, bias),
                                            TopKTeacher(top.values, top.indices, "power"), token_weights,
                                            **mixture_weight(name, weight))
        grads = torch.autograd.grad(loss, (hidden, head))
        logits = hidden @ head.t() + bias
        ref = (token_weights * fn(logits, power_dense_teacher(logits, top), weight, 1.0)).sum()
        assert torch.isfinite(loss)
        assert_matches(loss, grads, ref, torch.autograd.grad(ref, (hidden, head)), hidden, head, token_weights,
                       teacher_logits)

    hidden, head, teacher_logits, top, _ = problem(71, n=12, k=3)
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    values, ids = top.values.clone(), top.indices.clone()
    dead = ~mask.reshape(-1)
    values[dead], ids[dead] = 0.0, 0
    token_weights = mask.double() / mask.sum()
    loss, per_token = fused_weighted_divergence("srkl", HeadInputs(hidden.reshape(3, 4, -1), head),
                                                TopKTeacher(values.reshape(3, 4, 3), ids.reshape(3, 4, 3), "power"),
                                                token_weights, alpha=0.1, mask=mask, chunk_size=2)
    grads = torch.autograd.grad(loss, (hidden, head))
    keep = (~dead).nonzero().squeeze(1)
    logits = hidden[keep] @ head.t()
    kept_top = torch.return_types.topk((top.values[keep], top.indices[keep]))
    ref = D.skew_reverse_kl(logits, power_dense_teacher(logits, kept_top), 0.1).sum() / mask.sum()
    assert torch.isfinite(loss) and bool((per_token[~mask] == 0).all())
    assert_matches(loss, grads, ref, torch.autograd.grad(ref, (hidden, head)), hidden, head,
                   token_weights.reshape(-1), teacher_logits)
    assert bool((grads[0][dead] == 0).all())
