"""The pairwise preference figure and its bootstrap interval against plain references, and the per-answer
teacher log-likelihoods it is computed from against one unpadded forward pass per answer."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from distillm.evaluation.divergence import normalised_scores, sequence_log_likelihoods, teacher_nll
from distillm.evaluation.preference import (
    bootstrap_interval, outcomes, paired_scores, preference, preference_over_seeds, score_answers,
)
from distillm.models import real_vocab_size
from tolerances import forward_atol, rounding_rtol, softmax_atol, sum_atol


# ----------------------------------------------------------------------------------------------- outcomes


def test_outcomes_win_tie_loss():
    assert outcomes([1.0, 0.0, -2.0, 3.0], [0.5, 0.0, -1.0, 3.0 + 1e-9]) == [1.0, 0.5, 0.0, 0.0]
    # the same answer is a tie even when the two scores differ in the last bits (other batch, other padding)
    assert outcomes([1.0, -2.0], [1.0 + 1e-7, -2.0], same=[True, False]) == [0.5, 0.5]
    assert outcomes([float("-inf")], [float("-inf")]) == [0.5]  # two empty answers
    with pytest.raises(ValueError, match="same prompts"):
        outcomes([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        outcomes([1.0], [1.0], same=[True, True])


def test_all_wins_gives_one_and_ties_give_half():
    all_wins = preference([2.0] * 30, [1.0] * 30, resamples=500)
    assert (all_wins.rate, all_wins.low, all_wins.high) == (1.0, 1.0, 1.0)
    assert (all_wins.wins, all_wins.ties, all_wins.losses, all_wins.prompts, all_wins.seeds) == (30, 0, 0, 30, 1)
    ties = preference([1.0] * 12, [1.0] * 12, resamples=500)
    assert (ties.rate, ties.low, ties.high, ties.ties) == (0.5, 0.5, 0.5, 12)
    losses = preference([0.0] * 5, [1.0] * 5, resamples=50)
    assert (losses.rate, losses.low, losses.high) == (0.0, 0.0, 0.0)


def test_rate_is_wins_plus_half_ties():
    rng = random.Random(3)
    v = [rng.choice([0.0, 1.0, 2.0]) for _ in range(41)]
    r = [rng.choice([0.0, 1.0, 2.0]) for _ in range(41)]
    result = preference(v, r, resamples=200)
    wins = sum(a > b for a, b in zip(v, r))
    ties = sum(a == b for a, b in zip(v, r))
    assert (result.wins, result.ties, result.losses) == (wins, ties, 41 - wins - ties)
    assert result.rate == pytest.approx((wins + ties / 2) / 41, rel=rounding_rtol(41 + 1, torch.float64))


def test_over_seeds_averages_each_prompt_then_resamples_prompts():
    rng = random.Random(4)
    per_seed = [[rng.choice([0.0, 0.5, 1.0]) for _ in range(23)] for _ in range(3)]
    result = preference_over_seeds(per_seed, resamples=700, seed=2)
    per_prompt = [(a + b + c) / 3 for a, b, c in zip(*per_seed)]
    assert result.rate == pytest.approx(sum(per_prompt) / 23, rel=rounding_rtol(23 + 3, torch.float64))
    assert (result.low, result.high) == bootstrap_interval(per_prompt, resamples=700, seed=2)
    flat = [o for row in per_seed for o in row]
    assert (result.wins, result.ties, result.losses) == (flat.count(1.0), flat.count(0.5), flat.count(0.0))
    assert (result.prompts, result.seeds) == (23, 3)
    # one seed is `preference` itself
    v, r = [rng.random() for _ in range(9)], [rng.random() for _ in range(9)]
    assert preference_over_seeds([outcomes(v, r)], resamples=300) == preference(v, r, resamples=300)
    with pytest.raises(ValueError, match="same prompts"):
        preference_over_seeds([[1.0, 0.0], [1.0]])


# ----------------------------------------------------------------------------------------------- bootstrap


def bootstrap_reference(values, resamples, confidence, seed):
    """The same resamples drawn one at a time, the mean and the quantiles computed by hand (linear interpolation
    between order statistics, numpy's default)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    draws = rng.integers(0, len(values), size=(resamples, len(values)))
    means = sorted(sum(values[i] for i in row) / len(values) for row in draws.tolist())

    def quantile(q):
        position = q * (len(means) - 1)
        below = math.floor(position)
        above = min(below + 1, len(means) - 1)
        return means[below] + (means[above] - means[below]) * (position - below)

    return quantile((1 - confidence) / 2), quantile((1 + confidence) / 2)


def test_bootstrap_matches_reference_and_is_seeded():
    rng = random.Random(1)
    values = [rng.gauss(0.0, 1.0) for _ in range(37)]  # continuous: another seed moves the quantiles
    n, top = len(values), max(map(abs, values))
    got = bootstrap_interval(values, resamples=800, confidence=0.9, seed=5)
    want = bootstrap_reference(values, 800, 0.9, 5)
    # a mean of n terms up to `top`, summed in another order (sum_atol of the mean: sqrt(n) eps top); the
    # interpolation adds a few roundings of values up to `top`
    assert got == pytest.approx(want, abs=sum_atol(n, top, torch.float64) + rounding_rtol(4, torch.float64) * top)
    assert bootstrap_interval(values, resamples=800, confidence=0.9, seed=5) == got  # seeded: the same again
    assert bootstrap_interval(values, resamples=800, confidence=0.9, seed=6) != got


def test_interval_contains_the_estimate_and_narrows_with_prompts():
    rng = random.Random(2)
    widths = []
    for n in (20, 80, 320):
        v = [rng.gauss(0.3, 1.0) for _ in range(n)]
        r = [rng.gauss(0.0, 1.0) for _ in range(n)]
        result = preference(v, r, resamples=2000, seed=0)
        assert result.low <= result.rate <= result.high
        assert 0.0 <= result.low < result.high <= 1.0
        widths.append(result.high - result.low)
    # the width of a mean's interval shrinks like 1 / sqrt(n): a 4x larger sample halves it (allow a wide margin)
    assert widths[0] > widths[1] > widths[2]
    assert widths[2] < 0.75 * widths[0] / 2


def test_interval_coverage_on_a_known_rate():
    """Over many independent samples of prompts with a known true preference 0.7, the 90 % interval covers it in
    about 90 % of them (the percentile bootstrap of a mean runs a little narrow at small n: at least 80 %)."""
    rng = random.Random(11)
    covered, trials = 0, 200
    for trial in range(trials):
        wins = [1.0 if rng.random() < 0.7 else 0.0 for _ in range(60)]
        result = preference(wins, [0.5] * 60, resamples=400, confidence=0.9, seed=trial)
        covered += result.low <= 0.7 <= result.high
    assert covered / trials >= 0.8


def test_bad_settings():
    with pytest.raises(ValueError):
        bootstrap_interval([], resamples=10)
    with pytest.raises(ValueError):
        bootstrap_interval([1.0], resamples=0)
    with pytest.raises(ValueError):
        bootstrap_interval([1.0], confidence=1.0)
    with pytest.raises(ValueError, match="no prompts"):
        preference([], [])


def test_paired_scores_by_prompt_id():
    variant = [{"id": "b", "response_ids": [1, 2]}, {"id": "a", "response_ids": [3]}]
    reference = [{"id": "a", "response_ids": [3]}, {"id": "b", "response_ids": [1, 5]}]
    v, r, same = paired_scores(variant, reference, [0.1, 0.2], [0.3, 0.4])
    assert (v, r, same) == ([0.2, 0.1], [0.3, 0.4], [True, False])
    with pytest.raises(ValueError, match="different prompts"):
        paired_scores(variant, reference[:1] + [{"id": "c", "response_ids": []}], [0.1, 0.2], [0.3, 0.4])


# ----------------------------------------------------------------------------------------------- scoring


def test_sequence_log_likelihoods_match_one_forward_per_answer(teacher, tokenizer, encoded_prompts):
    gen = torch.Generator().manual_seed(0)
    vocab = real_vocab_size(tokenizer)
    rows = []
    for i, prompt in enumerate(encoded_prompts):
        length = int(torch.randint(0, 12, (1,), generator=gen))  # 0: an empty response
        rows.append({"id": prompt.id, "prompt_ids": list(prompt.input_ids),
                     "response_ids": torch.randint(0, vocab, (length,), generator=gen).tolist()})
    max_length = max(len(r["prompt_ids"]) for r in rows) + 8  # cuts the longer responses
    got = sequence_log_likelihoods(teacher, rows, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                                   max_length=max_length, batch_size=3)
    for row, (total, count) in zip(rows, got):
        response = row["response_ids"][:max(max_length - len(row["prompt_ids"]), 0)]
        assert count == len(response)
        if not response:
            assert total == 0.0
            continue
        ids = torch.tensor([row["prompt_ids"] + response])
        with torch.no_grad():
            logits = teacher(input_ids=ids).logits[0, :, :vocab].double()
        lp = torch.log_softmax(logits, -1)
        start = len(row["prompt_ids"])
        want = sum(float(lp[start - 1 + k, t]) for k, t in enumerate(response))
        # per token: the logits of a padded batch vs one row (forward_atol), moving a log-softmax entry by at
        # most twice that, plus the float32 log-softmax itself; summed over the response's tokens
        per_token = 2 * forward_atol(teacher.config, logits) + softmax_atol(logits)
        assert total == pytest.approx(want, abs=len(response) * per_token)
    scores = normalised_scores(got)
    assert [s == float("-inf") for s in scores] == [c == 0 for _, c in got]
    assert scores == [t / c if c else float("-inf") for t, c in got]
    assert score_answers(teacher, rows, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id,
                         max_length=max_length, batch_size=3) == scores
    # the token-weighted mean of the same sums is the teacher NLL
    nll = teacher_nll(teacher, rows, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id, max_length=max_length,
                      batch_size=3)
    total_tokens = sum(c for _, c in got)
    assert -sum(t for t, _ in got) / total_tokens == pytest.approx(nll, rel=rounding_rtol(total_tokens + 2))
