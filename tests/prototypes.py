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


def rocksalt() -> Structure:
    return cubic(5.64, {"Na": [[0, 0, 0]], "Cl": [[0.5, 0.5, 0.5]]})


def mncuf6() -> Structure:
    """mp-1206085, MnCuF6, triclinic P-1 (MP-20 test split, ../shared/data/structures/mp20_test.csv.gz)."""
    lattice = Lattice.from_parameters(4.99929318, 5.10230773, 5.29702356, 117.86393023, 90.02223206, 119.31413236)
    species = ["Mn", "Cu"] + ["F"] * 6
    frac = [
        [0.5, 0.0, 0.5], [0.0, 0.0, 0.0], [0.742222, 0.882207, 0.254056], [0.257778, 0.117793, 0.745944],
        [0.625363, 0.880407, 0.740416], [0.374637, 0.119593, 0.259584], [0.14963, 0.538997, 0.267309],
        [0.85037, 0.461003, 0.732691],
    ]  # fmt: skip
    return Structure(lattice, species, frac)


def lab_pattern(structure: Structure, two_theta: tuple[float, float, float], size: float, name: str,
                wavelength: float = 1.5406, background: float = 30.0):
    """Noise-free simulated lab pattern of ``structure`` (Cu Ka1, crystallites of ``size`` angstrom, B 0.5 A^2):
    10^4 counts at the strongest peak on a flat ``background``, sigma = sqrt(counts)."""
    from xtalsolve.pattern import Pattern
    from xtalsolve.physics.powder import Instrument, make_grid, simulate_powder

    grid, unit = make_grid(two_theta)
    y = simulate_powder([structure], instrument=Instrument(wavelength=wavelength), two_theta=two_theta, size=size,
                        biso=0.5)[0]
    y = 1e4 * y / y.max() + background
    return Pattern(grid, y, np.sqrt(y), unit, wavelength, name)


def max_pooled_pattern(structure: Structure, size_A: float, biso: float = 0.0, shift_bins: int = 0):
    """PXRDnet's representation, built independently of xtalsolve's forward model: pymatgen's stick pattern
    (Cu Kalpha) histogrammed on 4,096 Q bins (0 - 4 pi / lambda), convolved with the cube profile
    D sinc^2(D Q / 2), max-normalised and max-pooled to 512 points (each the maximum of 8 bins). ``biso``
    (angstrom^2): each stick times its Debye-Waller factor exp(-B Q^2 / 8 pi^2); ``shift_bins``: every stick moved
    up by that many of the 4,096 bins (a zero offset)."""
    from pymatgen.analysis.diffraction.xrd import XRDCalculator

    sticks = XRDCalculator("CuKa").get_pattern(structure, two_theta_range=(0.0, 180.0))
    wavelength = 1.54184
    q = 4 * np.pi * np.sin(np.radians(sticks.x) / 2) / wavelength
    edges = np.linspace(0.0, 4 * np.pi / wavelength, 4097)
    centres = 0.5 * (edges[1:] + edges[:-1])
    binned, _ = np.histogram(q, bins=edges, weights=sticks.y * np.exp(-biso * q**2 / (8 * np.pi**2)))
    binned = np.roll(binned, shift_bins)
    x = size_A * np.arange(-1024, 1025) * (edges[1] - edges[0]) / 2  # odd length: centred, no shift
    kernel = np.sinc(x / np.pi) ** 2
    y = np.convolve(binned, kernel / kernel.sum(), mode="same")
    return centres.reshape(512, 8).mean(1), (y / y.max()).reshape(512, 8).max(1), wavelength
