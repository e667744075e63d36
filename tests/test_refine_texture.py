"""Automatic preferred-orientation search and the default background: a textured pattern simulated with the
forward model's own March-Dollase factor (physics.powder, every reflection enumerated, independent of the
refinement's orbit-averaged one) must be recognised, and a random powder must stay untextured."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from xtalsolve.crystal import CrystalBatch
from xtalsolve.physics.powder import Instrument, make_grid, powder_pattern
from xtalsolve.radiation import tube_line
from xtalsolve.refine import perturb, refine, symmetrize
from xtalsolve.refine.constraints import symmetry_of
from xtalsolve.refine.recipe import Profile, background_terms
from xtalsolve.refine.texture import distinct_axes

INSTRUMENT = Instrument(wavelength=1.5406, w=0.004)
OPTIONS = dict(n_background=3, profile_params=("size",), biso=1.0, size=2000.0, max_nfev=30)


def rutile() -> Structure:
    return symmetrize(Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.594, 2.959), ["Ti", "O"],
                                                [[0, 0, 0], [0.3049, 0.3049, 0]]))


def noisy(structure: Structure, texture=None, seed: int = 0) -> Profile:
    grid, unit = make_grid((10.0, 80.0, 0.02))
    with torch.no_grad():
        y = powder_pattern(CrystalBatch.from_structures([structure]), grid, unit, INSTRUMENT, size=600.0, biso=0.6,
                           preferred_orientation=texture)[0].numpy()
    observed = np.random.default_rng(seed).poisson(2e4 * y / y.max() + 50.0).astype(float)
    return Profile.from_arrays(grid, observed, np.sqrt(np.maximum(observed, 1.0)))


def test_distinct_axes_follow_the_point_group():
    cubic = symmetry_of(Structure(Lattice.cubic(4.0), ["Cu"], [[0, 0, 0]]))
    assert distinct_axes(cubic.point_rotations) == [(0, 0, 1), (1, 1, 0), (1, 1, 1)]
    tetragonal = symmetry_of(rutile())
    assert distinct_axes(tetragonal.point_rotations) == [(0, 0, 1), (1, 0, 0), (1, 1, 0), (1, 0, 1), (1, 1, 1)]
    triclinic = symmetry_of(Structure(Lattice.from_parameters(4, 5, 6, 80, 85, 95), ["Cu", "O"],
                                      [[0, 0, 0], [0.3, 0.2, 0.1]]))
    assert len(distinct_axes(triclinic.point_rotations)) == 7


def test_texture_search_finds_the_axis_and_ratio():
    truth = rutile()
    profile = noisy(truth, texture=((0, 0, 1), 0.7))
    result = refine(profile, perturb(truth, 0.01, 0.05, seed=1), INSTRUMENT, texture="auto", **OPTIONS)
    search = result.stages[-1]
    assert search["stage"] == "texture search"
    assert search["texture"] == {"TiO2": "001"}
    assert min(search["tried"], key=search["tried"].get) == "TiO2 001"
    assert result.parameters["march_dollase"]["value"] == pytest.approx(0.7, abs=0.03)
    assert np.allclose(result.cell[:3], truth.lattice.abc, rtol=1e-3)
    assert result.gof < 1.3


def test_random_powder_stays_untextured():
    truth = rutile()
    result = refine(noisy(truth, seed=2), perturb(truth, 0.01, 0.05, seed=1), INSTRUMENT, texture="auto", **OPTIONS)
    search = result.stages[-1]
    assert search["texture"] == {"TiO2": None}
    assert "march_dollase" not in result.parameters
    assert len(search["tried"]) == 5  # every distinct axis was tried, none helped by 2 %


def test_bad_texture_option_is_a_clear_error():
    from xtalsolve.errors import XtalsolveError

    truth = rutile()
    with pytest.raises(XtalsolveError, match="texture"):
        refine(noisy(truth), truth, INSTRUMENT, texture="sideways", **OPTIONS)


def test_default_background_terms_scale_with_range_and_peak_width():
    x = np.arange(5.0, 109.0, 0.02)
    sharp = np.exp(-0.5 * ((x - 30.0) / 0.04) ** 2) * 1e4 + 100.0
    assert background_terms(Profile.from_arrays(x, sharp, np.sqrt(sharp))) == round(104 / 5)
    short = x < 19.0
    narrow_range = np.exp(-0.5 * ((x[short] - 12.0) / 0.04) ** 2) * 1e4 + 100.0
    assert background_terms(Profile.from_arrays(x[short], narrow_range, np.sqrt(narrow_range))) == 8
    broad = np.exp(-0.5 * ((x - 30.0) / (3.0 / 2.3548)) ** 2) * 1e4 + 100.0  # nanocrystal: FWHM 3 deg
    assert 104 / (4 * 3.0) < 9  # one term per four peak widths caps it at the floor of 8
    assert background_terms(Profile.from_arrays(x, broad, np.sqrt(broad))) == 8
    medium = np.exp(-0.5 * ((x - 30.0) / (1.0 / 2.3548)) ** 2) * 1e4 + 100.0  # FWHM 1 deg: 104 / 4 = 26 > 21
    assert background_terms(Profile.from_arrays(x, medium, np.sqrt(medium))) == 21


def test_tube_lines():
    assert tube_line(0.71073) == "MoKa"
    assert tube_line(1.5406) == "CuKa1"
    assert tube_line(0.49935) is None
