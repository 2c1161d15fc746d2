"""evaluation.divergence: the held-out figures of a student against its teacher, against plain references."""

from __future__ import annotations

import math

import pytest
import torch

from tolerances import forward_atol, softmax_atol, sum_atol
from distillm.evaluation.divergence import entropy, teacher_student_divergence


def test_entropy_matches_the_definition_and_ignores_impossible_tokens():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 3
    logits[0, 0, :4] = float("-inf")  # probability 0: contributes nothing (not nan)
    got = entropy(logits)
    for i in range(3):
        for t in range(5):
            row = logits[i, t].double()
            finite = row[torch.isfinite(row)]
            log_z = math.log(sum(math.exp(v) for v in finite.tolist()))
            want = -sum(math.exp(v - log_z) * (v - log_z) for v in finite.tolist())
            # a sum of 11 fp32 terms, each a product of a probability (<= 1) and a log of at most ~40
            assert got[i, t].item() == pytest.approx(want, abs=sum_atol(11, 40.0))
    assert entropy(torch.zeros(2, 7)).tolist() == pytest.approx([math.log(7)] * 2, abs=sum_atol(7, 2.0))
    one_hot = torch.full((1, 6), float("-inf"))
    one_hot[0, 2] = 0.0
    assert entropy(one_hot).item() == 0.0


def test_divergence_reports_both_entropies_over_response_tokens(tokenizer, teacher, student, encoded_prompts):
    torch.manual_seed(1)
    rows = [{"prompt_ids": p.input_ids, "response_ids": torch.randint(3, len(tokenizer), (n,)).tolist()}
            for p, n in zip(encoded_prompts[:4], (3, 1, 5, 2))]
    vocab = len(tokenizer)
    got = teacher_student_divergence(teacher, student, rows, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                                     max_length=512, batch_size=3)
    # the reference: each row alone, the logits that predict each response token, entropies averaged over tokens
    totals, count, atol = {"teacher_entropy": 0.0, "student_entropy": 0.0}, 0, 0.0
    for row in rows:
        ids = torch.tensor([row["prompt_ids"] + row["response_ids"]])
        n = len(row["response_ids"])
        for key, model in (("teacher_entropy", teacher), ("student_entropy", student)):
            with torch.no_grad():
                logits = model(ids).logits[0, -n - 1:-1, :vocab].double()
            log_p = torch.log_softmax(logits, -1)
            totals[key] += float(-(log_p.exp() * log_p).sum())
            # the batched, left-padded forward differs from this one row's by forward_atol per logit; the entropy
            # moves by at most |dz| * sum_i p_i |log p_i + H| <= |dz| * 2 max|log p|, and its fp32 softmax adds
            # softmax_atol
            spread = float(2 * logits.abs().max() + math.log(vocab))
            atol = max(atol, forward_atol(model.config, logits) * 2 * spread + softmax_atol(logits.float()))
        count += n
    for key in totals:  # a token mean of per-token errors within atol
        assert got[key] == pytest.approx(totals[key] / count, abs=atol)
    assert got["student_entropy"] != got["teacher_entropy"]  # a pruned student is another distribution
