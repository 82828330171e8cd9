"""Checks of option values that the torch layers, the mixers and the JAX model share. Imports
neither torch nor JAX."""

from __future__ import annotations

import math


def check_options(where: str, **options) -> None:
    """One error naming the option unless each is of its type: booleans are bools (a string such
    as 'False' is truthy), a frac_gradient* option is a finite number in [0, 1]."""
    for name, value in options.items():
        if name.startswith("frac_gradient"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{where}: {name} must be a finite number in [0, 1], got {value!r}")
        elif not isinstance(value, bool):
            raise TypeError(f"{where}: {name} must be a bool, got {type(value).__name__} {value!r}")
