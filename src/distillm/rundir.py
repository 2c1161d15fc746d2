"""The run directory's safety: its marker, its lock and the fingerprint of its inputs.

* Marker. Every run directory distillm creates holds ``.distillm-run`` (written before anything else).
  ``--overwrite`` removes only a directory that carries it, and never the current directory, an ancestor of it, the
  home directory or the file system root. A directory made by an older version (a ``config.yaml``, no marker) is
  continued when its config is the same one, and otherwise refused, never removed.
* Lock. A process working in a run directory holds an exclusive ``fcntl.flock`` on ``.distillm-run.lock`` in it
  (the kernel releases it when the process ends, SIGKILL included), so a second command on the same directory
  stops with a clear message instead of racing the first. In a multi-process run only the main process locks.
* Inputs. ``inputs.json`` records a SHA-256 of what the run was started from: the prompt files' bytes, the
  training and held-out prompts as encoded (ids, token ids, reference responses, images) and the
  teacher-responses file. A rerun whose inputs differ is refused (naming what changed) instead of silently reusing
  outputs made from the old inputs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from .errors import DistillmError
from .io import atomic_write_json

logger = logging.getLogger("distillm")

MARKER = ".distillm-run"
LOCK = ".distillm-run.lock"
INPUTS = "inputs.json"
#: files of distillm's own bookkeeping: a directory holding only these holds nothing yet
BOOKKEEPING = frozenset({MARKER, LOCK})

#: resolved run directory -> the open lock file this process holds on it
_held: dict[Path, int] = {}


class RunDirError(DistillmError):
    """The output directory holds another run, or cannot be used."""


# ----------------------------------------------------------------------------------------------- marker and safety


def is_marked(root: Path) -> bool:
    return (Path(root) / MARKER).is_file()


def contents(root: Path) -> list[Path]:
    """What the directory holds besides distillm's bookkeeping (marker and lock)."""
    return [p for p in Path(root).iterdir() if p.name not in BOOKKEEPING]


def check_usable(root: Path, option: str = "--output-dir") -> None:
    """Refuse an output directory that is a file, or whose parent is a file."""
    root = Path(root)
    for folder in (root, *root.parents):
        if folder.exists() and not folder.is_dir():
            raise RunDirError(f"{option} {root}: {folder} is a file, not a directory; choose another {option}.")
        if folder.exists():
            break


def protected(root: Path) -> str | None:
    """Why `root` may never be removed (the current directory or an ancestor of it, the home directory, the file
    system root), or None."""
    resolved = Path(root).resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        return "it is the current directory or contains it"
    if resolved == Path.home().resolve():
        return "it is the home directory"
    if resolved == Path(resolved.anchor):
        return "it is the file system root"
    return None


def remove_run(root: Path) -> None:
    """Remove a marked run directory's contents for --overwrite (the marker and the held lock file stay)."""
    root = Path(root)
    why = protected(root)
    if why:
        raise RunDirError(f"--overwrite: distillm does not delete {root}: {why}. Use a subdirectory as --output-dir.")
    if not is_marked(root):
        raise RunDirError(f"--overwrite: {root} has no distillm run marker ({MARKER}), so distillm does not delete "
                          "it. Choose another --output-dir, or delete it yourself if it is an old run you no longer "
                          "need.")
    for path in contents(root):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def write_marker(root: Path, kind: str) -> None:
    if not is_marked(root):
        atomic_write_json(Path(root) / MARKER, {"distillm": kind})


# ----------------------------------------------------------------------------------------------- lock


def lock(root: Path) -> None:
    """Take this process's exclusive lock on the run directory `root` (kept until `unlock` or the process ends;
    taking it again in the same process is a no-op)."""
    key = Path(root).resolve()
    if key in _held:
        return
    path = key / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RunDirError(f"Cannot create the lock file {path} ({err.strerror}): the output directory must be "
                          "writable; choose another --output-dir.") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = ""
        try:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        except OSError:
            pass
        os.close(fd)
        raise RunDirError(f"{root} is in use by another distillm process{f' (pid {holder})' if holder else ''}: "
                          "wait for it to finish (rerunning the same command afterwards continues or reuses its "
                          "work), or choose another --output-dir.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = fd


def unlock(root: Path) -> None:
    fd = _held.pop(Path(root).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


# ----------------------------------------------------------------------------------------------- inputs


def digest_path(spec: str | None) -> str | None:
    """SHA-256 of a file's bytes, or of a directory's files (names and bytes); the spec itself for built-in
    prompts; None when there is nothing to read (the loader reports that)."""
    if spec is None or spec == "builtin" or str(spec).startswith("builtin:"):
        return f"builtin:{spec}" if spec else None
    path = Path(spec)
    if not path.exists():
        base, _, split = str(spec).rpartition(":")
        if base and split and Path(base).is_dir():  # DIR:split, a saved dataset's split
            path = Path(base)
        else:
            return None
    sha = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        sha.update(str(file.relative_to(path) if file != path else "").encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
    return sha.hexdigest()


def encoded_digest(prompts) -> str:
    """SHA-256 of a prompt set as the model sees it: ids, token ids, reference responses and images."""
    sha = hashlib.sha256()
    for p in prompts:
        image = getattr(p, "image", None)
        row = [p.id, list(p.input_ids), p.response, digest_path(image) if isinstance(image, str) else None]
        sha.update(json.dumps(row).encode() + b"\n")
    return sha.hexdigest()


def file_digests(config) -> dict:
    """Digests of the input files named by a run config (cheap: no model or tokenizer needed)."""
    d = config.data
    return {"prompts": digest_path(d.prompts), "eval_prompts": digest_path(d.eval_prompts),
            "teacher_responses": digest_path(d.teacher_responses)}


_WHAT = {"prompts": "training prompt file (data.prompts = {})", "eval_prompts": "held-out prompt file "
         "(data.eval_prompts = {})", "teacher_responses": "teacher-responses file (data.teacher_responses = {})",
         "train_encoded": "training prompts as encoded (data.prompts = {})",
         "eval_encoded": "held-out prompts as encoded (data.eval_prompts = {})",
         "preferences": "preference file (data.preferences = {})"}
_SOURCE = {"prompts": "prompts", "eval_prompts": "eval_prompts", "teacher_responses": "teacher_responses",
           "train_encoded": "prompts", "eval_encoded": "eval_prompts", "preferences": "preferences"}


def stored_inputs(root: Path) -> dict | None:
    path = Path(root) / INPUTS
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # damaged: recorded again from the current inputs


def check_inputs(root: Path, config, current: dict, *, keys) -> None:
    """Refuse when an input in `keys` differs from the one recorded in `root`/inputs.json."""
    stored = stored_inputs(root)
    if stored is None:
        return
    changed = [key for key in keys if key in stored and key in current and stored[key] != current[key]]
    if changed:
        d = config.data
        what = "; ".join(_WHAT[key].format(getattr(d, _SOURCE[key])) for key in changed)
        raise RunDirError(
            f"{root} holds a run started from other inputs: the {what} changed since (recorded in "
            f"{Path(root) / INPUTS}). Its outputs were made from the old contents and would be reused. Restore the "
            "file to continue that run, pass --overwrite to start it again from the new contents, or choose another "
            "--output-dir.")


def inputs_match_files(root: Path, config) -> bool:
    """Whether the input files are byte-for-byte the ones recorded (a finished run may then be reused as is)."""
    stored = stored_inputs(root)
    current = file_digests(config)
    return stored is not None and all(stored.get(key) == value for key, value in current.items())


def record_inputs(root: Path, current: dict) -> None:
    stored = stored_inputs(root) or {}
    if {**stored, **current} != stored:
        atomic_write_json(Path(root) / INPUTS, {**stored, **current})
