"""Parsing and validation of a vLLM teacher server's replies (distillm.teacher.protocol), without a server."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distillm.teacher.client import TeacherServerError, split_urls
from distillm.teacher.protocol import (TeacherReplyError, parse_completion, parse_prompt_logprobs,
                                       parse_prompt_ranks, parse_tokenize, score_request)

VOCAB = 10


def entry(pairs, actual=None):
    """vLLM's per-position dict from (token, logprob) pairs in rank order, plus the actual token if outside."""
    out = {str(t): {"logprob": lp, "rank": r, "decoded_token": f"t{t}"} for r, (t, lp) in enumerate(pairs, 1)}
    if actual is not None:
        out[str(actual[0])] = {"logprob": actual[1], "rank": actual[2], "decoded_token": "x"}
    return out


def reply(entries):
    return {"choices": [{"index": 0, "text": "", "prompt_logprobs": entries}]}


IDS = [5, 1, 2, 7]  # prompt [5, 1], response [2, 7]: positions 2 and 3


def good_entries():
    return [None, entry([(1, math.log(0.6)), (3, math.log(0.3))]),
            entry([(2, math.log(0.5)), (4, math.log(0.25))]),
            entry([(0, math.log(0.7)), (9, math.log(0.2))], actual=(7, math.log(0.01), 5))]


def test_prompt_logprobs_give_the_top_k_of_the_response_positions():
    values, ids, own = parse_prompt_logprobs(reply(good_entries()), IDS, 2, 2, VOCAB, "srv")
    assert ids.tolist() == [[2, 4], [0, 9]]
    np.testing.assert_array_equal(values, np.log(np.array([[0.5, 0.25], [0.7, 0.2]])).astype(np.float32))
    np.testing.assert_array_equal(own, np.float32([math.log(0.5), math.log(0.01)]))


def test_float32_log_probs_survive_the_json_round_trip_exactly():
    import json

    x = np.float32(-1.2345678)
    entries = good_entries()
    entries[2] = entry([(2, float(x)), (4, math.log(0.25))])
    values, _, _ = parse_prompt_logprobs(json.loads(json.dumps(reply(entries))), IDS, 2, 2, VOCAB, "srv")
    assert values[0, 0] == x


@pytest.mark.parametrize("break_it, message", [
    (lambda e: e[:-1], "3 positions for the 4 tokens"),
    (lambda e: e[:2] + ["oops", e[3]], "is str, not an object"),
    (lambda e: e[:2] + [entry([(2, -0.1), (4, -2.0)])] + e[3:], "more than 1"),
    (lambda e: e[:2] + [entry([(2, -0.7)])] + e[3:], "1 entries of rank <= 2"),
    (lambda e: e[:2] + [entry([(2, -0.7), (11, -3.0)])] + e[3:], "outside the vocabulary"),
    (lambda e: e[:2] + [entry([(2, float("nan")), (4, -3.0)])] + e[3:], "log-prob nan"),
    (lambda e: e[:2] + [{"2": {"logprob": -1.0}, "4": {"logprob": -2.0, "rank": 2}}] + e[3:], "is not"),
    (lambda e: e[:3] + [entry([(0, -0.5), (9, -2.0)])], "lacks the actual token 7"),
])
def test_malformed_or_short_replies_are_refused(break_it, message):
    with pytest.raises(TeacherReplyError, match=message):
        parse_prompt_logprobs(reply(break_it(good_entries())), IDS, 2, 2, VOCAB, "srv")


def test_prompt_ranks_are_the_actual_tokens_ranks():
    # token 2 is ranked 1st at position 2; token 7 is outside the top 2 at position 3, with its own rank 5
    assert parse_prompt_ranks(reply(good_entries()), IDS, 2, VOCAB, "srv") == [1, 5]
    assert parse_prompt_ranks(reply(good_entries()), IDS, 3, VOCAB, "srv") == [5]
    # prompt_logprobs=0: only the actual tokens' entries
    only_actual = [None] + [{str(t): {"logprob": -1.0, "rank": r}} for t, r in zip(IDS[1:], (4, 2, 9))]
    assert parse_prompt_ranks(reply(only_actual), IDS, 1, VOCAB, "srv") == [4, 2, 9]


@pytest.mark.parametrize("break_it, message", [
    (lambda e: e[:-1], "3 positions for the 4 tokens"),
    (lambda e: e[:3] + [entry([(0, -0.5), (9, -2.0)])], "lacks the actual token 7"),
    (lambda e: e[:3] + [{"7": {"logprob": -1.0}}], "has no integer 'rank'"),
    (lambda e: e[:3] + [{"7": {"logprob": -1.0, "rank": 0}}], "rank 0, outside"),
    (lambda e: e[:3] + [{"7": {"logprob": -1.0, "rank": VOCAB + 1}}], "outside"),
    (lambda e: e[:3] + ["x"], "lacks the actual token 7"),
])
def test_malformed_rank_replies_are_refused(break_it, message):
    with pytest.raises(TeacherReplyError, match=message):
        parse_prompt_ranks(reply(break_it(good_entries())), IDS, 2, VOCAB, "srv")


def test_reply_without_choices_or_prompt_logprobs_is_refused():
    with pytest.raises(TeacherReplyError, match="no 'choices'"):
        parse_prompt_logprobs({"error": "x"}, IDS, 2, 2, VOCAB, "srv")
    with pytest.raises(TeacherReplyError, match="prompt_logprobs is missing"):
        parse_prompt_logprobs({"choices": [{"text": ""}]}, IDS, 2, 2, VOCAB, "srv")


def test_completion_token_ids_are_checked():
    assert parse_completion({"choices": [{"token_ids": [1, 2], "finish_reason": "length"}]}, VOCAB, "s") == (
        [1, 2], "length")
    with pytest.raises(TeacherReplyError, match="return_token_ids"):
        parse_completion({"choices": [{"text": "hi"}]}, VOCAB, "s")
    with pytest.raises(TeacherReplyError, match="outside the vocabulary"):
        parse_completion({"choices": [{"token_ids": [1, 12]}]}, VOCAB, "s")
    with pytest.raises(TeacherReplyError, match="tokens"):
        parse_tokenize({"count": 3}, "s")


def test_urls_are_split_and_checked():
    assert split_urls("http://a:1/, https://b:2/v1") == ["http://a:1", "https://b:2"]
    with pytest.raises(TeacherServerError, match="must start with http"):
        split_urls("a:1")
    assert score_request([1, 2], 5)["prompt_logprobs"] == 5
