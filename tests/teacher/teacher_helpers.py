"""Helpers of the teacher-server tests: start a real loopback teacher server process (distillm.teacher.loopback
over the built-in tiny-random model), stop it, set its faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
STARTUP_S = 180  # importing torch and transformers on a loaded 2-core machine


def start_server(*, port: int = 0, faults: dict | None = None, api_key: str | None = None):
    """(process, base URL) of a loopback teacher server; waits until it listens."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "distillm.teacher.loopback", "--model", "tiny-random", "--port", str(port),
           "--faults", json.dumps(faults or {})]
    if api_key:
        cmd += ["--api-key", api_key]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    deadline = time.monotonic() + STARTUP_S
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("listening on ") or proc.poll() is not None:
            break
    if not line.startswith("listening on "):
        proc.kill()
        raise RuntimeError(f"the loopback teacher server did not start: {line!r}")
    return proc, line.split()[-1]


def stop_server(proc) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def set_faults(url: str, faults: dict) -> None:
    request = urllib.request.Request(url + "/_faults", data=json.dumps(faults).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).read()
