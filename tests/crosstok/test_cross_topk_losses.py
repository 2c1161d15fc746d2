"""The cross-tokenizer loss from a served teacher's top-K (`crosstok.losses.topk_group_values`, a `TopKTeacher` in
`aligned_divergence`) against plain brute-force references: K = the whole teacher vocabulary gives the
full-distribution loss; a smaller K gives the coarse-grained formula (known shared tokens + one bucket, ULD with
the unknown teacher probabilities as 0), a lower bound that grows with K; gradients; -inf entries, absent
entries, a top-K that rounds to 1, empty alignments, refusals."""

from __future__ import annotations

import math

import pytest
import torch

from distillm.crosstok.losses import (
    AlignedGroups, CrossTeacher, aligned_divergence, aligned_span_log_probs, cross_divergence_loss, group_values,
    topk_group_values, uld_distance,
)
from distillm.crosstok.vocab import VocabMap
from distillm.losses import divergences as plain
from distillm.losses.fused import HeadInputs, TopKTeacher
from tolerances import sum_atol

NAMES = [("fkl", None), ("rkl", None), ("skl", 0.1), ("srkl", 0.2), ("jsd", 0.3), ("tvd", None)]
F64 = torch.float64


def _vmap(t_ids, s_ids, vt, vs):
    return VocabMap(torch.tensor(t_ids), torch.tensor(s_ids), vt, vs)


# teacher vocab 9, student vocab 7; shared (t0,s3) (t1,s2) (t2,s1) (t3,s0) (t6,s5); teacher unmatched 4,5,7,8;
# student unmatched 4,6
VM = _vmap([0, 1, 2, 3, 6], [3, 2, 1, 0, 5], 9, 7)


def brute_divergence(name: str, p: list[float], q: list[float], w) -> float:
    """The divergences of losses.divergences, written out over two probability lists (0 log 0 = 0)."""
    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

    if name == "fkl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "skl":
        return kl(p, [w * x + (1 - w) * y for x, y in zip(p, q)])
    if name == "srkl":
        return kl(q, [(1 - w) * x + w * y for x, y in zip(p, q)])
    if name == "jsd":
        m = [w * x + (1 - w) * y for x, y in zip(p, q)]
        return w * kl(p, m) + (1 - w) * kl(q, m)
    return 0.5 * sum(abs(x - y) for x, y in zip(p, q))


def brute_uld(a: list[float], b: list[float]) -> float:
    a, b = sorted(a, reverse=True), sorted(b, reverse=True)
    n = max(len(a), len(b))
    a, b = a + [0.0] * (n - len(a)), b + [0.0] * (n - len(b))
    return sum(abs(x - y) for x, y in zip(a, b))


def brute_coarse(name, w, p: list[float], q: list[float], known: set[int], vm: VocabMap, one_to_one: bool,
                 c_t: float = 0.0, c_s: float = 0.0, uld_weight: float = 1.0, merge_weight: float = 1.0) -> float:
    """The coarse-grained d_g, spelt out: outcomes = the known teacher ids in the shared vocabulary, + one bucket
    (teacher: 1 - their p; student: 1 - their q); ULD over the unmatched ids with the teacher's unknown p as 0."""
    pairs = dict(zip(vm.teacher_ids.tolist(), vm.student_ids.tolist()))
    seen = [t for t in sorted(known) if t in pairs]
    p_known = [p[t] if t in known else 0.0 for t in range(len(p))]
    if not one_to_one:
        return merge_weight * brute_uld([x * math.exp(c_t) for x in p_known], [x * math.exp(c_s) for x in q])
    big_p = [p[t] for t in seen] + [1.0 - sum(p[t] for t in seen)]
    big_q = [q[pairs[t]] for t in seen] + [1.0 - sum(q[pairs[t]] for t in seen)]
    t_un = [t for t in range(len(p)) if t not in pairs]
    s_un = [s for s in range(len(q)) if s not in pairs.values()]
    return (brute_divergence(name, big_p, big_q, w)
            + uld_weight * brute_uld([p_known[t] for t in t_un], [q[s] for s in s_un]))


def _scores(seed, m=4):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(m, 7, generator=g, dtype=F64).requires_grad_()
    t = torch.randn(m, 9, generator=g, dtype=F64) * 1.5
    return s, t


def _known(t_lp: torch.Tensor, k: int, seed: int):
    """Each row's top-k (ids in a shuffled order, as a server need not sort them) and 2 absent slots (-1)."""
    top = t_lp.topk(k, -1)
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(k, generator=g) for _ in range(t_lp.shape[0])])
    values, ids = top.values.gather(1, order), top.indices.gather(1, order)
    pad_v = torch.full((t_lp.shape[0], 2), -3.0, dtype=t_lp.dtype)  # values under no entry are never read
    pad_i = torch.full((t_lp.shape[0], 2), -1, dtype=torch.long)
    return torch.cat([values, pad_v], -1), torch.cat([ids, pad_i], -1)


@pytest.mark.parametrize("name,w", NAMES)
def test_whole_teacher_vocabulary_equals_the_full_cross_loss(name, w):
    """K = V_t (every teacher id known): the coarse-grained partition is the full one, so the value and the
    student's gradient are group_values' on the teacher's full logits (1:1 and merged groups, a -inf logit)."""
    s, t = _scores(1)
    t[0, 5] = float("-inf")  # a teacher zero on an unmatched id
    t[2, 1] = float("-inf")  # and on a shared one
    t_lp = torch.log_softmax(t, -1)
    one = torch.tensor([True, True, False, True])
    c_s = torch.tensor([0.0, 0.0, -0.7, 0.0], dtype=F64, requires_grad=True)
    c_t = torch.tensor([0.0, 0.0, -1.1, 0.0], dtype=F64)
    values, ids = _known(t_lp, 9, seed=2)
    got = topk_group_values(name, s, values, ids, one, c_s, c_t, VM, weight=w, uld_weight=0.7, merge_weight=1.3)
    want = group_values(name, s, t, one, c_s, c_t, VM, weight=w, uld_weight=0.7, merge_weight=1.3)
    # sums of 9 + 7 terms of probabilities (<= 1) times logs of size <= max|log p|
    scale = float(t_lp[torch.isfinite(t_lp)].abs().max()) + float(s.detach().abs().max()) + 2.0
    tol = sum_atol(16, 4 * scale, F64)
    assert torch.allclose(got, want, atol=tol, rtol=0)
    g1 = torch.autograd.grad(got.sum(), (s, c_s))
    g2 = torch.autograd.grad(want.sum(), (s, c_s))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=tol, rtol=0)


@pytest.mark.parametrize("name,w", NAMES)
@pytest.mark.parametrize("k", [1, 3, 6])
def test_top_k_equals_the_brute_force_coarse_grained_formula(name, w, k):
    s, t = _scores(3 + k)
    t_lp = torch.log_softmax(t, -1)
    one = torch.tensor([True, False, True, True])
    c_s = torch.tensor([0.0, -0.4, 0.0, 0.0], dtype=F64)
    c_t = torch.tensor([0.0, -2.0, 0.0, 0.0], dtype=F64)
    values, ids = _known(t_lp, k, seed=k)
    got = topk_group_values(name, s, values, ids, one, c_s, c_t, VM, weight=w, uld_weight=0.6, merge_weight=2.0)
    q_all = torch.softmax(s.detach(), -1)
    for m in range(4):
        known = {int(i) for i in ids[m] if i >= 0}
        want = brute_coarse(name, w, t_lp[m].exp().tolist(), q_all[m].tolist(), known, VM, bool(one[m]),
                            float(c_t[m]), float(c_s[m]), uld_weight=0.6, merge_weight=2.0)
        assert got[m].item() == pytest.approx(want, abs=sum_atol(16, 20.0, F64))


@pytest.mark.parametrize("name", ["fkl", "skl", "tvd"])
def test_top_k_gradient_equals_autograd_of_the_brute_force(name):
    """The student's gradient, against autograd through the coarse-grained formula written with torch ops."""
    s, t = _scores(11)
    t_lp = torch.log_softmax(t, -1)
    values, ids = _known(t_lp, 3, seed=11)
    one = torch.ones(4, dtype=torch.bool)
    zeros = torch.zeros(4, dtype=F64)
    got = topk_group_values(name, s, values, ids, one, zeros, zeros, VM, weight=0.1, uld_weight=0.5)
    (g_got,) = torch.autograd.grad(got.sum(), s)
    s2 = s.detach().clone().requires_grad_()
    q = torch.softmax(s2, -1)
    p = t_lp.exp()
    pairs = dict(zip(VM.teacher_ids.tolist(), VM.student_ids.tolist()))
    total = 0.0
    for m in range(4):
        seen = [int(i) for i in ids[m] if i >= 0 and int(i) in pairs]
        zero = torch.zeros((), dtype=F64)
        big_p = torch.stack([p[m, i] for i in seen] + [1 - sum((p[m, i] for i in seen), zero)])
        big_q = torch.stack([q[m, pairs[i]] for i in seen] + [1 - sum((q[m, pairs[i]] for i in seen), zero)])
        if name == "fkl":
            d = (big_p * (big_p / big_q).log()).sum()
        elif name == "skl":
            d = (big_p * (big_p / (0.1 * big_p + 0.9 * big_q)).log()).sum()
        else:
            d = 0.5 * (big_p - big_q).abs().sum()
        known = {int(i) for i in ids[m] if i >= 0}
        a = torch.stack([p[m, i] if i in known else torch.zeros((), dtype=F64) for i in (4, 5, 7, 8)])
        total = total + d + 0.5 * uld_distance(a[None], torch.stack([q[m, 4], q[m, 6]])[None])[0]
    (g_ref,) = torch.autograd.grad(total, s2)
    assert torch.allclose(g_got, g_ref, atol=sum_atol(16, 20.0, F64), rtol=0)


@pytest.mark.parametrize("name,w", NAMES)
def test_a_lower_bound_that_grows_with_k(name, w):
    """Data-processing inequality: the divergence term (ULD off) of known sets k1 < k2 < V_t: d(k1) <= d(k2) <=
    the full value; each ULD term is within the teacher's unknown mass of the full one."""
    s, t = _scores(21)
    t_lp = torch.log_softmax(t, -1)
    one, zeros = torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=F64)
    full = group_values(name, s, t, one, zeros, zeros, VM, weight=w, uld_weight=0.0)
    prev = torch.zeros(4, dtype=F64)
    for k in (1, 2, 4, 6, 9):
        values, ids = _known(t_lp, k, seed=k)
        got = topk_group_values(name, s, values, ids, one, zeros, zeros, VM, weight=w, uld_weight=0.0)
        slack = sum_atol(16, 20.0, F64)
        assert (got <= full + slack).all() and (got >= prev - slack).all(), (k, got, full)
        prev = got.detach()
        uld_only = topk_group_values(name, s, values, ids, one, zeros, zeros, VM, weight=w, uld_weight=1.0) - got
        uld_full = group_values(name, s, t, one, zeros, zeros, VM, weight=w, uld_weight=1.0) - full
        unknown = 1.0 - values.exp().masked_fill(ids < 0, 0.0).sum(-1)
        assert ((uld_only - uld_full).abs() <= unknown + slack).all()


def test_rounding_top_k_absent_entries_and_inf():
    """A top-K whose probabilities sum past 1 (rounding) keeps a finite, smallest-float bucket; -inf known
    entries count as zero mass (RKL is then +inf, its true value, with a finite gradient); a row with no entry at
    all has only the bucket (both sides 1: value 0); the same vocabulary with every id known is the plain
    divergence (the bucket empty on both sides)."""
    s, _ = _scores(31, m=2)
    values = torch.tensor([[0.0, float("-inf"), -1.0], [-3.0, -3.0, -3.0]], dtype=F64)
    values[0, 0] = math.log1p(1e-12)  # p slightly over 1
    ids = torch.tensor([[1, 2, -1], [-1, -1, -1]])
    one, zeros = torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=F64)
    for name, w in NAMES:
        got = topk_group_values(name, s, values, ids, one, zeros, zeros, VM, weight=w, uld_weight=0.0)
        # q(s1) > 0 where the teacher's p(t2) = 0: only the reverse KL is infinite
        assert torch.isfinite(got[0]).item() == (name != "rkl"), name
        assert got[1].item() == pytest.approx(0.0, abs=1e-12)
        (grad,) = torch.autograd.grad(got.sum(), s)
        assert torch.isfinite(grad).all(), name
    fkl = topk_group_values("fkl", s, values, ids, one, zeros, zeros, VM, uld_weight=0.0)
    q = torch.softmax(s.detach()[0], -1)  # teacher: p(t1) = 1 (-> s2), p(t2) = 0 (-> s1), bucket tiny
    assert fkl[0].item() == pytest.approx(-math.log(q[2].item()), abs=sum_atol(8, 40.0, F64))
    # identical vocabularies, every id known: exactly the plain divergence
    v = 7
    ident = _vmap(list(range(v)), list(range(v)), v, v)
    t = torch.randn(2, v, dtype=F64, generator=torch.Generator().manual_seed(5))
    lp = torch.log_softmax(t, -1)
    for name, w in NAMES:
        got = topk_group_values(name, s, lp, torch.arange(v).expand(2, v), one, zeros, zeros, ident, weight=w)
        want = {"fkl": lambda: plain.forward_kl(s, t), "rkl": lambda: plain.reverse_kl(s, t),
                "tvd": lambda: plain.total_variation(s, t), "skl": lambda: plain.skew_forward_kl(s, t, w),
                "srkl": lambda: plain.skew_reverse_kl(s, t, w), "jsd": lambda: plain.generalized_jsd(s, t, w)}[name]()
        assert torch.allclose(got, want, atol=sum_atol(v + 1, 20.0, F64), rtol=0), name


def test_refusals():
    s, t = _scores(41, m=1)
    values, ids = _known(torch.log_softmax(t, -1), 3, seed=1)
    one, zeros = torch.ones(1, dtype=torch.bool), torch.zeros(1, dtype=F64)
    with pytest.raises(ValueError, match="temperature 1"):
        topk_group_values("fkl", s, values, ids, one, zeros, zeros, VM, temperature=2.0)
    with pytest.raises(ValueError, match="Unknown divergence"):
        topk_group_values("xyz", s, values, ids, one, zeros, zeros, VM)
    groups = AlignedGroups(*(torch.tensor([0]) for _ in range(5)), torch.tensor([True]))
    with pytest.raises(ValueError, match="actual tokens' log-probs"):
        aligned_divergence("fkl", s[:, None], TopKTeacher(values[:, None], ids[:, None]), torch.tensor([[1]]),
                           torch.tensor([[1]]), groups._replace(t_end=torch.tensor([1]), s_end=torch.tensor([1])), VM)


def _batch(seed=4, n=2, r_s=5, r_t=6, h=8):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, r_s, h, generator=g, dtype=F64).requires_grad_()
    weight = torch.randn(VM.student_size, h, generator=g, dtype=F64).requires_grad_()
    t_hidden = torch.randn(n, r_t, h, generator=g, dtype=F64)
    t_weight = torch.randn(VM.teacher_size, h, generator=g, dtype=F64)
    s_targets = torch.randint(0, VM.student_size, (n, r_s), generator=g)
    t_targets = torch.randint(0, VM.teacher_size, (n, r_t), generator=g)
    s_targets[1, :2] = -100  # row 1's response is shorter (left padding)
    t_targets[1, :3] = -100
    groups = AlignedGroups(row=torch.tensor([0, 0, 0, 1, 1]), t_start=torch.tensor([0, 2, 4, 3, 4]),
                           t_end=torch.tensor([2, 4, 6, 4, 6]), s_start=torch.tensor([0, 1, 3, 2, 3]),
                           s_end=torch.tensor([1, 3, 5, 3, 5]),
                           one_to_one=torch.tensor([False, True, False, True, False]))
    return hidden, weight, t_hidden, t_weight, s_targets, t_targets, groups


def _served(t_logits: torch.Tensor, t_targets: torch.Tensor, k: int) -> TopKTeacher:
    """What the server sends: top-k log-probs and ids per position, and the actual token's exact log-prob."""
    lp = torch.log_softmax(t_logits, -1)
    top = lp.topk(k, -1)
    own = lp.gather(-1, t_targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return TopKTeacher(top.values, top.indices, "uniform", own)


@pytest.mark.parametrize("name,w", [("fkl", None), ("srkl", 0.1), ("jsd", 0.4)])
def test_aligned_divergence_from_a_served_whole_vocabulary_equals_the_local_teacher(name, w):
    """Through aligned_divergence (chunked, checkpointed head path, masked columns): a TopKTeacher with K = V_t and
    the actual tokens' log-probs gives the values and gradients of the local teacher's head; the span
    log-probs (the chain rule over the actual tokens) too."""
    hidden, weight, t_hidden, t_weight, s_targets, t_targets, groups = _batch()
    t_logits = t_hidden @ t_weight.T
    served = _served(t_logits, t_targets, VM.teacher_size)
    kw = dict(weight=w, chunk_size=2)
    got = aligned_divergence(name, HeadInputs(hidden, weight), served, s_targets, t_targets, groups, VM, **kw)
    g_got = torch.autograd.grad(got.sum(), (hidden, weight))
    want = aligned_divergence(name, HeadInputs(hidden, weight), HeadInputs(t_hidden, t_weight), s_targets, t_targets,
                              groups, VM, **kw)
    g_want = torch.autograd.grad(want.sum(), (hidden, weight))
    tol = sum_atol(16, float(want.detach().abs().max()) + 10.0, torch.float32)  # values are stored in float32
    assert torch.allclose(got, want, atol=tol, rtol=0)
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a, b, atol=tol * 10, rtol=0)
    spans = aligned_span_log_probs(served, t_targets, groups, "teacher", s_targets.shape)
    ref = aligned_span_log_probs(t_logits, t_targets, groups, "teacher", s_targets.shape)
    assert torch.allclose(spans, ref.float(), atol=sum_atol(6, 60.0, torch.float32), rtol=0)
    # rows() of a CrossTeacher slices the served scores with the groups
    cross = CrossTeacher(served, t_targets, groups, VM)
    mask = s_targets != -100
    _, values = cross_divergence_loss(HeadInputs(hidden, weight), cross, s_targets, mask.double(), name, weight=w)
    _, second = cross_divergence_loss(HeadInputs(hidden[1:], weight), cross.rows(slice(1, 2)), s_targets[1:],
                                      mask[1:].double(), name, weight=w)
    assert torch.allclose(second[0], values[1])


def test_small_k_through_aligned_divergence_and_empty_alignment():
    """K = 2: each group start's value is topk_group_values of its row with the actual token as a known entry, and
    the merged groups' teacher continuation is the sum of the served actual-token log-probs."""
    hidden, weight, t_hidden, t_weight, s_targets, t_targets, groups = _batch(seed=7)
    t_logits = t_hidden @ t_weight.T
    served = _served(t_logits, t_targets, 2)
    logits = (hidden @ weight.T).detach()
    got = aligned_divergence("fkl", logits, served, s_targets, t_targets, groups, VM)
    lp_t, lp_s = torch.log_softmax(t_logits, -1), torch.log_softmax(logits, -1)
    for g in range(groups.row.numel()):
        b, i0, i1, j0, j1 = (int(x[g]) for x in (groups.row, groups.t_start, groups.t_end, groups.s_start,
                                                 groups.s_end))
        known = set(lp_t[b, i0].topk(2).indices.tolist()) | {int(t_targets[b, i0])}
        c_t = sum(lp_t[b, i, t_targets[b, i]].item() for i in range(i0 + 1, i1))
        c_s = sum(lp_s[b, j, s_targets[b, j]].item() for j in range(j0 + 1, j1))
        want = brute_coarse("fkl", None, lp_t[b, i0].exp().tolist(), lp_s[b, j0].exp().tolist(), known, VM,
                            bool(groups.one_to_one[g]), c_t, c_s)
        assert got[b, j0].item() == pytest.approx(want, abs=sum_atol(16, 20.0, torch.float32))
    empty = AlignedGroups(*(torch.zeros(0, dtype=torch.long) for _ in range(5)), torch.zeros(0, dtype=torch.bool))
    out = aligned_divergence("fkl", HeadInputs(hidden, weight), served, s_targets, t_targets, empty, VM)
    assert out.abs().sum().item() == 0.0
    out.sum().backward()
    assert hidden.grad.abs().sum().item() == 0.0
