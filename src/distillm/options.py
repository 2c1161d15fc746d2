"""The declaration of a config option (`opt`): shared by the config sections (`distillm.config`) and the
methods' own options dataclasses (`distillm.methods.<name>.Options`), which the config schema, the CLI flags and
the validation are derived from. A leaf module: it imports nothing of distillm."""

from __future__ import annotations

from dataclasses import field


def opt(default, help: str, *, ge=None, gt=None, le=None, lt=None, choices=None, aliases=(), formerly=None,
        **kwargs):
    """A config option: its default, help text and the values it accepts (checked by `config.check_option`
    wherever a value comes from): `ge`/`gt`/`le`/`lt` bound a number, `choices` lists the accepted strings. Every
    float option must also be finite and every int option within int64.

    `aliases`: earlier names of the option, still accepted (YAML keys and flags) with a deprecation warning.
    `formerly`: the config section the option lived in before (a sectioned YAML file may still put it there)."""
    bounds = {key: value for key, value in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if value is not None}
    if choices is not None:
        bounds["choices"] = tuple(choices)
    if aliases:
        bounds["aliases"] = tuple(aliases)
    if formerly:
        bounds["formerly"] = formerly
    return field(default=default, metadata={"help": help, **bounds, **kwargs})
