"""Agreement with TRL's GOLD (trl.experimental.gold.ULDLoss) where the two coincide: the sorted L1 on the
unmatched vocabulary (its hybrid loss' unmatched part) is our ULD term, and its 'observed' merge of a
one-to-many group (first position's distribution times the conditional probabilities of the later actual
tokens) is our chain-rule merge. Skipped when TRL has no GOLD."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from distillm.crosstok.losses import group_values, span_log_probs, uld_distance
from distillm.crosstok.vocab import VocabMap
from tolerances import sum_atol

gold = pytest.importorskip("trl.experimental.gold.gold_trainer")


def test_unmatched_sorted_l1_equals_our_uld():
    g = torch.Generator().manual_seed(0)
    vt, vs, n = 12, 9, 5
    p = torch.softmax(torch.randn(n, vt, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(n, vs, generator=g, dtype=torch.float64), -1)
    t_ids, s_ids = [0, 2, 3, 7], [1, 0, 5, 4]
    ns = SimpleNamespace(_teacher_matched_ids=set(t_ids), hybrid_matched_weight=0.0, hybrid_unmatched_weight=1.0,
                         mapping_tensor=torch.full((vt,), -1, dtype=torch.long),
                         _compute_jsd_loss_for_matched_tokens=lambda s, t: torch.tensor(0.0, dtype=torch.float64))
    ns.mapping_tensor[torch.tensor(t_ids)] = torch.tensor(s_ids)
    theirs = gold.ULDLoss._compute_hybrid_uld_loss(ns, q, p)
    vm = VocabMap(torch.tensor(t_ids), torch.tensor(s_ids), vt, vs)
    ours = uld_distance(p[:, vm.unmatched("teacher")], q[:, vm.unmatched("student")]).mean()
    assert ours.item() == pytest.approx(theirs.item(), abs=sum_atol(vt, 2.0, torch.float64))


def test_observed_merge_equals_our_chain_rule_merge():
    """A student group of 3 tokens against one teacher token: GOLD merges the student's probabilities at those
    3 positions; ours is q_start * exp(sum of the continuation's log-probs). ULD of the two merged vectors
    against the same teacher vector agree."""
    g = torch.Generator().manual_seed(1)
    vs, vt = 10, 14
    s_logits = torch.randn(3, vs, generator=g, dtype=torch.float64)
    t_logits = torch.randn(1, vt, generator=g, dtype=torch.float64)
    tokens = torch.tensor([4, 7, 2])
    probs = torch.softmax(s_logits, -1)
    ns = SimpleNamespace(token_merge_strategy="observed")
    theirs = gold.ULDLoss._merge_probabilities_with_alignment_groups(ns, probs, [[0, 1, 2]], token_ids=tokens)
    lp = torch.log_softmax(s_logits, -1)
    cont = span_log_probs(lp.gather(-1, tokens[:, None]).squeeze(-1)[None], torch.tensor([1]), torch.tensor([3]),
                          torch.tensor([0]))
    ours_vector = (lp[0] + cont).exp()
    assert torch.allclose(ours_vector, theirs[0], atol=sum_atol(3, 1.0, torch.float64), rtol=0)
    vm = VocabMap(torch.tensor([0]), torch.tensor([0]), vt, vs)
    ours = group_values("fkl", s_logits[:1], t_logits, torch.tensor([False]), cont, torch.zeros(1, dtype=torch.float64),
                        vm)
    want = uld_distance(torch.softmax(t_logits, -1), theirs)
    assert ours.item() == pytest.approx(want.item(), abs=sum_atol(vt, 2.0, torch.float64))
