"""Token-level divergences and reductions against plain brute-force references (float64, loops over V)."""
import math

import pytest
import torch
from tolerances import softmax_atol, sum_atol

from distillm.losses.divergences import (
    acceptance_rate,
    forward_kl,
    generalized_jsd,
    per_sequence_mean,
    reduce_tokens,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    token_log_probs,
    total_variation,
)

B, T, V = 2, 3, 7
TEMPS = [0.5, 1.0, 2.0]


def _logits(seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(B, T, V, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------------------------ brute force
def bf_softmax(row, tau):
    z = [row[v] / tau for v in range(len(row))]
    zmax = max(zv.detach().item() for zv in z)
    e = [torch.exp(zv - zmax) for zv in z]
    s = sum(e)
    return [ev / s for ev in e]


def bf_kl(a, b):
    total = torch.zeros((), dtype=torch.float64)
    for v in range(len(a)):
        if a[v] > 0:  # 0 log 0 = 0
            total = total + a[v] * torch.log(a[v] / b[v])
    return total


def bf_fkl(p, q, w):
    return bf_kl(p, q)


def bf_rkl(p, q, w):
    return bf_kl(q, p)


def bf_skl(p, q, a):
    return bf_kl(p, [a * p[v] + (1 - a) * q[v] for v in range(len(p))])


def bf_srkl(p, q, a):
    return bf_kl(q, [(1 - a) * p[v] + a * q[v] for v in range(len(p))])


def bf_srkl_detached(p, q, a):
    q_const = [qv.detach() for qv in q]  # the inner q is a constant
    return bf_kl(q, [(1 - a) * p[v] + a * q_const[v] for v in range(len(p))])


def bf_jsd(p, q, b):
    m = [b * p[v] + (1 - b) * q[v] for v in range(len(p))]
    return b * bf_kl(p, m) + (1 - b) * bf_kl(q, m)


def bf_tvd(p, q, w):
    return 0.5 * sum(torch.abs(p[v] - q[v]) for v in range(len(p)))


def bf_acc(p, q, w):
    return sum(torch.minimum(p[v], q[v]) for v in range(len(p)))


def brute(fn, student, teacher, tau=1.0, weight=0.0):
    """[B, T] tensor of fn(p, q, w) per token; weight is a float or a per-sequence list."""
    rows = []
    for b in range(student.shape[0]):
        w = weight[b] if isinstance(weight, (list, tuple)) else weight
        cols = []
        for t in range(student.shape[1]):
            p = bf_softmax(teacher[b, t], tau)
            q = bf_softmax(student[b, t], tau)
            cols.append(fn(p, q, w))
        rows.append(torch.stack(cols))
    return torch.stack(rows)


def value_and_grad(fn, student, teacher, upstream):
    s = student.detach().clone().requires_grad_(True)
    out = fn(s, teacher)
    (out * upstream).sum().backward()
    return out.detach(), s.grad


def check(impl, ref_fn, student, teacher, tau, weight):
    """impl on float32 logits vs brute force on float64: value and gradient w.r.t. the student (the upstream
    gradient is at most 1.5, so the gradient's bound is 1.5 times the value's; the float64 brute force is exact
    at this scale)."""
    up = torch.rand(student.shape[:2], generator=torch.Generator().manual_seed(7), dtype=torch.float64) + 0.5
    val, grad = value_and_grad(lambda s, t: impl(s, t), student.float(), teacher.float(), up.float())
    ref_val, ref_grad = value_and_grad(lambda s, t: brute(ref_fn, s, t, tau, weight), student, teacher, up)
    assert val.dtype == torch.float32 and val.shape == (B, T)
    atol = softmax_atol(student, teacher, temperature=tau)
    torch.testing.assert_close(val.double(), ref_val, atol=atol, rtol=0)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1.5 * atol, rtol=0)
    return val, grad


# ---------------------------------------------------------------------------------- values and grads
@pytest.mark.parametrize("tau", TEMPS)
@pytest.mark.parametrize(
    "name", ["fkl", "rkl", "tvd", "acc"]
)
def test_plain_divergences_match_brute_force(name, tau):
    impl, ref = {
        "fkl": (forward_kl, bf_fkl), "rkl": (reverse_kl, bf_rkl),
        "tvd": (total_variation, bf_tvd), "acc": (acceptance_rate, bf_acc),
    }[name]
    s, t = _logits(1), _logits(2)
    check(lambda a, b: impl(a, b, temperature=tau), ref, s, t, tau, 0.0)


@pytest.mark.parametrize("tau", TEMPS)
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9, [0.1, 0.4], [0.0, 0.3]])
def test_skew_kls_match_brute_force(alpha, tau):
    s, t = _logits(3), _logits(4)
    a = torch.tensor(alpha) if isinstance(alpha, list) else alpha
    check(lambda x, y: skew_forward_kl(x, y, a, temperature=tau), bf_skl, s, t, tau, alpha)
    # SKL's only student dependence is inside m1: detaching it keeps the value and removes the gradient
    detached = skew_forward_kl(s.float().requires_grad_(True), t.float(), a, temperature=tau,
                               detach_student_in_mixture=True)
    assert not detached.requires_grad
    torch.testing.assert_close(detached.double(), brute(bf_skl, s, t, tau, alpha), rtol=0,
                               atol=softmax_atol(s, t, temperature=tau))
    check(lambda x, y: skew_reverse_kl(x, y, a, temperature=tau), bf_srkl_detached, s, t, tau, alpha)
    check(lambda x, y: skew_reverse_kl(x, y, a, temperature=tau, detach_student_in_mixture=False),
          bf_srkl, s, t, tau, alpha)


@pytest.mark.parametrize("tau", TEMPS)
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9, [0.2, 0.7]])
def test_jsd_matches_brute_force(beta, tau):
    s, t = _logits(5), _logits(6)
    b = torch.tensor(beta) if isinstance(beta, list) else beta
    check(lambda x, y: generalized_jsd(x, y, b, temperature=tau), bf_jsd, s, t, tau, beta)


def test_jsd_endpoints_are_fkl_and_rkl():
    s, t = _logits(8).float(), _logits(9).float()
    # two float32 evaluations of the same divergence by different formulas: each within softmax_atol of the truth
    tol = dict(rtol=0, atol=2 * softmax_atol(s, t))
    for beta, ref in [(0.0, forward_kl), (1.0, reverse_kl)]:
        v, g = value_and_grad(lambda x, y: generalized_jsd(x, y, beta, temperature=2.0), s, t, 1.0)
        rv, rg = value_and_grad(lambda x, y: ref(x, y, temperature=2.0), s, t, 1.0)
        torch.testing.assert_close(v, rv, **tol)
        torch.testing.assert_close(g, rg, **tol)
    # per-sequence betas with end points: row 0 -> FKL, row 1 -> JSD_0.5 / RKL
    mixed = generalized_jsd(s, t, torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(mixed[0], forward_kl(s, t)[0], **tol)
    torch.testing.assert_close(mixed[1], generalized_jsd(s, t, 0.5)[1], **tol)
    mixed = generalized_jsd(s, t, torch.tensor([0.3, 1.0]))
    torch.testing.assert_close(mixed[1], reverse_kl(s, t)[1], **tol)
    torch.testing.assert_close(mixed[0], generalized_jsd(s, t, 0.3)[0], **tol)


# --------------------------------------------------------------------------------------- detach choice
def test_srkl_detach_changes_gradient_not_value():
    s, t = _logits(10), _logits(11)
    up = torch.ones(B, T, dtype=torch.float64)
    v_det, g_det = value_and_grad(lambda x, y: skew_reverse_kl(x, y, 0.3), s, t, up)
    v_full, g_full = value_and_grad(
        lambda x, y: skew_reverse_kl(x, y, 0.3, detach_student_in_mixture=False), s, t, up)
    _, g_ref_det = value_and_grad(lambda x, y: brute(bf_srkl_detached, x, y, 1.0, 0.3), s, t, up)
    _, g_ref_full = value_and_grad(lambda x, y: brute(bf_srkl, x, y, 1.0, 0.3), s, t, up)
    torch.testing.assert_close(v_det, v_full, rtol=0, atol=0)  # the same float64 arithmetic
    atol = softmax_atol(s, t, dtype=torch.float64)  # float64 throughout
    torch.testing.assert_close(g_det, g_ref_det, atol=atol, rtol=0)
    torch.testing.assert_close(g_full, g_ref_full, atol=atol, rtol=0)
    assert (g_det - g_full).abs().max() > 1e3 * atol


# ------------------------------------------------------------------------------------------ identities
@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_alpha_zero_reduces_to_plain_kls(tau):
    s, t = _logits(12).float(), _logits(13).float()
    tol = dict(rtol=0, atol=2 * softmax_atol(s, t, temperature=tau))  # two float32 evaluations
    for skew, plain, detaches in [(skew_forward_kl, forward_kl, [False]),
                                  (skew_reverse_kl, reverse_kl, [False, True])]:
        for detach in detaches:
            v, g = value_and_grad(
                lambda x, y: skew(x, y, 0.0, temperature=tau, detach_student_in_mixture=detach), s, t, 1.0)
            rv, rg = value_and_grad(lambda x, y: plain(x, y, temperature=tau), s, t, 1.0)
            torch.testing.assert_close(v, rv, **tol)
            torch.testing.assert_close(g, rg, **tol)
            v = skew(s, t, torch.zeros(B), temperature=tau, detach_student_in_mixture=detach)
            torch.testing.assert_close(v, rv, **tol)


def test_acceptance_is_one_minus_tvd():
    s, t = _logits(14).float(), _logits(15).float()
    for tau in TEMPS:
        # sums of V probabilities (each at most 1) by two formulas
        torch.testing.assert_close(acceptance_rate(s, t, temperature=tau),
                                   1 - total_variation(s, t, temperature=tau), rtol=0, atol=2 * sum_atol(V, 1.0))


def _all_divergences(s, t):
    return {
        "fkl": forward_kl(s, t), "rkl": reverse_kl(s, t), "tvd": total_variation(s, t),
        "skl": skew_forward_kl(s, t, 0.1), "srkl": skew_reverse_kl(s, t, 0.1),
        "jsd": generalized_jsd(s, t, 0.5), "jsd_lo": generalized_jsd(s, t, 0.0),
        "jsd_hi": generalized_jsd(s, t, 1.0),
    }


def test_zero_when_equal_and_nonnegative_otherwise():
    x = _logits(16).float()
    for name, v in _all_divergences(x, x.clone()).items():
        # p log(p / m) with m = p up to the rounding of the mixture (relative eps): a sum of V terms of size p * eps
        torch.testing.assert_close(v, torch.zeros(B, T), atol=sum_atol(V, 1.0), rtol=0, msg=name)
    torch.testing.assert_close(acceptance_rate(x, x), torch.ones(B, T), rtol=0, atol=sum_atol(V, 1.0))  # sum of p
    s, t = _logits(17).float(), _logits(18).float()
    for name, v in _all_divergences(s, t).items():
        assert (v > 0).all(), name
    assert (acceptance_rate(s, t) < 1).all()


def test_skew_shrinks_divergence():
    s, t = _logits(19).float(), _logits(20).float()
    fkl, rkl = forward_kl(s, t), reverse_kl(s, t)
    prev = fkl
    slack = 2 * softmax_atol(s, t)  # two float32 evaluations
    for a in (0.05, 0.1, 0.3, 0.6, 0.9):
        skl = skew_forward_kl(s, t, a)
        assert (skl <= fkl).all() and (skl <= prev + slack).all()
        assert (skew_reverse_kl(s, t, a) <= rkl).all()
        prev = skl


# ------------------------------------------------------------------------------------------ edge cases
def _masked_teacher(seed):
    t = _logits(seed)
    t[0, :, 2] = -math.inf
    t[1, 1, [0, 5]] = -math.inf
    t[1, 2, 6] = -math.inf
    return t


@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_neg_inf_teacher_logits(tau):
    s, t = _logits(21), _masked_teacher(22)
    cases = [
        (lambda x, y: forward_kl(x, y, temperature=tau), bf_fkl, 0.0),
        (lambda x, y: skew_forward_kl(x, y, 0.1, temperature=tau), bf_skl, 0.1),
        (lambda x, y: skew_reverse_kl(x, y, 0.1, temperature=tau), bf_srkl_detached, 0.1),
        (lambda x, y: generalized_jsd(x, y, 0.5, temperature=tau), bf_jsd, 0.5),
        (lambda x, y: total_variation(x, y, temperature=tau), bf_tvd, 0.0),
        (lambda x, y: acceptance_rate(x, y, temperature=tau), bf_acc, 0.0),
    ]
    for impl, ref, w in cases:
        val, grad = check(impl, ref, s, t, tau, w)
        assert torch.isfinite(val).all() and torch.isfinite(grad).all()
    # q > 0 where p = 0: the true reverse KL is +inf (not NaN)
    rkl = reverse_kl(s.float(), t.float(), temperature=tau)
    assert torch.isposinf(rkl[0]).all() and torch.isfinite(rkl[1, 0])
    # shared vocabulary mask (student is -inf at the same entries): everything finite, RKL included
    s_masked = torch.where(torch.isinf(t), -math.inf, s)
    for impl, ref, w in cases + [
        (lambda x, y: reverse_kl(x, y, temperature=tau), bf_rkl, 0.0),
        (lambda x, y: skew_reverse_kl(x, y, 0.0, temperature=tau), bf_rkl, 0.0),
        (lambda x, y: generalized_jsd(x, y, 1.0, temperature=tau), bf_rkl, 0.0),
    ]:
        val, grad = check(impl, ref, s_masked, t, tau, w)
        assert torch.isfinite(val).all() and torch.isfinite(grad).all()
        assert (grad[torch.isinf(t)] == 0).all()


def test_large_logits_are_finite():
    s, t = _logits(23, scale=1e4).float(), _logits(24, scale=1e4).float()
    fns = [forward_kl, reverse_kl, total_variation, acceptance_rate,
           lambda x, y: skew_forward_kl(x, y, 0.1), lambda x, y: skew_reverse_kl(x, y, 0.1),
           lambda x, y: skew_reverse_kl(x, y, 0.1, detach_student_in_mixture=False),
           lambda x, y: generalized_jsd(x, y, 0.5)]
    for fn in fns:
        val, grad = value_and_grad(fn, s, t, 1.0)
        assert torch.isfinite(val).all() and torch.isfinite(grad).all()
        assert (val >= -softmax_atol(s, t)).all()  # >= 0 up to float32 rounding
    # the value is still right (a probability-space brute force would underflow to inf here)
    lp, lq = torch.log_softmax(t.double(), -1), torch.log_softmax(s.double(), -1)
    ref = (lp.exp() * (lp - lq)).sum(-1)
    assert ref.max() > 1000  # near-one-hot distributions, mostly with different modes
    torch.testing.assert_close(forward_kl(s, t).double(), ref, rtol=0, atol=softmax_atol(s, t))


def test_low_precision_inputs_computed_in_float32():
    s, t = _logits(25).bfloat16(), _logits(26).bfloat16()
    out = skew_forward_kl(s, t, 0.1)
    assert out.dtype == torch.float32
    # bfloat16 -> float32 is exact, and the arithmetic is then the float32 one
    torch.testing.assert_close(out, skew_forward_kl(s.float(), t.float(), 0.1), rtol=0, atol=0)


@pytest.mark.parametrize("alpha", [-0.1, 1.0, 1.5, float("nan"), [0.1, 1.0], [0.1, 0.2, 0.3]])
def test_invalid_alpha_raises(alpha):
    s, t = _logits(27), _logits(28)
    a = torch.tensor(alpha) if isinstance(alpha, list) else alpha
    for fn in (skew_forward_kl, skew_reverse_kl):
        with pytest.raises(ValueError, match="alpha"):
            fn(s, t, a)


def test_invalid_beta_and_temperature_raise():
    s, t = _logits(29), _logits(30)
    for beta in (-0.01, 1.01, torch.tensor([0.5, 2.0])):
        with pytest.raises(ValueError, match="beta"):
            generalized_jsd(s, t, beta)
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(s, t, temperature=0.0)


# ------------------------------------------------------------------------------------------ reductions
VALUES = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
# small integers, their sums and their halves and quarters are exact in float32: these reductions round nothing
EXACT = dict(rtol=0, atol=0)


def test_reductions_hand_computed():
    v = torch.tensor(VALUES)
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]])
    torch.testing.assert_close(per_sequence_mean(v, mask), torch.tensor([1.5, 6.0]), **EXACT)
    torch.testing.assert_close(reduce_tokens(v, mask), torch.tensor(3.75), **EXACT)
    torch.testing.assert_close(reduce_tokens(v, mask.bool(), "seq_mean"), torch.tensor(3.75), **EXACT)
    torch.testing.assert_close(reduce_tokens(v, mask, "token_mean"), torch.tensor(3.0), **EXACT)
    torch.testing.assert_close(reduce_tokens(v, mask, "sum"), torch.tensor(9.0), **EXACT)
    torch.testing.assert_close(reduce_tokens(v, mask, "none"), torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 6.0]]),
                               **EXACT)


def test_reductions_with_empty_sequence():
    v = torch.tensor(VALUES, requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    torch.testing.assert_close(per_sequence_mean(v, mask), torch.tensor([2.0, 0.0]), **EXACT)
    torch.testing.assert_close(reduce_tokens(v, mask, "token_mean"), torch.tensor(2.0), **EXACT)
    torch.testing.assert_close(reduce_tokens(v, mask, "sum"), torch.tensor(4.0), **EXACT)
    out = reduce_tokens(v, mask)  # the empty sequence does not count in the mean over sequences
    torch.testing.assert_close(out, torch.tensor(2.0), **EXACT)
    out.backward()
    torch.testing.assert_close(v.grad, torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.0, 0.0]]), **EXACT)


@pytest.mark.parametrize("reduction", ["seq_mean", "token_mean", "sum", "none"])
def test_all_masked_batch_is_zero_with_zero_grad(reduction):
    v = torch.tensor(VALUES, requires_grad=True)
    out = reduce_tokens(v, torch.zeros(2, 3, dtype=torch.bool), reduction)
    assert torch.equal(out.detach(), torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(v.grad, torch.zeros(2, 3))
    v.grad = None
    per_sequence_mean(v, torch.zeros(2, 3)).sum().backward()
    assert torch.equal(v.grad, torch.zeros(2, 3))


def test_masked_nonfinite_values_do_not_leak():
    v = torch.tensor([[1.0, math.inf, 3.0], [math.nan, 5.0, 6.0]], requires_grad=True)
    mask = torch.tensor([[1, 0, 1], [0, 1, 1]])
    for reduction in ("seq_mean", "token_mean", "sum"):
        out = reduce_tokens(v, mask, reduction)
        assert torch.isfinite(out)
        (g,) = torch.autograd.grad(out, v)
        assert torch.isfinite(g).all() and g[0, 1] == 0 and g[1, 0] == 0
    torch.testing.assert_close(reduce_tokens(v, mask, "seq_mean"), torch.tensor((2.0 + 5.5) / 2), **EXACT)


def test_invalid_reduction_raises():
    with pytest.raises(ValueError, match="seq_mean.*token_mean.*sum.*none"):
        reduce_tokens(torch.zeros(2, 3), torch.ones(2, 3), "mean")


# ---------------------------------------------------------------------------------------- token log-probs
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_token_log_probs(tau):
    logits = _logits(31).float().requires_grad_(True)
    labels = torch.tensor([[0, 3, -100], [-100, 6, 2]])
    out = token_log_probs(logits, labels, temperature=tau)
    ref = torch.log_softmax(logits.detach() / tau, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert out.shape == (B, T)
    torch.testing.assert_close(out.detach(), torch.where(labels == -100, 0.0, ref), rtol=0,
                               atol=2 * softmax_atol(logits, temperature=tau))
    assert out[0, 2] == 0 and out[1, 0] == 0
    out.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[0, 2] == 0).all() and (logits.grad[1, 0] == 0).all()
