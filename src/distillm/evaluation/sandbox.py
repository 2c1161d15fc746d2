"""Run untrusted Python (model-written code) in a contained child process.

What applies, layer by layer (`SandboxResult.isolation` records what was in force for each run):

- **Process**: a fresh interpreter (``python -I -B``) in a new session (its own process group) started from a
  fresh temporary directory, with an empty environment apart from PATH/HOME/TMPDIR pointing at that directory.
  On the wall-time limit the whole process group is killed with SIGKILL (repeatedly, until it is empty), so
  children and fork-bomb offspring go with it. A program that calls ``setsid()`` itself leaves the group and
  escapes that kill (it stays bound by the limits below, and by the unprivileged user when running as root).
- **Resources** (setrlimit, set by the child before the program runs): address space (RLIMIT_AS), CPU seconds
  (RLIMIT_CPU), size of any file written (RLIMIT_FSIZE, which also bounds the captured stdout/stderr, written to
  files), open files, no core dumps, and processes (RLIMIT_NPROC). RLIMIT_NPROC counts every process of the
  user: it is set to the user's current count plus `max_processes`. Root ignores RLIMIT_NPROC, so when the
  caller is root the child first drops to the user ``nobody`` (which also owns nothing outside the sandbox
  directory); as any other user the limit also caps that user's other processes while the program runs
  (a fork bomb holds them at the cap until it is killed at the time limit).
- **Network**: the child enters a new, empty network namespace (``unshare(CLONE_NEWNET)`` as root, with
  ``CLONE_NEWUSER`` otherwise) where no interface is up, so nothing, loopback included, can be reached. Where
  the kernel refuses that (no user namespaces), a Python audit hook refuses to create internet sockets instead:
  that stops Python code, not native code (ctypes), and `isolation["network"]` says "audit-hook".
- **Files**: an audit hook refuses opening files for writing, and deleting or renaming them, outside the sandbox
  directory (Python-level; ctypes could bypass it). When the caller is root the drop to ``nobody`` makes this an
  operating-system guarantee for every directory not writable by all (``/tmp`` itself stays writable by all).

This is containment for benchmark code written by a model that may be wrong, not a security boundary against a
determined attacker: for that, run evaluations inside a container or VM.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

_RUNNER = r'''
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
workdir = os.path.realpath(os.getcwd())
isolation = {"network": "none", "user": "unchanged", "files": "audit-hook"}
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
try:
    libc = ctypes.CDLL(None, use_errno=True)
    flags = CLONE_NEWNET if os.geteuid() == 0 else (CLONE_NEWUSER | CLONE_NEWNET)
    if libc.unshare(flags) == 0:
        isolation["network"] = "netns"
except Exception:
    pass
for name, value in cfg["limits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
# The interpreter's own files may not be readable by the unprivileged user (e.g. a Python under /root): import
# the modules the program names (from the interpreter's paths, not the sandbox directory) before dropping.
import ast
try:
    import encodings.idna  # loaded lazily by socket name lookups
except ImportError:
    pass
try:
    _tree = ast.parse(open(cfg["program"]).read())
except (SyntaxError, ValueError):
    _tree = None
for _node in ast.walk(_tree) if _tree is not None else ():
    _names = [a.name for a in _node.names] if isinstance(_node, ast.Import) else (
        [_node.module] if isinstance(_node, ast.ImportFrom) and _node.module and not _node.level else [])
    for _name in _names:
        try:
            __import__(_name)
        except BaseException:
            pass
if cfg["drop_to"] is not None and os.geteuid() == 0:
    uid, gid = cfg["drop_to"]
    os.setgroups([]); os.setgid(gid); os.setuid(uid)
    isolation["user"] = f"uid {uid}"
with open(os.path.join(workdir, "isolation.json"), "w") as handle:
    json.dump(isolation, handle)
del libc, ctypes

def _inside(path):
    try:
        real = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else "/dev/fd")
    except Exception:
        return False
    return real == workdir or real.startswith(workdir + os.sep)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_NET = isolation["network"] != "netns"

def _guard(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (flags or 0) & _WRITE_FLAGS
        if writing and not isinstance(path, int) and not _inside(path):
            raise PermissionError(f"sandbox: writing outside the sandbox directory is not allowed: {path}")
    elif event in ("os.remove", "os.rmdir", "os.rename", "os.truncate", "shutil.rmtree", "os.chmod", "os.mkdir"):
        if args and not isinstance(args[0], int) and not _inside(args[0]):
            raise PermissionError(f"sandbox: {event} outside the sandbox directory is not allowed: {args[0]}")
    elif _NET and event == "socket.__new__" and len(args) > 1 and args[1] in (2, 10):
        raise PermissionError("sandbox: network access is not allowed")

sys.addaudithook(_guard)
sys.argv = [cfg["program"]]
sys.path.insert(0, workdir)
del ast, _tree
_source = open(cfg["program"]).read()
exec(compile(_source, cfg["program"], "exec"), {"__name__": "__main__", "__file__": cfg["program"]})
'''


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run. `cpu_seconds` defaults to the wall limit rounded up, plus one."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    max_processes: int = 16
    max_file_mb: int = 16
    max_open_files: int = 64
    cpu_seconds: int | None = None


@dataclass
class SandboxResult:
    status: str  # "passed" (exit 0), "failed" (non-zero exit or killed by a signal), "timeout"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    isolation: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _nobody() -> tuple[int, int] | None:
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return (65534, 65534)


def _tasks_of_uid(uid: int) -> int:
    """Processes and threads (RLIMIT_NPROC counts both) whose real user id is `uid`."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            count += int(fields.get("Threads", "1").strip() or 1)
    return count


@functools.lru_cache(maxsize=1)
def _runner_python() -> str:
    return sys.executable


def _live_members(pgid: int) -> int:
    """Members of process group `pgid` that are not zombies (zombies hold no resources and cannot be killed)."""
    alive = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state not in ("Z", "X"):
            alive += 1
    return alive


def _kill_group(proc: subprocess.Popen, deadline_s: float = 10.0) -> None:
    """SIGKILL the process group until no live member is left (members forked during a kill are caught next time)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        proc.poll()  # reap the leader
        if _live_members(proc.pid) == 0:
            return
        time.sleep(0.02)


def _read_head(path: Path, limit: int = 20_000) -> str:
    try:
        with open(path, "rb") as handle:
            return handle.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return ""


def run_python(source: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `source` as a Python program under `limits` (see the module docstring); never raises for what the
    program does."""
    workdir = Path(tempfile.mkdtemp(prefix="distillm-sandbox-")).resolve()
    drop_to = _nobody() if os.geteuid() == 0 else None
    target_uid = drop_to[0] if drop_to else os.getuid()
    mb = 1024 * 1024
    cpu = limits.cpu_seconds or int(limits.timeout_s) + 2
    rlimits = {
        "RLIMIT_AS": limits.memory_mb * mb,
        "RLIMIT_CPU": cpu,
        "RLIMIT_FSIZE": limits.max_file_mb * mb,
        "RLIMIT_NOFILE": limits.max_open_files,
        "RLIMIT_CORE": 0,
        "RLIMIT_NPROC": _tasks_of_uid(target_uid) + limits.max_processes,
    }
    program = workdir / "program.py"
    program.write_text(source, encoding="utf-8")
    (workdir / "runner.py").write_text(_RUNNER, encoding="utf-8")
    out_path, err_path = workdir / "stdout.txt", workdir / "stderr.txt"
    if drop_to:
        for path in (workdir, program, workdir / "runner.py"):
            os.chown(path, *drop_to)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8",
           "PYTHONHASHSEED": "0"}
    cfg = json.dumps({"limits": rlimits, "drop_to": drop_to, "program": str(program)})
    start = time.monotonic()
    status, returncode = "failed", None
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        if drop_to:
            os.chown(out_path, *drop_to)
            os.chown(err_path, *drop_to)
        proc = subprocess.Popen([_runner_python(), "-I", "-B", str(workdir / "runner.py"), cfg], cwd=workdir,
                                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True)
        try:
            returncode = proc.wait(timeout=limits.timeout_s)
            status = "passed" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
        finally:
            _kill_group(proc)  # on a timeout, and also any background children left after a normal exit
            if returncode is None:
                proc.wait()
    seconds = time.monotonic() - start
    try:
        isolation = json.loads((workdir / "isolation.json").read_text())
    except (OSError, ValueError):
        isolation = {}
    result = SandboxResult(status, returncode, _read_head(out_path), _read_head(err_path), seconds, isolation)
    shutil.rmtree(workdir, ignore_errors=True)
    return result
