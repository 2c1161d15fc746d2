"""Training curves of a comparison's cells: DistiLLM-2's per-component losses and its a and b trajectories.

    python scripts/plot_train_curves.py DIR --variants distillm2,contrastive,contrastive+b_ramp,contrastive+curriculum \\
        --output curves.png

DIR is a comparison's output directory or its `--archive` folder (both hold cells/VARIANT/seed_S/run/logs/
train_log.jsonl). One panel per logged figure (skl, srkl, skew_t and skew_s -- the a of each side --, b, loss,
grad_norm by default; those a variant does not log are left out), one line per variant: the mean over its seeds at each step, with the range
over seeds shaded. Prints the per-round means of each figure as a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FIGURES = ("skl", "srkl", "skew_t", "skew_s", "b", "loss", "grad_norm")  # skew_t / skew_s: the curriculum a


def read_log(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                sys.exit(f"{path}:{number}: not JSON ({err.msg}); a torn last line means the run is still going")
    return [r for r in rows if "step" in r]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="a comparison's output directory or its --archive folder")
    ap.add_argument("--variants", required=True, help="comma-separated")
    ap.add_argument("--figures", default=",".join(FIGURES))
    ap.add_argument("--output", required=True, help="the PNG to write")
    args = ap.parse_args()
    root = Path(args.root)
    figures = [f for f in args.figures.split(",") if f]
    curves: dict[str, dict[str, list[list[float]]]] = {}
    for variant in [v for v in args.variants.split(",") if v]:
        logs = sorted(root.glob(f"cells/{variant}/seed_*/run/logs/train_log.jsonl"))
        if not logs:
            sys.exit(f"{root}/cells/{variant}: no seed with a training log (cells/{variant}/seed_S/run/logs/"
                     "train_log.jsonl); check the variant's name and the folder")
        runs = [read_log(p) for p in logs]
        curves[variant] = {f: [[r[f] for r in run if f in r] for run in runs] for f in figures}
    shown = [f for f in figures if any(any(seq) for v in curves.values() for seq in v[f])]
    if not shown:
        sys.exit(f"none of the figures {', '.join(figures)} is in these training logs")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(shown), 4)
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    print(f"{'variant':<26}{'figure':<11}{'first half -> second half of the steps (mean over seeds)'}")
    colors = {variant: f"C{i % 10}" for i, variant in enumerate(curves)}  # one colour per variant in every panel
    for ax, figure in zip(axes.flat, shown):
        for variant, data in curves.items():
            seqs = [s for s in data[figure] if s]
            if not seqs:
                continue
            n = min(len(s) for s in seqs)
            mean = [sum(s[i] for s in seqs) / len(seqs) for i in range(n)]
            low = [min(s[i] for s in seqs) for i in range(n)]
            high = [max(s[i] for s in seqs) for i in range(n)]
            steps = list(range(1, n + 1))
            ax.plot(steps, mean, label=f"{variant} ({len(seqs)} seeds)", lw=1.3, color=colors[variant])
            ax.fill_between(steps, low, high, color=colors[variant], alpha=0.15, lw=0)
            half = n // 2
            rounds = [sum(mean[:half]) / max(half, 1), sum(mean[half:]) / max(n - half, 1)]
            print(f"{variant:<26}{figure:<11}{rounds[0]:.4f} -> {rounds[1]:.4f}")
        ax.set_title(figure)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7)  # each panel names its own lines (a variant that does not log a figure is absent)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
