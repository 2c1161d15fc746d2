"""The judge: verdict parsing on messy replies, win rate and its interval, and the OpenAI-compatible client
against a real HTTP server on loopback (retries, back-off, API key, concurrency, on-disk cache)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from distillm.evaluation.judge import (
    JudgeError, OpenAIChatJudge, PairItem, VerdictCache, judge_pairs, parse_verdict, win_rate,
)


@pytest.mark.parametrize("reply, verdict", [
    ("Answer A is more detailed.\n\n[[A]]", "A"),
    ("I first thought [[A]] but on reflection [[B]]", "B"),
    ("Both are fine. [[C]]", "tie"),
    ("[[ tie ]]", "tie"),
    ('{"reasoning": "B is right", "winner": "B"}', "B"),
    ("Verdict: Output (a)", "A"),
    ("**Final verdict:** **B**", "B"),
    ("The better answer is: Response B.", "B"),
    ("After comparing, Assistant A is clearly better than assistant B.", "A"),
    ("b", "B"),
    ("  (A).  ", "A"),
    ("Both answers are equally good.", "tie"),
    ("It's a tie.", "tie"),
    ("I cannot decide about A or B", None),
    ("", None),
    (None, None),
])
def test_parse_verdict_on_messy_replies(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_win_rate_counts_ties_as_half_with_a_bootstrap_interval():
    results = [{"id": str(i), "outcomes": o, "unparsed": 0}
               for i, o in enumerate([[1.0, 1.0], [1.0, 0.5], [0.0, 0.0], [0.5, 0.5]])]
    wr = win_rate(results)
    assert (wr["wins"], wr["ties"], wr["losses"], wr["comparisons"]) == (3, 3, 2, 8)
    assert wr["win_rate"] == pytest.approx((3 + 0.5 * 3) / 8)
    assert 0.0 <= wr["ci_low"] <= wr["win_rate"] <= wr["ci_high"] <= 1.0
    assert wr["ci_high"] - wr["ci_low"] > 0.2  # four prompts: a wide interval
    unanimous = win_rate([{"id": str(i), "outcomes": [1.0, 1.0], "unparsed": 0} for i in range(20)])
    assert unanimous["win_rate"] == unanimous["ci_low"] == unanimous["ci_high"] == 1.0


class _Server:
    """An OpenAI-compatible /v1/chat/completions server on 127.0.0.1. The verdict prefers the answer holding
    "GOOD" (a tie when neither or both do); the first `fail` requests get the given HTTP error codes."""

    def __init__(self, fail: list[int] | None = None, key: str = "sekrit"):
        self.fail, self.key, self.calls, self.lock = list(fail or []), key, 0, threading.Lock()
        self.concurrent, self.max_concurrent = 0, 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.calls += 1
                    code = outer.fail.pop(0) if outer.fail else 200
                    outer.concurrent += 1
                    outer.max_concurrent = max(outer.max_concurrent, outer.concurrent)
                try:
                    if self.path != "/v1/chat/completions":
                        return self._send(404, {"error": "not found"})
                    if self.headers.get("Authorization") != f"Bearer {outer.key}":
                        return self._send(401, {"error": "bad key"})
                    if code != 200:
                        return self._send(code, {"error": "try later"}, {"Retry-After": "0"} if code == 429 else {})
                    prompt = body["messages"][-1]["content"]
                    a = prompt.split("[Answer A]")[1].split("[Answer B]")[0]
                    b = prompt.split("[Answer B]")[1]
                    verdict = "[[A]]" if "GOOD" in a and "GOOD" not in b else (
                        "[[B]]" if "GOOD" in b and "GOOD" not in a else "Hard to say, [[C]]")
                    self._send(200, {"choices": [{"message": {"role": "assistant",
                                                              "content": f"Reasoning...\n{verdict}"}}]})
                finally:
                    with outer.lock:
                        outer.concurrent -= 1

            def _send(self, code, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


ITEMS = [PairItem("p1", "Say hi", "GOOD hi", "hello"), PairItem("p2", "Add 1+1", "GOOD 2", "3"),
         PairItem("p3", "Name a colour", "GOOD red", "blue"), PairItem("p4", "Why?", "because", "no idea")]


def test_endpoint_judge_win_rate_retries_and_cache(tmp_path):
    with _Server(fail=[429, 500, 503]) as server:
        judge = OpenAIChatJudge(server.url, "judge-model", api_key="sekrit", backoff_s=0.01)
        cache = VerdictCache(tmp_path / "verdicts.jsonl")
        results = judge_pairs(judge, ITEMS, cache=cache, concurrency=3)
        # 8 comparisons answered, after 3 refused requests that were retried
        assert server.calls == 8 + 3
        assert server.max_concurrent <= 3
        assert [r["verdicts"] for r in results] == [["A", "B"]] * 3 + [["tie", "tie"]]
        wr = win_rate(results)
        assert wr["win_rate"] == pytest.approx((6 + 0.5 * 2) / 8) and wr["unparsed"] == 0
        # a rerun with the cache read back from disk costs no request at all
        again = judge_pairs(judge, ITEMS, cache=VerdictCache(tmp_path / "verdicts.jsonl"), concurrency=3)
        assert server.calls == 11 and again == results
        # a different judge model is a different cache key
        other = OpenAIChatJudge(server.url, "other-model", api_key="sekrit", backoff_s=0.01)
        judge_pairs(other, ITEMS[:1], cache=VerdictCache(tmp_path / "verdicts.jsonl"))
        assert server.calls == 13


def test_endpoint_judge_gives_up_and_refuses_bad_keys(tmp_path):
    with _Server(fail=[500] * 10) as server:
        judge = OpenAIChatJudge(server.url, "m", api_key="sekrit", max_retries=2, backoff_s=0.01)
        with pytest.raises(JudgeError, match="no answer after 3 attempts"):
            judge.complete([{"role": "user", "content": "x"}])
        assert server.calls == 3
    with _Server() as server:
        judge = OpenAIChatJudge(server.url, "m", api_key="wrong", backoff_s=0.01)
        with pytest.raises(JudgeError, match="HTTP 401"):
            judge.complete([{"role": "user", "content": "x"}])
        assert server.calls == 1  # a refused key is not retried


def test_local_hf_judge_replies_with_the_models_greedy_continuation():
    """The local judge renders the chat with the model's template and decodes greedily: its reply is exactly what
    the model generates for that prompt, and asking twice gives the same reply."""
    from distillm.evaluation.judge import HFJudge, judge_messages
    from distillm.generation.base import SamplingParams
    from distillm.generation.hf import HFBackend

    judge = HFJudge("tiny-random", max_new_tokens=12)
    messages = judge_messages("What is 2 + 2?", "4", "5")
    reply = judge.complete(messages)
    prompt = judge.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]
    expected = HFBackend(judge.model, judge.tokenizer).generate_batch(
        [list(prompt)], SamplingParams(temperature=0, max_new_tokens=12), seed=0)[0]
    assert reply == judge.tokenizer.decode(expected.token_ids, skip_special_tokens=True)
    assert reply and judge.complete(messages) == reply
