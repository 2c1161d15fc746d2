"""The top-k teacher of the fused losses with tail="uniform": the distribution it stands for (top-k log-probs, tail
mass spread evenly over the other tokens), checked against the plain divergences on that distribution built by
hand. The tail in proportion to the student's probabilities is tested in tests/losses/test_topk_tail.py."""

from __future__ import annotations

import pytest
import torch

from distillm.losses import divergences as D
from distillm.losses.fused import HeadInputs, TopKTeacher, fused_weighted_divergence, mixture_weight
from tolerances import head_loss_atols


def by_hand(teacher_logits, k):
    """The dense log-probs a top-k teacher stands for, written out per position."""
    logp = torch.log_softmax(teacher_logits.double(), -1)
    out = torch.empty_like(logp)
    for pos in range(logp.shape[0]):
        top = logp[pos].topk(k)
        rest = logp.shape[1] - k
        tail = (1 - top.values.exp().sum()) / rest if rest else 0.0
        out[pos] = torch.log(torch.as_tensor(tail, dtype=torch.float64)) if rest else 0.0
        out[pos, top.indices] = top.values
    return out


@pytest.mark.parametrize("name,weight", [("fkl", None), ("skl", 0.1), ("srkl", 0.1), ("jsd", 0.5)])
@pytest.mark.parametrize("k", [1, 5, 23])
def test_topk_teacher_is_the_topk_plus_uniform_tail_distribution(name, weight, k):
    g = torch.Generator().manual_seed(k)
    n, h, v = 9, 6, 23
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_logits = 2 * torch.randn(n, v, generator=g, dtype=torch.float64)
    top = torch.log_softmax(teacher_logits, -1).topk(k)
    token_weights = torch.rand(n, generator=g, dtype=torch.float64)
    loss, _ = fused_weighted_divergence(name, HeadInputs(hidden, head), TopKTeacher(top.values, top.indices, "uniform"),
                                        token_weights, **mixture_weight(name, weight), chunk_size=4)
    grads = torch.autograd.grad(loss, (hidden, head))
    fn = {"fkl": lambda s, t: D.forward_kl(s, t), "skl": lambda s, t: D.skew_forward_kl(s, t, 0.1),
          "srkl": lambda s, t: D.skew_reverse_kl(s, t, 0.1), "jsd": lambda s, t: D.generalized_jsd(s, t, 0.5)}[name]
    ref = (token_weights * fn(hidden @ head.t(), by_hand(teacher_logits, k))).sum()
    ref_grads = torch.autograd.grad(ref, (hidden, head))
    # float64 fused head vs plain logits, coefficients token_weights (tolerances.head_loss_atols)
    loss_atol, grad_atol = head_loss_atols(HeadInputs(hidden, head), teacher_logits, n=n, loss=ref,
                                           upstream=float(token_weights.sum()), dtype=torch.float64)
    torch.testing.assert_close(loss, ref, rtol=0, atol=loss_atol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=grad_atol)
    if k == v:  # nothing left out: exactly the full teacher (the same bound: only the order of the sums differs)
        exact = (token_weights * fn(hidden @ head.t(), teacher_logits)).sum()
        torch.testing.assert_close(loss, exact, rtol=0, atol=loss_atol)


def test_topk_teacher_ids_out_of_range_are_refused():
    hidden, head = torch.randn(2, 3), torch.randn(5, 3)
    bad = TopKTeacher(torch.log(torch.full((2, 2), 0.3)), torch.tensor([[0, 1], [2, 7]]))
    with pytest.raises(ValueError, match="ids must be in"):
        fused_weighted_divergence("fkl", HeadInputs(hidden, head), bad, torch.ones(2))
