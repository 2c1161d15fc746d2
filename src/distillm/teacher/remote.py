"""The remote teacher as the pipeline and the trainer use it.

- `connect(config, tokenizer)`: the client of --teacher-url, checked at start-up (reachable, and the server's
  tokenizer is the student's -- the teacher's in a cross-tokenizer run: /tokenize of a probe text must give that
  tokenizer's ids), or None.
- `RemoteBackend`: the teacher's responses (a generation backend: one /v1/completions request per prompt with
  its token ids, `concurrency` in flight, seed + the prompt's index in the batch as the request's seed).
- `RemoteJointTeacher`: the teacher's side of speculative KD's joint decoding
  (generation.speculative.blockwise_speculative_decode): the rank of each drafted token (prompt_logprobs=0: the
  actual token's entry only) and the teacher's own sample where a draft is rejected (/v1/completions, 1 token).
- `RemoteScores`: the teacher's scores on a micro-batch, a `TopKTeacher` [B, R, k] (top-k log-probs and ids at
  every response position, from prompt_logprobs=k on prompt + response, and the exact log-prob of each actual
  token, which vLLM sends as well), for every teacher-scored method; the
  fused and plain losses spread the tail (losses.fused.TopKTeacher). `prefetch(batch)` sends a micro-batch's
  requests ahead (the trainer does so for every micro-batch of the optimizer step as soon as it is drawn, so
  the server scores the next micro-batches while the current one trains); at most `max_pending` micro-batches
  are in flight, the rest are scored when asked for. A sequence's scores are a function of its tokens only, so
  a retried request (server restarted mid-run) gives the same rows, none lost or duplicated.
"""
from __future__ import annotations

import hashlib
import logging
from concurrent.futures import Future
from typing import Sequence

import numpy as np
import torch

from ..errors import DistillmError
from ..generation.base import Completion, SamplingParams
from ..losses.fused import TopKTeacher
from ..training.collate import IGNORE
from .client import TeacherClient, TeacherServerError
from .protocol import (TeacherReplyError, completion_request, parse_completion, parse_prompt_logprobs,
                       parse_prompt_ranks, parse_tokenize, score_request)

logger = logging.getLogger("distillm")

#: what the vocabulary check tokenizes on the server and here: letters, digits, punctuation, whitespace runs,
#: accents, CJK and an emoji, so that two different tokenizers practically never agree on all of it
PROBE = ("Distillation check: The quick brown fox jumps over 13 lazy dogs; ¿qué tal? Grüße, 東京 🙂\n\t"
         "def f(x):\n    return x ** 2  # ok")


def connect(config, tokenizer, vocab_size: int, *, whose: str = "the student's") -> TeacherClient | None:
    """The checked client of --teacher-url (None without it). `tokenizer`: the one the server must share
    (`whose` names it in the error: the student's, or the teacher's in a cross-tokenizer run)."""
    t = config.training
    if not t.teacher_url:
        return None
    client = TeacherClient(t.teacher_url, api_key_env=t.teacher_api_key_env, timeout=t.teacher_timeout,
                           concurrency=t.teacher_concurrency, max_wait=t.teacher_max_wait,
                           insecure=t.teacher_insecure)
    client.check_reachable()
    check_vocabulary(client, tokenizer, vocab_size, whose=whose)
    logger.info("Teacher server(s) %s: reachable, same tokenizer; top-%d log-probs per position",
                ", ".join(client.urls), t.teacher_top_k)
    return client


def check_vocabulary(client: TeacherClient, tokenizer, vocab_size: int, *, whose: str = "the student's") -> None:
    """Refuse a server whose tokenizer differs from `tokenizer` (the student's; the teacher's in a cross-tokenizer
    run, `whose`): each URL's /tokenize of PROBE (and of the end-of-sequence token's text) must give its ids."""
    probes = [PROBE]
    if tokenizer.eos_token:
        probes.append(tokenizer.eos_token)
    for url in client.urls:
        for text in probes:
            ours = tokenizer.encode(text, add_special_tokens=False)
            single = TeacherClient([url], timeout=client.timeout, max_wait=0.0)
            single._headers, single._context = client._headers, client._context
            try:
                reply = single.request("/tokenize", {"prompt": text, "add_special_tokens": False})
            except TeacherServerError as err:
                raise TeacherServerError(f"teacher server {url}: the vocabulary check needs its /tokenize endpoint "
                                         f"(vLLM serves it): {err}") from None
            finally:
                single.close()
            theirs = parse_tokenize(reply, f"teacher server {url}/tokenize")
            if theirs != ours:
                first = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
                fix = ("distillation through top-k log-probs needs the same vocabulary. Serve a teacher of the "
                       "student's family, or use a student with the teacher's tokenizer." if "student" in whose else
                       "a cross-tokenizer run reads the server's scores in the --teacher model's vocabulary: serve "
                       "that model (or pass the served model's name or path as --teacher).")
                raise DistillmError(
                    f"teacher server {url} tokenizes differently from {whose} tokenizer ({len(theirs)} vs "
                    f"{len(ours)} ids for a probe text; first difference at position {first}): {fix}")
            if any(not 0 <= t < vocab_size for t in theirs):
                raise DistillmError(f"teacher server {url} returns token ids outside {whose} vocabulary "
                                    f"[0, {vocab_size})")


def _complete(client: TeacherClient, prompt: list[int], params: SamplingParams, max_tokens: int, seed: int,
              vocab_size: int, where: str) -> tuple[list[int], str]:
    """The server's continuation of `prompt` (up to `max_tokens`, the run's temperature and top-p, `seed`):
    (token ids, finish reason), checked by `protocol.parse_completion`."""
    body = completion_request(prompt, max_tokens=max_tokens, temperature=params.temperature, top_p=params.top_p,
                              seed=seed)
    return parse_completion(client.request("/v1/completions", body), vocab_size, where)


def _scored_start(ids: list[int], length: int, what: str, verb: str) -> int:
    """Where the last `length` tokens of `ids` start; the server's prompt_logprobs has no entry for a sequence's
    first token, so at least one token must come before them."""
    start = len(ids) - length
    if start < 1:
        raise DistillmError(f"{what} without prompt tokens cannot be {verb} by the teacher server (prompt_logprobs "
                            "has no entry for the first token)")
    return start


class RemoteBackend:
    """The teacher's responses from the server (generation.base.GenerationBackend)."""

    name = "teacher-server"

    def __init__(self, client: TeacherClient, vocab_size: int):
        self.client, self.vocab_size = client, vocab_size
        self.max_batch_size = max(8, 4 * client.concurrency)
        self.max_batch_tokens = None

    def generate_batch(self, prompts: Sequence[list[int]], params: SamplingParams, *, seed: int) -> list[Completion]:
        def one(item):
            index, prompt = item
            ids, reason = _complete(self.client, prompt, params, params.max_new_tokens, seed + index, self.vocab_size,
                                    f"teacher server /v1/completions (prompt {index})")
            return Completion(ids[:params.max_new_tokens], reason)

        return self.client.map(one, list(enumerate(prompts)))


class RemoteJointTeacher:
    """The served teacher in speculative KD's joint decoding (generation.speculative.JointTeacher)."""

    def __init__(self, client: TeacherClient, vocab_size: int):
        self.client, self.vocab_size = client, int(vocab_size)
        self.ranked = 0  # drafted tokens ranked by the teacher
        self.sampled = 0  # tokens sampled by the teacher (rejected drafts)

    def ranks(self, sequences: Sequence[tuple[list[int], int]]) -> list[list[int]]:
        def one(item):
            ids, length = item
            start = _scored_start(ids, length, "a draft", "ranked")
            reply = self.client.request("/v1/completions", score_request(ids, 0))
            return parse_prompt_ranks(reply, ids, start, self.vocab_size,
                                      "teacher server /v1/completions (prompt_logprobs=0, speculative-kd)")

        out = self.client.map(one, list(sequences))
        self.ranked += sum(len(r) for r in out)
        return out

    def sample(self, prefixes: Sequence[list[int]], params: SamplingParams, seeds: Sequence[int]) -> list[int]:
        def one(item):
            index, (prefix, seed) = item
            where = f"teacher server /v1/completions (speculative-kd, rejected draft {index})"
            ids, _ = _complete(self.client, prefix, params, 1, seed, self.vocab_size, where)
            if not ids:
                raise TeacherReplyError(f"{where}: the reply has no token (max_tokens 1 was asked)")
            return ids[0]

        out = self.client.map(one, list(enumerate(zip(prefixes, seeds))))
        self.sampled += len(out)
        return out


def _sequences(batch: dict[str, torch.Tensor]) -> list[tuple[list[int], int]]:
    """Per row of a left-padded batch: (its real token ids, its response length)."""
    out = []
    for ids, attention, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        real = ids[attention.bool()].tolist()
        out.append((real, int((labels != IGNORE).sum())))
    return out


def _key(batch: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha1()
    for name in ("input_ids", "attention_mask", "labels"):
        h.update(batch[name].detach().cpu().numpy().tobytes())
    return h.hexdigest()


class RemoteScores:
    """The teacher's top-k scores on micro-batches, from the server (see the module)."""

    def __init__(self, client: TeacherClient, k: int, vocab_size: int, *, max_pending: int = 8,
                 tail: str = "uniform"):
        if k > vocab_size:
            raise DistillmError(f"--teacher-top-k {k} exceeds the vocabulary ({vocab_size} tokens)")
        self.client, self.k, self.vocab_size, self.max_pending = client, int(k), int(vocab_size), int(max_pending)
        self.tail = tail  # how the top-k teacher spreads its tail (losses.fused.TopKTeacher)
        self._pending: dict[str, Future] = {}
        self.rows = 0  # sequences scored
        self.tokens = 0  # response positions scored
        self.prefetched = 0  # micro-batches whose scores were requested ahead

    def _score_row(self, item) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(top-k log-probs [n, k], their ids [n, k], the actual tokens' log-probs [n]) of a row's response."""
        ids, length = item
        if length == 0:
            return np.zeros((0, self.k), np.float32), np.zeros((0, self.k), np.int64), np.zeros(0, np.float32)
        start = _scored_start(ids, length, "a sequence", "scored")
        reply = self.client.request("/v1/completions", score_request(ids, self.k))
        return parse_prompt_logprobs(reply, ids, start, self.k, self.vocab_size,
                                     "teacher server /v1/completions (prompt_logprobs)")

    def _score_batch(self, rows: list[tuple[list[int], int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        futures = [self.client.submit(self._score_row, row) for row in rows]
        return [f.result() for f in futures]

    def prefetch(self, batch: dict[str, torch.Tensor]) -> None:
        """Send the batch's scoring requests now (when fewer than max_pending batches are in flight)."""
        key = _key(batch)
        if key in self._pending or len(self._pending) >= self.max_pending:
            return
        rows = _sequences(batch)
        self._pending[key] = self.client.submit(self._score_batch_async, rows)
        self.prefetched += 1

    def _score_batch_async(self, rows):
        # runs on a pool thread: its row requests go through the same pool only if a worker is free, so score
        # them here one after another (other batches' requests fill the remaining workers)
        return [self._score_row(row) for row in rows]

    def scores(self, trainer, inputs: dict[str, torch.Tensor]) -> TopKTeacher:
        """A TopKTeacher [B, R, k] of the micro-batch (R: its response columns), left-padded like the batch."""
        labels = inputs["labels"]
        width = max(int((labels != IGNORE).sum(-1).max().item()), 1)
        future = self._pending.pop(_key(inputs), None)
        rows = _sequences(inputs)
        results = future.result() if future is not None else self._score_batch(rows)
        values = torch.zeros(len(rows), width, self.k, dtype=torch.float32)
        ids = torch.zeros(len(rows), width, self.k, dtype=torch.long)
        target = torch.zeros(len(rows), width, dtype=torch.float32)
        for i, ((_, length), (v, t, own)) in enumerate(zip(rows, results)):
            if v.shape[0] != length:
                raise DistillmError(f"teacher server: {v.shape[0]} scored positions for a response of {length}")
            if length:
                values[i, width - length:] = torch.from_numpy(v)
                ids[i, width - length:] = torch.from_numpy(t)
                target[i, width - length:] = torch.from_numpy(own)
            self.rows += 1
            self.tokens += length
        device = labels.device
        return TopKTeacher(values.to(device), ids.to(device), self.tail, target.to(device))

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
