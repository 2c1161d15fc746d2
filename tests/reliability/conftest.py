"""The reliability suite's shared fixture: one uninterrupted tiny run, the yardstick for interrupted ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from reliability_helpers import TINY_RUN, run_distillm


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """One uninterrupted run of TINY_RUN, the yardstick for every interrupted one."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = run_distillm([*TINY_RUN, "--output-dir", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    return out
