"""Degeneracy figures against plain references, the degenerate-student rule, and the ranking that a collapsed
student cannot win."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from distillm.evaluation.degeneracy import (
    MARGIN, degeneracy_figures, degenerate, gap_change_test, loop_period, per_set, periodic_tail, rank, repetition,
    set_figures, thresholds,
)
from distillm.evaluation.text import distinct_n, rouge_tokens
from tolerances import rounding_rtol

F64 = torch.float64


# ----------------------------------------------------------------------------------------------- references


def repetition_reference(words, n):
    """Count, one n-gram at a time, those that already appeared earlier in the answer."""
    seen, repeats, total = [], 0, 0
    for i in range(len(words) - n + 1):
        gram = words[i:i + n]
        repeats += gram in seen
        seen.append(gram)
        total += 1
    return repeats / total if total else None


def loop_reference(words, min_repeats):
    """Try every period and every number of copies: the last c*p (+ r, r < p) words are c copies of a unit u and
    a prefix of u."""
    for p in range(1, len(words) + 1):
        for r in range(p):
            for c in range(min_repeats, len(words) // p + 1):
                length = c * p + r
                if length > len(words):
                    break
                tail = words[len(words) - length:]
                copies = (tail[:p] * (c + 1))[:length]
                # the last word may be cut mid-word: a prefix of the word it repeats
                if tail[:-1] == copies[:-1] and copies[-1].startswith(tail[-1]):
                    return p
    return None


def random_answers(rng, count, vocab="abc", max_len=14):
    return [[rng.choice(vocab) for _ in range(rng.randint(0, max_len))] for _ in range(count)]


# ----------------------------------------------------------------------------------------------- per answer


@pytest.mark.parametrize("n", [1, 2, 4])
def test_repetition_matches_reference(n):
    rng = random.Random(n)
    for words in random_answers(rng, 300):
        if len(words) < n:
            assert repetition(words, n) is None and repetition_reference(words, n) is None
        else:  # 1 - a / b against c / b: three roundings apart
            assert repetition(words, n) == pytest.approx(repetition_reference(words, n), rel=rounding_rtol(3, F64))


def test_repetition_extremes():
    assert repetition("the cat sat on the mat today".split(), 4) == 0.0
    assert repetition(["a"] * 20, 4) == 1 - 1 / 17  # 17 four-grams, all the same
    assert repetition(["a", "b", "c"], 4) is None


def test_loop_period_matches_brute_force():
    rng = random.Random(0)
    answers = random_answers(rng, 400, vocab="ab") + random_answers(rng, 400, vocab="abcd")
    answers += [list(w) for w in ("", "a", "aa", "aaa", "abab", "ababa", "ababab", "xabcabcab", "xabcabcabc")]
    for words in answers:
        for min_repeats in (2, 3, 4):
            assert loop_period(words, min_repeats) == loop_reference(words, min_repeats), (words, min_repeats)


def test_loop_examples():
    assert loop_period("an answer that ends in the the the".split()) == 1
    # a sentence looping until the token budget cut it mid-sentence
    looped = ("Paris is the capital of France . " * 4 + "Paris is the").split()
    assert loop_period(looped) == 7
    assert loop_period("x a b a b a b".split()) == 2
    assert loop_period("x a bc a bc a b".split()) == 2  # the last word cut mid-word
    assert loop_period("x a bc a bc a bd".split()) is None  # not a prefix
    assert loop_period("x a bc a bc a".split()) is None  # 2.5 copies
    assert loop_period("x a bc a bc a bc a".split()) == 2
    assert loop_period("a b a b".split()) is None  # two copies are not a loop
    assert loop_period("the cat sat on the mat".split()) is None


def test_periodic_tail():
    assert periodic_tail(list("xyabab"), 2) == 4
    assert periodic_tail(list("xyabab"), 1) == 1
    assert periodic_tail(["x", "ab", "ab", "a"], 1) == 3
    assert periodic_tail(list("ab"), 5) == 2
    assert periodic_tail([], 1) == 0


# ----------------------------------------------------------------------------------------------- per model


def test_figures_match_references():
    rng = random.Random(7)
    answers = random_answers(rng, 50, vocab="abcdef", max_len=20)
    texts = [" ".join(words) + ("." if i % 3 else "") for i, words in enumerate(answers)]
    figures = degeneracy_figures(texts)
    words = [rouge_tokens(t) for t in texts]
    reps = [repetition_reference(w, 4) for w in words if len(w) >= 4]
    # each term three roundings from its reference, then a sum of terms of one sign and a division
    assert figures["repetition"] == pytest.approx(sum(reps) / len(reps), rel=rounding_rtol(3 + len(reps) + 1, F64))
    assert figures["loop_rate"] == sum(loop_reference(w, 3) is not None for w in words) / len(texts)
    assert figures["empty_rate"] == sum(not w for w in words) / len(texts)
    assert figures["distinct_2"] == distinct_n(texts, 2)


def test_set_figures_are_the_means_of_the_per_set_figures():
    rng = random.Random(3)
    sets = [_answers(rng, 6) for _ in range(3)]
    sets[1][0] = ""  # an empty answer in one set
    figures = set_figures(sets)
    per = [degeneracy_figures(texts) for texts in sets]
    for key in ("repetition", "loop_rate", "empty_rate", "distinct_2"):
        values = [f[key] for f in per]  # a sum of 3 terms and a division
        assert figures[key] == pytest.approx(sum(values) / 3, rel=rounding_rtol(4, F64))
    assert set_figures(sets[:1]) == degeneracy_figures(sets[0])  # one set: the plain figures
    # why not the pooled answers: two samples that agree count each other's bigrams as repeats
    twice = [["the cat sat on the mat", "a dog ran far away"]] * 2
    assert set_figures(twice)["distinct_2"] == 1.0 and distinct_n(sum(twice, []), 2) == 0.5
    # a figure no set has (no answer of 4 words) stays None; one set without it leaves the others' mean
    short = [["a b", "c"], ["d e f g h", "i j"]]
    assert set_figures(short[:1])["repetition"] is None
    assert set_figures(short)["repetition"] == degeneracy_figures(short[1])["repetition"]
    with pytest.raises(ValueError, match="at least one set"):
        set_figures([])


def test_per_set_figure_averages_consecutive_sets_and_checks_the_length():
    rng = random.Random(4)
    a, b = _answers(rng, 5), _answers(rng, 3)
    mean_d2 = per_set(lambda texts: distinct_n(texts, 2), [5, 3])
    assert mean_d2(a + b) == pytest.approx((distinct_n(a, 2) + distinct_n(b, 2)) / 2, rel=rounding_rtol(2, F64))
    with pytest.raises(ValueError, match="expected 8 answers"):
        mean_d2(a)
    # in the permutation test, a swap moves an answer between before and after, never between sets: with the
    # per-set figure the p-values are the brute-force ones computed set by set
    teacher, before, after = _answers(rng, 8), _answers(rng, 8), _answers(rng, 8, loop_every=2)
    result = gap_change_test(teacher, before, after, figure=mean_d2)
    t = mean_d2(teacher)
    changes = []
    for mask in range(2 ** 8):
        x = [before[i] if mask >> i & 1 else after[i] for i in range(8)]
        y = [after[i] if mask >> i & 1 else before[i] for i in range(8)]
        changes.append(abs(mean_d2(x) - t) - abs(mean_d2(y) - t))
    assert result.patterns == 256
    assert result.p_farther == sum(c >= changes[0] - 1e-12 for c in changes) / 256
    assert result.p_closer == sum(c <= changes[0] + 1e-12 for c in changes) / 256


def test_empty_answers_count_as_empty():
    figures = degeneracy_figures(["", "  \n", "...", "a real answer here"])
    assert figures["empty_rate"] == 0.75
    assert figures["repetition"] == 0.0  # the one answer with 4 words never repeats itself
    assert degeneracy_figures(["", "hi"])["repetition"] is None
    with pytest.raises(ValueError):
        degeneracy_figures([])


# ----------------------------------------------------------------------------------------------- the rule

TEACHER_TEXTS = [
    "Paris is the capital of France, known for the Eiffel Tower.",
    "Two plus two is four.",
    "Blue is a calm colour often linked with the sky and the sea.",
    "Waves fold on the cliffs; the wind carries salt over the grass.",
    "A neural network is a function built from layers of weighted sums and nonlinearities.",
    "Apples, bananas and cherries.",
    "Bonjour means good morning in French.",
    "The cat built a tiny red plane and flew over the town at dawn.",
]


def test_thresholds_are_the_midpoints_to_collapse():
    teacher = {"repetition": 0.1, "loop_rate": 0.0, "empty_rate": 0.2, "distinct_2": 0.8}
    assert thresholds(teacher) == {"repetition": (">", 0.1 + MARGIN * 0.9), "loop_rate": (">", MARGIN),
                                   "empty_rate": (">", 0.2 + MARGIN * 0.8), "distinct_2": ("<", 0.8 * (1 - MARGIN))}
    assert thresholds({"repetition": None, "distinct_2": 0.5}, margin=0.25) == {"distinct_2": ("<", 0.375)}
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError):
            thresholds(teacher, bad)


@pytest.mark.parametrize("name, texts, flagged_on", [
    ("one token over and over", ["A " * 40] * 8, {"repetition", "loop_rate", "distinct_2"}),
    ("the same short answer to every prompt", ["I do not know."] * 8, {"distinct_2"}),
    ("stops at once", [""] * 6 + TEACHER_TEXTS[:2], {"empty_rate"}),
    ("a sentence looped until cut, mid-word", [t + " " + t + " " + t + " " + t[:20] for t in TEACHER_TEXTS],
     {"repetition", "loop_rate", "distinct_2"}),
])
def test_collapsed_students_are_flagged(name, texts, flagged_on):
    teacher = degeneracy_figures(TEACHER_TEXTS)
    verdict = degenerate(degeneracy_figures(texts), teacher)
    assert verdict.flagged, name
    assert {reason.split()[0] for reason in verdict.reasons} == flagged_on, verdict.reasons


def test_teacher_like_student_is_not_flagged():
    teacher = degeneracy_figures(TEACHER_TEXTS)
    assert degenerate(teacher, teacher).flagged is False
    student = [t.replace("the", "a") for t in TEACHER_TEXTS]
    verdict = degenerate(degeneracy_figures(student), teacher)
    assert not verdict.flagged and verdict.reasons == ()
    assert verdict.distinct_2_gap == pytest.approx(abs(distinct_n(student, 2) - distinct_n(TEACHER_TEXTS, 2)))


def test_rule_boundaries():
    teacher = {"repetition": 0.0, "loop_rate": 0.0, "empty_rate": 0.0, "distinct_2": 0.8}
    at_limit = {"repetition": 0.5, "loop_rate": 0.5, "empty_rate": 0.5, "distinct_2": 0.4}
    assert not degenerate(at_limit, teacher).flagged  # strictly beyond the midpoint flags
    for key, value in (("repetition", 0.51), ("loop_rate", 0.51), ("empty_rate", 0.51), ("distinct_2", 0.39)):
        assert degenerate(at_limit | {key: value}, teacher).reasons[0].startswith(key)
    # more diverse than the teacher (noise) is not collapse; a missing figure does not flag
    assert not degenerate({"distinct_2": 1.0, "repetition": None}, teacher).flagged


# ----------------------------------------------------------------------------------------------- ranking


def test_rank_orders_unflagged_first():
    values = {"a": 3.0, "b": 1.0, "c": 2.0, "d": 0.5}
    assert rank(values, "lower") == [("d", False), ("b", False), ("c", False), ("a", False)]
    assert rank(values, "higher", flagged={"a", "b"}) == [("c", False), ("d", False), ("a", True), ("b", True)]
    for flagged in itertools.chain.from_iterable(itertools.combinations(values, k) for k in range(5)):
        order = rank(values, "lower", flagged)
        marks = [f for _, f in order]
        assert marks == sorted(marks) and {n for n, f in order if f} == set(flagged)
    with pytest.raises(ValueError):
        rank(values, "target")


def test_one_token_student_wins_teacher_nll_only_under_the_old_rule():
    """The teacher's NLL of a student that says "A A A ..." is the lowest of all (a teacher predicts a repeated
    token well): ranked by that column alone it comes first; with the degeneracy flag it comes last, marked."""
    teacher = degeneracy_figures(TEACHER_TEXTS)
    students = {
        "collapsed": ["A " * 40] * len(TEACHER_TEXTS),
        "working": [t.replace("the", "a") for t in TEACHER_TEXTS],
        "weaker": [" ".join(reversed(t.split())) for t in TEACHER_TEXTS],
    }
    # the shape of docs/results/full/results.md: minillm, distinct-2 0.002, had the best teacher NLL (0.626, next
    # to the teacher's own 0.610) against kd's 2.281 and seqkd's 2.446
    teacher_nll = {"collapsed": 0.626, "working": 2.281, "weaker": 2.446}
    old = [name for name, _ in rank(teacher_nll, "lower")]
    assert old[0] == "collapsed"
    flags = {name for name, texts in students.items() if degenerate(degeneracy_figures(texts), teacher).flagged}
    assert flags == {"collapsed"}
    assert rank(teacher_nll, "lower", flags) == [("working", False), ("weaker", False), ("collapsed", True)]


# ----------------------------------------------------------------------------------------------- gap change test

_WORDS = "the cat sat on a mat dog ran far away from home bread rises when yeast eats sugar".split()


def _answers(rng, n, *, loop_every=0):
    out = []
    for i in range(n):
        if loop_every and i % loop_every == 0:
            out.append(" ".join(["the dog"] * 8))
        else:
            out.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))))
    return out


def _brute_force_p(teacher, before, after):
    """Every one of the 2^n swap patterns, written out plainly: a pattern is the bits of an integer."""
    t = distinct_n(teacher, 2)
    n = len(before)
    changes = []
    for mask in range(2 ** n):
        a, b = [], []
        for i in range(n):
            if mask >> i & 1:
                a.append(before[i]); b.append(after[i])
            else:
                a.append(after[i]); b.append(before[i])
        changes.append(abs(distinct_n(a, 2) - t) - abs(distinct_n(b, 2) - t))
    observed = changes[0]
    return (sum(c >= observed - 1e-12 for c in changes) / len(changes),
            sum(c <= observed + 1e-12 for c in changes) / len(changes))


@pytest.mark.parametrize("seed", range(4))
def test_gap_change_p_values_match_the_brute_force_enumeration(seed):
    rng = random.Random(seed)
    n = 7
    teacher, before, after = _answers(rng, n), _answers(rng, n), _answers(rng, n, loop_every=seed % 3)
    result = gap_change_test(teacher, before, after)
    assert result.patterns == 2 ** n
    assert (result.p_farther, result.p_closer) == _brute_force_p(teacher, before, after)
    t = distinct_n(teacher, 2)
    assert result.before_gap == abs(distinct_n(before, 2) - t) and result.after_gap == abs(distinct_n(after, 2) - t)


def test_a_collapse_on_every_prompt_is_not_chance_and_no_change_is():
    rng = random.Random(5)
    n = 10
    teacher, before = _answers(rng, n), _answers(rng, n)
    collapsed = ["the dog " * 10] * n  # the same loop everywhere: distinct-2 near 0
    result = gap_change_test(teacher, before, collapsed)
    # the observed split (every diverse answer on one side) is the most extreme of the 1,024 patterns; its
    # mirror (all swapped) is the least, so p_farther is 1/1024 (up to exact ties) and p_closer is 1
    assert result.patterns == 1024 and result.p_farther <= 2 / 1024 and result.p_closer == 1.0
    same = gap_change_test(teacher, before, before)  # nothing changed: every pattern ties the observed 0
    assert same.change == 0 and same.p_farther == 1.0 and same.p_closer == 1.0


def test_gap_change_samples_patterns_when_there_are_too_many_and_is_seeded():
    rng = random.Random(9)
    n = 40
    teacher, before, after = _answers(rng, n), _answers(rng, n), _answers(rng, n, loop_every=2)
    one, two = gap_change_test(teacher, before, after, permutations=300), gap_change_test(teacher, before, after, permutations=300)
    assert one == two and one.patterns == 301  # the sampled patterns plus the observed one
    assert 1 / 301 <= one.p_farther <= 1 and 1 / 301 <= one.p_closer <= 1
    assert one.p_farther < 0.05  # a loop in every other answer: really farther from the teacher


def test_gap_change_test_refuses_bad_inputs():
    with pytest.raises(ValueError, match="same prompts"):
        gap_change_test(["a b c"], ["a b"], ["a b", "c d"])
    with pytest.raises(ValueError, match="at least one prompt"):
        gap_change_test(["a b c"], [], [])
    with pytest.raises(ValueError, match="permutations"):
        gap_change_test(["a b c"], ["a b"], ["c d"], permutations=0)
