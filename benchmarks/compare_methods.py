"""The paper's method comparison at laptop scale: `distillm compare` (see src/distillm/compare.py).

    python benchmarks/compare_methods.py --quick --output-dir runs/compare-quick   # < 30 min on 2 idle CPU cores
    python benchmarks/compare_methods.py --output-dir runs/compare                 # the full size: a few hours

Every method (kd, seqkd, imitkd, gkd, minillm, distillm v1, dpkd, speculative-kd, step-by-step, distillm2) and
DistiLLM-2's component ablation (contrastive loss only, + b ramp, + curriculum a) are trained from the same
teacher (SmolLM2-135M-Instruct), student initialisation (its 10-layer pruned copy), prompts and budget over
seeds 0, 1, 2, and evaluated on held-out prompts. Writes results.md (mean ± std per metric, with the teacher
and the initial student, tokens generated and wall time per variant), results.json and comparison.png /
ablation.png to --output-dir. Rerun the same command to continue an interrupted comparison: finished cells
are skipped. All options: `python benchmarks/compare_methods.py --help`.
"""

import sys

from distillm.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
