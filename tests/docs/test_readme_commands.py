"""Every `distillm` command the README shows (in its shell blocks, also under `accelerate launch` or `torchrun`)
is accepted by the command line as it stands: the parser knows every flag and value, and a run's options pass the
config's checks. Running them needs real models and hours; this catches a renamed or removed option."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from distillm.cli import build_parser, main
from distillm.config import load_config, option_fields

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_commands() -> list[list[str]]:
    """The argv after `distillm` / `-m distillm` of each command line in the README's code blocks."""
    commands = []
    for block in re.findall(r"^```(?:bash|text)\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"^\$ ", "", line.strip())
            if not line.startswith(("distillm ", "accelerate ", "torchrun ")):
                continue  # output, or another tool (make, python, pip)
            words = shlex.split(line, comments=True)
            if words[:1] == ["distillm"]:
                commands.append(words[1:])
            elif words[:1] in (["accelerate"], ["torchrun"]) and "distillm" in words:
                commands.append(words[words.index("distillm") + 1:])
    return commands


COMMANDS = readme_commands()


def test_the_readme_shows_the_commands_of_its_tour():
    assert len(COMMANDS) >= 20
    assert {argv[0] for argv in COMMANDS if argv and not argv[0].startswith("-")} >= {
        "run", "generate", "train", "eval", "speculate", "align", "compare"}


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a)[:80])
def test_readme_command_is_accepted(argv, capsys, monkeypatch):
    global_flags = [a for a in argv[:1] if a in ("-q", "--quiet")]
    rest = argv[len(global_flags):]
    if rest in (["--help"], ["-h"]):
        with pytest.raises(SystemExit) as exit_:
            main(rest)
        assert exit_.value.code == 0
        return
    args = build_parser().parse_args([*global_flags, *rest])  # an unknown flag or bad choice exits here
    if args.command in ("run", "train") and not args.config:
        known = option_fields()
        overrides = {key: value for key, value in vars(args).items() if key in known}
        load_config(None, preset=args.preset or "none", overrides=overrides)  # ranges, choices, cross-checks
