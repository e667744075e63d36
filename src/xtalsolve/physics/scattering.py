"""Scattering power of atoms: X-ray form factors and neutron scattering lengths, as torch lookups by Z.

Tables
- ``"waasmaier-kirfel"`` (default): D. Waasmaier and A. Kirfel, Acta Cryst. A51, 416-431 (1995), the
  International Tables Vol. C parametrisation, f0(s) = c + sum_{i=1..5} a_i exp(-b_i s^2), valid to
  s = 6 1/angstrom (resources/waasmaier_kirfel.json, written by tools/build_form_factor_table.py).
- ``"pymatgen"``: the 4-Gaussian electron-scattering fit used through the Mott-Bethe formula by pymatgen's
  XRDCalculator (De Graef & McHenry, *Structure of Materials*), f(s) = Z - 41.78214 s^2 sum a_i exp(-b_i s^2).
  Read from pymatgen's own data file; offered so that a comparison with pymatgen compares like with like.
- Neutron: bound coherent scattering lengths (fm) of V. F. Sears, Neutron News 3, 26 (1992), from the
  table that pymatgen ships.

s = sin(theta)/lambda = Q / (4 pi), in 1/angstrom; anomalous dispersion is not modelled.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

import numpy as np
import torch

from xtalsolve.errors import XtalsolveError

MAX_Z = 98
MOTT_BETHE_PREFACTOR = 41.78214  # of the Mott-Bethe formula in pymatgen's XRDCalculator (see "pymatgen" above)
FORM_FACTOR_TABLES = ("waasmaier-kirfel", "pymatgen")


@lru_cache(maxsize=None)
def _waasmaier_kirfel() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = json.loads(resources.files("xtalsolve.resources").joinpath("waasmaier_kirfel.json").read_text())
    a = np.zeros((MAX_Z + 1, 5))
    b = np.zeros((MAX_Z + 1, 5))
    c = np.zeros(MAX_Z + 1)
    for entry in data["elements"].values():
        z = entry["Z"]
        a[z], b[z], c[z] = entry["a"], entry["b"], entry["c"]
    return a, b, c


@lru_cache(maxsize=None)
def _pymatgen_mott_bethe() -> tuple[np.ndarray, np.ndarray]:
    from pymatgen.analysis.diffraction.xrd import ATOMIC_SCATTERING_PARAMS
    from pymatgen.core import Element

    coeff = np.zeros((MAX_Z + 1, 4, 2))
    for symbol, value in ATOMIC_SCATTERING_PARAMS.items():
        z = Element(symbol).Z
        if z <= MAX_Z:
            coeff[z] = value
    return coeff[..., 0], coeff[..., 1]


@lru_cache(maxsize=None)
def _neutron_lengths_fm() -> np.ndarray:
    import os

    import pymatgen.analysis.diffraction.neutron as neutron
    from pymatgen.core import Element

    with open(os.path.join(os.path.dirname(neutron.__file__), "neutron_scattering_length.json")) as fh:
        table = json.load(fh)
    lengths = np.full(MAX_Z + 1, np.nan)
    for symbol, value in table.items():
        if symbol.isalpha() and Element.is_valid_symbol(symbol) and Element(symbol).Z <= MAX_Z:
            lengths[Element(symbol).Z] = value
    return lengths


@lru_cache(maxsize=None)
def _as_tensors(table, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
    """A coefficient table as torch tensors, converted once per dtype and device."""
    return tuple(torch.as_tensor(t, dtype=dtype, device=device) for t in table())


def check_elements(numbers, radiation: str = "xray", source: str | None = None) -> None:
    """Raise a clear error for atomic numbers that the chosen table does not cover."""
    numbers = np.unique(np.asarray(numbers))
    numbers = numbers[numbers > 0]
    bad = numbers[numbers > MAX_Z]
    if radiation == "neutron":
        bad = np.concatenate([bad, [z for z in numbers if z <= MAX_Z and np.isnan(_neutron_lengths_fm()[z])]])
    if len(bad):
        from pymatgen.core import Element

        names = ", ".join(Element.from_Z(int(z)).symbol for z in bad)
        raise XtalsolveError(f"no {radiation} scattering data for {names}", source)


def xray_form_factor(numbers: torch.Tensor, s2: torch.Tensor, table: str = "waasmaier-kirfel") -> torch.Tensor:
    """Atomic X-ray form factors f0 (electrons); 0 for Z = 0 (padding).

    numbers: (U,) atomic numbers, or (B, U) with s2 of shape (B, H); s2: values of (sin(theta)/lambda)^2 in
    1/angstrom^2. Returns (..., U), i.e. (B, H, U) in the batched form.
    """
    dtype, device = s2.dtype, s2.device
    s2 = s2.unsqueeze(-1).unsqueeze(-1)  # (..., 1, 1)
    if numbers.dim() == 2:  # per-structure species: broadcast (B, 1, U, ...) against (B, H, 1, 1)
        numbers = numbers.unsqueeze(1)
    if table == "waasmaier-kirfel":
        a, b, c = _as_tensors(_waasmaier_kirfel, dtype, device)
        return c[numbers] + (a[numbers] * torch.exp(-b[numbers] * s2)).sum(-1)
    if table == "pymatgen":
        a, b = _as_tensors(_pymatgen_mott_bethe, dtype, device)
        z = numbers.to(dtype)
        return z - MOTT_BETHE_PREFACTOR * s2[..., 0] * (a[numbers] * torch.exp(-b[numbers] * s2)).sum(-1)
    raise XtalsolveError(f"unknown form-factor table {table!r}; use one of {', '.join(FORM_FACTOR_TABLES)}")


def xray_form_factor_slope(numbers: torch.Tensor, s2: torch.Tensor, table: str = "waasmaier-kirfel") -> torch.Tensor:
    """d f0 / d s2 (electrons angstrom^2) of :func:`xray_form_factor`, same arguments and shape: the closed-form
    derivative of the table's Gaussian sum, for the hand-written structure-factor derivatives."""
    dtype, device = s2.dtype, s2.device
    s2 = s2.unsqueeze(-1).unsqueeze(-1)
    if numbers.dim() == 2:
        numbers = numbers.unsqueeze(1)
    if table == "waasmaier-kirfel":
        a, b, _ = _as_tensors(_waasmaier_kirfel, dtype, device)
        return -(a[numbers] * b[numbers] * torch.exp(-b[numbers] * s2)).sum(-1)
    if table == "pymatgen":
        a, b = _as_tensors(_pymatgen_mott_bethe, dtype, device)
        return -MOTT_BETHE_PREFACTOR * (a[numbers] * (1.0 - b[numbers] * s2) * torch.exp(-b[numbers] * s2)).sum(-1)
    raise XtalsolveError(f"unknown form-factor table {table!r}; use one of {', '.join(FORM_FACTOR_TABLES)}")


def neutron_scattering_length(numbers: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    """Bound coherent scattering lengths (fm) for atomic numbers ``numbers``, shape of ``numbers``."""
    return torch.as_tensor(_neutron_lengths_fm(), dtype=dtype, device=numbers.device)[numbers]
