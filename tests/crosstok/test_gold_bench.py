"""benchmarks/bench_gold.py --tiny: TRL's GOLDTrainer and distillm's cross-tokenizer kd side by side on two tiny
models with different byte-level tokenizers. The figures it prints are finite, both trainers saw the same student
tokens, and on the term where the two loss definitions coincide -- the sorted L1 over the unmatched vocabulary on
the 1:1 groups of the first step's rows (the same groups, found by both alignments) -- the two implementations
agree within the rounding of two float32 forward passes. Skipped when TRL has no GOLD."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from tolerances import forward_atol, sum_atol

pytest.importorskip("trl.experimental.gold")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_gold.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gold", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_side_by_side_figures_and_the_coinciding_term(tmp_path, capsys):
    out = _bench().main(["--tiny", "--workdir", str(tmp_path), "--num-prompts", "4", "--steps", "2", "--batch", "2",
                         "--max-new-tokens", "24"])
    printed = capsys.readouterr().out
    assert "distillm/GOLD: tokens/s" in printed and "coinciding term" in printed
    for side in ("gold", "distillm"):
        assert len(out[side]["losses"]) == 2 and all(math.isfinite(x) for x in out[side]["losses"])
        assert math.isfinite(out[side]["tokens_per_s"]) and out[side]["tokens_per_s"] > 0
        assert out["usage"][side]["peak_rss_mib"] > 0
    assert all(math.isfinite(r) and r > 0 for r in out["ratios"].values())
    assert out["same_student_tokens"]
    assert out["gold"]["uld_mode"] == "extended"
    # both tokenizers are byte-level with the same special strings: string and byte matching pair the same tokens
    assert out["gold"]["matched_vocab"] == out["distillm"]["matched_vocab"]
    cmp = out["coinciding"]
    assert cmp["common"] == cmp["gold_groups"] == cmp["distillm_groups"] > 0
    assert out["gold"]["merged"] == out["distillm"]["merged"]

    # Tolerance: each side's logits come from its own forward pass (other padding, batch layout and head matmul),
    # off by at most delta = forward_atol per entry. A softmax then moves by at most ~2*delta in L1 (|dp_i| <= 2*delta*p_i),
    # a log-prob by at most 2*delta, and the sorted L1 is 1-Lipschitz in the L1 norm of each argument; plus the
    # rounding of the L1 sum itself over at most V entries of total size 2.
    scale = out["distillm"]["logit_scale"]
    delta = {side: forward_atol(AutoConfig.from_pretrained(tmp_path / side), torch.tensor(scale[side]))
             for side in ("teacher", "student")}
    vocab = max(AutoConfig.from_pretrained(tmp_path / side).vocab_size for side in ("teacher", "student"))
    uld_tol = 2 * delta["teacher"] + 2 * delta["student"] + 2 * sum_atol(vocab, 2.0)
    assert cmp["uld"]["max_abs_diff"] <= uld_tol
    assert cmp["uld"]["gold_mean"] > 0  # the term is not trivially zero
    assert cmp["t_logp"]["max_abs_diff"] <= 2 * delta["teacher"]
    assert cmp["s_logp"]["max_abs_diff"] <= 2 * delta["student"]
