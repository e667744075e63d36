"""Test structures written out by hand (Structure.from_spacegroup takes ~1 s per call)."""

from __future__ import annotations

import numpy as np
from pymatgen.core import Lattice, Structure

FCC = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])


def cubic(a: float, basis: dict[str, list]) -> Structure:
    """Conventional cubic cell (a in angstrom): every atom of ``basis`` (element -> fractional positions)
    repeated on the fcc lattice."""
    species, frac = [], []
    for element, positions in basis.items():
        for position in positions:
            for shift in FCC:
                species.append(element)
                frac.append((np.asarray(position) + shift) % 1.0)
    return Structure(Lattice.cubic(a), species, frac)
