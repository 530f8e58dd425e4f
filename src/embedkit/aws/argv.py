"""Rebuild a command line from parsed arguments, with some values replaced (container paths).

>>> p = argparse.ArgumentParser()
>>> _ = p.add_argument("--input"); _ = p.add_argument("--width", type=int, default=32)
>>> _ = p.add_argument("--fast", action="store_true"); _ = p.add_argument("--tag", action="append")
>>> a = p.parse_args(["--input", "/data", "--width", "64", "--fast", "--tag", "x", "--tag", "y"])
>>> rebuild_arguments(p, a, replace={"input": "/opt/ml/processing/input/input"})
['--input', '/opt/ml/processing/input/input', '--width', '64', '--fast', '--tag', 'x', '--tag', 'y']
"""

from __future__ import annotations

import argparse
from collections.abc import Container, Mapping
from typing import Any

from embedkit.aws.job import Ref

_SKIP_TYPES = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def _flag(action: argparse.Action) -> str:
    longs = [s for s in action.option_strings if s.startswith("--")]
    return (longs or action.option_strings)[0]


def _values(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [str(value)]


def rebuild_arguments(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    *,
    replace: Mapping[str, Any] | None = None,
    skip: Container[str] = (),
) -> list[Any]:
    """Tokens that make ``parser`` parse back to ``args`` (values equal to the default omitted).

    ``replace`` maps a dest to the value to emit instead (any object, e.g. a placeholder); dests in
    ``skip`` and those starting with ``_`` or ``sagemaker_`` are left out."""
    replace = dict(replace or {})
    positionals: list[Any] = []
    options: list[Any] = []
    # argparse has no public list of a parser's arguments; _actions is what its own help and
    # usage formatters read, stable since Python 3.2, and the user's parser is not ours to declare
    for action in parser._actions:
        dest = action.dest
        if isinstance(action, _SKIP_TYPES) or dest in skip or dest.startswith(("_", "sagemaker_")):
            continue
        if not hasattr(args, dest):
            continue
        value = replace.get(dest, getattr(args, dest))
        if not action.option_strings:
            if value is not None and value != []:
                positionals.extend(value if isinstance(value, list) else [value])
            continue
        if dest not in replace and (value is None or value == action.default):
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            options.append(_flag(action) if value else "--no-" + _flag(action)[2:])
        elif isinstance(action, argparse._StoreConstAction):  # store_true/false/const
            if value == action.const:
                options.append(_flag(action))
        elif isinstance(action, argparse._CountAction):
            options.extend([_flag(action)] * int(value or 0))
        elif isinstance(action, argparse._AppendAction):
            for item in value or []:
                options.append(_flag(action))
                options.extend(_values(item))
        elif value is not None:
            options.append(_flag(action))
            options.extend(value if isinstance(value, list) and not isinstance(value, str) else [value])
    return [v if isinstance(v, str | Ref) else str(v) for v in positionals + options]
