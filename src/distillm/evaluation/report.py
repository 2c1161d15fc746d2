"""The human-readable side of `distillm eval`: a Markdown report with a models x metrics table, bar charts of each
metric (metrics.png) and the training curves of the runs given (training_curves.png), drawn with matplotlib."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from ..io import atomic_write_text, read_jsonl

#: key -> (label, which direction is better); metrics not listed are shown with their key.
METRICS = {
    "win_rate": ("judge win rate", "higher"),
    "math_accuracy": ("math accuracy (exact match)", "higher"),
    "code_pass@1": ("code pass@1", "higher"),
    "code_pass@10": ("code pass@10", "higher"),
    "rouge_l": ("ROUGE-L F1", "higher"),
    "distinct_2": ("distinct-2 (teacher's = target)", ""),
    "perplexity": ("perplexity on references", "lower"),
    "kl": ("KL(teacher ‖ model), nats/token", "lower"),
    "tvd": ("TVD to the teacher", "lower"),
    "acceptance_rate": ("acceptance rate (1 - TVD)", "higher"),
}
HIDDEN = {"nll"}  # kept in results.json, left out of the table (perplexity says the same)
CURVE_ORDER = ["loss", "skl", "srkl", "skew_t", "skew_s", "b", "learning_rate", "grad_norm"]


def metric_keys(results: dict) -> list[str]:
    present = {k for entry in results["models"].values() for k in entry["metrics"] if k not in HIDDEN}
    return [k for k in METRICS if k in present] + sorted(present - set(METRICS))


def _fmt(value) -> str:
    if value is None:
        return "—"
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"


def markdown_table(results: dict) -> str:
    keys = metric_keys(results)
    arrows = {"higher": " ↑", "lower": " ↓"}
    header = "| model | " + " | ".join(METRICS.get(k, (k, ""))[0] + arrows.get(METRICS.get(k, (k, ""))[1], "")
                                       for k in keys) + " |"
    lines = [header, "| --- |" + " ---: |" * len(keys)]
    for name, entry in results["models"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(entry["metrics"].get(k)) for k in keys) + " |")
    return "\n".join(lines)


def read_train_log(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Every numeric key of a train log (JSONL of Trainer log entries) as (step, value) series."""
    series: dict[str, list[tuple[float, float]]] = {}
    for index, row in enumerate(read_jsonl(path), start=1):
        step = float(row.get("step", index))
        for key, value in row.items():
            if key in ("step", "epoch"):
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(number):
                series.setdefault(key, []).append((step, number))
    return series


def save_figure(fig, path: Path, *, dpi: int = 110) -> None:
    """Write a matplotlib figure atomically (a unique temporary file, then rename)."""
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)  # a unique name: two processes writing the same figure do not share a temporary file
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _plot_metrics(results: dict, path: Path) -> bool:
    import matplotlib  # optional: matplotlib, heavy, only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: matplotlib, heavy, only when a figure is drawn

    keys = metric_keys(results)
    if not keys:
        return False
    names = list(results["models"])
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes.flat, keys):
        values = [results["models"][n]["metrics"].get(key) for n in names]
        shown = [(n, v) for n, v in zip(names, values) if v is not None]
        bars = ax.bar([n for n, _ in shown], [v for _, v in shown],
                      color=[colors[names.index(n) % len(colors)] for n, _ in shown])
        ax.bar_label(bars, labels=[_fmt(v) for _, v in shown], fontsize=7)
        label, better = METRICS.get(key, (key, ""))
        ax.set_title(f"{label}" + (f"\n({better} is better)" if better else ""), fontsize=9)
        if key == "perplexity" and shown and max(v for _, v in shown) / max(min(v for _, v in shown), 1e-9) > 50:
            ax.set_yscale("log")
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


def _plot_curves(logs: dict[str, dict], path: Path) -> list[str]:
    import matplotlib  # optional: matplotlib, heavy, only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: matplotlib, heavy, only when a figure is drawn

    keys = sorted({k for series in logs.values() for k in series},
                  key=lambda k: (CURVE_ORDER.index(k) if k in CURVE_ORDER else len(CURVE_ORDER), k))
    if not keys:
        return []
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, series in logs.items():
            if key in series:
                steps, values = zip(*series[key])
                ax.plot(steps, values, label=name, linewidth=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        if len(logs) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return keys


def write_report(results: dict, out_dir: str | Path) -> Path:
    """report.md (+ metrics.png, training_curves.png) in `out_dir`; returns the report's path."""
    out = Path(out_dir)
    s = results["settings"]
    lines = ["# distillm evaluation", ""]
    if results.get("command"):
        lines += ["```bash", results["command"], "```", ""]
    lines += [f"Models: {', '.join(results['models'])}. Tasks: {', '.join(s['tasks'])}. "
              f"Same prompts ({s['prompts']}), sampling (temperature {s['temperature']}, top-p {s['top_p']}, "
              f"up to {s['max_new_tokens']} new tokens) and seed ({s['seed']}) for every model.", ""]
    lines += [markdown_table(results), "", "↑ higher is better, ↓ lower is better; — not measured (see the notes).", ""]
    if _plot_metrics(results, out / "metrics.png"):
        lines += ["![metrics](metrics.png)", ""]
    notes = []
    if results.get("teacher"):
        notes.append(f"Divergences are measured on the teacher's (`{results['teacher']}`) responses to the prompts.")
    notes.append(f"ROUGE-L and perplexity references: {results['reference_source']}"
                 + (" (so the teacher has none of its own)." if results["reference_source"] == "teacher" else "."))
    for name, entry in results["models"].items():
        math_d, code_d, judge_d = (entry["details"].get(k) for k in ("math", "code", "judge"))
        if math_d:
            notes.append(f"`{name}` math: {math_d['correct']}/{math_d['total']} correct "
                         f"({math_d['no_answer']} without any answer).")
        if code_d:
            passes = ", ".join(f"{k} {v:.3f}" for k, v in code_d.items() if k.startswith("pass@"))
            notes.append(f"`{name}` code: {passes} on {code_d['problems']} problems "
                         f"(sandbox isolation: {code_d.get('isolation')}).")
            if code_d.get("warning"):
                notes.append(f"`{name}` code: **{code_d['warning']}**")
        if judge_d:
            notes.append(f"`{name}` judge: win rate {judge_d['win_rate']:.3f} "
                         f"[{judge_d['ci_low']:.3f}, {judge_d['ci_high']:.3f}] ({judge_d['ci']}); "
                         f"{judge_d['wins']} wins, {judge_d['ties']} ties, {judge_d['losses']} losses in "
                         f"{judge_d['comparisons']} comparisons, {judge_d['unparsed']} unparsed verdicts.")
    if results.get("judge"):
        notes.append(f"Judge: {results['judge']['judge']}; reference answers: {results['judge']['reference']}.")
    lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    logs = {name: read_train_log(entry["train_log"]) for name, entry in results["models"].items()
            if entry.get("train_log") and Path(entry["train_log"]).is_file()}
    if logs and _plot_curves(logs, out / "training_curves.png"):
        lines += ["## Training curves", "", "From " + ", ".join(f"`{results['models'][n]['train_log']}`" for n in logs)
                  + " (every numeric key of the logs).", "", "![training curves](training_curves.png)", ""]
    lines += [f"Wall time: {results.get('wall_seconds')} s. Every figure, setting and seed: `results.json`.", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
