"""One convention for empty responses, everywhere: an empty response carries no tokens, so it is left out of
every mean (as `reduce_tokens(..., "seq_mean")` does): adding one to a batch changes neither the loss nor the
gradients, for every method, plain and fused; CALD averages each side over its non-empty responses; a DPKD pair
with an empty response is left out."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distillm.config import load_config
from distillm.losses.cald import cald_loss
from distillm.losses.divergences import per_sequence_mean, skew_forward_kl, skew_reverse_kl
from distillm.losses.fused import HeadInputs
from distillm.methods import METHODS, build_method
from distillm.methods.base import LossInputs
from distillm.training.trainer import local_counts
from tolerances import head_loss_atols, rounding_rtol

T, H, V = 5, 6, 13
TWO_GROUPS = {"distillm2", "dpkd", "step-by-step"}
CASES = [("distillm2", {"curriculum": False, "b_ramp": False}), ("distillm2", {"reduction": "token_mean"}),
         ("distillm", {"v1_loss": "skl"}), ("distillm", {"v1_loss": "srkl"}), ("kd", {}), ("seqkd", {}),
         ("imitkd", {}), ("gkd", {"jsd_beta": 0.3}), ("minillm", {}), ("dpkd", {}),
         ("speculative-kd", {"skd_loss": "tvd"}), ("speculative-kd", {"skd_loss": "jsd"}), ("step-by-step", {})]
assert {name for name, _ in CASES} == set(METHODS)


def upstream(name, options):
    """The most a method's loss moves per unit change of all its per-token values together (the sum of |its
    coefficients|): a mean over a group's responses or tokens weighs 1 in all; DistiLLM-2 weighs its two groups
    (2 - b) + b = 2; step-by-step 1 + its rationale weight; DPKD's softplus has slope <= 1 on beta times four
    per-response means (student and teacher, chosen and rejected) per pair."""
    method = load_config(overrides={"method": name, **options}).method
    weights = {"distillm2": 2.0, "dpkd": 4 * method.dpkd_beta, "step-by-step": 1 + method.sbs_rationale_weight}
    return weights.get(name, 1.0)


def tols(name, options, heads, groups, loss):
    """(loss, gradient) assert_close bounds for two float64 evaluations of a method's loss on the batch `groups`
    (or one with fewer rows) that differ in the order of their sums only (tolerances.head_loss_atols)."""
    hs, ht, targets = stack(groups)
    loss_atol, grad_atol = head_loss_atols(HeadInputs(hs, heads.ws, heads.bs), HeadInputs(ht, heads.wt, heads.bt),
                                           upstream=upstream(name, options), n=targets.numel(), loss=loss,
                                           dtype=torch.float64)
    return dict(rtol=0, atol=loss_atol), dict(rtol=0, atol=grad_atol)


def sequences(n, seed):
    """n random sequences: student/teacher hidden states [n, T, H], targets [n, T] (some left-shortened)."""
    g = torch.Generator().manual_seed(seed)
    hs, ht = torch.randn(n, T, H, generator=g, dtype=torch.float64), torch.randn(n, T, H, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (n, T), generator=g)
    targets[0, :2] = -100
    return hs, ht, targets


def empty(n):
    return torch.zeros(n, T, H, dtype=torch.float64), torch.zeros(n, T, H, dtype=torch.float64), \
        torch.full((n, T), -100)


def stack(groups):
    """Concatenate per-group (hs, ht, targets) into one batch: the first group's rows, then the second's."""
    return [torch.cat([g[k] for g in groups]) for k in range(3)]


class Heads:
    def __init__(self, seed=99):
        g = torch.Generator().manual_seed(seed)
        self.ws, self.bs = torch.randn(V, H, generator=g, dtype=torch.float64), torch.randn(V, generator=g, dtype=torch.float64)
        self.wt, self.bt = torch.randn(V, H, generator=g, dtype=torch.float64), torch.randn(V, generator=g, dtype=torch.float64)


def run(name, options, impl, groups, heads):
    """(loss, grads of the student's hidden states [N, T, H], head weight, bias) of a method on a batch."""
    hs, ht, targets = stack(groups)
    n_first = groups[0][0].shape[0]
    hidden = hs.clone().requires_grad_(True)
    weight, bias = heads.ws.clone().requires_grad_(True), heads.bs.clone().requires_grad_(True)
    if impl == "fused":
        student, teacher = HeadInputs(hidden, weight, bias), HeadInputs(ht, heads.wt, heads.bt)
    else:
        student, teacher = F.linear(hidden, weight, bias), F.linear(ht, heads.wt, heads.bt)
    counts = local_counts([{"labels": targets, "n_first": n_first}])
    method = build_method(load_config(overrides={"method": name, **options}))
    loss, _, _ = method.compute_loss(LossInputs(student, teacher, targets, n_first, counts, chunk_size=4))
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad, bias.grad


@pytest.mark.parametrize("impl", ["plain", "fused"])
@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in CASES])
def test_an_empty_response_changes_nothing(name, options, impl):
    heads = Heads()
    n_groups = 2 if name in TWO_GROUPS else 1
    full = [sequences(3, seed) for seed in range(n_groups)]
    with_empty = [stack([g, empty(1)]) for g in full]  # one more unit whose responses are all empty
    loss, gh, gw, gb = run(name, options, impl, full, heads)
    loss_e, gh_e, gw_e, gb_e = run(name, options, impl, with_empty, heads)
    loss_tol, grad_tol = tols(name, options, heads, with_empty, loss)  # float64, other sums (tolerances)
    torch.testing.assert_close(loss_e, loss, **loss_tol)
    torch.testing.assert_close(gw_e, gw, **grad_tol)
    torch.testing.assert_close(gb_e, gb, **grad_tol)
    rows = [slice(4 * k, 4 * k + 3) for k in range(n_groups)]
    torch.testing.assert_close(torch.cat([gh_e[r] for r in rows]), gh, **grad_tol)
    assert not torch.cat([gh_e[4 * k + 3] for k in range(n_groups)]).any()


@pytest.mark.parametrize("impl", ["plain", "fused"])
def test_dpkd_leaves_out_a_pair_with_one_empty_response(impl):
    heads = Heads()
    chosen, rejected = sequences(3, 0), sequences(3, 1)
    loss, gh, gw, gb = run("dpkd", {}, impl, [chosen, rejected], heads)
    for side in (0, 1):  # the fourth pair: a real response on one side, an empty one on the other
        extra = [sequences(1, 7), empty(1)] if side == 0 else [empty(1), sequences(1, 7)]
        groups = [stack([chosen, extra[0]]), stack([rejected, extra[1]])]
        loss_e, _, gw_e, gb_e = run("dpkd", {}, impl, groups, heads)
        loss_tol, grad_tol = tols("dpkd", {}, heads, groups, loss)  # float64, other sums (tolerances)
        torch.testing.assert_close(loss_e, loss, **loss_tol)
        torch.testing.assert_close(gw_e, gw, **grad_tol)


def brute_cald(s_t, t_t, mask_t, s_s, t_s, mask_s, alpha, b):
    """(2 - b) mean over non-empty teacher responses of their mean SKL + b the same of SRKL on student responses."""
    skl = per_sequence_mean(skew_forward_kl(s_t, t_t, alpha), mask_t)
    srkl = per_sequence_mean(skew_reverse_kl(s_s, t_s, alpha), mask_s)
    keep_t, keep_s = mask_t.any(-1), mask_s.any(-1)
    return (2 - b) * skl[keep_t].mean() + b * srkl[keep_s].mean()


@pytest.mark.parametrize("impl", ["plain", "fused"])
def test_cald_averages_each_side_over_its_non_empty_responses(impl):
    g = torch.Generator().manual_seed(5)
    s_t, t_t, s_s, t_s = (torch.randn(4, T, V, generator=g, dtype=torch.float64) for _ in range(4))
    mask_t, mask_s = torch.ones(4, T, dtype=torch.bool), torch.ones(4, T, dtype=torch.bool)
    mask_t[1], mask_s[2], mask_s[3, :3] = False, False, False  # pair 1: empty teacher side, pair 2: student side
    got = cald_loss(s_t, t_t, mask_t, 0.1, s_s, t_s, mask_s, 0.1, b=1.3)
    want = brute_cald(s_t, t_t, mask_t, s_s, t_s, mask_s, 0.1, 1.3)
    # float64 divergences on both sides, weighed (2 - b) + b = 2 in all, over 2 x 4 x T tokens (tolerances)
    atol, _ = head_loss_atols(s_t, t_t, s_s, t_s, upstream=2.0, n=2 * 4 * T, loss=want, dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    # the DistiLLM-2 method gives the same (curriculum and ramp off, a = 0.1, b = 1), plain and fused
    heads = Heads()
    hs, ht, targets = sequences(8, 3)
    targets[1] = -100
    targets[6] = -100
    loss, *_ = run("distillm2", {"curriculum": False, "b_ramp": False}, impl,
                   [(hs[:4], ht[:4], targets[:4]), (hs[4:], ht[4:], targets[4:])], heads)
    s, t = F.linear(hs, heads.ws, heads.bs), F.linear(ht, heads.wt, heads.bt)
    mask = targets != -100
    alpha = torch.tensor(0.1, dtype=torch.float32).item()  # the method's skews are float32
    want = brute_cald(s[:4], t[:4], mask[:4], s[4:], t[4:], mask[4:], alpha, 1.0)
    # the methods' per-token weights are float32: scale * mask / (tokens x responses), at most three float32
    # roundings each (tolerances.rounding_rtol), on terms of one sign; the rest float64 (head_loss_atols, as above)
    loss_tol, _ = tols("distillm2", {}, heads, [(hs, ht, targets)], want)
    torch.testing.assert_close(loss, want, atol=loss_tol["atol"], rtol=rounding_rtol(3, torch.float32))
