"""The measured (or simulated) one-dimensional signal that every command works on."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from xtalsolve.errors import XtalsolveError
from xtalsolve.radiation import q_to_two_theta, two_theta_to_q

UNITS = ("2theta", "q", "r")
"""x units: 2theta in degrees, Q in 1/angstrom, r in angstrom (PDF)."""


@dataclass(frozen=True)
class Pattern:
    """A powder pattern or PDF on a strictly increasing grid.

    x: 2theta (degrees), Q (1/angstrom) or r (angstrom), as ``unit`` says.
    y: intensity (arbitrary units) or G(r) (1/angstrom^2).
    sigma: one standard deviation of y (same units); estimated when the file gives none.
    wavelength: angstrom, or None where it is unknown / not needed (Q or r data).
    source: where the data came from (file path, or a description for simulated data).
    meta: anything else the reader found (instrument, sample, sigma_estimated, ...).
    max_pool: each point is the maximum over ``max_pool`` equally spaced sub-points across its bin (PXRDnet's
    512-point patterns are max-pooled from 4,096 bins: 8); 1 = the intensity at the point, as measured.
    """

    x: np.ndarray
    y: np.ndarray
    sigma: np.ndarray
    unit: str
    wavelength: float | None = None
    source: str = "<memory>"
    meta: dict = field(default_factory=dict)
    max_pool: int = 1

    def __post_init__(self):
        if self.unit not in UNITS:
            raise XtalsolveError(f"unknown x unit {self.unit!r}; use one of {', '.join(UNITS)}", self.source)
        if not (isinstance(self.max_pool, (int, np.integer)) and self.max_pool >= 1):
            raise XtalsolveError(f"max pooling must be a whole number >= 1, not {self.max_pool!r}", self.source)
        for name in ("x", "y", "sigma"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=float))
        if not (self.x.ndim == self.y.ndim == self.sigma.ndim == 1 and len(self.x) == len(self.y) == len(self.sigma)):
            raise XtalsolveError("x, y and sigma must be 1-D arrays of equal length", self.source)

    def __len__(self) -> int:
        return len(self.x)

    @property
    def q(self) -> np.ndarray:
        """x as Q (1/angstrom); needs the wavelength for 2theta data."""
        if self.unit == "q":
            return self.x
        if self.unit == "2theta":
            if self.wavelength is None:
                raise XtalsolveError("2theta data need a wavelength (--wavelength or --radiation)", self.source)
            return two_theta_to_q(self.x, self.wavelength)
        raise XtalsolveError("a PDF (x in r) has no Q axis", self.source)

    @property
    def two_theta(self) -> np.ndarray:
        """x as 2theta (degrees); needs the wavelength for Q data."""
        if self.unit == "2theta":
            return self.x
        if self.unit == "q":
            if self.wavelength is None:
                raise XtalsolveError("Q data need a wavelength to be shown in 2theta", self.source)
            return q_to_two_theta(self.x, self.wavelength)
        raise XtalsolveError("a PDF (x in r) has no 2theta axis", self.source)

    def in_two_theta(self) -> Pattern:
        """The same measurement on a 2theta axis (degrees): Q data are mapped point by point with the wavelength
        (points beyond 2theta = 180 dropped); y and sigma are kept as measured per point."""
        if self.unit == "2theta":
            return self
        two_theta = self.two_theta
        keep = np.isfinite(two_theta) & (two_theta > 0)
        return replace(self, x=two_theta[keep], y=self.y[keep], sigma=self.sigma[keep], unit="2theta")

    def with_wavelength(self, wavelength: float | None) -> Pattern:
        return replace(self, wavelength=wavelength)

    def cropped(self, x_min: float | None = None, x_max: float | None = None) -> Pattern:
        """The part of the pattern with x_min <= x <= x_max (same unit as x)."""
        keep = np.ones(len(self.x), dtype=bool)
        if x_min is not None:
            keep &= self.x >= x_min
        if x_max is not None:
            keep &= self.x <= x_max
        return replace(self, x=self.x[keep], y=self.y[keep], sigma=self.sigma[keep])

    def summary(self) -> dict:
        """Plain-data description (what ``xtalsolve info`` prints)."""
        return {
            "source": self.source,
            "points": int(len(self.x)),
            "x_unit": self.unit,
            "x_min": float(self.x.min()) if len(self.x) else None,
            "x_max": float(self.x.max()) if len(self.x) else None,
            "step_mean": float(np.mean(np.diff(self.x))) if len(self.x) > 1 else None,
            "wavelength_A": self.wavelength,
            "y_min": float(self.y.min()) if len(self.y) else None,
            "y_max": float(self.y.max()) if len(self.y) else None,
            "sigma_from_file": not self.meta.get("sigma_estimated", False),
        }
