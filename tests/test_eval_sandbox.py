"""The code sandbox contains hostile programs, and pass@k by execution counts known-correct and known-wrong
solutions exactly."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import threading
import time

import pytest

from distillm.evaluation.code import evaluate_samples, humaneval_path, load_humaneval, load_mbpp, pass_at_k
from distillm.evaluation.sandbox import SandboxLimits, run_python

FAST = SandboxLimits(timeout_s=2.0, memory_mb=512, max_processes=8)


def test_ordinary_programs_pass_and_fail():
    ok = run_python("print(sum(range(10)))", FAST)
    assert ok.status == "passed" and ok.stdout.strip() == "45"
    bad = run_python("assert 1 + 1 == 3", FAST)
    assert bad.status == "failed" and "AssertionError" in bad.stderr


def test_infinite_loop_is_killed_at_the_wall_limit():
    start = time.monotonic()
    result = run_python("while True:\n    pass", FAST)
    assert result.status == "timeout" and 2.0 <= time.monotonic() - start < 6


def test_fork_bomb_is_contained_and_the_machine_still_forks():
    bomb = "import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)\n"
    start = time.monotonic()
    result = run_python(bomb, FAST)
    assert result.status == "timeout" and time.monotonic() - start < 15
    # every offspring died with the process group, and this process can still start programs
    assert subprocess.run(["true"]).returncode == 0
    assert run_python("print('after')", FAST).stdout.strip() == "after"


def test_huge_allocation_fails_inside_the_sandbox():
    result = run_python("x = bytearray(16 * 1024 ** 3)\nprint('allocated')", FAST)
    assert result.status == "failed" and "MemoryError" in result.stderr and "allocated" not in result.stdout


def test_writing_outside_its_directory_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    result = run_python(f"open({str(target)!r}, 'w').write('x')\n", FAST)
    assert result.status == "failed" and not target.exists()
    # inside its own directory it may write as it likes
    assert run_python("open('mine.txt', 'w').write('x'); print(open('mine.txt').read())", FAST).stdout.strip() == "x"


def test_socket_to_a_loopback_server_never_connects():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted, done = [], threading.Event()

    def accept():
        while not done.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept)
    thread.start()
    program = f"import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\nprint('connected')\n"
    result = run_python(program, FAST)
    time.sleep(0.3)
    done.set()
    thread.join()
    server.close()
    assert result.status == "failed" and "connected" not in result.stdout and accepted == []
    assert result.isolation["network"] in ("netns", "audit-hook")


def test_background_children_die_with_the_group():
    marker = f"distillm-sandbox-test-{os.getpid()}"
    program = ("import subprocess, time\n"
               f"subprocess.Popen(['sh', '-c', 'exec -a {marker} sleep 60'])\n"
               "time.sleep(30)\n")
    result = run_python(program, SandboxLimits(timeout_s=1.5))
    assert result.status == "timeout"
    time.sleep(0.2)
    alive = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    assert alive == []


def test_pass_at_k_of_known_correct_and_wrong_solution_sets(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps({"task_id": 7, "text": "Write a function add(a, b) returning a + b.", "code": "",
                                "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}) + "\n")
    problem = load_mbpp(path)[0]
    correct = "```python\ndef add(a, b):\n    return a + b\n```"
    samples = {problem.id: [correct, correct, correct,
                            "def add(a, b):\n    return a - b",          # wrong answer
                            "def add(a, b)\n    return a + b",           # syntax error
                            "def add(a, b):\n    while True: pass"]}     # never returns
    limits = SandboxLimits(timeout_s=1.5)
    out = evaluate_samples([problem], samples, ks=(1, 2, 6), limits=limits, concurrency=2)
    assert out["details"][0]["correct"] == 3 and out["details"][0]["statuses"].count("timeout") == 1
    assert out["pass@1"] == pytest.approx(0.5)
    assert out["pass@2"] == pytest.approx(1 - 3 / 15)  # 1 - C(3,2)/C(6,2)
    assert out["pass@6"] == 1.0 and pass_at_k(6, 3, 2) == pytest.approx(0.8)


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    problems = load_humaneval(limit=3)
    with gzip.open(humaneval_path(), "rt") as handle:
        canonical = {row["task_id"]: row["canonical_solution"] for row in map(json.loads, handle)}
    samples = {p.id: [canonical[p.id], "    return None\n"] for p in problems}
    out = evaluate_samples(problems, samples, ks=(1, 2), limits=SandboxLimits(timeout_s=5), concurrency=2)
    assert [d["correct"] for d in out["details"]] == [1, 1, 1]
    assert out["pass@1"] == pytest.approx(0.5) and out["pass@2"] == 1.0
