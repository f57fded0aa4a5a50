"""Command-line option values as the bundle's code needs them.

``python -m monai.bundle run ... --flag false`` hands the config the *string* ``'false'`` (fire parses only ``True``
and ``False`` as booleans), which is truthy in Python and in ``$not @flag``. Every boolean option goes through
:func:`as_bool`, which accepts the spellings users type and refuses anything else with the option's name.
"""

from __future__ import annotations

from typing import Any

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def as_bool(value: Any, name: str = "option") -> bool:
    """``value`` as a bool: ``True``/``False``, ``1``/``0`` and the strings ``true/false/yes/no/on/off/1/0`` (any case).

    Raises ``ValueError`` naming ``name`` for anything else (``'flase'``, ``2``, ``None``, a list, ...).
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
    raise ValueError(f"--{name} must be true or false (also accepted: True/False, 1/0, yes/no, on/off); got {value!r}")
