"""The compiled pattern-only powder model (simulate_powder's engine) against pymatgen and the torch model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pymatgen.analysis.diffraction.xrd import XRDCalculator
from pymatgen.core import Lattice, Structure

from xtalsolve import simulate_powder
from xtalsolve.crystal import CrystalBatch
from xtalsolve.errors import XtalsolveError
from xtalsolve.physics import compiled
from xtalsolve.physics.powder import Instrument, cluster_peaks, make_grid, powder_pattern


def torch_pattern(structures, grid, unit, instrument, **settings) -> np.ndarray:
    """The differentiable torch model, merged peaks, float64: the reference of the compiled one."""
    batch = CrystalBatch.from_structures(structures)
    with torch.no_grad():
        return powder_pattern(batch, torch.as_tensor(grid), unit, instrument, merge=True, **settings).numpy()


def test_sticks_match_pymatgen(mp20_sample):
    """pymatgen's form-factor table: the same peaks at the same 2theta, relative intensities within 1e-6
    (reflections merged within 1e-5 deg as pymatgen does, then both lists clustered within 5e-5 deg)."""
    calculator = XRDCalculator()
    structures = mp20_sample[:40]
    two_theta, intensity, n_peaks = compiled.bragg_sticks(structures, 1.54184, 1.54184 / (2 * np.sin(np.radians(45))),
                                                          form_factors="pymatgen", tolerance_deg=1e-5)
    for k, structure in enumerate(structures):
        reference = calculator.get_pattern(structure, scaled=False, two_theta_range=(0, 90))
        t_ref, i_ref = cluster_peaks(reference.x, reference.y, tolerance_deg=5e-5)
        t_ours, i_ours = cluster_peaks(two_theta[k, : n_peaks[k]], intensity[k, : n_peaks[k]], tolerance_deg=5e-5)
        i_ref, i_ours = i_ref / i_ref.max(), i_ours / i_ours.max()
        ours, ref = i_ours > 1e-4, i_ref > 1e-4  # pymatgen drops peaks below 1e-5 of the strongest
        np.testing.assert_allclose(t_ours[ours], t_ref[ref], atol=5e-5)
        np.testing.assert_allclose(i_ours[ours], i_ref[ref], rtol=1e-6, atol=1e-9)


SETTINGS = {
    "plain": (Instrument(), {}),
    "size, strain, biso": (Instrument(), {"size": 300.0, "strain": 2e-3, "biso": 0.8}),
    "caglioti, lorentzian, zero, monochromator": (
        Instrument(u=0.01, v=-0.004, w=0.003, x=0.02, y=0.01, zero_shift=0.05, monochromator_2theta=26.6), {}),
    "doublet": (Instrument(wavelength=1.54056, wavelength2=1.54439), {"size": 500.0}),
    "neutron": (Instrument(wavelength=1.8, radiation="neutron", w=0.01), {}),
    "pymatgen table": (Instrument(), {"form_factors": "pymatgen"}),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_patterns_match_the_torch_model(mp20_sample, name):
    """Same pattern as powder_pattern(merge=True) to 1e-6 of its maximum on a 2theta grid with every peak
    evaluated everywhere; with the default windows (each peak +-(3 + 40 eta) FWHM here, the batch's widest
    window in the torch model) Lorentzian tails are cut differently, by less than 1e-3 of the maximum."""
    instrument, settings = SETTINGS[name]
    structures = mp20_sample[40:52]
    grid, unit = make_grid((5.0, 100.0, 0.01))
    ours = compiled.powder_patterns(structures, grid, unit, instrument, n_fwhm=1e5, **settings)
    reference = torch_pattern(structures, grid, unit, instrument, n_fwhm=1e5, **settings)
    error = np.abs(ours - reference).max(1) / reference.max(1)
    assert error.max() < 1e-6, name
    windowed = compiled.powder_patterns(structures, grid, unit, instrument, **settings)
    assert (np.abs(windowed - reference).max(1) / reference.max(1)).max() < 1e-3


def test_q_grid_and_nonuniform_grid_match_the_torch_model(mp20_sample):
    structures = mp20_sample[52:60]
    instrument = Instrument(wavelength=0.7093, w=0.002)
    grid, unit = make_grid(q=(0.5, 9.0, 0.002))
    ours = compiled.powder_patterns(structures, grid, unit, instrument, size=400.0, n_fwhm=1e5)
    reference = torch_pattern(structures, grid, unit, instrument, size=400.0, n_fwhm=1e5)
    assert (np.abs(ours - reference).max(1) / reference.max(1)).max() < 1e-6
    rng = np.random.default_rng(0)
    uneven = np.sort(rng.uniform(10.0, 80.0, 3000))
    ours = compiled.powder_patterns(structures, uneven, "2theta", Instrument(w=0.01))
    reference = torch_pattern(structures, uneven, "2theta", Instrument(w=0.01))
    assert (np.abs(ours - reference).max(1) / reference.max(1)).max() < 1e-6


def test_disordered_sites_and_batch_independence(rocksalt):
    """A 50/50 disordered site scatters as the average of its species; each structure's pattern is the same
    alone or in a batch of different cells."""
    mixed = Structure(Lattice.cubic(4.2), [{"Mg": 0.5, "Fe": 0.5}, "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    grid, unit = make_grid((10.0, 90.0, 0.02))
    together = compiled.powder_patterns([rocksalt, mixed], grid, unit, Instrument())
    apart = np.vstack([compiled.powder_patterns([s], grid, unit, Instrument()) for s in (rocksalt, mixed)])
    np.testing.assert_allclose(together, apart, rtol=0, atol=1e-9 * together.max())
    reference = torch_pattern([mixed], grid, unit, Instrument())
    assert np.abs(together[1] - reference[0]).max() < 1e-6 * reference.max()


def test_threads_give_the_same_patterns(mp20_sample):
    """Blocks of structures on a thread pool (torch's thread count) write the same rows as one thread."""
    grid, unit = make_grid((5.0, 90.0, 0.02))
    one = compiled.powder_patterns(mp20_sample[:21], grid, unit, Instrument(), size=900.0)
    saved = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        three = compiled.powder_patterns(mp20_sample[:21], grid, unit, Instrument(), size=900.0)
    finally:
        torch.set_num_threads(saved)
    np.testing.assert_array_equal(one, three)


def test_simulate_powder_uses_it_and_refuses_bad_input(rocksalt):
    grid, unit = make_grid((10.0, 90.0, 0.02))
    direct = compiled.powder_patterns([rocksalt], grid, unit, Instrument(), size=2000.0, biso=0.5)
    public = simulate_powder([rocksalt], two_theta=(10.0, 90.0, 0.02), size=2000.0, biso=0.5)
    np.testing.assert_allclose(public, direct)
    with pytest.raises(XtalsolveError, match="no xray scattering data for Es"):
        simulate_powder([Structure(Lattice.cubic(3), ["Es"], [[0, 0, 0]])])
    with pytest.raises(XtalsolveError, match="unknown form-factor table"):
        simulate_powder([rocksalt], form_factors="cromer")


def test_back_reflection_range_matches_the_torch_model(mp20_sample):
    """Cr Ka to 2theta = 175 deg: the limiting sphere near its edge (sin theta -> 1) and large Lorentz factors."""
    structures = mp20_sample[60:66]
    instrument = Instrument(wavelength=2.2909, w=0.004)
    grid, unit = make_grid((10.0, 175.0, 0.01))
    ours = compiled.powder_patterns(structures, grid, unit, instrument, biso=0.3)
    reference = torch_pattern(structures, grid, unit, instrument, biso=0.3)
    assert (np.abs(ours - reference).max(1) / reference.max(1)).max() < 1e-6


def test_supercell_gives_the_same_pattern(rocksalt):
    """A 3x3x3 supercell (27 times the atoms, its extra reflections extinct) scatters 27^2 times as strongly into
    the same peaks."""
    grid, unit = make_grid((10.0, 90.0, 0.02))
    cell, supercell = compiled.powder_patterns([rocksalt, rocksalt * (3, 3, 3)], grid, unit, Instrument())
    np.testing.assert_allclose(supercell / 27**2, cell, rtol=0, atol=1e-9 * cell.max())
