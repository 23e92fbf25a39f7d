"""`parse_flag`: a boolean setting from a config, a command line or Python, strictly.

``python -m monai.bundle run --use_checkpoint false`` hands the config the *string* "false" (fire parses
``True`` / ``False`` as booleans but leaves ``true`` / ``false`` as text), and ``bool("false")`` is True: a
user who turns a setting off would silently get it on. `parse_flag` reads both spellings, and refuses
anything else naming the setting.
"""

from __future__ import annotations

from typing import Any

__all__ = ["parse_flag", "TRUE_WORDS", "FALSE_WORDS"]

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


def parse_flag(value: Any, name: str) -> bool:
    """``value`` as a bool: a bool, 0 / 1, or one of true/false, yes/no, on/off, 1/0 (any case); else ValueError."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise ValueError(f"{name} must be true or false, got {value!r}")
