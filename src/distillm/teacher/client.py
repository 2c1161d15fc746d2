"""HTTP client of a teacher server: timeouts, retries with bounded exponential back-off, a concurrency limit,
round-robin over several URLs, the API key from an environment variable, TLS verification on by default.

Retried (with back-off 0.5 s, 1 s, 2 s, ... capped at `MAX_DELAY`, until `max_wait` seconds have been spent
waiting): a refused or reset connection, a timeout, HTTP 429 and 5xx. Each retry goes to the next URL of the
list. Not retried: other HTTP errors (4xx: the request is wrong, retrying would not help) and malformed replies
(`protocol.TeacherReplyError`). The API key is sent as `Authorization: Bearer ...` and nowhere else: it is read
from the environment when the client is made, and no message, log line or repr shows it.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from ..errors import DistillmError
from .protocol import TeacherReplyError

logger = logging.getLogger("distillm")

FIRST_DELAY = 0.5
MAX_DELAY = 30.0
RETRY_STATUS = {429, 500, 502, 503, 504}


class TeacherServerError(DistillmError):
    """The teacher server cannot be reached or refuses the request."""


def split_urls(value: str) -> list[str]:
    urls = [u.strip().rstrip("/") for u in str(value).split(",") if u.strip()]
    if not urls:
        raise TeacherServerError("--teacher-url is empty: give the server's base URL, e.g. http://host:8000")
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise TeacherServerError(f"--teacher-url {url!r} must start with http:// or https://")
    return [u[:-3] if u.endswith("/v1") else u for u in urls]


class TeacherClient:
    """POSTs JSON to a teacher server (one of `urls`, round-robin) and returns the decoded reply."""

    def __init__(self, urls: list[str] | str, *, api_key_env: str | None = None, timeout: float = 120.0,
                 concurrency: int = 4, max_wait: float = 600.0, insecure: bool = False, model: str | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.urls = split_urls(urls) if isinstance(urls, str) else list(urls)
        self.timeout, self.max_wait, self.model = float(timeout), float(max_wait), model
        self.concurrency = int(concurrency)
        self._sleep = sleep
        self._next = itertools.count()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="teacher")
        self._headers = {"Content-Type": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise TeacherServerError(f"--teacher-api-key-env {api_key_env}: the environment variable "
                                         f"{api_key_env} is not set (export it with the teacher server's API key)")
            self._headers["Authorization"] = f"Bearer {key}"
        self._context = None
        if any(u.startswith("https://") for u in self.urls):
            self._context = ssl.create_default_context()
            if insecure:
                self._context.check_hostname = False
                self._context.verify_mode = ssl.CERT_NONE
        self.requests = 0  # requests answered
        self.retries = 0  # attempts that failed and were retried
        self.bytes_sent = 0
        self.bytes_received = 0

    def __repr__(self) -> str:  # never the headers: they hold the API key
        return f"TeacherClient(urls={self.urls}, concurrency={self.concurrency}, timeout={self.timeout})"

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, fn, *args):
        """Run fn(*args) on the client's pool (at most `concurrency` requests in flight)."""
        return self._pool.submit(fn, *args)

    def map(self, fn, items) -> list:
        return list(self._pool.map(fn, items))

    def _url(self) -> str:
        with self._lock:
            return self.urls[next(self._next) % len(self.urls)]

    def _once(self, url: str, path: str, body: bytes | None):
        request = urllib.request.Request(url + path, data=body, headers=self._headers,
                                         method="POST" if body is not None else "GET")
        with urllib.request.urlopen(request, timeout=self.timeout, context=self._context) as reply:
            data = reply.read()
        with self._lock:
            self.requests += 1
            self.bytes_sent += len(body or b"")
            self.bytes_received += len(data)
        return data

    def request(self, path: str, payload: dict | None = None, *, max_wait: float | None = None):
        """The decoded JSON reply to POST `path` (GET when payload is None), retried as the module says."""
        body = None if payload is None else json.dumps(payload).encode()
        budget = self.max_wait if max_wait is None else max_wait
        waited, attempt = 0.0, 0
        while True:
            url = self._url()
            try:
                data = self._once(url, path, body)
                break
            except urllib.error.HTTPError as err:
                detail = _error_detail(err)
                if err.code not in RETRY_STATUS:
                    raise TeacherServerError(f"teacher server {url}{path} answered HTTP {err.code}: {detail}") from None
                problem = f"HTTP {err.code} {detail}"
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, OSError) as err:
                reason = getattr(err, "reason", err)
                if isinstance(reason, ssl.SSLCertVerificationError):
                    raise TeacherServerError(f"teacher server {url}: TLS certificate verification failed ({reason}); "
                                             "fix the certificate, or pass --teacher-insecure to skip the check "
                                             "(not recommended)") from None
                problem = f"{type(reason).__name__}: {reason}"
            delay = min(FIRST_DELAY * 2 ** attempt, MAX_DELAY)
            if waited + delay > budget:
                raise TeacherServerError(
                    f"teacher server {url} ({path}) did not answer: {problem}; gave up after {attempt + 1} attempts "
                    f"and {waited:.0f} s of waiting (--teacher-max-wait {budget:g}). Is the server running and "
                    "reachable from here?")
            with self._lock:
                self.retries += 1
            logger.warning("Teacher server %s: %s; retrying in %.1f s", url, problem, delay)
            self._sleep(delay)
            waited += delay
            attempt += 1
        try:
            return json.loads(data)
        except ValueError:
            raise TeacherReplyError(f"teacher server {url}{path}: the reply is not JSON: {data[:200]!r}") from None

    def check_reachable(self) -> None:
        """Every URL answers GET /v1/models (a few quick retries only): else a clear error naming the URL."""
        for url in self.urls:
            try:
                request = urllib.request.Request(url + "/v1/models", headers=self._headers)
                with urllib.request.urlopen(request, timeout=min(self.timeout, 30.0), context=self._context) as r:
                    r.read()
            except urllib.error.HTTPError as err:
                if err.code in (401, 403):
                    raise TeacherServerError(f"teacher server {url} refused the API key (HTTP {err.code}): set "
                                             "--teacher-api-key-env to the variable holding the right key") from None
                if err.code != 404:  # a server without /v1/models still may serve completions
                    raise TeacherServerError(f"teacher server {url} answered HTTP {err.code} to /v1/models: "
                                             f"{_error_detail(err)}") from None
            except (urllib.error.URLError, OSError) as err:
                reason = getattr(err, "reason", err)
                raise TeacherServerError(f"teacher server {url} is not reachable ({reason}): start it (e.g. `vllm "
                                         "serve MODEL`) or fix --teacher-url") from None


def _error_detail(err: urllib.error.HTTPError) -> str:
    try:
        text = err.read().decode(errors="replace")
    except Exception:  # noqa: BLE001 - best effort: the body is only for the message
        text = ""
    try:
        parsed = json.loads(text)
        message = parsed.get("message") or parsed.get("error", {}).get("message") or text
    except (ValueError, AttributeError):
        message = text
    return str(message)[:300]
