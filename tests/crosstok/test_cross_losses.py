"""Cross-tokenizer losses against plain brute-force references: ULD, the shared-vocabulary divergence + bucket,
the GOLD-style merge, the chain-rule span log-probs; the same-tokenizer case equals the plain loss; the chunked,
checkpointed head path equals the logits path (values and gradients); -inf logits, masks, empty alignments."""

from __future__ import annotations

import math

import pytest
import torch

from distillm.crosstok.losses import (
    AlignedGroups, CrossTeacher, aligned_divergence, aligned_span_log_probs, cross_divergence_loss, group_values,
    uld_distance,
)
from distillm.crosstok.vocab import VocabMap
from distillm.losses import divergences as plain
from distillm.losses.fused import HeadInputs
from tolerances import sum_atol


def brute_uld(a: list[float], b: list[float]) -> float:
    a, b = sorted(a, reverse=True), sorted(b, reverse=True)
    n = max(len(a), len(b))
    a, b = a + [0.0] * (n - len(a)), b + [0.0] * (n - len(b))
    return sum(abs(x - y) for x, y in zip(a, b))


def brute_kl(p: list[float], q: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(p, q) if x > 0)


def test_uld_matches_plain_reference_and_gradients():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(3, 7, generator=g, dtype=torch.float64), -1)
    b = torch.softmax(torch.randn(3, 4, generator=g, dtype=torch.float64), -1).requires_grad_()
    got = uld_distance(a, b)
    for m in range(3):
        assert got[m].item() == pytest.approx(brute_uld(a[m].tolist(), b[m].tolist()), abs=sum_atol(7, 2.0, torch.float64))
    # gradient: d/db_(i) of |a_(i) - b_(i)| is sign(b_(i) - a_(i)) (ties have measure zero here)
    got.sum().backward()
    for m in range(3):
        order = b[m].detach().argsort(descending=True)
        a_sorted = a[m].sort(descending=True).values
        for rank, idx in enumerate(order.tolist()):
            assert b.grad[m, idx].item() == pytest.approx(math.copysign(1.0, b[m, idx].item() - a_sorted[rank].item()))
    # empty and one-sided vectors
    assert uld_distance(torch.zeros(2, 0), torch.zeros(2, 0)).tolist() == [0.0, 0.0]
    assert uld_distance(a, torch.zeros(3, 0)).tolist() == pytest.approx(a.sum(-1).tolist())


def _vmap(t_ids, s_ids, vt, vs):
    return VocabMap(torch.tensor(t_ids), torch.tensor(s_ids), vt, vs)


@pytest.mark.parametrize("name,w", [("fkl", None), ("rkl", None), ("skl", 0.1), ("srkl", 0.1), ("jsd", 0.3),
                                    ("tvd", None)])
def test_same_tokenizer_equals_plain_loss(name, w):
    """Identical vocabularies: every group 1:1, empty bucket and ULD -> exactly the plain divergence."""
    g = torch.Generator().manual_seed(1)
    v = 11
    s = torch.randn(5, v, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.randn(5, v, generator=g, dtype=torch.float64)
    t[0, 3] = float("-inf")  # a teacher zero
    vm = _vmap(list(range(v)), list(range(v)), v, v)
    zeros = torch.zeros(5, dtype=torch.float64)
    got = group_values(name, s, t, torch.ones(5, dtype=torch.bool), zeros, zeros, vm, weight=w, temperature=1.5)
    fn = {"fkl": lambda: plain.forward_kl(s, t, temperature=1.5), "rkl": lambda: plain.reverse_kl(s, t, temperature=1.5),
          "skl": lambda: plain.skew_forward_kl(s, t, w, temperature=1.5),
          "srkl": lambda: plain.skew_reverse_kl(s, t, w, temperature=1.5),
          "jsd": lambda: plain.generalized_jsd(s, t, w, temperature=1.5),
          "tvd": lambda: plain.total_variation(s, t, temperature=1.5)}[name]
    want = fn()
    tol = sum_atol(v + 1, float(want.detach().abs().max()) + 1.0, torch.float64)
    assert torch.allclose(got, want, atol=tol, rtol=0)
    (g1,) = torch.autograd.grad(got.sum(), s)
    (g2,) = torch.autograd.grad(want.sum(), s)
    assert torch.allclose(g1, g2, atol=tol, rtol=0)


def test_one_to_one_group_matches_brute_force():
    """Teacher vocab 6, student vocab 5; shared pairs (t0,s2), (t1,s0), (t4,s1); the rest unmatched."""
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 5, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.randn(2, 6, generator=g, dtype=torch.float64)
    vm = _vmap([0, 1, 4], [2, 0, 1], 6, 5)
    zeros = torch.zeros(2, dtype=torch.float64)
    got = group_values("fkl", s, t, torch.ones(2, dtype=torch.bool), zeros, zeros, vm, uld_weight=0.7)
    for m in range(2):
        p, q = torch.softmax(t[m], -1).tolist(), torch.softmax(s[m].detach(), -1).tolist()
        big_p = [p[0], p[1], p[4], p[2] + p[3] + p[5]]
        big_q = [q[2], q[0], q[1], q[3] + q[4]]
        want = brute_kl(big_p, big_q) + 0.7 * brute_uld([p[2], p[3], p[5]], [q[3], q[4]])
        assert got[m].item() == pytest.approx(want, abs=sum_atol(6, 4.0, torch.float64))
    # gradient against autograd of the brute force written with torch ops
    got.sum().backward()
    s2 = s.detach().clone().requires_grad_()
    q = torch.softmax(s2, -1)
    p = torch.softmax(t, -1)
    big_q = torch.stack([q[:, 2], q[:, 0], q[:, 1], q[:, 3] + q[:, 4]], -1)
    big_p = torch.stack([p[:, 0], p[:, 1], p[:, 4], p[:, 2] + p[:, 3] + p[:, 5]], -1)
    ref = (big_p * (big_p.log() - big_q.log())).sum(-1)
    ref = ref + 0.7 * uld_distance(torch.stack([p[:, 2], p[:, 3], p[:, 5]], -1), torch.stack([q[:, 3], q[:, 4]], -1))
    ref.sum().backward()
    assert torch.allclose(s.grad, s2.grad, atol=sum_atol(6, 4.0, torch.float64), rtol=0)


def test_merged_group_matches_brute_force():
    """A merged group: ULD of p * e^{c_t} against q * e^{c_s} over the full vocabularies (chain rule)."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(1, 5, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.randn(1, 6, generator=g, dtype=torch.float64)
    c_s = torch.tensor([-0.4], dtype=torch.float64, requires_grad=True)
    c_t = torch.tensor([-1.3], dtype=torch.float64)
    vm = _vmap([0], [0], 6, 5)
    got = group_values("fkl", s, t, torch.zeros(1, dtype=torch.bool), c_s, c_t, vm, merge_weight=2.0)
    p = (torch.softmax(t[0], -1) * math.exp(-1.3)).tolist()
    q = (torch.softmax(s[0].detach(), -1) * math.exp(-0.4)).tolist()
    assert got.item() == pytest.approx(2.0 * brute_uld(p, q), abs=sum_atol(6, 2.0, torch.float64))
    got.sum().backward()
    assert c_s.grad is not None and s.grad is not None  # the student's continuation gets a gradient too


def _batch(seed=4, n=2, r_s=5, r_t=6, h=8, vs=7, vt=9):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, r_s, h, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(vs, h, generator=g, dtype=torch.float64).requires_grad_()
    t_hidden = torch.randn(n, r_t, h, generator=g, dtype=torch.float64)
    t_weight = torch.randn(vt, h, generator=g, dtype=torch.float64)
    s_targets = torch.randint(0, vs, (n, r_s), generator=g)
    t_targets = torch.randint(0, vt, (n, r_t), generator=g)
    s_targets[1, :2] = -100  # row 1's response is shorter (left padding)
    t_targets[1, :3] = -100
    groups = AlignedGroups(row=torch.tensor([0, 0, 0, 1, 1]), t_start=torch.tensor([0, 2, 4, 3, 4]),
                           t_end=torch.tensor([2, 4, 6, 4, 6]), s_start=torch.tensor([0, 1, 3, 2, 3]),
                           s_end=torch.tensor([1, 3, 5, 3, 5]),
                           one_to_one=torch.tensor([False, False, False, True, False]))
    vm = _vmap([0, 1, 2, 3], [3, 2, 1, 0], vt, vs)
    return hidden, weight, t_hidden, t_weight, s_targets, t_targets, groups, vm


@pytest.mark.parametrize("name", ["fkl", "skl", "srkl"])
def test_head_path_chunked_equals_logits_path(name):
    hidden, weight, t_hidden, t_weight, s_targets, t_targets, groups, vm = _batch()
    alpha = torch.tensor([0.1, 0.3], dtype=torch.float64)
    fused = aligned_divergence(name, HeadInputs(hidden, weight), HeadInputs(t_hidden, t_weight), s_targets, t_targets,
                               groups, vm, weight=alpha if name != "fkl" else None, chunk_size=2)
    w = torch.rand(fused.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    (fused.double() * w).sum().backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = hidden @ weight.T
    t_logits = t_hidden @ t_weight.T
    ref = aligned_divergence(name, logits, t_logits, s_targets, t_targets, groups, vm,
                             weight=alpha if name != "fkl" else None)
    (ref.double() * w).sum().backward()
    tol = sum_atol(16, float(ref.detach().abs().max()) + 1.0, torch.float32)  # values are stored in float32
    assert torch.allclose(fused.double(), ref.double(), atol=tol, rtol=0)
    assert torch.allclose(hidden.grad, g_h, atol=tol * 10, rtol=0) and torch.allclose(weight.grad, g_w, atol=tol * 10, rtol=0)
    # values only at group starts
    nz = (fused != 0).nonzero().tolist()
    assert set(map(tuple, nz)) <= {(0, 0), (0, 1), (0, 3), (1, 2), (1, 3)}


def test_group_values_reference_per_group():
    """aligned_divergence places group_values of each group's start rows (brute-force gathered) at its column."""
    hidden, weight, t_hidden, t_weight, s_targets, t_targets, groups, vm = _batch(seed=5)
    logits, t_logits = (hidden @ weight.T).detach(), t_hidden @ t_weight.T
    got = aligned_divergence("fkl", logits, t_logits, s_targets, t_targets, groups, vm)
    s_lp, t_lp = torch.log_softmax(logits, -1), torch.log_softmax(t_logits, -1)
    for k in range(groups.row.numel()):
        b, i0, i1, j0, j1 = (int(x[k]) for x in (groups.row, groups.t_start, groups.t_end, groups.s_start, groups.s_end))
        c_s = sum(s_lp[b, j, s_targets[b, j]].item() for j in range(j0 + 1, j1))
        c_t = sum(t_lp[b, i, t_targets[b, i]].item() for i in range(i0 + 1, i1))
        want = group_values("fkl", logits[b, j0][None], t_logits[b, i0][None], groups.one_to_one[k][None],
                            torch.tensor([c_s]), torch.tensor([c_t]), vm)
        assert got[b, j0].item() == pytest.approx(want.item(), abs=sum_atol(16, 4.0, torch.float32))


def test_span_log_probs_chain_rule_and_empty():
    hidden, weight, t_hidden, t_weight, s_targets, t_targets, groups, vm = _batch(seed=6)
    t_logits = t_hidden @ t_weight.T
    spans = aligned_span_log_probs(t_logits, t_targets, groups, "teacher", s_targets.shape)
    tok = plain.token_log_probs(t_logits, t_targets)
    for b in range(2):  # the groups cover each row's response: the spans sum to the sequence log-prob
        keep = groups.row == b
        covered = sum(tok[b, i0:i1].sum().item() for i0, i1 in zip(groups.t_start[keep].tolist(), groups.t_end[keep].tolist()))
        assert spans[b].sum().item() == pytest.approx(covered, abs=sum_atol(6, 30.0, torch.float64))
        assert spans[b].sum().item() == pytest.approx(tok[b].sum().item(), abs=sum_atol(6, 30.0, torch.float64))
    empty = AlignedGroups(*(torch.zeros(0, dtype=torch.long) for _ in range(5)), torch.zeros(0, dtype=torch.bool))
    out = aligned_divergence("fkl", HeadInputs(hidden, weight), HeadInputs(t_hidden, t_weight), s_targets, t_targets,
                             empty, vm)
    assert out.abs().sum().item() == 0.0
    out.sum().backward()
    assert hidden.grad.abs().sum().item() == 0.0


def test_cross_divergence_loss_masks_and_rows():
    hidden, weight, t_hidden, t_weight, s_targets, t_targets, groups, vm = _batch(seed=7)
    teacher = CrossTeacher(HeadInputs(t_hidden, t_weight), t_targets, groups, vm)
    mask = s_targets != -100
    w = mask.double() / mask.sum()
    loss, values = cross_divergence_loss(HeadInputs(hidden, weight), teacher, s_targets, w, "fkl")
    assert loss.item() == pytest.approx((values.double() * w).sum().item(), rel=1e-6)
    assert (values[~mask] == 0).all()
    # rows(): the second row alone gives that row's values
    sub = teacher.rows(slice(1, 2))
    _, v1 = cross_divergence_loss(HeadInputs(hidden[1:2], weight), sub, s_targets[1:2], w[1:2], "fkl")
    assert torch.allclose(v1[0], values[1])


def test_uld_top_k_rule():
    """top_k: the k largest of each side sorted and compared, the tails' masses as one entry; exact when both
    vectors have at most k entries."""
    g = torch.Generator().manual_seed(8)
    a = torch.softmax(torch.randn(2, 9, generator=g, dtype=torch.float64), -1)
    b = torch.softmax(torch.randn(2, 6, generator=g, dtype=torch.float64), -1)
    assert torch.allclose(uld_distance(a, b, top_k=9), uld_distance(a, b), rtol=0, atol=1e-15)
    got = uld_distance(a, b, top_k=3)
    for m in range(2):
        sa, sb = sorted(a[m].tolist(), reverse=True), sorted(b[m].tolist(), reverse=True)
        want = brute_uld(sa[:3], sb[:3]) + abs(sum(sa[3:]) - sum(sb[3:]))
        assert got[m].item() == pytest.approx(want, abs=sum_atol(9, 2.0, torch.float64))
        assert got[m].item() <= brute_uld(sa, sb) + 1e-12  # a lower bound of the exact value
