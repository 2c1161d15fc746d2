"""A small teacher server for tests and demos: a real HTTP server (stdlib, threaded) that speaks the part of vLLM's
OpenAI-compatible protocol distillm uses, over a local model (e.g. the built-in `tiny-random`).

    python -m distillm.teacher.loopback --model tiny-random --port 8123 [--faults '{"exit_after": 5}']

Endpoints: GET /v1/models; POST /tokenize {"prompt": text, "add_special_tokens"}; POST /v1/completions with a
token-id prompt, either sampling a response (return_token_ids: choices[0].token_ids) or scoring the prompt
(prompt_logprobs=K: vLLM's list per position of {"<id>": {"logprob", "rank", "decoded_token"}}, None first).
Log-probs are float32 values written with Python's repr of their float64 widening, so they read back exactly.

`--faults` (JSON) injects failures, counted over /v1/completions requests (1-based): "status": {"n": code}
answers request n with that HTTP status; "hang": [n, ...] never answers request n; "short": [n] drops the last
position of a prompt_logprobs reply; "malformed": [n] answers non-JSON; "exit_after": n exits the process (no
reply) when request n + 1 arrives. POST /_faults {...} replaces them and restarts the count (for tests).
`--api-key KEY` demands `Authorization: Bearer KEY`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from ..generation.base import SamplingParams
from ..generation.hf import HFBackend
from ..models import load_model, real_vocab_size


def topk_scores(model, ids: list[int], k: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log-softmax [len(ids) - 1, vocab] of the model's next-token logits at every position but the last (the
    row predicting ids[1:]), computed on the single unpadded sequence, float32."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1, :vocab].float()
    return torch.log_softmax(logits, -1)


class _State:
    def __init__(self, model, tokenizer, vocab: int, faults: dict, api_key: str | None, name: str):
        self.model, self.tokenizer, self.vocab, self.faults, self.api_key, self.name = (
            model, tokenizer, vocab, faults, api_key, name)
        self.count = 0
        self.lock = threading.Lock()
        self.model_lock = threading.Lock()


def _handler(state: _State):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, payload, raw: bytes | None = None):
            body = raw if raw is not None else json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authorized(self) -> bool:
            if state.api_key and self.headers.get("Authorization") != f"Bearer {state.api_key}":
                self._send(401, {"error": {"message": "invalid API key"}})
                return False
            return True

        def do_GET(self):
            if not self._authorized():
                return
            if self.path == "/v1/models":
                return self._send(200, {"object": "list", "data": [{"id": state.name, "object": "model"}]})
            self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if not self._authorized():
                return
            if self.path == "/_faults":  # tests: replace the faults and restart the request count
                with state.lock:
                    state.faults, state.count = body, 0
                return self._send(200, {"faults": body})
            if self.path == "/tokenize":
                ids = state.tokenizer.encode(body["prompt"], add_special_tokens=bool(body.get("add_special_tokens", True)))
                return self._send(200, {"tokens": ids, "count": len(ids)})
            if self.path != "/v1/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            with state.lock:
                state.count += 1
                n = state.count
            faults = state.faults
            if faults.get("exit_after") is not None and n > int(faults["exit_after"]):
                os._exit(3)
            if n in faults.get("hang", []):
                time.sleep(3600)
            if str(n) in faults.get("status", {}):
                return self._send(int(faults["status"][str(n)]), {"error": {"message": "injected fault"}})
            if n in faults.get("malformed", []):
                return self._send(200, None, raw=b"<html>not json</html>")
            ids = [int(t) for t in body["prompt"]]
            if body.get("prompt_logprobs") is not None:
                k = int(body["prompt_logprobs"])
                with state.model_lock:
                    logp = topk_scores(state.model, ids, k, state.vocab)
                entries = [None]
                for pos in range(1, len(ids)):
                    row = logp[pos - 1]
                    top = row.topk(k)
                    entry = {}
                    for rank, (value, token) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
                        entry[str(token)] = {"logprob": value, "rank": rank,
                                             "decoded_token": state.tokenizer.decode([token])}
                    actual = ids[pos]
                    if str(actual) not in entry:
                        entry[str(actual)] = {"logprob": float(row[actual]), "rank": int((row > row[actual]).sum()) + 1,
                                              "decoded_token": state.tokenizer.decode([actual])}
                    entries.append(entry)
                if n in faults.get("short", []):
                    entries = entries[:-1]
                choice = {"index": 0, "text": "", "finish_reason": "length", "prompt_logprobs": entries,
                          "token_ids": [0]}
                return self._send(200, {"id": f"cmpl-{n}", "object": "text_completion", "model": state.name,
                                        "choices": [choice]})
            params = SamplingParams(temperature=float(body.get("temperature", 1.0)), top_p=float(body.get("top_p", 1.0)),
                                    max_new_tokens=int(body.get("max_tokens", 16)))
            with state.model_lock:
                out = HFBackend(state.model, state.tokenizer, max_batch_size=1).generate_batch(
                    [ids], params, seed=int(body.get("seed", 0)))[0]
            choice = {"index": 0, "text": state.tokenizer.decode(out.token_ids), "finish_reason": out.finish_reason,
                      "token_ids": out.token_ids}
            self._send(200, {"id": f"cmpl-{n}", "object": "text_completion", "model": state.name,
                             "choices": [choice]})

    return Handler


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed on stdout)")
    parser.add_argument("--faults", default="{}")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model, dtype="float32")
    model.eval()
    state = _State(model, tokenizer, real_vocab_size(tokenizer), json.loads(args.faults), args.api_key, args.model)
    server = ThreadingHTTPServer((args.host, args.port), _handler(state))
    server.daemon_threads = True
    print(f"listening on http://{args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
