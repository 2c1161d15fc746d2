"""Pairwise LLM-as-judge win rate, the paper's main metric.

Each prompt is judged twice, the candidate's answer shown first (as A) and then second (as B), so a judge that
favours a position cancels out. A verdict is A, B or tie (`parse_verdict` reads it from free-form judge text;
a verdict it cannot read counts as a tie and is reported in `unparsed`). With the candidate's outcome per
comparison (win 1, tie 0.5, loss 0):

    win rate = (wins + 0.5 ties) / comparisons

The 95% confidence interval is a percentile bootstrap over prompts (each prompt's two comparisons are
resampled together, because they share a prompt and answers), 2,000 resamples with a fixed seed.

Judges: `OpenAIChatJudge` talks to any OpenAI-compatible `/v1/chat/completions` endpoint (OpenAI, a vLLM
server, a llama.cpp server) with the standard library only: an overall deadline per request, a bounded response
size, retries of 429 / 5xx / timeouts / dropped connections with exponential back-off (honouring Retry-After)
within a total time budget, and errors that name the URL; `HFJudge` runs a local Hugging Face chat model greedily.
`VerdictCache` keeps every judge reply on disk, keyed by the judge and the exact request, so a rerun sends
nothing that was answered before.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import math
import random
import re
import socket
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import DistillmError
from ..io import read_jsonl, write_jsonl
from ..models import load_model

logger = logging.getLogger("distillm")

JUDGE_SYSTEM = ("You are a fair and careful judge of AI assistants. You compare two answers to the same "
                "instruction and decide which one is more helpful, correct, relevant and clear.")
JUDGE_TEMPLATE = """Which answer follows the instruction better?

[Instruction]
{instruction}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Ignore the order in which the answers are shown and their length as such. Explain briefly, then give your verdict \
on the last line, exactly one of: [[A]] if answer A is better, [[B]] if answer B is better, [[C]] for a tie."""


class JudgeError(DistillmError):
    """The judge endpoint refused a request in a way retrying cannot fix (bad key, unknown model, ...)."""


def judge_messages(instruction: str, answer_a: str, answer_b: str) -> list[dict]:
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_TEMPLATE.format(instruction=instruction, answer_a=answer_a,
                                                              answer_b=answer_b)}]


# ----------------------------------------------------------------------------------------------- verdicts

_BRACKETED = re.compile(r"\[\[\s*(A|B|C|TIE)\s*\]\]", re.IGNORECASE)
_LABEL = r"(?:answer|output|response|assistant|model)?\s*[\(\[]?([AB])[\)\]]?"
_KEYED = re.compile(r"(?:verdict|winner|better|best|choice|final answer|decision|preferred|prefer)"
                    r"(?:\s+(?:answer|one|response|output))?(?:\s*(?:is|:|=|-))*\s*"
                    r"[\"'*\s]*" + _LABEL + r"(?![A-Za-z])", re.IGNORECASE)
_STATED = re.compile(r"(?:answer|output|response|assistant)\s*[\(\[]?([AB])[\)\]]?\s+(?:is|was)\s+(?:clearly\s+|much\s+|"
                     r"slightly\s+)?(?:better|superior|preferred|more helpful|the better|the winner)", re.IGNORECASE)
_JSON_WINNER = re.compile(r"[\"'](?:winner|verdict|choice|better)[\"']\s*:\s*[\"']\s*(A|B|tie|C)\s*[\"']", re.IGNORECASE)
_TIE = re.compile(r"\b(?:tie|draw|equally (?:good|bad|helpful)|both (?:answers |are )?(?:are )?equally|"
                  r"neither is better|no clear winner)\b|\[\[\s*C\s*\]\]", re.IGNORECASE)
_ALONE = re.compile(r"^\W*(?:answer|output|response|assistant)?\s*[\(\[]?([AB])[\)\]]?\W*$", re.IGNORECASE)


def parse_verdict(text: str | None) -> str | None:
    """"A", "B" or "tie" from a judge reply, or None when it states no verdict.

    In order: the last [[A]] / [[B]] / [[C]] (C or TIE = tie); a JSON "winner"/"verdict" field; the last
    "verdict/winner/better...: A" phrase; the last "Answer A is better" statement; a reply that is only a label
    ("B", "(a)", "Output (b)."); tie wording ("tie", "equally good", ...).
    """
    if not text:
        return None
    text = text.strip()
    found = _BRACKETED.findall(text)
    if found:
        return {"A": "A", "B": "B"}.get(found[-1].upper(), "tie")
    match = _JSON_WINNER.search(text)
    if match:
        return {"A": "A", "B": "B"}.get(match.group(1).upper(), "tie")
    for pattern in (_KEYED, _STATED):
        found = pattern.findall(text)
        if found:
            return found[-1].upper()
    last_line = text.splitlines()[-1]
    for candidate in (text, last_line):
        match = _ALONE.match(candidate)
        if match:
            return match.group(1).upper()
    if _TIE.search(text):
        return "tie"
    return None


# ----------------------------------------------------------------------------------------------- judges


class Judge(Protocol):
    #: Identifies the judge in the cache key (endpoint model and settings).
    identity: str

    def complete(self, messages: list[dict]) -> str: ...


class OpenAIChatJudge:
    """POST /v1/chat/completions with the standard library; thread-safe (one connection per request).

    Every request has an overall deadline of `timeout_s` seconds (connect, headers and body together: a server
    that hangs or sends one byte every few seconds is cut off at the deadline), and its response body is read up
    to `max_response_bytes` (a larger or endless body is an error). 429, 408, 5xx, timeouts and dropped
    connections are retried with exponential back-off (honouring Retry-After), at most `max_retries` times and
    only while the whole call stays within `retry_budget_s` seconds. A refused request (other 4xx), a reply that
    is not HTTP, not JSON or too large is not retried. Every error names the URL. Proxies (http_proxy ...) are
    not used.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, temperature: float = 0.0,
                 max_tokens: int = 512, timeout_s: float = 120.0, max_retries: int = 6, backoff_s: float = 1.0,
                 max_backoff_s: float = 60.0, retry_budget_s: float = 300.0,
                 max_response_bytes: int = 8 * 1024 * 1024):
        base = base_url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else (
            base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions"))
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise JudgeError(f"--judge-url {base_url!r}: give an http:// or https:// URL, e.g. "
                             "http://localhost:8000/v1.")
        for name, option, value in (("timeout_s", "--judge-timeout", timeout_s),
                                    ("retry_budget_s", "--judge-retry-budget", retry_budget_s)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise JudgeError(f"{option} ({name}) {value!r}: must be a positive number of seconds.")
        if retry_budget_s < timeout_s:
            raise JudgeError(f"--judge-retry-budget {retry_budget_s:g} is shorter than --judge-timeout {timeout_s:g}: "
                             "the budget for all attempts of one request must hold at least one attempt.")
        if max_retries < 0 or max_response_bytes < 1024:
            raise JudgeError(f"max_retries {max_retries} must be >= 0 and max_response_bytes {max_response_bytes} "
                             ">= 1024.")
        self.model, self.api_key = model, api_key
        self.temperature, self.max_tokens, self.timeout_s = temperature, max_tokens, float(timeout_s)
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self.retry_budget_s, self.max_response_bytes = float(retry_budget_s), max_response_bytes
        self.identity = f"openai:{self.url}:{model}:t={temperature}:max={max_tokens}"

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(max(float(retry_after), 0.0), self.max_backoff_s)
            except ValueError:
                pass
        return min(self.backoff_s * 2 ** attempt, self.max_backoff_s) * (0.5 + random.random() / 2)

    def _post(self, body: bytes, headers: dict, deadline: float) -> tuple[int, dict, bytes]:
        """One POST, all of it (connect, headers, body) before `deadline` (time.monotonic()): a watchdog shuts
        the socket down at the deadline, which ends any read in progress."""
        parts = urllib.parse.urlsplit(self.url)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Timeout()
        connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = connection_class(parts.hostname, parts.port, timeout=remaining)
        expired = threading.Event()

        def expire():
            expired.set()
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        watchdog = threading.Timer(remaining, expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            length = response.getheader("Content-Length")
            if length and length.strip().isdigit() and int(length) > self.max_response_bytes:
                raise _TooLarge(int(length))
            chunks, total = [], 0
            while True:
                chunk = response.read(min(65536, self.max_response_bytes + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > self.max_response_bytes:
                    raise _TooLarge(total)
            return response.status, {k.lower(): v for k, v in response.getheaders()}, b"".join(chunks)
        except (OSError, http.client.HTTPException) as err:
            # The socket's own timeout is the time left at the start, so it can only fire at the deadline: it
            # races the watchdog there (under load it wins), and is the same overall timeout.
            if expired.is_set() or isinstance(err, TimeoutError) or time.monotonic() >= deadline:
                raise _Timeout() from err
            raise
        finally:
            watchdog.cancel()
            conn.close()

    def complete(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        start = time.monotonic()
        budget_end = start + self.retry_budget_s
        last_error, attempts = "", 0
        for attempt in range(self.max_retries + 1):
            attempts += 1
            retry_after = None
            attempt_start = time.monotonic()
            if attempt and budget_end - attempt_start < 0.05 * self.timeout_s:
                attempts -= 1  # a retry woken at the budget's end would only time out: keep the last real error
                break
            deadline = min(attempt_start + self.timeout_s, budget_end)
            try:
                status, response_headers, data = self._post(body, headers, deadline)
            except _Timeout:
                last_error = f"no complete answer within {deadline - attempt_start:.3g} s (--judge-timeout)"
            except _TooLarge as err:
                raise JudgeError(f"{self.url} sent a response of more than {self.max_response_bytes} bytes "
                                 f"({err.args[0]} so far): not a chat completion; check --judge-url.") from None
            except http.client.RemoteDisconnected as err:
                last_error = f"the server closed the connection without answering ({err})"
            except http.client.HTTPException as err:  # BadStatusLine, LineTooLong, ...: not an HTTP server
                raise JudgeError(f"{self.url} did not answer with HTTP ({type(err).__name__}: {str(err)[:200]}): "
                                 "check the scheme, host and port of --judge-url.") from None
            except OSError as err:  # refused, reset, unreachable, DNS ...
                last_error = f"{type(err).__name__}: {err}"
            else:
                if 200 <= status < 300:
                    return self._content(data)
                detail = data.decode("utf-8", errors="replace")[:300]
                if status not in (408, 429) and status < 500:
                    raise JudgeError(f"{self.url} refused the request: HTTP {status} {detail}. Check --judge-model, "
                                     "--judge-url and the API key environment variable.")
                last_error, retry_after = f"HTTP {status} {detail}", response_headers.get("retry-after")
            if attempt == self.max_retries:
                break
            delay = self._delay(attempt, retry_after)
            if time.monotonic() + delay >= budget_end:
                break
            log = logger.info if last_error.startswith("HTTP 429") else logger.warning
            log("judge %s: %s; retrying in %.1f s", self.url, last_error, delay)
            time.sleep(delay)
        raise JudgeError(f"{self.url}: no answer after {attempts} attempt{'s' * (attempts > 1)} in "
                         f"{time.monotonic() - start:.1f} s (last error: {last_error}). Check that the server is up "
                         "and serves --judge-model, or raise --judge-timeout / --judge-retry-budget.")

    def _content(self, data: bytes) -> str:
        try:
            payload = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise JudgeError(f"{self.url} answered with a body that is not JSON: {data[:200]!r}. Is --judge-url an "
                             "OpenAI-compatible endpoint?") from None
        try:
            return payload["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"{self.url} answered without choices[0].message.content: {str(payload)[:300]}") from None


class _Timeout(Exception):
    """A request ran past its deadline."""


class _TooLarge(Exception):
    """A response body beyond max_response_bytes."""


class HFJudge:
    """A local Hugging Face chat model as judge (greedy decoding). One request at a time (a lock guards it)."""

    def __init__(self, model_name: str, *, max_new_tokens: int = 256, dtype: str = "auto"):
        self.model, self.tokenizer = load_model(model_name, dtype=dtype)
        self.max_new_tokens = max_new_tokens
        self.identity = f"hf:{model_name}:max={max_new_tokens}"
        self._lock = threading.Lock()

    def complete(self, messages: list[dict]) -> str:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True, return_tensors="pt")
        with self._lock, torch.inference_mode():
            output = self.model.generate(**ids.to(self.model.device), max_new_tokens=self.max_new_tokens,
                                         do_sample=False, temperature=None, top_p=None, top_k=None,
                                         pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(output[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------- cache


class VerdictCache:
    """Judge replies on disk (JSONL, one line per request), keyed by sha256 of the judge identity and messages."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        rows = read_jsonl(self.path, tolerate_torn_tail=True) if self.path.is_file() else []
        if rows:
            write_jsonl(self.path, rows)  # drop a torn last line (an interrupted write) before appending after it
        self._entries = {row["key"]: row["reply"] for row in rows}

    @staticmethod
    def key(identity: str, messages: list[dict]) -> str:
        return hashlib.sha256(json.dumps([identity, messages], sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: str, reply: str) -> None:
        with self._lock:
            self._entries[key] = reply
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n")
                handle.flush()

    def __len__(self) -> int:
        return len(self._entries)


# ----------------------------------------------------------------------------------------------- win rate


@dataclass(frozen=True)
class PairItem:
    id: str
    instruction: str
    candidate: str
    reference: str


def judge_pairs(judge: Judge, items: Sequence[PairItem], *, cache: VerdictCache | None = None, concurrency: int = 4,
                desc: str = "judging") -> list[dict]:
    """Judge every item in both orders. Returns per item: verdicts as the judge gave them for (candidate first,
    candidate second), the candidate's outcome in each (1 win, 0.5 tie, 0 loss) and whether a reply was unparsed."""
    requests = []
    for item in items:
        requests.append(judge_messages(item.instruction, item.candidate, item.reference))  # candidate is A
        requests.append(judge_messages(item.instruction, item.reference, item.candidate))  # candidate is B

    failed = threading.Event()  # set by the first request that fails: no request starts after it

    def ask(messages: list[dict]) -> str:
        key = VerdictCache.key(judge.identity, messages)
        cached = cache.get(key) if cache is not None else None
        if cached is not None:
            return cached
        if failed.is_set():
            raise JudgeError("not sent: an earlier judge request failed")
        try:
            reply = judge.complete(messages)
        except BaseException:
            failed.set()
            raise
        if cache is not None:
            cache.put(key, reply)
        return reply

    unique: dict[str, list[dict]] = {}  # identical requests (e.g. identical answers) are asked once
    for messages in requests:
        unique.setdefault(VerdictCache.key(judge.identity, messages), messages)
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool, \
            tqdm(total=len(unique), desc=desc, unit="verdict", leave=False) as bar:
        futures = {key: pool.submit(ask, messages) for key, messages in unique.items()}
        answers = {}
        try:
            for key, future in futures.items():
                answers[key] = future.result()
                bar.update(1)
        except BaseException:
            for future in futures.values():  # the first error ends the run: queued requests never start
                future.cancel()
            raise
    replies = [answers[VerdictCache.key(judge.identity, messages)] for messages in requests]
    results = []
    for index, item in enumerate(items):
        first, second = parse_verdict(replies[2 * index]), parse_verdict(replies[2 * index + 1])
        outcome_first = {"A": 1.0, "B": 0.0}.get(first, 0.5)
        outcome_second = {"B": 1.0, "A": 0.0}.get(second, 0.5)
        results.append({"id": item.id, "verdicts": [first, second], "outcomes": [outcome_first, outcome_second],
                        "unparsed": int(first is None) + int(second is None)})
    return results


def win_rate(results: Sequence[dict], *, n_bootstrap: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict:
    """(wins + 0.5 ties) / comparisons over all comparisons of `results` (from `judge_pairs`), with a percentile
    bootstrap confidence interval over prompts."""
    outcomes = [o for r in results for o in r["outcomes"]]
    if not outcomes:
        raise DistillmError("win rate of zero comparisons: no prompts were judged.")
    per_prompt = [sum(r["outcomes"]) / len(r["outcomes"]) for r in results]
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(per_prompt, k=len(per_prompt))) / len(per_prompt) for _ in range(n_bootstrap))
    tail = (1 - confidence) / 2
    low, high = means[int(tail * (n_bootstrap - 1))], means[int(round((1 - tail) * (n_bootstrap - 1)))]
    return {
        "win_rate": sum(outcomes) / len(outcomes),
        "wins": sum(o == 1.0 for o in outcomes), "ties": sum(o == 0.5 for o in outcomes),
        "losses": sum(o == 0.0 for o in outcomes), "comparisons": len(outcomes), "prompts": len(results),
        "unparsed": sum(r["unparsed"] for r in results),
        "ci_low": low, "ci_high": high, "ci": f"{confidence:.0%} percentile bootstrap over prompts ({n_bootstrap} resamples)",
    }
