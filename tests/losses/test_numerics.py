"""Teacher logits of -inf (probability exactly 0) at positions a mask or a zero weight leaves out must not turn
into NaN gradients, for every divergence, plain and fused; and an included position whose value is legitimately
+inf (reverse KL with p = 0 under q > 0) has a finite gradient: its infinite term counts as a constant
(docs/numerics.md). The reference is a plain float64 brute force over the kept positions only."""
import math

import pytest
import torch
import torch.nn.functional as F

from distillm.losses import divergences as D
from distillm.losses.fused import HeadInputs, fused_divergence, fused_weighted_divergence, mixture_weight
from tolerances import head_loss_atols

B, T, H, V = 2, 5, 6, 11
DROP_MASK, DROP_WEIGHT = (1, 3), (0, 2)  # -inf teacher entries at a masked-out position and a zero-weight one


def tols(*heads, coef, loss=0.0):
    """(loss, gradient) assert_close bounds for sum_ij coef_ij d(p_ij, q_ij) computed by the library vs the brute
    force, both float64 (tolerances.head_loss_atols: head_atol per position, times sum|coef|, over B * T)."""
    loss_atol, grad_atol = head_loss_atols(*heads, upstream=float(coef.abs().sum()), n=B * T, loss=loss,
                                           dtype=torch.float64)
    return dict(rtol=0, atol=loss_atol), dict(rtol=0, atol=grad_atol)


# (name, weight, detach_student_in_mixture): every divergence, with the end points where +inf can occur
CASES = [
    ("fkl", None, None), ("rkl", None, None),
    ("skl", 0.0, None), ("skl", 0.1, None),
    ("srkl", 0.0, True), ("srkl", 0.0, False), ("srkl", 0.1, True), ("srkl", 0.1, False),
    ("jsd", 0.0, None), ("jsd", 0.5, None), ("jsd", 1.0, None), ("jsd", "per_row", None),
    ("tvd", None, None), ("acceptance", None, None),
]
IDS = [f"{n}-{w}-{d}" for n, w, d in CASES]


def _weight(w, dtype=torch.float64):
    return torch.tensor([0.5, 1.0], dtype=dtype) if w == "per_row" else w


def plain(name, s, t, w, detach):
    w = _weight(w)
    if name == "fkl":
        return D.forward_kl(s, t)
    if name == "rkl":
        return D.reverse_kl(s, t)
    if name == "skl":
        return D.skew_forward_kl(s, t, w)
    if name == "srkl":
        return D.skew_reverse_kl(s, t, w, detach_student_in_mixture=detach)
    if name == "jsd":
        return D.generalized_jsd(s, t, w)
    return D.total_variation(s, t) if name == "tvd" else D.acceptance_rate(s, t)


def brute(name, p, q, w, detach):
    """One position's value from probability vectors [V] (p > 0 everywhere here), by the textbook formulas."""
    kl = lambda a, b: (a * (a / b).log()).sum()  # noqa: E731
    if name == "jsd" and w in (0.0, 1.0):
        name = "fkl" if w == 0.0 else "rkl"
    if name == "fkl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "skl":
        return kl(p, w * p + (1 - w) * q)
    if name == "srkl":
        return kl(q, (1 - w) * p + w * (q.detach() if detach else q))
    if name == "jsd":
        m = w * p + (1 - w) * q
        return w * kl(p, m) + (1 - w) * kl(q, m)
    return 0.5 * (p - q).abs().sum() if name == "tvd" else torch.minimum(p, q).sum()


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    t = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    t[DROP_MASK + (7,)] = -math.inf
    t[DROP_WEIGHT + (4,)] = -math.inf
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[DROP_MASK] = False
    mask[DROP_WEIGHT] = False
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    weights[DROP_MASK] = 0.0
    weights[DROP_WEIGHT] = 0.0
    return s, t, mask, weights


def reference(name, w, detach, s, t, coef):
    """sum over kept positions of coef[i, j] * d(p_ij, q_ij), with d the brute force; backward gives the grads."""
    total = s.new_zeros(())
    for i in range(B):
        for j in range(T):
            if coef[i, j] != 0:
                wij = (0.5, 1.0)[i] if w == "per_row" else w
                p, q = torch.softmax(t[i, j], -1), torch.softmax(s[i, j], -1)
                total = total + coef[i, j] * brute(name, p, q, wij, detach)
    return total


def coefficients(mask, reduction):
    m = mask.double()
    if reduction == "seq_mean":
        return m / m.sum(-1, keepdim=True).clamp_min(1) / mask.any(-1).sum()
    if reduction == "token_mean":
        return m / m.sum()
    return m


@pytest.mark.parametrize("name,w,detach", CASES, ids=IDS)
def test_plain_masked_and_zero_weight_positions_give_no_nan(name, w, detach):
    s, t, mask, weights = data()
    for reduction in ("seq_mean", "token_mean", "sum"):
        x = s.clone().requires_grad_(True)
        loss = D.reduce_tokens(plain(name, x, t, w, detach), mask, reduction)
        loss.backward()
        y = s.clone().requires_grad_(True)
        coef = coefficients(mask, reduction)
        ref = reference(name, w, detach, y, t, coef)
        ref.backward()
        loss_tol, grad_tol = tols(s, t, coef=coef, loss=ref)  # float64, head_atol per position (tolerances)
        torch.testing.assert_close(loss, ref.detach(), **loss_tol)
        torch.testing.assert_close(x.grad, y.grad, **grad_tol)
        assert not x.grad[DROP_MASK].any() and not x.grad[DROP_WEIGHT].any()
    # zero weights (a method's per-token weights), the positions left in the mask
    x = s.clone().requires_grad_(True)
    values = plain(name, x, t, w, detach)
    loss = torch.where(weights != 0, weights * values, 0.0).sum()
    loss.backward()
    y = s.clone().requires_grad_(True)
    ref = reference(name, w, detach, y, t, weights)
    ref.backward()
    loss_tol, grad_tol = tols(s, t, coef=weights, loss=ref)  # float64, head_atol per position (tolerances)
    torch.testing.assert_close(loss, ref.detach(), **loss_tol)
    torch.testing.assert_close(x.grad, y.grad, **grad_tol)


def head_data(seed=1):
    g = torch.Generator().manual_seed(seed)
    student = HeadInputs(torch.randn(B, T, H, generator=g, dtype=torch.float64),
                         torch.randn(V, H, generator=g, dtype=torch.float64),
                         torch.randn(V, generator=g, dtype=torch.float64))
    _, t, mask, weights = data(seed)
    return student, t, mask, weights


def leaves(head):
    return HeadInputs(*(x.detach().clone().requires_grad_(True) for x in head))


def _fused_kwargs(name, w, detach, chunk):
    kw = dict(chunk_size=chunk)
    if detach is not None:
        kw["detach_student_in_mixture"] = detach
    return kw


@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("name,w,detach", CASES, ids=IDS)
def test_fused_masked_and_zero_weight_positions_give_no_nan(name, w, detach, chunk):
    student, t, mask, weights = head_data()
    ref_s = leaves(student)
    ref_logits = F.linear(ref_s.hidden, ref_s.weight, ref_s.bias)
    ref = reference(name, w, detach, ref_logits, t, weights)
    ref.backward()
    # float64 head vs the brute force over F.linear's logits, coefficients `weights` (tolerances.head_loss_atols)
    loss_tol, grad_tol = tols(student, t, coef=weights, loss=ref)
    kw = _fused_kwargs(name, w, detach, chunk)
    wt = _weight(w)

    # per-token values over every position (the -inf ones included), then a masked reduction / zero weights
    for upstream in (weights, coefficients(mask, "seq_mean")):
        per_token = leaves(student)
        values = fused_divergence(name, per_token, t, **mixture_weight(name, wt), **kw)
        loss = torch.where(upstream != 0, upstream * values, 0.0).sum()
        loss.backward()
        if torch.equal(upstream, weights):
            torch.testing.assert_close(loss, ref.detach(), **loss_tol)
            for got, want in zip(per_token, ref_s):
                torch.testing.assert_close(got.grad, want.grad, **grad_tol)
        for x in per_token:
            assert torch.isfinite(x.grad).all()

    # the training path: per-token weights given up front, zero at the -inf positions, which stay in the mask
    weighted = leaves(student)
    loss, values = fused_weighted_divergence(name, weighted, t, weights, **mixture_weight(name, wt),
                                             mask=torch.ones(B, T, dtype=torch.bool), **kw)
    loss.backward()
    torch.testing.assert_close(loss, ref.detach(), **loss_tol)
    for got, want in zip(weighted, ref_s):
        torch.testing.assert_close(got.grad, want.grad, **grad_tol)

    # the mask leaves the -inf positions out: they are not even computed
    masked = leaves(student)
    loss, _ = fused_weighted_divergence(name, masked, t, torch.where(mask, weights, 0.0), **mixture_weight(name, wt),
                                        mask=mask, **kw)
    loss.backward()
    torch.testing.assert_close(loss, ref.detach(), **loss_tol)
    for got, want in zip(masked, ref_s):
        torch.testing.assert_close(got.grad, want.grad, **grad_tol)


@pytest.mark.parametrize("name,w,detach", [("rkl", None, None), ("srkl", 0.0, True), ("srkl", 0.0, False),
                                           ("jsd", 1.0, None)])
def test_included_infinite_position_has_infinite_value_and_finite_gradient(name, w, detach):
    """p = 0 where q > 0 at a kept position: the value is +inf (the true value); the infinite term is a constant,
    so the gradient is that of the position's finite terms -- the same plain and fused, and NaN-free."""
    student, t, mask, _ = head_data(2)
    ones = torch.ones(B, T, dtype=torch.float64)
    x = leaves(student)
    values = plain(name, F.linear(x.hidden, x.weight, x.bias), t, w, detach)
    assert torch.isposinf(values[DROP_MASK]) and torch.isposinf(values[DROP_WEIGHT])
    assert torch.isposinf(values.sum())
    values.sum().backward()  # upstream 1 at every position, the infinite ones included
    plain_grads = [g.grad.clone() for g in x]
    x = leaves(student)
    D.reduce_tokens(plain(name, F.linear(x.hidden, x.weight, x.bias), t, w, detach), mask, "sum").backward()
    assert all(torch.isfinite(g.grad).all() for g in x)

    # the reference: the finite terms of the infinite positions (p = 0 entries dropped), the other positions whole
    y = leaves(student)
    logits = F.linear(y.hidden, y.weight, y.bias)
    total = logits.new_zeros(())
    for i in range(B):
        for j in range(T):
            p, q = torch.softmax(t[i, j], -1), torch.softmax(logits[i, j], -1)
            if (i, j) in (DROP_MASK, DROP_WEIGHT):
                keep = p > 0
                total = total + (q[keep] * (q[keep] / p[keep]).log()).sum()
            else:
                total = total + brute("rkl", p, q, None, detach)
    total.backward()
    # float64, upstream 1 at each of the B * T positions (tolerances.head_loss_atols; the loss is +inf, unchecked)
    _, grad_tol = tols(student, t, coef=ones)
    for got, want in zip(plain_grads, y):
        torch.testing.assert_close(got, want.grad, **grad_tol)

    for chunk in (1, 4):
        z = leaves(student)
        loss, values = fused_weighted_divergence(name, z, t, ones, **mixture_weight(name, _weight(w)), chunk_size=chunk,
                                                 **({} if detach is None else {"detach_student_in_mixture": detach}))
        assert torch.isposinf(loss) and torch.isposinf(values[DROP_MASK])
        loss.backward()
        for got, want in zip(z, y):
            torch.testing.assert_close(got.grad, want.grad, **grad_tol)


def test_cald_with_zero_skew_and_masked_inf_teacher_has_no_nan():
    from distillm.losses.cald import cald_loss

    s, t, mask, _ = data(3)
    x = s.clone().requires_grad_(True)
    loss = cald_loss(x, t, mask, 0.0, x, t, mask, 0.0, b=1.5)  # SKL_0 = FKL, SRKL_0 = RKL: +inf at the dropped ones
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert not x.grad[DROP_MASK].any() and not x.grad[DROP_WEIGHT].any()


@pytest.mark.parametrize("impl", ["plain", "fused"])
@pytest.mark.parametrize("name", ["minillm", "gkd"])
def test_methods_with_inf_teacher_off_the_response_have_no_nan(name, impl):
    """A method's batch: the teacher forbids a token at positions off the response (labels -100)."""
    from distillm.config import load_config
    from distillm.methods import build_method
    from distillm.methods.base import LossInputs

    student, t, mask, _ = head_data(4)
    targets = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    targets[~mask] = -100
    counts = torch.tensor([B, mask.sum().item(), 0.0], dtype=torch.float64)
    x = leaves(student)
    scores = x if impl == "fused" else F.linear(x.hidden, x.weight, x.bias)
    method = build_method(load_config(overrides={"method": name, "jsd_beta": 1.0}))
    loss, _, _ = method.compute_loss(LossInputs(scores, t, targets, B, counts, chunk_size=3))
    loss.backward()
    assert torch.isfinite(loss)
    for leaf in x:
        assert torch.isfinite(leaf.grad).all()
