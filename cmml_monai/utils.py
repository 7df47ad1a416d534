"""Small helpers shared by every layer (the lowest layer: it imports nothing else of the package)."""

from __future__ import annotations

from typing import Any

__all__ = ["as_bool"]

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0", "none", "")


def as_bool(value: Any, name: str = "value") -> bool:
    """``value`` as a bool, accepting the strings a command line gives.

    ``python -m monai.bundle run ... --amp false`` passes the *string* ``'false'`` (Fire only turns
    ``False`` into a bool), which plain ``bool()`` or ``if`` would read as true. This reads
    true/false, yes/no, on/off, 1/0 in any case, and real bools or 0/1 numbers.

    Raises:
        ValueError: anything else, naming ``name`` and the value.

    Example::

        >>> as_bool("false"), as_bool("True"), as_bool(1), as_bool(None)
        (False, True, True, False)
    """
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError(f"{name} must be true or false, got {value!r}")
