"""X-ray wavelengths and the conversions between 2theta, Q and d.

Conventions: angles in degrees, wavelengths and d in angstrom, Q = 4 pi sin(theta) / lambda in 1/angstrom.
"""

from __future__ import annotations

import numpy as np

from xtalsolve.errors import XtalsolveError

# Characteristic lines in angstrom. Kalpha is the weighted (2:1) Kalpha1/Kalpha2 mean, as in
# International Tables Vol. C, Table 4.2.2.1 (the same values pymatgen uses).
WAVELENGTHS_A: dict[str, float] = {
    "CuKa": 1.54184,
    "CuKa1": 1.54056,
    "CuKa2": 1.54439,
    "MoKa": 0.71073,
    "MoKa1": 0.70930,
    "CoKa": 1.79026,
    "CoKa1": 1.78896,
    "AgKa": 0.560885,
    "AgKa1": 0.559421,
    "CrKa": 2.29100,
    "CrKa1": 2.28970,
    "FeKa": 1.93735,
    "FeKa1": 1.93604,
}

MIN_WAVELENGTH_A = 0.01  # 1.2 MeV photons; shorter is not a diffraction experiment
MAX_WAVELENGTH_A = 20.0  # very cold neutrons; longer is absurd for crystallography


def tube_line(wavelength: float, tolerance: float = 2e-3) -> str | None:
    """Name of the laboratory X-ray tube line within ``tolerance`` (angstrom) of ``wavelength``, or None
    (a synchrotron or neutron wavelength)."""
    name = min(WAVELENGTHS_A, key=lambda n: abs(WAVELENGTHS_A[n] - wavelength))
    return name if abs(WAVELENGTHS_A[name] - wavelength) <= tolerance else None


def wavelength_of(radiation: str) -> float:
    """Wavelength in angstrom of a named radiation (case-insensitive, e.g. ``"CuKa"``, ``"MoKa1"``)."""
    for name, value in WAVELENGTHS_A.items():
        if name.lower() == radiation.strip().lower():
            return value
    known = ", ".join(WAVELENGTHS_A)
    raise XtalsolveError(f"unknown radiation {radiation!r}; known: {known}", "--radiation")


def check_wavelength(wavelength: float, source: str = "--wavelength") -> float:
    """Return ``wavelength`` (angstrom) as float, or raise if it is not a physical X-ray/neutron wavelength."""
    try:
        value = float(wavelength)
    except (TypeError, ValueError):
        raise XtalsolveError(f"wavelength {wavelength!r} is not a number", source) from None
    if not np.isfinite(value) or not (MIN_WAVELENGTH_A <= value <= MAX_WAVELENGTH_A):
        raise XtalsolveError(
            f"wavelength {wavelength!r} angstrom is outside {MIN_WAVELENGTH_A}-{MAX_WAVELENGTH_A} angstrom", source
        )
    return value


def wavelength_from_options(wavelength, radiation) -> tuple[float | None, str | None]:
    """The wavelength (angstrom) the user asked for with --wavelength or --radiation (not both), and which
    option gave it; (None, None) when neither was given."""
    if wavelength is not None and radiation is not None:
        raise XtalsolveError("give --wavelength or --radiation, not both", "--wavelength")
    if radiation is not None:
        return wavelength_of(radiation), f"--radiation {radiation}"
    if wavelength is not None:
        return check_wavelength(wavelength), "--wavelength"
    return None, None


def two_theta_to_q(two_theta_deg, wavelength: float):
    """Q (1/angstrom) from 2theta (degrees)."""
    return 4.0 * np.pi * np.sin(np.radians(np.asarray(two_theta_deg, dtype=float)) / 2.0) / wavelength


def q_to_two_theta(q, wavelength: float):
    """2theta (degrees) from Q (1/angstrom); NaN where the reflection is beyond the limiting sphere."""
    s = np.asarray(q, dtype=float) * wavelength / (4.0 * np.pi)
    with np.errstate(invalid="ignore"):
        return np.where(np.abs(s) <= 1.0, np.degrees(2.0 * np.arcsin(np.clip(s, -1, 1))), np.nan)
