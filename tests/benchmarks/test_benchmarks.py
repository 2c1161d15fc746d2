"""The benchmark scripts' reporting (not their timings): the loss benchmark's table and headline from result
rows, including the bound it gives when plain does not fit."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ok(impl, vocab, length, gib, seconds):
    return {"impl": impl, "vocab": vocab, "length": length, "status": "ok", "extra_peak_gib": gib, "time_s": seconds}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_loss_headline_bounds_and_extrapolates_when_plain_does_not_fit(tmp_path, capsys):
    rows = [
        _ok("plain", 100, 10, 10.0, 10.0), _ok("fused", 100, 10, 1.0, 5.0), _ok("fused_weighted", 100, 10, 0.5, 12.0),
        {"impl": "plain", "vocab": 200, "length": 20, "status": "oom", "why": "alloc", "cap_gib": 8.0,
         "needs_more_than_gib": 6.0},
        _ok("fused", 200, 20, 1.2, 30.0), _ok("fused_weighted", 200, 20, 0.6, 20.0),
    ]
    _load("bench_loss").main(["--from-json", _write(tmp_path / "r.jsonl", rows)])
    lines = capsys.readouterr().out.strip().splitlines()
    headline = lines[-1]
    assert headline.startswith("headline: fused/plain extra peak memory at V=200 L=20")
    # measured bound 1.2 / 6; plain extrapolated linearly in N x V: 10 GiB x 4 = 40 GiB -> 1.2 / 40
    assert "fused < 0.200 (1.20 GiB), ~0.030 against plain's 40 GiB extrapolated, time 0.50x at V=100 L=10" in headline
    assert "fused_weighted < 0.100" in headline and "time 1.20x at V=100 L=10" in headline
    assert "time fused/plain at V=100 L=10: 0.50 (meets the <= 1.15 target)" in lines
    assert "time fused_weighted/plain at V=100 L=10: 1.20 (MISSES the <= 1.15 target)" in lines
    assert any(line.startswith("| 200 | 20 | 80 | plain") and "does not fit (needs > 6.0)" in line for line in lines)


def test_loss_later_result_file_replaces_a_whole_shape(tmp_path, capsys):
    early = [_ok("plain", 100, 10, 10.0, 10.0), _ok("fused", 100, 10, 1.0, 5.0)]
    late = [_ok("plain", 100, 10, 8.0, 40.0)]  # a rerun of plain alone: the early fused row must not be mixed in
    _load("bench_loss").main(["--from-json", _write(tmp_path / "a.jsonl", early), _write(tmp_path / "b.jsonl", late)])
    out = capsys.readouterr().out
    assert "fused per-token" not in out
    assert "| 100 | 10 | 40 | plain (full logits, distillm divergences) | 8.000 | 40.00 |" in out


def test_generation_benchmark_refuses_too_few_prompts_for_its_batch():
    with pytest.raises(SystemExit):
        _load("bench_generation").main(["--num-prompts", "8", "--batch-sizes", "1", "32"])


def test_train_step_peak_memory_sees_a_freed_tensor():
    """PeakRSS reports the transient peak of a block (64 MiB: above glibc's largest mmap threshold, so mapped and
    unmapped whatever the environment), not just what is still resident at the end. Measured in a fresh process:
    in the test process, memory that earlier tests freed but the allocator kept resident can hold the block
    without the resident size growing at all."""
    import subprocess
    import sys

    program = f"""
import importlib.util, time, torch
spec = importlib.util.spec_from_file_location("bench", {str(BENCH / "bench_train_step.py")!r})
bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
with bench.PeakRSS(interval=0.001) as memory:
    block = torch.ones(16 * 2**20)  # 64 MiB, written (resident)
    # the sampling thread must see the block while it lives; on a loaded machine it may wait for a core
    deadline = time.monotonic() + 30
    while memory.peak - memory.start < 60 * 2**20 and time.monotonic() < deadline:
        time.sleep(0.01)
    del block
print(memory.extra, memory.rss() - memory.start)
"""
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    extra, left = map(int, result.stdout.split())
    assert extra >= 60 * 2**20
    assert left < 32 * 2**20  # freed again


def test_gradient_share_checks_every_student_before_loading_the_teacher(tmp_path, monkeypatch, capsys):
    bench = _load("bench_gradient_share")
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "config.json").write_text("{}")
    assert bench.check_source(str(tmp_path / "student")) is None
    assert bench.check_source("rtn:int3") is None and bench.check_source("layers:even:10") is None
    assert "rtn:int4" in bench.check_source("rtn:int5")
    assert "layers:SPEC" in bench.check_source("layers:")
    assert "no model directory" in bench.check_source(str(tmp_path / "nowhere"))

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded before every --student was checked")

    monkeypatch.setattr(bench, "load_model", no_teacher)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt_ids": [1], "response_ids": [2]}) + "\n")
    monkeypatch.setattr("sys.argv", ["bench", "--teacher-rows", str(rows), "--student", "a=rtn:int3",
                                     "--student", f"b={tmp_path / 'nowhere'}"])
    with pytest.raises(SystemExit, match=r"--student b=.*nowhere: no model directory"):
        bench.main()
