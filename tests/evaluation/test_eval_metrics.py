"""Math exact match, ROUGE-L and pass@k on hand-built cases with known answers."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
import torch

from distillm.evaluation.code import build_program, extract_code, load_humaneval, load_mbpp, pass_at_k, CodeDataError
from distillm.evaluation.math import (
    MathDataError, answers_match, arithmetic_problems, extract_answer, load_math_problems, score_responses,
)
from distillm.evaluation.text import distinct_n, lcs_length, mean_rouge_l, rouge_l, rouge_tokens
from tolerances import product_atol, rounding_rtol


# ----------------------------------------------------------------------------------------------- math


@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48/2 = 24 clips in May.\nAltogether she sold 48+24 = 72 clips.\n#### 72", "72"),
    ("so the answer is 5 apples, not 7.\n####  1,234 dollars", "1,234"),
    ("The total is $18. Then 3 more... final: 21", "21"),
    ("We get \\boxed{\\frac{1}{2}} in the end.", "\\frac{1}{2}"),
    ("The answer is \\boxed{x^{2}+1}.", "x^{2}+1"),
    ("no numbers here", None),
    ("It is -3.5.", "-3.5"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_answers_match_compares_numbers_exactly():
    assert answers_match("1,234", "1234")
    assert answers_match("$72", "72.0")
    assert answers_match("\\frac{1}{2}", "0.5")
    assert answers_match("1/2", "0.5")
    assert not answers_match("72.01", "72")
    assert not answers_match(None, "3")
    assert answers_match(" X^2 + 1 ", "x^2+1")  # non-numbers compare as normalised text


def test_score_responses_known_accuracy():
    problems = arithmetic_problems(4, seed=1)
    responses = {problems[0].id: f"#### {problems[0].answer}",
                 problems[1].id: f"I think it is {problems[1].answer}.",
                 problems[2].id: f"#### {int(problems[2].answer) + 1}",
                 problems[3].id: "I don't know"}
    scored = score_responses(problems, responses)
    assert (scored["correct"], scored["total"], scored["no_answer"]) == (2, 4, 1)
    assert scored["accuracy"] == 0.5


def test_arithmetic_generator_is_seeded_and_correct():
    a, b = arithmetic_problems(50, seed=3), arithmetic_problems(50, seed=3)
    assert a == b and a != arithmetic_problems(50, seed=4)
    assert len({p.id for p in a}) == 50
    for p in a:  # every answer is a whole number the question's own numbers produce
        assert int(p.answer) >= 0 and p.question.endswith("?")
    add = next(p for p in a if "gives" in p.question and "more" in p.question)
    x, y = [int(t) for t in add.question.replace(".", " ").split() if t.isdigit()][:2]
    assert int(add.answer) == x + y


def test_load_gsm8k_and_math_jsonl(tmp_path):
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text(json.dumps({"question": "2+2?", "answer": "2+2=4\n#### 4"}) + "\n" +
                   json.dumps({"question": "3*3?", "answer": "#### 9", "id": "q2"}) + "\n")
    problems = load_math_problems(gsm)
    assert [(p.id, p.answer) for p in problems] == [("gsm8k:1", "4"), ("q2", "9")]
    math_file = tmp_path / "math.jsonl"
    math_file.write_text(json.dumps({"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$."}) + "\n")
    assert load_math_problems(math_file)[0].answer == "\\frac{1}{2}"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "2+2?"}) + "\n")
    with pytest.raises(MathDataError, match=r"bad.jsonl:1: no final answer"):
        load_math_problems(bad)


# ----------------------------------------------------------------------------------------------- ROUGE-L


def test_rouge_l_known_values():
    # LCS "the cat on the mat" = 5 of 6 tokens on each side: P = R = F = 5/6
    # (P = 5/6 rounded once, 2 P R rounded, / (P + R) rounded: three float64 roundings, tolerances.rounding_rtol)
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(
        5 / 6, rel=rounding_rtol(3, torch.float64), abs=0)
    # LCS "police the gunman" = 3; P = R = 3/4
    assert rouge_l("police killed the gunman", "police kill the gunman") == 0.75  # 2 * 0.75^2 / 1.5: exact
    # P = 2/2, R = 2/4: F = 2 * 1 * 0.5 / 1.5
    assert rouge_l("a b", "a x b y") == 2 / 3  # 1.0 / 1.5: one correctly rounded quotient, as 2 / 3
    assert rouge_l("", "anything") == 0.0 and rouge_l("same words", "Same, words!") == 1.0
    assert rouge_tokens("It's 3.5-ish") == ["it", "s", "3", "5", "ish"]
    assert lcs_length("ABCBDAB", "BDCABA") == 4
    assert mean_rouge_l(["a b", "c"], ["a b", "d"]) == 0.5  # (1 + 0) / 2: exact


def test_distinct_n_against_a_plain_count():
    texts = ["the cat sat on the mat", "The cat, the cat!", "A\nA\nA\nA", "one", ""]

    def plain(texts, n):  # every n-gram of every text, then distinct ones over all of them
        grams = []
        for text in texts:
            words = rouge_tokens(text)
            for i in range(len(words) - n + 1):
                grams.append(" ".join(words[i:i + n]))
        return len(set(grams)) / len(grams)

    for n in (1, 2, 3):
        assert distinct_n(texts, n) == plain(texts, n)  # the same quotient of the same two counts
    # bigrams: 5 distinct of 5, then "the cat", "cat the", "the cat" (1 new), then "a a" x 3
    assert distinct_n(texts, 2) == (5 + 1 + 1) / (5 + 3 + 3)  # a quotient of counts, correctly rounded: exact
    assert distinct_n(["A\nA\nA\nA\nA"] * 10, 2) == 1 / 40  # a collapsed model: near 0
    assert distinct_n(["one", ""], 2) == 0.0 and distinct_n([], 2) == 0.0  # no bigram at all
    with pytest.raises(ValueError, match="n >= 1"):
        distinct_n(texts, 0)


# ----------------------------------------------------------------------------------------------- pass@k


def _closed_form(n, c, k):
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_matches_closed_form():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(_closed_form(n, c, k)), rel=0, abs=product_atol(n))
    # large n: the product form stays exact where the binomials are astronomically large
    assert pass_at_k(200, 13, 100) == pytest.approx(float(_closed_form(200, 13, 100)), rel=0, abs=product_atol(200))
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4, rel=0, abs=product_atol(5))  # tolerances.product_atol
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 10, 1) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_extract_code_and_programs():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n") == "x = 1\n"  # unclosed fence
    assert extract_code("def g(): pass") == "def g(): pass"
    problem = load_humaneval(limit=1)[0]
    assert problem.id == "HumanEval/0" and problem.entry_point == "has_close_elements"
    body = "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n"
    program = build_program(problem, body)  # a bare body completes the prompt
    assert program.startswith(problem.prompt) and program.rstrip().endswith("check(has_close_elements)")
    whole = "```python\ndef has_close_elements(numbers, threshold):\n" + body + "```"
    program = build_program(problem, whole)  # a whole function keeps the prompt's imports
    assert "from typing import List" in program and program.count("def has_close_elements") == 1


def test_mbpp_loader_errors_name_line_and_field(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps({"task_id": 1, "text": "t", "code": "", "test_list": ["assert True"]}) + "\n"
                    + json.dumps({"text": "t", "test_list": "assert True"}) + "\n")
    with pytest.raises(CodeDataError, match=r"mbpp.jsonl:2: field 'test_list'"):
        load_mbpp(path)
    assert load_mbpp(path, limit=1)[0].id == "1"
