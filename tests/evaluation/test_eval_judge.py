"""The judge: verdict parsing on messy replies, win rate and its interval, and the OpenAI-compatible client
against a real HTTP server on loopback (retries, back-off, API key, concurrency, on-disk cache) and against
misbehaving raw-socket servers (hanging, dripping, endless, not HTTP, not there)."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
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
    assert wr["win_rate"] == (3 + 0.5 * 3) / 8  # halves and eighths: exact in float64
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
        assert wr["win_rate"] == (6 + 0.5 * 2) / 8 and wr["unparsed"] == 0  # halves and eighths: exact
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


class _RawServer:
    """A misbehaving server on 127.0.0.1: a raw socket; `behave(connection, stop)` runs for each connection."""

    def __init__(self, behave):
        self.behave, self.stop, self.connections = behave, threading.Event(), 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.threads = [threading.Thread(target=self._accept, daemon=True)]

    def _accept(self):
        while not self.stop.is_set():
            try:
                connection, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(connection,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, connection):
        try:
            connection.settimeout(0.05)
            try:
                connection.recv(65536)  # the request (its body may come in a second segment; never mind)
            except OSError:
                pass
            self.behave(connection, self.stop)
        except OSError:
            pass
        finally:
            connection.close()

    def __enter__(self):
        self.threads[0].start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in list(self.threads):
            thread.join(timeout=2)
        self.sock.close()


def _hang(connection, stop):
    stop.wait()


def _drip(connection, stop):  # a valid status line, one byte at a time, forever
    for byte in itertools.cycle(b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000):
        if stop.wait(0.05):
            return
        connection.sendall(bytes([byte]))


def _endless(connection, stop):
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
    block = b'{"choices": [' * 4096
    while not stop.is_set():
        connection.sendall(block)


def _huge_length(connection, stop):
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 99999999999\r\n\r\n{")
    stop.wait()


def _not_http(connection, stop):
    connection.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")


MESSAGES = [{"role": "user", "content": "x"}]


def _judge(url, **kwargs):
    return OpenAIChatJudge(url, "m", backoff_s=0.01, max_backoff_s=0.05, **kwargs)


def test_a_hanging_server_is_cut_off_at_the_deadline_and_retried_within_the_budget():
    with _RawServer(_hang) as server:
        start = time.monotonic()
        with pytest.raises(JudgeError) as info:
            _judge(server.url, timeout_s=0.4, retry_budget_s=1.0).complete(MESSAGES)
        elapsed = time.monotonic() - start
        message = str(info.value)
    assert 0.9 <= elapsed < 3.0, elapsed
    assert server.url in message and "no complete answer within" in message and "--judge-timeout" in message
    assert 2 <= server.connections <= 3  # retried, but only while the budget lasted


def test_the_socket_timeout_winning_the_race_with_the_watchdog_is_the_same_deadline(monkeypatch):
    """Under load the socket's own timeout (the time left) can fire before the watchdog at the deadline: that is
    the overall timeout too, not a connection error (it once read "TimeoutError: timed out" in a loaded suite)."""
    import distillm.evaluation.judge as judge

    class NeverFires:  # a watchdog that loses every race
        def __init__(self, *args, **kwargs):
            self.daemon = True

        def start(self):
            pass

        def cancel(self):
            pass

    monkeypatch.setattr(judge.threading, "Timer", NeverFires)
    with _RawServer(_hang) as server:
        with pytest.raises(JudgeError) as info:
            _judge(server.url, timeout_s=0.3, retry_budget_s=0.3).complete(MESSAGES)
    assert "no complete answer within" in str(info.value) and "--judge-timeout" in str(info.value)


def test_a_slow_drip_does_not_keep_a_request_alive():
    """One byte every 50 ms never trips a per-read timeout of 0.5 s; the overall deadline still ends it."""
    with _RawServer(_drip) as server:
        start = time.monotonic()
        with pytest.raises(JudgeError, match="no complete answer within"):
            _judge(server.url, timeout_s=0.5, retry_budget_s=0.5).complete(MESSAGES)
        assert time.monotonic() - start < 2.0
        assert server.connections == 1


@pytest.mark.parametrize("behave", [_endless, _huge_length])
def test_an_endless_or_oversized_body_is_an_error_not_a_memory_error(behave):
    with _RawServer(behave) as server:
        start = time.monotonic()
        with pytest.raises(JudgeError, match=r"more than 65536 bytes") as info:
            _judge(server.url, timeout_s=5, retry_budget_s=5, max_response_bytes=65536).complete(MESSAGES)
        assert time.monotonic() - start < 3.0 and server.url in str(info.value)
        assert server.connections == 1  # not retried: the server would send it again


def test_non_http_bytes_give_a_clear_error():
    with _RawServer(_not_http) as server:
        with pytest.raises(JudgeError, match="did not answer with HTTP") as info:
            _judge(server.url, timeout_s=2, retry_budget_s=2).complete(MESSAGES)
        assert server.url in str(info.value) and "--judge-url" in str(info.value)
        assert server.connections == 1


def test_nothing_listening_is_retried_within_the_budget_then_named():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    probe.close()  # nothing listens there now
    start = time.monotonic()
    with pytest.raises(JudgeError, match="Connection ?Refused|refused") as info:
        _judge(url, timeout_s=0.3, retry_budget_s=0.5, max_retries=100).complete(MESSAGES)
    assert time.monotonic() - start < 2.0 and url in str(info.value)


def test_judging_stops_at_the_first_failed_request():
    """No request starts after one has failed: 8 requests, 2 at a time, one deadline's worth of time."""
    with _RawServer(_hang) as server:
        start = time.monotonic()
        with pytest.raises(JudgeError):
            judge_pairs(_judge(server.url, timeout_s=0.3, retry_budget_s=0.3), ITEMS, concurrency=2)
        assert time.monotonic() - start < 1.5
        assert server.connections == 2  # the first two; none of the 6 others


@pytest.mark.parametrize("kwargs, message", [
    ({"timeout_s": 0}, "--judge-timeout"), ({"timeout_s": -1}, "--judge-timeout"),
    ({"retry_budget_s": float("inf")}, "--judge-retry-budget"),
    ({"timeout_s": 10, "retry_budget_s": 5}, "shorter than --judge-timeout"),
])
def test_bad_judge_settings_are_refused_up_front(kwargs, message):
    with pytest.raises(JudgeError, match=message):
        OpenAIChatJudge("http://127.0.0.1:9/v1", "m", **kwargs)
    with pytest.raises(JudgeError, match="http:// or https://"):
        OpenAIChatJudge("localhost:8000", "m")


def test_judge_timeout_options_reach_the_client():
    import argparse

    from distillm.evaluation.cli import add_eval_parser, make_judge

    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    args = parser.parse_args(["eval", "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m",
                              "--judge-timeout", "7", "--judge-retry-budget", "30"])
    judge = make_judge(args)
    assert (judge.timeout_s, judge.retry_budget_s) == (7.0, 30.0)
