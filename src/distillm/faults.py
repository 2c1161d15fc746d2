"""Moved to `distillm.testing.faults` (issue 17). This alias keeps imports of branches written before the move
working; remove it once they are merged."""

from .testing.faults import *  # noqa: F401,F403
