"""Type checks at the library's public entry points, so a wrong type is an `InputError` that names the argument and
what was expected, not a TypeError or AttributeError from deep inside (README: every error on bad input is a
`QwenAudioError`).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import InputError, QwenAudioError


def expect(value: Any, types: type | tuple[type, ...], name: str, what: str,
           error: type[QwenAudioError] = InputError) -> None:
    """Raise `error` unless `value` is one of `types`; a bool never passes for a number."""
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
        raise error(f"{name} must be {what}, got {shown(value)}")


def whole(x: Any, low: int, high: int | None = None) -> bool:
    """An int in [low, high] (no upper bound when `high` is None); a bool is never taken for a count."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= low and (high is None or x <= high)


def finite(x: Any) -> bool:
    """A finite int or float (not a bool, not nan or inf)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def as_path(value: Any, name: str) -> Path:
    """`value` as a Path; InputError unless it is a non-empty str or path-like."""
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise InputError(f"{name} must be a path (a str or Path), got {shown(value)}")
    return Path(value)


def renamed(module: str, moved: dict[str, tuple[str, Any]]) -> Callable[[str], Any]:
    """The `__getattr__` of module `module` (its `__name__`) that keeps its old names working for one release:
    `moved[old]` is (the new name, as the warning shows it, and its value); an old name gives the value with a
    DeprecationWarning ("tasks.Task is deprecated; use tasks.Prompt"), any other is an AttributeError."""
    short = module.removeprefix("qwenaudio.")

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        new, value = moved[name]
        warnings.warn(f"{short}.{name} is deprecated; use {new}", DeprecationWarning, stacklevel=2)
        return value

    return __getattr__


def _tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def shown(value: Any) -> str:
    """The value's type, and a short repr of it."""
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '…' if len(text) > 60 else text}"
