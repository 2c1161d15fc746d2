"""Text metrics: ROUGE-L (the DistiLLM v1 / MiniLLM protocol), perplexity on references, and distinct-n.

ROUGE-L here is the sentence-level F-measure of Lin (2004) over the longest common subsequence of tokens, with
the tokenisation of Google's `rouge_score` (lower-cased, every run of characters other than a-z and 0-9 is a
separator, no stemming): F = 2 P R / (P + R), P = LCS / len(prediction), R = LCS / len(reference). Reported as
a fraction in [0, 1] (papers often print it x100).

Distinct-n (Li et al., 2016) needs no reference: the number of distinct word n-grams over all of a model's
responses divided by their total number, with the same tokenisation. It exposes a collapsed student -- the same
few tokens repeated in every answer -- that likelihood under the teacher rewards (a teacher predicts "A\nA\nA"
well); the teacher's own value is the one to match.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

from .divergence import teacher_nll

_SEPARATORS = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    return _SEPARATORS.sub(" ", text.lower()).split()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) x len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of one prediction against one reference."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over `texts` (corpus level); 0.0 when no text has n tokens."""
    if n < 1:
        raise ValueError(f"distinct-n needs n >= 1, got {n}")
    grams = [tuple(tokens[i:i + n]) for tokens in map(rouge_tokens, texts) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def mean_rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return sum(map(rouge_l, predictions, references)) / max(len(predictions), 1)


def reference_rows(prompt_ids: Sequence[list[int]], references: Sequence[str], tokenizer) -> list[dict]:
    """Rows (prompt_ids, response_ids) scoring each reference response as the answer to its prompt; the
    response ends with the end-of-sequence token, as a model's own finished response does."""
    rows = []
    for ids, text in zip(prompt_ids, references):
        response = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append({"prompt_ids": list(ids), "response_ids": response})
    return rows


def perplexity(model, rows: Sequence[dict], *, vocab_size: int, pad_token_id: int, max_length: int,
               batch_size: int = 8, desc: str = "perplexity") -> dict[str, float]:
    """exp(mean per-token NLL) of `model` on the response tokens of `rows` (token-weighted over all rows)."""
    nll = teacher_nll(model, rows, vocab_size=vocab_size, pad_token_id=pad_token_id, max_length=max_length,
                      batch_size=batch_size, desc=desc)
    return {"perplexity": math.exp(nll), "nll": nll}
