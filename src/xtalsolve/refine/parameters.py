"""Refinable parameters and the flat vector the least-squares solver sees (in the spirit of diffpy.srfit)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from xtalsolve.errors import XtalsolveError


@dataclass
class Parameter:
    """One refinable quantity: ``value`` in its natural unit, ``bounds`` (lower, upper), whether it is
    ``refined`` in the current stage, its ``group`` (the stage that releases it: scale, background, lattice,
    zero, profile, positions, biso, texture, intensities) and the esd from the last refinement (None before)."""

    name: str
    value: float
    group: str
    bounds: tuple[float, float] = (-math.inf, math.inf)
    refined: bool = False
    esd: float | None = None

    def __post_init__(self):
        lo, hi = self.bounds
        if not lo < hi:
            raise XtalsolveError(f"parameter {self.name}: lower bound {lo} not below upper bound {hi}")
        self.value = float(np.clip(self.value, lo, hi))


class ParameterSet:
    """Ordered parameters; ``vector()`` / ``set_vector()`` map the refined ones to a flat float64 vector."""

    def __init__(self, parameters: list[Parameter] | None = None):
        self._items: dict[str, Parameter] = {}
        for p in parameters or []:
            self.add(p)

    def add(self, parameter: Parameter) -> Parameter:
        if parameter.name in self._items:
            raise XtalsolveError(f"duplicate parameter name {parameter.name!r}")
        self._items[parameter.name] = parameter
        return parameter

    def __getitem__(self, name: str) -> Parameter:
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self):
        return iter(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return list(self._items)

    def group(self, group: str) -> list[Parameter]:
        return [p for p in self if p.group == group]

    def release(self, *groups: str) -> None:
        """Refine every parameter of these groups from now on."""
        for p in self:
            if p.group in groups:
                p.refined = True

    def fix_all(self) -> None:
        for p in self:
            p.refined = False

    @property
    def free(self) -> list[Parameter]:
        return [p for p in self if p.refined]

    def values(self) -> np.ndarray:
        """All values (refined or not), in order."""
        return np.array([p.value for p in self], dtype=float)

    def vector(self) -> np.ndarray:
        return np.array([p.value for p in self.free], dtype=float)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        free = self.free
        return np.array([p.bounds[0] for p in free]), np.array([p.bounds[1] for p in free])

    def set_vector(self, x: np.ndarray) -> None:
        for p, value in zip(self.free, x):
            lo, hi = p.bounds
            p.value = float(min(max(value, lo), hi))

    def free_mask(self) -> np.ndarray:
        return np.array([p.refined for p in self], dtype=bool)

    def as_dict(self) -> dict:
        """{name: {"value", "esd", "refined"}} for the JSON summary."""
        return {p.name: {"value": p.value, "esd": p.esd, "refined": p.refined or p.esd is not None} for p in self}


def format_esd(value: float, esd: float | None, min_decimals: int = 0) -> str:
    """Crystallographic notation: 0.12345 with esd 0.00052 -> '0.1235(5)'; two digits when the esd starts
    with 1 (IUCr rule of 19); plain value when there is no esd. ``min_decimals``: never round the value to fewer
    decimals (the esd then gets more digits, '0.2034(9000)'), so that a poorly determined coordinate is not
    moved onto another atom by the rounding."""
    if esd is None or not np.isfinite(esd) or esd <= 0:
        return f"{value:.6f}".rstrip("0").rstrip(".") if value != 0 else "0"
    exponent = math.floor(math.log10(esd))
    digits = esd / 10**exponent
    if digits < 1.95:  # esd's starting with 1 keep two significant digits
        exponent -= 1
    exponent = min(exponent, -min_decimals)
    decimals = max(0, -exponent)
    unit = 10.0**exponent
    esd_digits = round(esd / unit)
    if decimals == 0:
        return f"{round(value / unit) * unit:.0f}({esd_digits * int(unit)})"
    return f"{value:.{decimals}f}({esd_digits})"
