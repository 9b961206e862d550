"""`key=value` command lines for the inference entry points (generate.py, export).

Hydra's override grammar reads commas as sweeps and brackets as lists, which prompts
are full of, so these commands take each value as typed, converted by the type of its
field in a dataclass of defaults; unknown keys and bad values are errors naming them.
Only a field typed as a list reads `[a,b]` as a list (adapter=[A,B] in generate.py).
"""

from __future__ import annotations

import dataclasses
import types
import typing


def _convert(key: str, text: str, kind):
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None, str | list[str]
        options = [t for t in typing.get_args(kind) if t is not type(None)]
        if len(options) < len(typing.get_args(kind)) and text.lower() in ("null", "none", ""):
            return None
        listed = [t for t in options if typing.get_origin(t) is list]
        single = [t for t in options if typing.get_origin(t) is not list]
        kind = listed[0] if listed and (text.startswith("[") or not single) else single[0]
    if typing.get_origin(kind) is list:  # [a,b] (or one value): items converted by the item type
        inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        return [_convert(key, part.strip(), typing.get_args(kind)[0]) for part in inner.split(",")] if inner.strip() else []
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{key}={text!r}: expected true or false")
        return text.lower() in ("true", "1", "yes")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{key}={text!r}: expected {kind.__name__}") from None


def parse_args(config_class, argv: list[str], command: str):
    """An instance of the dataclass `config_class` with `key=value` arguments applied."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    hints = typing.get_type_hints(config_class)
    values = {}
    for argument in argv:
        key, sep, text = argument.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"{command}: bad argument {argument!r}; arguments are key=value with keys "
                             f"{', '.join(fields)}")
        try:
            values[key] = _convert(key, text, hints[key])
        except ValueError as error:
            raise SystemExit(f"{command}: {error}") from None
    missing = [name for name, f in fields.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SystemExit(f"{command}: missing required argument(s): {', '.join(f'{m}=...' for m in missing)}")
    return config_class(**values)
