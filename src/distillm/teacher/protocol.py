"""The wire format of a vLLM (OpenAI-compatible) teacher server, and the validation of its replies.

Requests (JSON bodies of POST /v1/completions):

- responses: {"prompt": [token ids], "max_tokens", "temperature", "top_p", "seed", "return_token_ids": true,
  "skip_special_tokens": false}; the reply's choices[0].token_ids are the response (vLLM >= 0.10.2);
- scores: {"prompt": [prompt + response token ids], "max_tokens": 1, "temperature": 0, "prompt_logprobs": K};
  the reply's choices[0].prompt_logprobs is vLLM's format: one entry per prompt token, None for the first, else a
  dict {"<token id>": {"logprob": float, "rank": int, "decoded_token": str}} holding the K most likely tokens
  (rank 1..K) and the actual token (its own rank, possibly > K: then K + 1 entries).

Every reply is checked before anything trains on it: its shape, one entry per position sent (a short reply is
refused), the K entries of ranks 1..K, finite log-probs <= 0 (or -inf), ids inside the vocabulary, and a top-K
mass of at most 1. A bad reply raises `TeacherReplyError`, naming the server and what is wrong.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import DistillmError

#: log-probs a little above 0 or top-K masses a little above 1 come from the server's float32 rounding: the
#: largest relative rounding of a float32 log-softmax over a sum of <= 2**20 terms is far below this
MASS_SLACK = 1e-3


class TeacherReplyError(DistillmError):
    """The teacher server's reply is malformed or does not match the request."""


def completion_request(prompt: list[int], *, max_tokens: int, temperature: float, top_p: float, seed: int,
                       model: str | None = None) -> dict:
    body = {"prompt": list(map(int, prompt)), "max_tokens": int(max_tokens), "temperature": float(temperature),
            "top_p": float(top_p), "seed": int(seed), "return_token_ids": True, "skip_special_tokens": False}
    if model:
        body["model"] = model
    return body


def score_request(ids: list[int], k: int, model: str | None = None) -> dict:
    body = {"prompt": list(map(int, ids)), "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": int(k)}
    if model:
        body["model"] = model
    return body


def _choice(reply, where: str) -> dict:
    if not isinstance(reply, dict) or not isinstance(reply.get("choices"), list) or not reply["choices"]:
        raise TeacherReplyError(f"{where}: the reply has no 'choices' list (got {str(reply)[:200]!r})")
    choice = reply["choices"][0]
    if not isinstance(choice, dict):
        raise TeacherReplyError(f"{where}: choices[0] is not an object")
    return choice


def parse_completion(reply, vocab: int, where: str) -> tuple[list[int], str]:
    """(response token ids, finish reason 'stop' or 'length') of a /v1/completions reply."""
    choice = _choice(reply, where)
    ids = choice.get("token_ids")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise TeacherReplyError(f"{where}: choices[0].token_ids is missing or not a list of ints: the server must "
                                "support return_token_ids (vLLM >= 0.10.2)")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise TeacherReplyError(f"{where}: response token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    reason = choice.get("finish_reason")
    return ids, "length" if reason == "length" else "stop"


def _prompt_entries(reply, ids: list[int], where: str) -> list:
    """choices[0].prompt_logprobs of a reply, one entry per token sent (refused otherwise)."""
    entries = _choice(reply, where).get("prompt_logprobs")
    if not isinstance(entries, list):
        raise TeacherReplyError(f"{where}: choices[0].prompt_logprobs is missing (does the server support "
                                "prompt_logprobs? vLLM does)")
    if len(entries) != len(ids):
        raise TeacherReplyError(f"{where}: prompt_logprobs has {len(entries)} positions for the {len(ids)} tokens "
                                "sent: a short or mismatched reply is not used")
    return entries


def parse_prompt_logprobs(reply, ids: list[int], start: int, k: int, vocab: int, where: str
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The teacher's top-k at the positions start .. len(ids) - 1 (those predicting ids[start:]):
    (log-probs [n, k] float32, descending; token ids [n, k] int64; log-prob of the actual token [n] float32)."""
    entries = _prompt_entries(reply, ids, where)
    n = len(ids) - start
    values = np.empty((n, k), dtype=np.float32)
    top_ids = np.empty((n, k), dtype=np.int64)
    own = np.empty(n, dtype=np.float32)
    for row, pos in enumerate(range(start, len(ids))):
        entry = entries[pos]
        if not isinstance(entry, dict):
            raise TeacherReplyError(f"{where}: prompt_logprobs[{pos}] is {type(entry).__name__}, not an object")
        ranked = []
        for key, item in entry.items():
            try:
                token = int(key)
                logprob = float(item["logprob"])
                rank = int(item["rank"])
            except (TypeError, ValueError, KeyError):
                raise TeacherReplyError(f"{where}: prompt_logprobs[{pos}] entry {key!r}: {str(item)[:100]!r} is not "
                                        "{'logprob': float, 'rank': int, ...}") from None
            if not 0 <= token < vocab:
                raise TeacherReplyError(f"{where}: prompt_logprobs[{pos}] has token id {token}, outside the "
                                        f"vocabulary [0, {vocab})")
            if math.isnan(logprob) or logprob > MASS_SLACK or logprob == math.inf:
                raise TeacherReplyError(f"{where}: prompt_logprobs[{pos}] token {token} has log-prob {logprob}")
            ranked.append((rank, -logprob, token, min(logprob, 0.0)))
            if token == ids[pos]:
                own[row] = min(logprob, 0.0)
        if ids[pos] not in {r[2] for r in ranked}:
            raise TeacherReplyError(f"{where}: prompt_logprobs[{pos}] lacks the actual token {ids[pos]} (vLLM "
                                    "always includes it): the reply does not match the tokens sent")
        ranked.sort()
        top = [r for r in ranked if r[0] <= k][:k]
        if len(top) < k:
            raise TeacherReplyError(f"{where}: prompt_logprobs[{pos}] has {len(top)} entries of rank <= {k}, not "
                                    f"{k}: is the server's --max-logprobs below --teacher-top-k?")
        top.sort(key=lambda r: (r[1], r[2]))
        values[row] = [r[3] for r in top]
        top_ids[row] = [r[2] for r in top]
        if len(set(top_ids[row].tolist())) != k:
            raise TeacherReplyError(f"{where}: prompt_logprobs[{pos}] repeats a token id among its top {k}")
        if float(np.exp(values[row].astype(np.float64)).sum()) > 1 + MASS_SLACK:
            raise TeacherReplyError(f"{where}: prompt_logprobs[{pos}]: the top-{k} probabilities add up to more "
                                    "than 1")
    return values, top_ids, own


def parse_prompt_ranks(reply, ids: list[int], start: int, vocab: int, where: str) -> list[int]:
    """The teacher's rank (1 = most likely) of each actual token ids[start:] given the tokens before it, from a
    prompt_logprobs reply (vLLM sends the actual token's entry, with its rank, at any prompt_logprobs >= 0)."""
    entries = _prompt_entries(reply, ids, where)
    ranks = []
    for pos in range(start, len(ids)):
        entry = entries[pos]
        item = entry.get(str(ids[pos])) if isinstance(entry, dict) else None
        if not isinstance(item, dict):
            raise TeacherReplyError(f"{where}: prompt_logprobs[{pos}] lacks the actual token {ids[pos]} (vLLM "
                                    "always includes it): the reply does not match the tokens sent")
        try:
            rank = int(item["rank"])
        except (TypeError, ValueError, KeyError):
            raise TeacherReplyError(f"{where}: prompt_logprobs[{pos}] entry {ids[pos]}: {str(item)[:100]!r} has no "
                                    "integer 'rank'") from None
        if not 1 <= rank <= vocab:
            raise TeacherReplyError(f"{where}: prompt_logprobs[{pos}] gives token {ids[pos]} rank {rank}, outside "
                                    f"[1, {vocab}]")
        ranks.append(rank)
    return ranks


def parse_tokenize(reply, where: str) -> list[int]:
    tokens = reply.get("tokens") if isinstance(reply, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise TeacherReplyError(f"{where}: the /tokenize reply has no 'tokens' list of ints")
    return tokens
