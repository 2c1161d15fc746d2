"""Run untrusted Python (model-written code) in a contained child process.

A program **passes** only when it ran to its end: the runner executes it, and only after the whole program
(solution, tests, ``check(...)``) returned normally does it write a random token, chosen per run by the parent
and read by the runner before the program starts, to a pipe only the parent reads. ``exit()``,
``sys.exit(0)``, ``os._exit(0)``, a signal or a crash before that point is a failure whatever the exit status
(`SandboxResult.reason` says which). The program runs in a thread of its own; the token stays in the main
thread's frame, which Python code cannot reach while the audit hook refuses ``sys._current_frames``, ``gc``
object walks, ``ctypes`` and ``/proc/*/mem`` (Python-level only, see below).

What applies, layer by layer (`SandboxResult.isolation` records what was in force for each run):

- **Namespaces** (the strong mode, where the kernel allows unprivileged user namespaces, or as root): the
  runner unshares mount, pid, network, IPC and UTS namespaces (plus a user namespace when not root, mapping
  only its own uid). Pid 1 of the new pid namespace builds a new root -- a small tmpfs with read-only binds of
  /usr, /bin, /lib*, /etc and the interpreter's own directories, /dev/null, /dev/zero, /dev/full,
  /dev/(u)random, a fresh /proc, an empty read-only /tmp, and the sandbox directory, the only writable place --
  and pivots into it, so the host's /tmp, /run, home directories, Unix sockets and other files are not there
  at all. No network interface is up (loopback included). When pid 1 ends, the kernel kills every process left
  in the namespace, ``setsid()`` or not. Every capability is dropped before the program runs (``setuid`` to
  a uid of this run alone as root, see below; ``capset`` to nothing in a user namespace), with
  ``no_new_privs`` set.
- **Without namespaces** (`isolation["namespaces"]` says "unavailable (...)"): the runner is a child
  subreaper and kills every descendant, re-parented ones included, at the end; files, network and processes
  are then guarded only by the audit hook.
- **Audit hook** (always, Python-level): refuses starting processes (``os.system``, ``subprocess``,
  ``os.fork``, ``os.exec*``, ``os.posix_spawn``, ``pty``...), signalling other processes, socket
  ``connect``/``bind``/``sendto``/``sendmsg`` on AF_UNIX/AF_INET/AF_INET6, writing, deleting, renaming,
  linking or chmod-ing outside the sandbox directory (``open``, ``os.symlink``, ``os.link``,
  ``sqlite3.connect``...), and the introspection named above. A Python audit hook is **not a security
  boundary**: native code (crafted bytecode, a C extension, a bug in the interpreter) can bypass it; only the
  namespace layer holds against such code.
- **Resources** (setrlimit, set by the child before the program runs): address space (RLIMIT_AS), CPU seconds
  (RLIMIT_CPU), size of any file written (RLIMIT_FSIZE, which also bounds the captured stdout/stderr),
  open files, no core dumps, and processes (RLIMIT_NPROC: the user's current count plus `max_processes`).
  The wall-time limit is enforced by the runner (SIGKILL to pid 1 of the namespace, or to every descendant)
  and, with a few seconds of grace, by the parent (SIGKILL to the process group).
- **A uid per run** (as root): the program runs as a fresh, unused uid and gid (`isolation["uid"]`), drawn
  from the ids this user namespace maps above 100,000, and not as the shared ``nobody``. Its RLIMIT_NPROC
  therefore counts this run's processes only (runs of concurrent evaluations cannot exhaust each other's
  limit), and after the run the parent sweeps the uid: a helper that becomes that uid sends SIGKILL to every
  process it may signal (``kill(-1)``) until none but zombies is left, so nothing the program started survives
  it, whatever it did to its session, process group or parent. Where no such range is mapped it falls back to
  ``nobody`` (`isolation["uid"]` says so). Not as root, the program keeps the caller's uid (the sweep would
  reach the caller's own processes), and the pid namespace or the subreaper kill are what end its offspring.

This is containment for benchmark code written by a model that may be wrong; for code written by a determined
attacker, run evaluations inside a container or VM as well.
"""

from __future__ import annotations

import functools
import grp
import json
import math
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DistillmError

_RUNNER = r'''
import ctypes, json, os, platform, resource, signal, sys, time

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(platform.machine())
libc = ctypes.CDLL(None, use_errno=True)
cfg = json.loads(sys.argv[1])
WORK, ROOT = cfg["workdir"], cfg["rootdir"]
TOKEN_FD, RESULT_FD, STATUS_FD = cfg["token_fd"], cfg["result_fd"], cfg["status_fd"]


def report(**fields):  # to the parent, on a pipe the program cannot reach (closed in the program's process)
    os.write(STATUS_FD, (json.dumps(fields) + "\n").encode())


def check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else os.fsencode(s)
    check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def read_only(target, extra=0):
    """Remount a bind mount read-only, keeping the flags a user namespace may not drop (nosuid, nodev, ...)."""
    st = os.statvfs(target).f_flag
    keep = sum(ms for st_flag, ms in ((2, MS_NOSUID), (4, MS_NODEV), (8, MS_NOEXEC), (1024, MS_NOATIME),
                                      (2048, MS_NODIRATIME), (4096, MS_RELATIME)) if st & st_flag)
    mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | keep | extra)


def python_dirs():
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))]
    paths += [p if os.path.isdir(p) else os.path.dirname(p) for p in sys.path if p]
    return [os.path.realpath(p) for p in paths if p and os.path.isdir(p)]


def build_root():
    """A new root: a small tmpfs holding read-only binds of the system and Python directories, /dev/null & co,
    a fresh /proc, and the sandbox directory (the only writable place); then pivot into it."""
    if SYS_PIVOT_ROOT is None:
        raise OSError(f"pivot_root: unknown syscall number on {platform.machine()}")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", ROOT, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    bound = []
    for path in ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc"] + sorted(set(python_dirs()), key=len):
        if any(path == b or path.startswith(b.rstrip("/") + "/") for b in bound) or not os.path.lexists(path):
            continue
        target = ROOT + path
        if os.path.islink(path):  # e.g. /bin -> usr/bin
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.readlink(path), target)
        elif os.path.isdir(path):
            os.makedirs(target, exist_ok=True)
            mount(path, target, None, MS_BIND)
            read_only(target)
            bound.append(path)
    os.makedirs(ROOT + WORK, exist_ok=True)
    mount(WORK, ROOT + WORK, None, MS_BIND)
    mount(None, ROOT + WORK, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
    os.makedirs(ROOT + "/dev", exist_ok=True)
    for name in ("null", "zero", "full", "random", "urandom"):
        if os.path.exists("/dev/" + name):
            open(ROOT + "/dev/" + name, "w").close()
            mount("/dev/" + name, ROOT + "/dev/" + name, None, MS_BIND)
    os.makedirs(ROOT + "/tmp", mode=0o755, exist_ok=True)
    os.makedirs(ROOT + "/proc", exist_ok=True)
    proc = True
    try:
        mount("proc", ROOT + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
        proc = False  # e.g. a container whose /proc is partly masked; Python runs without one
    os.chdir(ROOT)
    check(libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
    check(libc.umount2(b".", 2), "umount old root")  # MNT_DETACH
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chdir(WORK)
    return "private root (read-only system and Python directories, writable sandbox directory only)" + (
        "" if proc else "; no /proc")


def enter_namespaces():
    """Unshare user (unless root), mount, pid, network, IPC and UTS namespaces; None where the kernel refuses."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    if os.geteuid() != 0:
        flags |= CLONE_NEWUSER
    if libc.unshare(flags) != 0:
        return f"unavailable ({os.strerror(ctypes.get_errno())})"
    if flags & CLONE_NEWUSER:  # the same uid and gid inside, no other ids
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")
    return None


def kill_descendants(deadline_s=30.0):
    """SIGKILL every child, and what is reparented to us as subreaper, until none is left (it returns as soon as
    none is; the deadline only bounds a machine so loaded that a fork bomb outpaces the /proc scans)."""
    me, end = os.getpid(), time.monotonic() + deadline_s
    while time.monotonic() < end:
        children = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = open(f"/proc/{entry}/stat").read()
                except OSError:
                    continue
                fields = stat.rsplit(")", 1)[1].split()
                if int(fields[1]) == me:
                    children.append(int(entry))
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        if not children:
            return
        time.sleep(0.01)


def encode_status(status):
    return {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"exit": os.waitstatus_to_exitcode(status)}


def outer():
    ns_error = enter_namespaces() if cfg["namespaces"] else "unavailable (turned off by the caller)"
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # after the uid map is written: it makes /proc/self root's
    isolation = {"namespaces": "user+mount+pid+net+ipc+uts" if os.geteuid() != 0 else "mount+pid+net+ipc+uts"}
    if ns_error:
        isolation = {"namespaces": ns_error, "network": "audit-hook", "files": "audit-hook",
                     "processes": "audit-hook; subreaper kill of every descendant"}
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    report(isolation=isolation)
    start = time.monotonic()
    child = os.fork()
    if child == 0:
        if ns_error:
            program()
        else:
            init()
        os._exit(70)
    timed_out, status = False, None
    while True:
        pid, st = os.waitpid(child, os.WNOHANG)
        if pid:
            status = st
            break
        if time.monotonic() - start > cfg["timeout_s"]:
            timed_out = True
            os.kill(child, signal.SIGKILL)  # in a pid namespace its init: the kernel kills every member with it
            os.waitpid(child, 0)
            break
        time.sleep(0.005)
    if ns_error:
        kill_descendants()
        if status is not None:
            report(program=encode_status(status))
    report(timeout=timed_out, seconds=time.monotonic() - start)
    os._exit(0)


def init():
    """Pid 1 of the new pid namespace: build the root, start the program, wait for it; when it returns the
    kernel kills whatever else is left in the namespace (setsid() or not)."""
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    try:
        files = build_root()
    except Exception as err:  # noqa: BLE001 - reported, and the audit hook still applies
        files = f"audit-hook (private root failed: {err})"
    report(isolation={"files": files, "network": "netns (no interface up)", "processes":
                      "pid namespace (every process dies with the run)"})
    child = os.fork()
    if child == 0:
        program()
        os._exit(70)
    while True:
        try:
            pid, st = os.wait()
        except ChildProcessError:
            os._exit(0)
        if pid == child:
            report(program=encode_status(st))
            os._exit(0)


def program():
    os.close(STATUS_FD)
    uid_before = os.geteuid()
    # Import the modules the program names before the limits and the drop (the interpreter's files may not be
    # readable by the unprivileged user), and what the runner needs later.
    import ast, threading, _thread, traceback
    try:
        import encodings.idna  # loaded lazily by socket name lookups
    except ImportError:
        pass
    source = open(cfg["program"], encoding="utf-8").read()
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        tree = None
    for node in ast.walk(tree) if tree is not None else ():
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        for name in names:
            try:
                __import__(name)
            except BaseException:
                pass
    for name, value in cfg["limits"].items():  # CPU: SIGXCPU at the soft limit, SIGKILL a second later
        resource.setrlimit(getattr(resource, name), (value, value + 1 if name == "RLIMIT_CPU" else value))
    token = os.read(TOKEN_FD, 256).decode().strip()
    os.close(TOKEN_FD)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if cfg["drop_to"] is not None and uid_before == 0:
        uid, gid = cfg["drop_to"]
        os.setgroups([]); os.setgid(gid); os.setuid(uid)  # drops every capability
    elif uid_before != 0:  # capabilities held in our own user namespace: drop them all (capset, version 3)
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)
        data = (ctypes.c_uint32 * 6)()
        libc.capset(header, data)
    if cfg["audit_hook"]:
        sys.addaudithook(make_guard(os.path.realpath(WORK)))
    # The program runs in a thread of its own: the token lives only in this (main) thread's frame, which the
    # program cannot walk to (sys._current_frames, gc and ctypes are refused by the audit hook).
    import types
    module = types.ModuleType("__main__")
    module.__file__ = cfg["program"]
    sys.modules["__main__"] = module
    sys.argv = [cfg["program"]]
    sys.path.insert(0, WORK)
    outcome, done = [], _thread.allocate_lock()
    done.acquire()
    def run(source=source, namespace=module.__dict__, outcome=outcome, done=done, write=os.write):
        try:
            write(RESULT_FD, b"started\n")
            exec(compile(source, cfg["program"], "exec"), namespace)  # a SyntaxError is the program's failure
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            outcome.append(err)
        finally:
            done.release()
    del source, tree
    threading.Thread(target=run, name="program", daemon=True).start()
    done.acquire()
    err = outcome[0] if outcome else RuntimeError("the program thread ended without a result")
    if err is None:
        os.write(RESULT_FD, ("completed " + token + "\n").encode())
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(0)
    del token
    if isinstance(err, SystemExit):
        code = err.code
        if code is None or isinstance(code, int):
            try:
                sys.stdout.flush()
            except BaseException:
                pass
            os._exit(code or 0)
        print(code, file=sys.stderr)
        os._exit(1)
    tb = err.__traceback__.tb_next if err.__traceback__ is not None else None  # not the runner's own frame
    traceback.print_exception(type(err), err, tb)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    os._exit(1)


def make_guard(workdir):
    def inside(path):
        try:
            real = os.path.realpath(os.fsdecode(path))
        except Exception:
            return False
        return real == workdir or real.startswith(workdir + os.sep)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    processes = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
                 "os.startfile", "pty.spawn", "os.killpg"}
    memory = {"sys._current_frames", "gc.get_objects", "gc.get_referrers", "gc.get_referents", "code.__new__",
              "sys.setprofile_all_threads", "sys.settrace_all_threads"}
    path_events = {"os.remove", "os.rmdir", "os.truncate", "shutil.rmtree", "os.chmod", "os.chown", "os.mkdir",
                   "os.utime", "os.chflags", "os.setxattr", "os.removexattr", "os.mkfifo", "os.mknod"}
    families = {1, 2, 10}  # AF_UNIX, AF_INET, AF_INET6
    me = os.getpid()

    def refuse(what):
        raise PermissionError(f"sandbox: {what} is not allowed")

    def guard(event, args):
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            text = os.fsdecode(path)
            if text.startswith("/proc/") and text.rstrip("/").rsplit("/", 1)[-1] == "mem":
                refuse(f"opening {text}")
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (flags or 0) & write_flags
            if writing and not inside(path):
                refuse(f"writing outside the sandbox directory ({text})")
        elif event in processes:
            refuse(f"starting processes ({event})")
        elif event in memory or event.startswith("ctypes."):
            refuse(event)
        elif event in path_events:
            if args and not isinstance(args[0], int) and not inside(args[0]):
                refuse(f"{event} outside the sandbox directory ({args[0]})")
        elif event in ("os.rename", "os.link"):
            if not (inside(args[0]) and inside(args[1])):
                refuse(f"{event} from or to outside the sandbox directory")
        elif event == "os.symlink":
            if not inside(args[1]):
                refuse(f"os.symlink outside the sandbox directory ({args[1]})")
        elif event == "sqlite3.connect":
            database = args[0]
            if not (isinstance(database, (str, bytes)) and os.fsdecode(database) in (":memory:", "")) \
                    and not inside(database):
                refuse(f"sqlite3.connect outside the sandbox directory ({database})")
        elif event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"):
            if getattr(args[0], "family", None) in families:
                refuse(f"network and Unix-socket access ({event})")
        elif event == "os.kill":
            if args[0] != me:
                refuse("signalling other processes (os.kill)")

    return guard


outer()
'''


class SandboxConfigError(DistillmError):
    """A sandbox limit outside its range; the message names the option."""


#: Allowed ranges of the limits: the runner and interpreter alone need about 30 MB of address space (measured:
#: 16 MB cannot start the program thread, 32 MB runs a small program), imports more.
TIMEOUT_RANGE_S = (0.1, 3600.0)
MEMORY_RANGE_MB = (128, 1024 * 1024)


def check_limits(timeout_s: float, memory_mb: int, *, timeout_name: str = "timeout_s",
                 memory_name: str = "memory_mb") -> None:
    """Raise SandboxConfigError naming the option when a limit would make every program fail."""
    low, high = TIMEOUT_RANGE_S
    if not isinstance(timeout_s, (int, float)) or not math.isfinite(timeout_s) or not low <= timeout_s <= high:
        raise SandboxConfigError(f"{timeout_name} {timeout_s!r}: the wall-time limit per program must be between "
                                 f"{low:g} and {high:g} seconds (e.g. 10).")
    low, high = MEMORY_RANGE_MB
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or not low <= memory_mb <= high:
        raise SandboxConfigError(f"{memory_name} {memory_mb!r}: the address-space limit per program must be an "
                                 f"integer between {low} and {high} MB (the interpreter alone needs about 30 MB, "
                                 "more with what the program imports; e.g. 1024).")


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run. `cpu_seconds` defaults to the wall limit rounded up, plus two."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    max_processes: int = 16
    max_file_mb: int = 16
    max_open_files: int = 64
    cpu_seconds: int | None = None

    def __post_init__(self):
        check_limits(self.timeout_s, self.memory_mb)
        for name, low in (("max_processes", 1), ("max_file_mb", 1), ("max_open_files", 16)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SandboxConfigError(f"SandboxLimits.{name} {value!r}: must be an integer >= {low}.")
        if self.cpu_seconds is not None and (not isinstance(self.cpu_seconds, int) or self.cpu_seconds < 1):
            raise SandboxConfigError(f"SandboxLimits.cpu_seconds {self.cpu_seconds!r}: must be an integer >= 1.")


#: Failure reasons that come from the sandbox's limits rather than from the program's answer being wrong.
SANDBOX_REASONS = frozenset({"timeout", "memory", "cpu-limit", "file-size-limit", "killed", "sandbox"})


@dataclass
class SandboxResult:
    status: str  # "passed" (ran to its end), "failed", "timeout"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    isolation: dict = field(default_factory=dict)
    #: None when passed; else "error" (an exception, e.g. a failed assert, or a non-zero exit), "exited-early"
    #: (exit status 0 before the end: exit(), sys.exit(0), os._exit(0)), "timeout", "memory" (MemoryError),
    #: "cpu-limit" (SIGXCPU), "file-size-limit" (a write past RLIMIT_FSIZE), "killed" (another signal),
    #: "sandbox" (the program never started: the sandbox could not start Python under these limits; see stderr).
    reason: str | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _nobody() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return (65534, 65534)


def _tasks_of_uid(uid: int, *, live_only: bool = False) -> int:
    """Processes and threads (RLIMIT_NPROC counts both) whose real user id is `uid`; with `live_only`, the
    processes that are not zombies (a zombie holds no resources and cannot be killed, only reaped)."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1").split()[0]) != uid:
            continue
        if live_only:
            count += fields.get("State", "").strip()[:1] not in ("Z", "X")
        else:
            count += int(fields.get("Threads", "1").strip() or 1)
    return count


def _mapped_ranges(path: str) -> list[tuple[int, int]]:
    """[start, end) of the ids that /proc/self/{uid,gid}_map maps in this user namespace."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            ranges.append((int(parts[0]), int(parts[0]) + int(parts[2])))
    return ranges


#: per-run ids are drawn from [_RUN_ID_LOW, _RUN_ID_HIGH): above any ordinary user or group, below 2**31
_RUN_ID_LOW, _RUN_ID_HIGH = 100_000, 2**31 - 1


def _run_ids() -> tuple[int, int, bool, str]:
    """A uid and gid (the same number) that nothing else uses, for one sandbox run as root, whether they are
    the run's own, and how they were chosen; ``nobody`` where this namespace maps no ids above 100,000 or none is found free."""
    def usable(path):
        return [(max(a, _RUN_ID_LOW), min(b, _RUN_ID_HIGH)) for a, b in _mapped_ranges(path)
                if min(b, _RUN_ID_HIGH) - max(a, _RUN_ID_LOW) >= 1024]
    uids, gids = usable("/proc/self/uid_map"), usable("/proc/self/gid_map")
    both = [(max(a, c), min(b, d)) for a, b in uids for c, d in gids if min(b, d) - max(a, c) >= 1024]
    for _ in range(16) if both else ():
        low, high = both[secrets.randbelow(len(both))]
        candidate = low + secrets.randbelow(high - low)
        try:
            pwd.getpwuid(candidate)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(candidate)
            continue
        except KeyError:
            pass
        if _tasks_of_uid(candidate) == 0:
            return candidate, candidate, True, f"{candidate} (this run's own)"
    uid, gid = _nobody()
    return uid, gid, False, f"{uid} (nobody: no free id above {_RUN_ID_LOW} is mapped here)"


_SWEEP = r'''
import os, signal, sys, time
uid, end = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])

def live():
    alive = 0
    for name in os.listdir("/proc"):
        if name.isdigit() and name != str(os.getpid()):
            try:
                status = open(f"/proc/{name}/status").read()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if int(fields.get("Uid", "-1").split()[0]) == uid and fields.get("State", "").strip()[:1] not in "ZX":
                alive += 1
    return alive

while time.monotonic() < end:
    try:
        os.kill(-1, signal.SIGKILL)  # every process this uid may signal: the run's, and nothing else
    except ProcessLookupError:
        sys.exit(0)
    if live() == 0:
        sys.exit(0)
    time.sleep(0.005)
sys.exit(1)
'''


def _sweep_uid(uid: int, gid: int, deadline_s: float = 30.0) -> int:
    """SIGKILL every process of the run's own `uid` (see the module docstring); the live ones left."""
    try:
        subprocess.run([_runner_python(), "-I", "-S", "-c", _SWEEP, str(uid), str(deadline_s)], user=uid,
                       group=gid, extra_groups=[], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, cwd="/", env={"PATH": "/usr/bin:/bin"},
                       timeout=deadline_s + 10)
    except (OSError, subprocess.SubprocessError):
        pass
    return _tasks_of_uid(uid, live_only=True)


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


def _drain(fd: int, limit: int = 1 << 20) -> bytes:
    """What is in a pipe now (non-blocking: a writer the runner failed to kill cannot hang the parent)."""
    os.set_blocking(fd, False)
    chunks, total = [], 0
    try:
        while total < limit:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    return b"".join(chunks)


def _reason(completed: bool, started: bool, timed_out: bool, program: dict | None, stderr: str) -> str | None:
    if timed_out:
        return "timeout"
    if completed:
        return None
    if not started:
        return "sandbox"
    if program and "signal" in program:
        return {signal.SIGXCPU: "cpu-limit", signal.SIGXFSZ: "file-size-limit"}.get(program["signal"], "killed")
    last = next((line for line in reversed(stderr.strip().splitlines()) if line.strip()), "")
    if last.startswith("MemoryError") or "can't start new thread" in last:
        return "memory"
    if "File too large" in last:  # Python ignores SIGXFSZ: a write past RLIMIT_FSIZE raises OSError(EFBIG)
        return "file-size-limit"
    if program and program.get("exit") == 0:
        return "exited-early"
    return "error"


def run_python(source: str, limits: SandboxLimits = SandboxLimits(), *, audit_hook: bool = True,
               namespaces: bool = True) -> SandboxResult:
    """Run `source` as a Python program under `limits` (see the module docstring); never raises for what the
    program does. `audit_hook=False` leaves the Python-level guard out and `namespaces=False` the namespace
    layer (both only for testing each layer on its own)."""
    base = Path(tempfile.mkdtemp(prefix="distillm-sandbox-")).resolve()
    workdir, rootdir = base / "work", base / "root"
    workdir.mkdir()
    rootdir.mkdir()
    run_uid = _run_ids() if os.geteuid() == 0 else None
    drop_to = run_uid[:2] if run_uid else None
    target_uid = drop_to[0] if drop_to else os.getuid()
    mb = 1024 * 1024
    cpu = limits.cpu_seconds or int(math.ceil(limits.timeout_s)) + 2
    rlimits = {
        "RLIMIT_AS": limits.memory_mb * mb,
        "RLIMIT_CPU": cpu,
        "RLIMIT_FSIZE": limits.max_file_mb * mb,
        "RLIMIT_NOFILE": limits.max_open_files,
        "RLIMIT_CORE": 0,
        "RLIMIT_NPROC": _tasks_of_uid(target_uid) + limits.max_processes + 1,  # + the runner's thread
    }
    program = workdir / "program.py"
    program.write_text(source, encoding="utf-8")
    (base / "runner.py").write_text(_RUNNER, encoding="utf-8")
    out_path, err_path = base / "stdout.txt", base / "stderr.txt"
    if drop_to:
        for path in (workdir, program):
            os.chown(path, *drop_to)
    token = secrets.token_hex(16)
    token_r, token_w = os.pipe()
    result_r, result_w = os.pipe()
    status_r, status_w = os.pipe()
    os.write(token_w, token.encode())
    os.close(token_w)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8",
           "PYTHONHASHSEED": "0"}
    cfg = json.dumps({"limits": rlimits, "drop_to": drop_to, "program": str(program), "workdir": str(workdir),
                      "rootdir": str(rootdir), "timeout_s": limits.timeout_s, "audit_hook": audit_hook,
                      "namespaces": namespaces,
                      "token_fd": token_r, "result_fd": result_w, "status_fd": status_w})
    start = time.monotonic()
    parent_timeout = False
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([_runner_python(), "-I", "-B", str(base / "runner.py"), cfg], cwd=workdir,
                                    env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, pass_fds=(token_r, result_w, status_w))
            for fd in (token_r, result_w, status_w):
                os.close(fd)
            try:
                proc.wait(timeout=limits.timeout_s + 5.0)  # the runner enforces timeout_s; this is the backstop
            except subprocess.TimeoutExpired:
                parent_timeout = True
            finally:
                _kill_group(proc)  # and anything left in its process group
                proc.wait()
                left = _sweep_uid(*drop_to) if run_uid and run_uid[2] else None
        seconds = time.monotonic() - start
        status_lines = _drain(status_r).decode("utf-8", errors="replace").splitlines()
        result_lines = _drain(result_r).decode("utf-8", errors="replace").splitlines()
        isolation: dict = {}
        program_status, timed_out = None, parent_timeout
        for line in status_lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            isolation.update(message.get("isolation", {}))
            program_status = message.get("program", program_status)
            timed_out = timed_out or bool(message.get("timeout"))
        isolation["uid"] = run_uid[3] if run_uid else f"{os.getuid()} (the caller's)"
        if left:
            isolation["survivors"] = f"{left} process(es) of uid {drop_to[0]} outlived the sweep"
        stdout, stderr = _read_head(out_path), _read_head(err_path)
        started = "started" in result_lines
        completed = f"completed {token}" in result_lines
        reason = _reason(completed, started, timed_out, program_status, stderr)
        status = "passed" if reason is None else ("timeout" if reason == "timeout" else "failed")
        returncode = None if program_status is None else (
            program_status["exit"] if "exit" in program_status else -program_status["signal"])
        return SandboxResult(status, returncode, stdout, stderr, seconds, isolation, reason)
    finally:
        for fd in (result_r, status_r):
            try:
                os.close(fd)
            except OSError:
                pass
        _remove_tree(base)


def _remove_tree(base: Path) -> None:
    # a mount point left behind only if the runner died mid-setup; the mount namespace died with it
    shutil.rmtree(base, ignore_errors=True)
