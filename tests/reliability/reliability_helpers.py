"""Helpers for the reliability suite: run `distillm` as a real subprocess (optionally with a fault injected
through DISTILLM_FAULT, which makes it SIGKILL itself at a named point) and read what it left on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# A run small enough for seconds of CPU, large enough that every phase has several batches / steps:
# 12 training prompts (6 generation batches of 2), 4 held-out prompts (2 batches), 2 rounds of 3 optimizer
# steps, a checkpoint every 2 steps.
TINY_RUN = ["run", "--preset", "tiny", "--num-prompts", "12", "--num-eval-prompts", "4", "--rounds", "2",
            "--per-device-train-batch-size", "4", "--generation-batch-size", "2", "--save-steps", "2",
            "--max-new-tokens", "8", "--save-total-limit", "3"]


def run_distillm(args: list[str], *, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("DISTILLM_FAULT", None)
    if fault:
        env["DISTILLM_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "distillm", "-q", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
