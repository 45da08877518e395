"""Validation helpers shared by the config sections: each raises ConfigError naming 'section.field'."""

from __future__ import annotations

from typing import Any

from slotmem.errors import ConfigError


def check_int(section: str, name: str, value: Any, lo: int | None = None, hi: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{section}.{name} must be an integer, got {value!r}")
    check_range(section, name, value, lo, hi)


def check_float(section: str, name: str, value: Any, lo: float | None = None, hi: float | None = None) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{section}.{name} must be a number, got {value!r}")
    check_range(section, name, value, lo, hi)


def check_range(section: str, name: str, value, lo, hi) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else lo
        hi_s = "inf" if hi is None else hi
        raise ConfigError(f"{section}.{name} must be in [{lo_s}, {hi_s}], got {value!r}")


def check_choice(section: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{name} must be one of {list(choices)}, got {value!r}")


def check_name(section: str, name: str, value: Any) -> None:
    """A non-empty name usable as a path segment and an MLflow name."""
    if not isinstance(value, str) or not value.strip() or "/" in value:
        raise ConfigError(f"{section}.{name} must be a non-empty name without '/', got {value!r}")


def check_sorted_frames(section: str, name: str, values: tuple, lo: int, hi: int) -> None:
    if any(not isinstance(v, int) or isinstance(v, bool) for v in values):
        raise ConfigError(f"{section}.{name} must be a list of integers, got {list(values)!r}")
    if list(values) != sorted(set(values)):
        raise ConfigError(f"{section}.{name} must be strictly increasing, got {list(values)!r}")
    for v in values:
        check_range(section, name, v, lo, hi)
