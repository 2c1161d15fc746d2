"""The code sandbox contains hostile programs, and pass@k by execution counts known-correct and known-wrong
solutions exactly."""

from __future__ import annotations

import gzip
import json
import os
import pwd
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from distillm.errors import DistillmError
from distillm.evaluation.code import (
    CodeProblem, check_completion, evaluate_samples, humaneval_path, load_humaneval, load_mbpp, pass_at_k,
)
from distillm.evaluation.sandbox import SandboxConfigError, SandboxLimits, _tasks_of_uid, run_python
from tolerances import product_atol

FAST = SandboxLimits(timeout_s=2.0, memory_mb=512, max_processes=8)
ADD = CodeProblem("t", "humaneval", "def add(a, b):\n", "def check(f):\n    assert f(1,2)==3\n", "add")


def _namespaces_work() -> bool:
    return not run_python("pass", FAST).isolation.get("namespaces", "unavailable").startswith("unavailable")


NAMESPACES = _namespaces_work()
needs_namespaces = pytest.mark.skipif(not NAMESPACES, reason="this kernel refuses the namespaces (the sandbox "
                                      "says so in isolation['namespaces'])")


def test_ordinary_programs_pass_and_fail():
    ok = run_python("print(sum(range(10)))", FAST)
    assert ok.status == "passed" and ok.stdout.strip() == "45"
    bad = run_python("assert 1 + 1 == 3", FAST)
    assert bad.status == "failed" and "AssertionError" in bad.stderr


def test_infinite_loop_is_killed_at_the_wall_limit():
    start = time.monotonic()
    result = run_python("while True:\n    pass", FAST)
    assert result.status == "timeout" and 2.0 <= time.monotonic() - start < 6


@pytest.mark.parametrize("audit_hook, namespaces", [(True, True), (False, True), (False, False)])
def test_fork_bomb_is_contained_and_the_machine_still_forks(audit_hook, namespaces, tmp_path, monkeypatch):
    """With the hook, fork is refused; without it (as native code would), RLIMIT_NPROC and the kill at the time
    limit (of the pid namespace, or without one of every descendant, setsid() or not) contain it."""
    if namespaces and not NAMESPACES:
        pytest.skip("namespaces unavailable here")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the runner's command line names this directory
    bomb = ("import os, time\nwhile True:\n    try:\n        if os.fork() == 0:\n            os.setsid()\n"
            "    except OSError:\n        time.sleep(0.01)\n")
    start = time.monotonic()
    result = run_python(bomb, FAST, audit_hook=audit_hook, namespaces=namespaces)
    assert result.status == "timeout" and time.monotonic() - start < 15
    # every offspring died, and this process can still start programs
    # SIGKILLed processes vanish from the process table asynchronously: allow the kernel a bounded moment
    deadline = time.monotonic() + 10
    while _alive(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _alive(str(tmp_path)) == []
    if os.geteuid() == 0:  # the run's own uid was swept: not one live process of it is left, at once
        uid = int(result.isolation["uid"].split()[0])
        assert "own" in result.isolation["uid"] and _tasks_of_uid(uid, live_only=True) == 0
        assert "survivors" not in result.isolation
    assert subprocess.run(["true"]).returncode == 0
    assert run_python("print('after')", FAST).stdout.strip() == "after"


@pytest.mark.skipif(os.geteuid() != 0, reason="a uid per run is taken only as root")
@pytest.mark.parametrize("namespaces", [True, False])
def test_each_run_has_a_uid_of_its_own_so_concurrent_runs_share_no_process_limit(namespaces):
    """Not the shared `nobody`: a fork bomb's leftovers of one evaluation once filled nobody's RLIMIT_NPROC for
    every other evaluation on the machine (three concurrent test suites, 2026-11-30)."""
    if namespaces and not NAMESPACES:
        pytest.skip("namespaces unavailable here")
    runs = [run_python("import os; print(os.getuid(), os.getgid())", FAST, namespaces=namespaces) for _ in range(2)]
    ids = [tuple(map(int, r.stdout.split())) for r in runs]
    assert all(r.passed for r in runs)
    assert ids[0] != ids[1] and all(u == g and u >= 100_000 and u != pwd.getpwnam("nobody").pw_uid for u, g in ids)
    assert [int(r.isolation["uid"].split()[0]) for r in runs] == [u for u, _ in ids]


@pytest.mark.skipif(os.geteuid() != 0, reason="a uid per run is taken only as root")
def test_without_free_ids_mapped_the_run_falls_back_to_nobody_and_says_so(monkeypatch):
    import distillm.evaluation.sandbox as sandbox
    monkeypatch.setattr(sandbox, "_mapped_ranges", lambda path: [(0, 65536)])  # a typical rootless container map
    result = run_python("import os; print(os.getuid())", FAST, namespaces=False)
    nobody = pwd.getpwnam("nobody").pw_uid
    assert result.passed and int(result.stdout) == nobody and "nobody" in result.isolation["uid"]


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
    assert result.isolation["network"] in ("netns (no interface up)", "audit-hook")


@pytest.mark.parametrize("tail", ["exit()", "quit()", "import sys; sys.exit(0)", "import os; os._exit(0)",
                                  "raise SystemExit", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
def test_leaving_before_the_end_is_not_a_pass(tail):
    """Exit status 0 is not enough: a pass needs the program (and check(...)) to have run to its end.

    Checked in a fresh interpreter. In three concurrent fresh-clone suites (2026-11-30) the exit-0 cases got
    reason "sandbox": leftover fork-bomb processes of another suite, running as `nobody`, had filled that uid's
    process limit (docs/evaluation-sandbox.md, "Open")."""
    script = (
        "import json\n"
        "from distillm.evaluation.code import CodeProblem, check_completion\n"
        "from distillm.evaluation.sandbox import SandboxLimits\n"
        "fast = SandboxLimits(timeout_s=2.0, memory_mb=512, max_processes=8)\n"
        "add = CodeProblem('t', 'humaneval', 'def add(a, b):\\n', 'def check(f):\\n    assert f(1,2)==3\\n', 'add')\n"
        f"tail = {tail!r}\n"
        "wrong = check_completion(add, '    return a - b\\n' + tail + '\\n', fast)\n"
        "early = check_completion(add, '    return a + b\\n' + tail + '\\n', fast)\n"
        "right = check_completion(add, '    return a + b\\n', fast)\n"
        "print(json.dumps([wrong.passed, wrong.reason, wrong.stderr[-2000:], early.passed, right.passed]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    wrong_passed, reason, stderr, early_passed, right_passed = json.loads(out.stdout.strip().splitlines()[-1])
    assert not wrong_passed and reason in ("exited-early", "killed"), stderr
    assert not early_passed  # even a correct solution that exits before its tests ran is not a pass
    assert right_passed


def test_printing_a_guessed_completion_line_does_not_pass():
    forged = ("import os\nfor fd in range(1, 20):\n    try:\n        os.write(fd, b'started\\ncompleted 0\\n')\n"
              "    except OSError:\n        pass\nos._exit(0)\n")
    result = run_python(forged, FAST)
    assert not result.passed and result.reason == "exited-early"


STEAL_TOKEN = """import os, re, sys
found = None
for frame in sys._current_frames().values():
    while frame is not None and found is None:
        found = next((v for v in frame.f_locals.values() if isinstance(v, str) and re.fullmatch('[0-9a-f]{32}', v)), None)
        frame = frame.f_back
for fd in range(3, 20):
    try:
        os.write(fd, f"completed {found}\\n".encode())
    except OSError:
        pass
os._exit(0)
"""


def test_the_token_is_out_of_reach_of_python_introspection():
    refused = run_python(STEAL_TOKEN, FAST)
    assert not refused.passed and "PermissionError" in refused.stderr and "_current_frames" in refused.stderr
    # the audit hook is what stands between the program and the token (it is Python-level only):
    assert run_python(STEAL_TOKEN, FAST, audit_hook=False).passed
    for attempt in ("import gc; gc.get_objects()", "import ctypes; ctypes.CDLL(None)",
                    "open('/proc/self/mem', 'rb')"):
        result = run_python(attempt, FAST)
        assert not result.passed and "PermissionError" in result.stderr, attempt


@pytest.fixture
def shared_dir(tmp_path):
    """A world-writable directory in the shared temporary directory, as /tmp is."""
    tmp_path.chmod(0o777)
    return tmp_path


def _escapes(target):
    return {
        "os.system": f"import os\nos.system('touch {target}/system')\n",
        "subprocess": f"import subprocess\nsubprocess.run(['touch', '{target}/subprocess'])\n",
        "sqlite3": f"import sqlite3\nc = sqlite3.connect('{target}/sqlite3')\nc.execute('create table t(x)')\nc.commit()\n",
        "symlink": f"import os\nos.symlink('/etc/passwd', '{target}/symlink')\n",
        "link": f"import os\nopen('mine', 'w').close()\nos.link('mine', '{target}/link')\n",
    }


@pytest.mark.parametrize("name", ["os.system", "subprocess", "sqlite3", "symlink", "link"])
@pytest.mark.parametrize("layer", ["audit hook", "namespaces"])
def test_nothing_is_written_to_the_shared_temporary_directory(shared_dir, name, layer):
    if layer == "namespaces" and not NAMESPACES:
        pytest.skip("namespaces unavailable here")
    program = _escapes(shared_dir)[name]
    result = run_python(program, FAST, audit_hook=layer == "audit hook", namespaces=layer == "namespaces")
    assert list(shared_dir.iterdir()) == [], (name, layer, result.stderr[-500:])
    if layer == "audit hook":
        assert not result.passed and "sandbox:" in result.stderr


@pytest.mark.parametrize("layer", ["audit hook", "namespaces"])
def test_a_world_writable_unix_socket_receives_nothing(shared_dir, layer):
    if layer == "namespaces" and not NAMESPACES:
        pytest.skip("namespaces unavailable here")
    path = str(shared_dir / "socket")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    os.chmod(path, 0o777)
    server.listen()
    server.settimeout(0.2)
    received, done = [], threading.Event()

    def serve():
        while not done.is_set():
            try:
                connection = server.accept()[0]
                received.append(connection.recv(100))
                connection.close()
            except OSError:
                pass

    thread = threading.Thread(target=serve)
    thread.start()
    program = f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({path!r})\ns.sendall(b'hello')\n"
    try:
        result = run_python(program, FAST, audit_hook=layer == "audit hook", namespaces=layer == "namespaces")
        time.sleep(0.3)
    finally:
        done.set()
        thread.join()
        server.close()
    assert not result.passed and received == []


def _alive(marker: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()


@pytest.mark.parametrize("namespaces", [True, False])
def test_a_setsid_child_does_not_outlive_the_run(namespaces):
    """With the audit hook off (as native code would), a double-forked setsid() child is killed at the end of the
    run: by the pid namespace, or without one by the runner as subreaper."""
    if namespaces and not NAMESPACES:
        pytest.skip("namespaces unavailable here")
    marker = f"distillm-setsid-{os.getpid()}-{namespaces}"
    program = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
               f"        os.execv('/bin/sh', ['sh', '-c', 'sleep 40; : {marker}'])\n    os._exit(0)\n"
               "time.sleep(0.5)\n")
    result = run_python(program, FAST, audit_hook=False, namespaces=namespaces)
    survivors = _alive(marker)
    for pid in survivors:
        os.kill(int(pid), 9)
    assert result.passed and survivors == [], result.stderr
    assert not run_python(program, FAST).passed  # with the hook, fork itself is refused


def test_starting_processes_is_refused_by_the_audit_hook():
    for program in ("import os; os.fork()", "import subprocess; subprocess.Popen(['true'])",
                    "import os; os.execv('/bin/true', ['true'])", "import os; os.forkpty()",
                    "import os; os.posix_spawn('/bin/true', ['true'], {})"):
        result = run_python(program, FAST)
        assert not result.passed and "sandbox: starting processes" in result.stderr, program


def test_the_namespace_layer_hides_the_host_filesystem(tmp_path):
    if not NAMESPACES:
        pytest.skip("namespaces unavailable here")
    secret = tmp_path / "secret.txt"
    secret.write_text("host data")
    secret.chmod(0o644)
    tmp_path.chmod(0o755)
    # /tmp inside holds the program's own directory and nothing else of the host's /tmp, except the read-only
    # path to Python itself when the interpreter (a venv in a fresh clone, say) lives under /tmp
    program = (f"import os, sys\nmine = {{os.getcwd().split('/')[2]}} | {{p.split('/')[2] for p in "
               "(sys.prefix, sys.base_prefix, sys.exec_prefix) if p.startswith('/tmp/')}\n"
               f"print(os.path.exists({str(secret)!r}), set(os.listdir('/tmp')) <= mine,"
               " os.listdir('/proc').count('1') == 1)\n"
               "open('/etc/distillm-probe', 'w')\n")
    result = run_python(program, FAST, audit_hook=False)
    assert result.stdout.split() == ["False", "True", "True"], result.stdout + result.stderr
    assert "Read-only file system" in result.stderr and not os.path.exists("/etc/distillm-probe")
    assert "private root" in result.isolation["files"]


@pytest.mark.parametrize("kwargs, message", [
    ({"timeout_s": 0}, "timeout_s 0"), ({"timeout_s": -1}, "timeout_s -1"),
    ({"timeout_s": float("nan")}, "timeout_s nan"), ({"memory_mb": 1}, "memory_mb 1"),
    ({"max_open_files": 3}, "max_open_files 3"),
])
def test_limits_that_would_fail_every_program_are_refused(kwargs, message):
    with pytest.raises(SandboxConfigError, match=message) as info:
        SandboxLimits(**kwargs)
    assert isinstance(info.value, DistillmError)


def test_eval_options_are_checked_before_any_model_loads(tmp_path, capsys):
    from distillm.cli import main

    for option, value in (("--code-timeout", "0"), ("--code-timeout", "-1"), ("--code-memory-mb", "1")):
        code = main(["eval", "--model", "m=/nonexistent-model", "--tasks", "code", "--output-dir", str(tmp_path),
                     option, value])
        err = capsys.readouterr().err
        assert code != 0 and f"{option} {float(value) if 'timeout' in option else int(value)!r}" in err, err
        assert "between" in err and "distillm: error" in err


def test_a_run_where_every_program_fails_for_the_sandbox_says_so(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    path.write_text(json.dumps({"task_id": 1, "text": "add", "test_list": ["assert add(1, 2) == 3"]}) + "\n")
    problem = load_mbpp(path)[0]
    out = evaluate_samples([problem], {problem.id: ["def add(a, b):\n    while True: pass"]},
                           limits=SandboxLimits(timeout_s=0.5))
    assert out["pass@1"] == 0.0 and out["failure_reasons"] == {"timeout": 1}
    assert "sandbox's own" in out["warning"] and "--code-timeout" in out["warning"]
    from distillm.evaluation.report import write_report

    results = {"settings": {"tasks": ["code"], "prompts": "p", "temperature": 0, "top_p": 1, "max_new_tokens": 8,
                            "seed": 0}, "reference_source": "teacher",
               "models": {"m": {"metrics": {"code_pass@1": 0.0}, "details": {"code": out}}}}
    assert out["warning"] in write_report(results, tmp_path).read_text()  # the report says it too
    hog = evaluate_samples([problem], {problem.id: ["x = bytearray(1 << 40)\ndef add(a, b):\n    return a + b"]},
                           limits=FAST)
    assert hog["failure_reasons"] == {"memory": 1} and "--code-memory-mb" in hog["warning"]
    # a wrong answer is not the sandbox's fault: no warning
    wrong = evaluate_samples([problem], {problem.id: ["def add(a, b):\n    return a - b"]}, limits=FAST)
    assert wrong["failure_reasons"] == {"error": 1} and "warning" not in wrong


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
    tol = dict(rel=0, abs=product_atol(6))  # pass@k's product form over 6 samples (tolerances.product_atol)
    assert out["pass@1"] == pytest.approx(0.5, **tol)
    assert out["pass@2"] == pytest.approx(1 - 3 / 15, **tol)  # 1 - C(3,2)/C(6,2)
    assert out["pass@6"] == 1.0 and pass_at_k(6, 3, 2) == pytest.approx(0.8, **tol)


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    problems = load_humaneval(limit=3)
    with gzip.open(humaneval_path(), "rt") as handle:
        canonical = {row["task_id"]: row["canonical_solution"] for row in map(json.loads, handle)}
    samples = {p.id: [canonical[p.id], "    return None\n"] for p in problems}
    out = evaluate_samples(problems, samples, ks=(1, 2), limits=SandboxLimits(timeout_s=5), concurrency=2)
    assert [d["correct"] for d in out["details"]] == [1, 1, 1]
    # (the mean of pass@1 = 1 - (1 - 1/2) = 0.5 exactly, over three problems: 1.5 / 3, exact)
    assert out["pass@1"] == 0.5 and out["pass@2"] == 1.0


def test_cpu_and_file_size_limits_are_named():
    spin = run_python("while True:\n    pass\n", SandboxLimits(timeout_s=20, cpu_seconds=1))
    assert (spin.status, spin.reason) == ("failed", "cpu-limit")
    big = run_python("open('big', 'wb').write(b'x' * (2 << 20))\n", SandboxLimits(timeout_s=5, max_file_mb=1))
    assert (big.status, big.reason) == ("failed", "file-size-limit") and "File too large" in big.stderr


def test_a_syntax_error_is_the_programs_failure_not_the_sandboxs():
    result = run_python("def f(:\n    pass\n", FAST)
    assert (result.status, result.reason) == ("failed", "error") and "SyntaxError" in result.stderr
