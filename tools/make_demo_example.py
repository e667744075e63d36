"""Write the bundled solve example: a nanocrystal powder pattern simulated with the project's forward model.

    python tools/make_demo_example.py        # -> src/xtalsolve/resources/examples/NaCl_nano_CuKa1.xy

Rock-salt NaCl (Fm-3m, a = 5.640 angstrom; the reference CIF NaCl.cif beside it), 60 angstrom crystallites,
Cu Kalpha1, 2theta 10-80 deg in 0.02 deg steps, B_iso 0.5 angstrom^2, peak height 20,000 counts over a flat 100-count
background, Poisson noise (seed 0). ``xtalsolve demo`` solves it from the formula alone and compares the answer
with the reference CIF.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pymatgen.core import Lattice, Structure

from xtalsolve.io import write_xy
from xtalsolve.io.structures import write_cif
from xtalsolve.pattern import Pattern
from xtalsolve.physics.powder import Instrument, make_grid, simulate_powder

EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "xtalsolve" / "resources" / "examples"
WAVELENGTH = 1.5406  # Cu Kalpha1, angstrom
SIZE = 60.0  # crystallite diameter, angstrom
TWO_THETA = (10.0, 80.0, 0.02)  # degrees


def main() -> None:
    truth = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.640), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    grid, unit = make_grid(TWO_THETA)
    y = simulate_powder([truth], instrument=Instrument(wavelength=WAVELENGTH), two_theta=TWO_THETA, size=SIZE,
                        biso=0.5)[0]
    y = 2e4 * y / y.max() + 100.0
    y = np.random.default_rng(0).poisson(y).astype(float)
    pattern = Pattern(grid, y, np.sqrt(np.maximum(y, 1.0)), unit, WAVELENGTH, "NaCl_nano_CuKa1.xy")
    header = {"simulated": "tools/make_demo_example.py (xtalsolve forward model), Poisson noise seed 0",
              "structure": "rock-salt NaCl, Fm-3m, a = 5.640 A (NaCl.cif)", "crystallite_size_A": SIZE,
              "biso_A2": 0.5, "formula": "NaCl"}
    write_xy(pattern, EXAMPLES / "NaCl_nano_CuKa1.xy", header)
    write_cif(truth, EXAMPLES / "NaCl.cif")
    print(f"wrote {EXAMPLES / 'NaCl_nano_CuKa1.xy'} and NaCl.cif")


if __name__ == "__main__":
    main()
