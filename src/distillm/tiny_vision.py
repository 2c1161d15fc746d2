"""Moved to `distillm.testing.tiny_vision` (issue 17). This alias keeps imports of branches written before the move
working; remove it once they are merged."""

from .testing.tiny_vision import *  # noqa: F401,F403

if __name__ == "__main__":
    raise SystemExit(main())  # noqa: F405
