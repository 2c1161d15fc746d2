"""The run directory: its layout (`RunPaths`), and taking it for a run or continuing the run it holds
(`prepare_run_dir`, `config_changes`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
import yaml

from .. import rundir
from ..config import AlignConfig, RunConfig, upgrade_keys
from ..io import atomic_write_text
from ..rundir import RunDirError

logger = logging.getLogger("distillm")


@dataclass
class RunPaths:
    root: Path

    def __post_init__(self):
        self.root = Path(self.root)

    config = property(lambda self: self.root / "config.yaml")
    teacher_train = property(lambda self: self.root / "data" / "teacher_train.jsonl")
    teacher_eval = property(lambda self: self.root / "data" / "teacher_eval.jsonl")
    checkpoints = property(lambda self: self.root / "checkpoints")
    train_log = property(lambda self: self.root / "logs" / "train_log.jsonl")
    student = property(lambda self: self.root / "student")
    training_summary = property(lambda self: self.root / "logs" / "training.json")
    metrics = property(lambda self: self.root / "metrics.json")

    def round_dir(self, k: int) -> Path:
        return self.root / "rounds" / f"round_{k}"

    def eval_samples(self, tag: str, sample: int = 0) -> Path:
        """The student's held-out samples at `tag` (before / after); `sample` > 0: the further sets of
        --eval-samples."""
        return self.root / "eval" / (f"{tag}_samples.jsonl" if sample == 0 else f"{tag}_samples_{sample}.jsonl")

    def teacher_eval_sample(self, sample: int) -> Path:
        """The teacher's held-out responses: set 0 is `teacher_eval`, the others the further sets of
        --eval-samples."""
        return self.teacher_eval if sample == 0 else self.root / "data" / f"teacher_eval_{sample}.jsonl"


def prepare_run_dir(config, *, overwrite: bool = False, lock: bool = True, kind: str = "run") -> RunPaths:
    """Create the run directory, or continue the run it holds if its config is the same one.

    A directory holding a run with a different config is refused unless `overwrite`, which empties it -- only a
    directory carrying distillm's run marker (see `distillm.rundir`); the CLI's --resume continues such a run by
    passing the config stored in it. With `lock` this process takes the directory's exclusive lock first (held
    until `rundir.unlock` or the process ends). Every refusal comes before anything in the directory is touched.
    """
    paths = RunPaths(config.output_dir)
    root = paths.root
    text = config.to_yaml()
    rundir.check_usable(root)
    exists = root.is_dir()
    marked = exists and rundir.is_marked(root)
    legacy = exists and not marked and paths.config.is_file()  # a run made before the marker (or a stranger)
    if exists and not marked and not legacy and rundir.contents(root):
        # never wiped, even with --overwrite: it may be anything (a home directory, a dataset)
        raise RunDirError(f"{root} is not empty and holds no distillm run (no {rundir.MARKER} marker): choose "
                          "another --output-dir.")
    if overwrite and exists and rundir.contents(root):
        if legacy:
            raise RunDirError(f"--overwrite: {root} has a config.yaml but no distillm run marker ({rundir.MARKER}): "
                              "it is not a distillm run, or one made by an older version. distillm does not delete "
                              "it: choose another --output-dir, or delete it yourself if it is an old run you no "
                              "longer need.")
        why = rundir.protected(root)
        if why:
            raise RunDirError(f"--overwrite: distillm does not delete {root}: {why}. Use a subdirectory as "
                              "--output-dir.")
    if legacy and config_changes(paths.config, text):
        raise RunDirError(
            f"{root} has a config.yaml that is not this run's (differs in: "
            f"{', '.join(config_changes(paths.config, text))}) and no distillm run marker ({rundir.MARKER}): it is "
            "not a distillm run, or one made by an older version with other settings. distillm neither continues "
            "nor deletes it: choose another --output-dir (or pass --resume to continue an older run with its own "
            "config).")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"Cannot create the output directory {root} ({err.strerror}): choose a writable "
                          "--output-dir.") from err
    if lock:
        rundir.lock(root)
    try:
        if overwrite and rundir.contents(root):
            rundir.remove_run(root)
        if paths.config.is_file():
            # output_dir itself may differ: a run directory can be moved or copied and continued
            changed = config_changes(paths.config, text)
            produced = [p for p in rundir.contents(root) if p.name != paths.config.name]
            if changed and produced:
                raise RunDirError(
                    f"{root} already holds a run with a different config (differs in: {', '.join(changed)}). "
                    "Pass --resume to continue that run with its own config, --overwrite to replace it, or choose "
                    "another --output-dir."
                )
            if produced:
                logger.info("Continuing the run in %s", root)
        rundir.write_marker(root, kind)
        atomic_write_text(paths.config, text)
    except BaseException:
        if lock:
            rundir.unlock(root)
        raise
    return paths


def config_changes(saved: Path, text: str) -> list[str]:
    """The dotted keys in which the run config saved at `saved` differs from the YAML `text` (output_dir aside: a
    run directory can be moved or copied and continued); [] when they agree."""
    try:
        loaded = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        loaded = None
    if not isinstance(loaded, dict):
        return ["config.yaml (not a distillm config)"]
    loaded, _ = upgrade_keys(loaded, RunConfig if "method" in loaded else AlignConfig)  # earlier option names
    previous = without_connection({**loaded, "output_dir": None})
    current = without_connection({**yaml.safe_load(text), "output_dir": None})
    return sorted(_diff_keys(previous, current)) if previous != current else []


#: how the teacher server is reached: a run may continue with another URL, key, timeout or concurrency (its
#: results depend on the server's model and --teacher-top-k only)
CONNECTION_OPTIONS = ("teacher_url", "teacher_api_key_env", "teacher_timeout", "teacher_concurrency",
                      "teacher_max_wait", "teacher_insecure")


def without_connection(config: dict) -> dict:
    """A saved config without the options that only say how the teacher server is reached."""
    if isinstance(config.get("training"), dict):
        config["training"] = {k: v for k, v in config["training"].items() if k not in CONNECTION_OPTIONS}
    return {k: v for k, v in config.items() if k not in CONNECTION_OPTIONS}


def _diff_keys(a: dict, b: dict, prefix: str = "") -> set[str]:
    out = set()
    for key in set(a) | set(b):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out |= _diff_keys(va, vb, f"{key}.")
        elif va != vb:
            out.add(prefix + key)
    return out
