"""Degeneracy figures of a model's held-out answers, and a rule that flags a collapsed student.

The teacher's NLL of a student's answers rewards collapse: a teacher predicts "A A A A ..." (or an empty answer)
well, so a student that repeats one token ranks first on that column. The figures here expose collapse, and
`degenerate` turns them into a flag, always relative to the teacher's own figures on the same prompts.

Every figure uses the word tokenisation of `text.rouge_tokens` (lower-cased; every run of characters other than
a-z and 0-9 separates words), the one distinct-n uses, so the figures do not depend on a model's tokenizer.

- **repetition** (seq-rep-n of Welleck et al., 2019, "Neural text generation with unlikelihood training"), per
  answer: 1 - (distinct word n-grams in the answer) / (word n-grams in the answer), n = 4 by default: the share
  of the answer's n-grams that repeat an earlier n-gram of the same answer. 0 for an answer that never repeats
  itself, -> 1 for one that loops ("A A A ..." or the same sentence again and again). The model's figure is the
  mean over its answers that have at least n words (shorter ones have no n-gram; an empty answer is counted by
  `empty_rate` instead); None when no answer has n words.
- **loop rate**: the share of answers that end in a loop. An answer of words w_1..w_L ends in a loop of period p
  when its last k >= `min_repeats` * p words (default 3 p) are p-periodic: w_j = w_{j-p} for every j among them
  past their first p, except that the last word w_L need only be a prefix of w_{L-p} -- at least three copies of
  a p-word unit, the last one possibly cut short, even mid-word (a greedy loop runs until the token budget cuts
  it anywhere, often inside a word). `loop_period` gives the smallest such p (None: no loop). Answers with no
  word count as not looping.
- **empty rate**: the share of answers with no word at all (blank, or only punctuation and symbols). Caveat of
  the tokenisation: text with no a-z / 0-9 character (e.g. another script) counts as empty too; the teacher's
  own rate, printed alongside, shows whether that matters for a prompt set.
- **distinct-2** (`text.distinct_n`, corpus level) and its distance to the teacher's, |d2_student - d2_teacher|.

The rule (`degenerate`): a student is degenerate when, on any of the figures below, it is closer to the
collapsed extreme than to the teacher -- more than `margin` (default 1/2) of the way from the teacher's value to
that extreme:

- repetition  > r_t + margin (1 - r_t)   (extreme 1: every n-gram a repeat)
- loop rate   > l_t + margin (1 - l_t)   (extreme 1: every answer loops)
- empty rate  > e_t + margin (1 - e_t)   (extreme 1: every answer empty)
- distinct-2  < d_t (1 - margin)         (extreme 0: one bigram over and over)

where r_t, l_t, e_t, d_t are the teacher's figures on the same prompts. Why these: every collapse that wins the
teacher-NLL column moves one of them to its extreme (one repeated token: repetition and loop rate -> 1,
distinct-2 -> 0; the same short answer to every prompt: distinct-2 -> 0; stopping at once: empty rate -> 1),
while a working student stays near the teacher on all of them. The midpoint needs no scale of its own -- it is
set by the teacher's value and the extreme -- and it is far from both: a student is flagged only when most of
its answers are empty or loop, most of its n-grams are repeats (for a teacher that rarely repeats itself), or
its bigram diversity is below half the teacher's. A student more diverse than the teacher (noise) is not
flagged: the teacher-NLL column already ranks noise last. A missing figure (no answer with n words) never flags
by itself; the others still apply.

`rank` orders models by one metric with the flagged ones after all others (and marked), so a collapsed student
can never rank first.

`gap_change_test` says whether a before/after change of a figure's distance to the teacher is more than chance:
a paired permutation test over prompts. Under the null hypothesis the student's answer to a prompt before and
after training are exchangeable, so each prompt's pair is swapped at random (every one of the 2^n swap patterns
when 2^n <= `permutations`, else that many random ones), and the p-value of "farther from the teacher" is the
share of patterns whose change in gap is at least the observed one (likewise "closer"). A corpus-level figure
such as distinct-2 cannot be bootstrapped by drawing prompts with replacement (a drawn twice answer repeats all
its bigrams); swapping within a prompt keeps every answer once. On 24 held-out prompts a run-to-run spread of
distinct-2 of about 0.04 is common (the demo preset: 0.8600 in one run, p = 0.0015, and 0.9045 in another, p = 0.45), so a
verdict without this test reads noise as a result.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from .text import distinct_n, rouge_tokens

#: n of the repetition figure (seq-rep-4, as Welleck et al.)
REPETITION_N = 4
#: copies of a unit that make an answer's tail a loop
MIN_REPEATS = 3
#: how far from the teacher's value towards the collapsed extreme a student is flagged (1/2: closer to collapse)
MARGIN = 0.5


# ----------------------------------------------------------------------------------------------- per answer


def repetition(words: Sequence[str], n: int = REPETITION_N) -> float | None:
    """1 - distinct n-grams / n-grams of one answer's words; None when it has fewer than n words."""
    if n < 1:
        raise ValueError(f"repetition needs n >= 1, got {n}")
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else None


def periodic_tail(words: Sequence[str], period: int) -> int:
    """Length of the longest suffix of `words` that is `period`-periodic (w_j = w_{j-p} past its first p words,
    the last word only a prefix of w_{L-p}: it may be cut mid-word); at most len(words), and at least
    min(p, len(words)) (any p words are trivially p-periodic)."""
    if period < 1:
        raise ValueError(f"a period is >= 1, got {period}")
    length = len(words)
    j = length - 1
    if j - period >= 0 and words[j - period].startswith(words[j]):
        j -= 1
        while j - period >= 0 and words[j] == words[j - period]:
            j -= 1
    # words[j+1:] all equal the word `period` before; the suffix starts `period` words before j + 1
    return min(length, length - (j + 1) + period)


def loop_period(words: Sequence[str], min_repeats: int = MIN_REPEATS) -> int | None:
    """Smallest p such that the answer ends in >= `min_repeats` copies of a p-word unit (the last possibly cut
    short): its p-periodic tail holds at least min_repeats * p words. None: the answer does not end in a loop."""
    if min_repeats < 2:
        raise ValueError(f"a loop needs min_repeats >= 2 copies, got {min_repeats}")
    for period in range(1, len(words) // min_repeats + 1):
        if periodic_tail(words, period) >= min_repeats * period:
            return period
    return None


# ----------------------------------------------------------------------------------------------- per model


def degeneracy_figures(texts: Sequence[str], *, n: int = REPETITION_N, min_repeats: int = MIN_REPEATS) -> dict:
    """repetition, loop_rate, empty_rate and distinct_2 of one model's answers (see the module's docstring)."""
    if not texts:
        raise ValueError("degeneracy figures need at least one answer")
    tokenised = [rouge_tokens(text) for text in texts]
    reps = [r for r in (repetition(words, n) for words in tokenised) if r is not None]
    return {
        "repetition": sum(reps) / len(reps) if reps else None,
        "loop_rate": sum(loop_period(words, min_repeats) is not None for words in tokenised) / len(texts),
        "empty_rate": sum(not words for words in tokenised) / len(texts),
        "distinct_2": distinct_n(texts, 2),
    }


def set_figures(sets: Sequence[Sequence[str]], *, n: int = REPETITION_N, min_repeats: int = MIN_REPEATS) -> dict:
    """`degeneracy_figures` of several sets of answers to the same prompts (one sampled answer per prompt in each
    set, e.g. --eval-samples), each figure the mean of its per-set values (None where no set has one). Not the
    figures of the pooled answers: distinct-2 is a corpus-level figure, and pooling would count the bigrams that
    two samples of one prompt share as repeats, a figure that falls as the number of sets grows."""
    if not sets:
        raise ValueError("set figures need at least one set of answers")
    per_set = [degeneracy_figures(texts, n=n, min_repeats=min_repeats) for texts in sets]
    out = {}
    for key in per_set[0]:
        values = [figures[key] for figures in per_set if figures[key] is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def per_set(figure: Callable[[Sequence[str]], float | None], sizes: Sequence[int]) -> Callable:
    """`figure` as the mean over consecutive sets of `sizes` answers (None where no set has a value): the form
    `gap_change_test` takes when its pairs come from several sets (swaps keep every answer's position, so each
    set stays a set)."""
    bounds = list(itertools.accumulate(sizes, initial=0))

    def mean_figure(texts: Sequence[str]) -> float | None:
        if len(texts) != bounds[-1]:
            raise ValueError(f"expected {bounds[-1]} answers in sets of {list(sizes)}, got {len(texts)}")
        values = [figure(texts[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    return mean_figure


@dataclass(frozen=True)
class Verdict:
    """Whether a model is degenerate, and why (one line per figure that flags it, with the threshold)."""

    flagged: bool
    reasons: tuple[str, ...]
    distinct_2_gap: float | None  # |d2_model - d2_teacher|

    def as_dict(self) -> dict:
        return {"degenerate": self.flagged, "degenerate_reasons": list(self.reasons),
                "distinct_2_gap": self.distinct_2_gap}


def thresholds(teacher: Mapping[str, float | None], margin: float = MARGIN) -> dict[str, tuple[str, float]]:
    """figure -> (direction, threshold) of the rule, from the teacher's figures; a figure the teacher lacks has
    no threshold."""
    if not 0 < margin < 1:
        raise ValueError(f"margin is a fraction of the way to collapse, in (0, 1); got {margin}")
    out = {}
    for key in ("repetition", "loop_rate", "empty_rate"):
        if teacher.get(key) is not None:
            out[key] = (">", teacher[key] + margin * (1.0 - teacher[key]))
    if teacher.get("distinct_2") is not None:
        out["distinct_2"] = ("<", teacher["distinct_2"] * (1.0 - margin))
    return out


def degenerate(model: Mapping[str, float | None], teacher: Mapping[str, float | None],
               margin: float = MARGIN) -> Verdict:
    """The rule of the module's docstring: `model` and `teacher` are `degeneracy_figures` of the same prompts."""
    reasons = []
    for key, (direction, limit) in thresholds(teacher, margin).items():
        value = model.get(key)
        if value is None:
            continue
        if (value > limit) if direction == ">" else (value < limit):
            reasons.append(f"{key} {value:.3f} {direction} {limit:.3f} (teacher {teacher[key]:.3f})")
    gap = (abs(model["distinct_2"] - teacher["distinct_2"])
           if model.get("distinct_2") is not None and teacher.get("distinct_2") is not None else None)
    return Verdict(bool(reasons), tuple(reasons), gap)


# ----------------------------------------------------------------------------------------------- ranking


def rank(values: Mapping[str, float], better: str, flagged: Iterable[str] = ()) -> list[tuple[str, bool]]:
    """Names ordered best first by `values` ("lower" or "higher" is `better`), every flagged name after every
    unflagged one (flagged ones in the same order among themselves); (name, flagged) pairs. Equal values keep
    the order of `values`."""
    if better not in ("lower", "higher"):
        raise ValueError(f"better is 'lower' or 'higher', got {better!r}")
    flagged = set(flagged)
    order = sorted(values, key=lambda name: values[name], reverse=better == "higher")
    return [(name, False) for name in order if name not in flagged] + [(name, True) for name in order if name in flagged]


# ----------------------------------------------------------------------------------------------- before/after


@dataclass(frozen=True)
class GapChange:
    """How a figure's distance to the teacher changed from `before` to `after`, with the permutation p-values."""

    before_gap: float
    after_gap: float
    p_farther: float  # P(change >= observed) under the null: small = after is really farther from the teacher
    p_closer: float  # P(change <= observed): small = after is really closer
    patterns: int  # swap patterns evaluated (2^n when exhaustive)

    @property
    def change(self) -> float:
        return self.after_gap - self.before_gap

    def as_dict(self) -> dict:
        return {"before_gap": self.before_gap, "after_gap": self.after_gap, "p_farther": self.p_farther,
                "p_closer": self.p_closer, "patterns": self.patterns}


def gap_change_test(teacher: Sequence[str], before: Sequence[str], after: Sequence[str], *,
                    figure: Callable[[Sequence[str]], float | None] = lambda texts: distinct_n(texts, 2),
                    permutations: int = 4096, seed: int = 0) -> GapChange:
    """The paired permutation test of the module's docstring. `before[i]` and `after[i]` answer the same prompt;
    `teacher` is the teacher's answers to the same prompts (its figure, fixed, is the target)."""
    if len(before) != len(after):
        raise ValueError(f"before and after answer the same prompts: got {len(before)} and {len(after)} answers")
    if not before:
        raise ValueError("the gap-change test needs at least one prompt")
    if permutations < 1:
        raise ValueError(f"permutations must be at least 1, got {permutations}")
    target = figure(teacher)
    if target is None:
        raise ValueError("the teacher's answers have no value of this figure")

    def change(swaps: Sequence[bool]) -> float | None:
        a = [b_ if s else a_ for a_, b_, s in zip(after, before, swaps)]
        b = [a_ if s else b_ for a_, b_, s in zip(after, before, swaps)]
        fa, fb = figure(a), figure(b)
        return None if fa is None or fb is None else abs(fa - target) - abs(fb - target)

    n = len(before)
    observed = change([False] * n)
    if observed is None:
        raise ValueError("the student's answers have no value of this figure")
    if n < 63 and 2 ** n <= permutations:  # every pattern, the observed one (no swap) among them
        changes = [change(s) for s in itertools.product((False, True), repeat=n)]
    else:  # random patterns, plus the observed one (so a p-value is never 0)
        rng = random.Random(seed)
        changes = [observed] + [change([rng.random() < 0.5 for _ in range(n)]) for _ in range(permutations)]
    changes = [c for c in changes if c is not None]
    eps = 1e-12  # a tie within float rounding counts as "at least as extreme"
    farther = sum(c >= observed - eps for c in changes) / len(changes)
    closer = sum(c <= observed + eps for c in changes) / len(changes)
    return GapChange(abs(figure(before) - target), abs(figure(after) - target), farther, closer, len(changes))
