"""The comparison's results: means and standard deviations over seeds, results.md tables, results.json and the
charts (see `distillm.compare`)."""

from __future__ import annotations

import dataclasses
import logging
import statistics
from pathlib import Path

from ..config import METHOD_NAMES
from ..evaluation.degeneracy import degenerate, rank
from ..evaluation.report import save_figure
from ..io import atomic_write_json, atomic_write_text
from .protocol import ABLATION_ROWS, ABLATIONS, CHARTED, CompareSettings, HEADLINE, METRICS

logger = logging.getLogger("distillm")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    mean = sum(values) / len(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def checked(metrics: dict, teacher: dict) -> dict:
    """`metrics` plus the distance of its distinct-2 to the teacher's and the degenerate flag
    (evaluation.degeneracy: relative to the teacher's figures on the same prompts)."""
    verdict = degenerate(metrics, teacher)
    out = dict(metrics)
    if verdict.distinct_2_gap is not None:
        out["distinct_2_gap"] = verdict.distinct_2_gap
    return out | {"degenerate": verdict.flagged, "degenerate_reasons": list(verdict.reasons)}


def summarise(cells: list[dict], reference: dict, settings: CompareSettings, *,
              preferences: dict[str, dict] | None = None) -> dict:
    teacher = reference["teacher"]
    reference = {**reference, "teacher": checked(teacher, teacher), "initial": checked(reference["initial"], teacher)}
    flagged_cells = []
    for cell in cells:
        metrics = checked(cell["metrics"], teacher)
        flagged_cells.append({**cell, "degenerate": metrics.pop("degenerate"),
                              "degenerate_reasons": metrics.pop("degenerate_reasons"), "metrics": metrics})
    cells = flagged_cells
    by_variant: dict[str, list[dict]] = {}
    for cell in cells:
        by_variant.setdefault(cell["variant"], []).append(cell)
    keys = [k for k in METRICS if any(k in c["metrics"] for c in cells) or k in reference["teacher"]]
    rows = {}
    for variant, group in by_variant.items():
        entry = {"seeds": [c["seed"] for c in group], "metrics": {},
                 # flagged if any seed is: that seed's collapse pulls the variant's mean teacher NLL down
                 "degenerate_seeds": [c["seed"] for c in group if c["degenerate"]],
                 "degenerate_reasons": {str(c["seed"]): c["degenerate_reasons"] for c in group if c["degenerate"]},
                 "preference": (preferences or {}).get(variant)}
        for key in keys:
            values = [c["metrics"][key] for c in group if c["metrics"].get(key) is not None]
            if values:
                entry["metrics"][key] = mean_std(values)
        for key in ("steps", "student_tokens", "teacher_tokens", "wall_seconds"):
            entry[key] = mean_std([float(c[key]) for c in group])
        rows[variant] = entry
    return {"settings": dataclasses.asdict(settings), "sizes": settings.sizes, "metric_keys": keys,
            "reference": reference, "variants": rows, "cells": cells}


def _fmt(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"


def _ms(pair) -> str:
    if pair is None:
        return "—"
    mean, std = pair
    return f"{_fmt(mean)} ± {_fmt(std)}"


def _preference(value: dict | None) -> str:
    return "—" if value is None else f"{_fmt(value['rate'])} [{_fmt(value['low'])}, {_fmt(value['high'])}]"


def _initial(settings: dict) -> str:
    """How every cell's student starts (older results.json files have no student_quant: pruned)."""
    if settings.get("student"):
        return f"`{settings['student']}`"
    quant = settings.get("student_quant", "none")
    if quant != "none":
        return f"{quant} round-to-nearest, groups of {settings.get('student_quant_group_size', 32)}"
    return "pruned"


def _table(summary: dict, variants: list[tuple[str, str]], *, with_reference: bool) -> list[str]:
    keys = summary["metric_keys"]
    arrow = {"lower": "↓", "higher": "↑", "target": "≈"}
    head = ["variant"] + [f"{METRICS[k][0]} {arrow[METRICS[k][1]]}" for k in keys] + [
        "degenerate", "preference vs initial ↑", "seeds", "steps", "student tokens generated",
        "teacher tokens generated", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    if with_reference:
        for name in ("teacher", "initial"):
            values = summary["reference"][name]
            label = "teacher" if name == "teacher" else f"initial student ({_initial(summary['settings'])}, untrained)"
            flag = "—" if name == "teacher" else ("**yes**" if values.get("degenerate") else "no")
            lines.append(f"| {label} | " + " | ".join(_fmt(values[k]) if values.get(k) is not None else "—"
                                                      for k in keys) + f" | {flag} | — | — | — | — | — | — |")
    for label, variant in variants:
        entry = summary["variants"].get(variant)
        if entry is None:
            continue
        one = len(entry["seeds"]) == 1  # no spread to show from one seed
        cells = [(_fmt(entry["metrics"][k][0]) if k in entry["metrics"] else "—") if one else _ms(entry["metrics"].get(k))
                 for k in keys]
        flagged = entry.get("degenerate_seeds", [])
        cells += [f"**yes** ({len(flagged)}/{len(entry['seeds'])} seeds)" if flagged else "no",
                  _preference(entry.get("preference"))]
        cells += [",".join(map(str, entry["seeds"])), f"{entry['steps'][0]:.0f}", f"{entry['student_tokens'][0]:.0f}",
                  f"{entry['teacher_tokens'][0]:.0f}", f"{entry['wall_seconds'][0]:.0f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def ranking(summary: dict, key: str) -> list[str]:
    """Method variants (not the ablation's extra rows) ordered best first by the mean of `key`, every variant
    flagged as degenerate (on any seed) after every other one: a collapsed student cannot rank first."""
    values = {v: e["metrics"][key][0] for v, e in summary["variants"].items()
              if v in METHOD_NAMES and key in e["metrics"]}
    return [v for v, _ in rank(values, METRICS[key][1], degenerate_variants(summary))]


def degenerate_variants(summary: dict) -> list[str]:
    return [v for v, e in summary["variants"].items() if e.get("degenerate_seeds")]


def write_results(summary: dict, out_dir: Path, *, command: str | None = None) -> Path:
    """results.md (tables), results.json (every cell) and comparison.png / ablation.png in `out_dir`."""
    out = Path(out_dir)
    z = summary["sizes"]
    s = summary["settings"]
    seeds = sorted({seed for e in summary["variants"].values() for seed in e["seeds"]})
    lines = ["# Method comparison", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    n_prompts = z["num_builtin"] + z["num_generated"]
    lines += [
        f"Teacher `{s['teacher']}`, student: "
        + (f"the teacher with its linear weights fake-quantized to {s['student_quant']} in groups of "
           f"{s['student_quant_group_size']} (quantization-aware training from round-to-nearest; embeddings and "
           "head full precision)" if s.get("student_quant", "none") != "none"
           else f"the saved model `{s['student']}`" if s.get("student")
           else f"its layers `{s['student_layers']}`")
        + f" (same initialisation for every cell). Training: {n_prompts} prompts ({z['num_builtin']} built-in + "
        f"{z['num_generated']} generated arithmetic problems), {z['rounds']} rounds, batch {z['batch_size']}, learning rate {s['learning_rate']} "
        f"(cosine), responses up to {z['max_new_tokens']} tokens sampled at temperature {s['temperature']}, "
        f"top-p {s['top_p']}, teacher responses sampled once and shared. Held-out: {z['num_eval_prompts']} "
        f"built-in eval prompts and {z['num_math']} arithmetic problems, greedy, up to "
        f"{z['eval_max_new_tokens']} tokens. Mean ± sample std over seeds {', '.join(map(str, seeds))}.", "",
    ]
    total = summary.get("cells_total", len(summary["cells"]))
    if len(summary["cells"]) < total:
        lines += [f"**Partial results: {len(summary['cells'])} of {total} cells finished** (a variant's row is "
                  "over its finished seeds, listed in its `seeds` column; a row from one seed has no ± std).", ""]
    lines += ["## Methods", ""]
    method_rows = [(v, v) for v in summary["variants"] if v in METHOD_NAMES]
    lines += _table(summary, method_rows, with_reference=True) + [""]
    if any(v in summary["variants"] for v in ABLATIONS):
        lines += ["## DistiLLM-2 ablation", ""]
        lines += _table(summary, ABLATION_ROWS, with_reference=False) + [""]
    lines += ["↓ lower is better, ↑ higher is better, ≈ closest to the teacher is best. Teacher NLL: the teacher's "
              "mean per-token NLL of the model's greedy held-out responses; KL and TVD per token on the teacher's "
              "greedy held-out responses; ROUGE-L against them. Distinct-2: distinct word bigrams / all bigrams "
              "over the greedy held-out responses -- near 0 for a student that repeats the same tokens in every "
              "answer, which the teacher NLL column rewards. Repetition: the share of an answer's word 4-grams that "
              "repeat an earlier one (mean over answers); loop: answers ending in 3 or more copies of a unit; empty: "
              "answers with no word. Degenerate: on some seed, closer to collapse than to the teacher on one of "
              "these (repetition, loop or empty rate more than halfway from the teacher's value to 1, or distinct-2 "
              "below half the teacher's); such variants rank last. Preference vs initial: the share of held-out "
              "prompts where the variant's greedy answer has the higher length-normalised teacher log-likelihood "
              "than the initial student's (ties half; each prompt averaged over seeds), with a 95 % percentile "
              "bootstrap interval over prompts -- read it with the degenerate column, as the teacher's likelihood "
              "favours repetition. docs/evaluation.md gives the details. Tokens generated: for the cell's training "
              "data (mean over seeds).", ""]
    ranks = {k: ranking(summary, k) for k in summary["metric_keys"] if k in HEADLINE}
    if ranks:
        lines += ["## Ranking (best first, by mean)", ""]
        for key, order in ranks.items():
            means = {summary["variants"][v]["metrics"][key][0] for v in order}
            if len(means) == 1:  # nothing to rank
                lines.append(f"- {METRICS[key][0]}: every method {_fmt(means.pop())}")
            elif order:
                flagged = set(degenerate_variants(summary))
                lines.append(f"- {METRICS[key][0]}: " + " > ".join(f"{v} (degenerate)" if v in flagged else v
                                                                   for v in order))
        flagged = degenerate_variants(summary)
        if flagged:
            lines += ["", "Degenerate, ranked last whatever their figures (seed: the figures that flag it):"]
            for v in flagged:
                why = "; ".join(f"seed {seed}: " + ", ".join(reasons)
                                for seed, reasons in summary["variants"][v]["degenerate_reasons"].items())
                lines.append(f"- {v}: {why}")
        lines.append("")
    if _plot(summary, out / "comparison.png", [v for v, _ in method_rows], with_reference=True):
        lines += ["![methods](comparison.png)", ""]
    ablation = [v for _, v in ABLATION_ROWS if v in summary["variants"]]
    if len(ablation) > 1 and _plot(summary, out / "ablation.png", ablation, with_reference=False):
        lines += ["![ablation](ablation.png)", ""]
    lines += _answers(summary)
    atomic_write_text(out / "results.md", "\n".join(lines))
    atomic_write_json(out / "results.json", {"command": command, **summary})
    return out / "results.md"


def _answers(summary: dict, width: int = 200) -> list[str]:
    """The held-out answers the figures come from (``summary["answers"]``, set by the comparison): per prompt, the
    teacher's, the initial student's and each variant's first seed's greedy answer, cut to `width` characters."""
    answers = summary.get("answers")
    if not answers:
        return []
    lines = [f"## Answers (greedy, held-out, first {len(answers['prompts'])} prompts; each variant's seed "
             f"{answers['seed']}; first {width} characters)", ""]

    def cut(text: str) -> str:
        text = " ".join(text.split())  # one line: newlines and runs of spaces shown as one space
        return (text[:width] + " …") if len(text) > width else text

    for prompt in answers["prompts"]:
        lines += [f"**{cut(prompt['prompt'])}**", ""]
        lines += [f'- {name}: "{cut(text)}"' for name, text in prompt["answers"].items()] + [""]
    return lines


def _plot(summary: dict, path: Path, variants: list[str], *, with_reference: bool) -> bool:
    import matplotlib  # optional: matplotlib, heavy, only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: matplotlib, heavy, only when a figure is drawn

    keys = [k for k in CHARTED if k in summary["metric_keys"]]
    if not keys or not variants:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        names, means, stds = [], [], []
        for v in variants:
            pair = summary["variants"][v]["metrics"].get(key)
            if pair is not None:
                names.append(v), means.append(pair[0]), stds.append(pair[1])
        ax.bar(names, means, yerr=stds, capsize=3, color="tab:blue")
        if with_reference:
            for name, style in (("teacher", "-"), ("initial", "--")):
                value = summary["reference"][name].get(key)
                if value is not None:
                    ax.axhline(value, linestyle=style, color="gray", linewidth=1, label=name)
            ax.legend(fontsize=7)
        label, better = METRICS[key]
        ax.set_title(f"{label}\n(" + ("the teacher's value is the target" if better == "target"
                                      else f"{better} is better") + ")", fontsize=9)
        ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)  # a unique temporary file: several workers may write the results at once
    plt.close(fig)
    return True
