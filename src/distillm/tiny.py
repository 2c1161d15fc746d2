"""Moved to `distillm.testing.tiny` (issue 17). This alias keeps imports of branches written before the move
working; remove it once they are merged."""

from .testing.tiny import *  # noqa: F401,F403
