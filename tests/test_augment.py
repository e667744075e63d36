"""On-the-fly training patterns and the fast binned renderer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xtalsolve.crystal import CrystalBatch
from xtalsolve.data.augment import Augmentation, training_patterns
from xtalsolve.physics.powder import Instrument, bragg_peaks, march_dollase, powder_pattern


@pytest.fixture(scope="module")
def batch(mp20_sample):
    return CrystalBatch.from_structures(mp20_sample[:16])


def test_binned_renderer_matches_exact_for_size_broadening(batch):
    """On a Q grid Scherrer widths are constant, so binning + one kernel is exact up to bin averaging."""
    grid = torch.linspace(0.5, 8.0, 4096, dtype=torch.float64)
    kwargs = {"size": 20.0, "merge": True, "instrument": Instrument(w=1e-6)}
    exact = powder_pattern(batch, grid, "q", **kwargs)
    binned = powder_pattern(batch, grid, "q", binned=True, **kwargs)
    error = (binned - exact).abs().amax(1) / exact.amax(1)
    assert float(error.max()) < 2e-3


def test_training_patterns_shapes_ranges_and_seed(batch):
    aug = Augmentation()
    first, mask, conditions = training_patterns(batch, aug, torch.Generator().manual_seed(3))
    again, _, _ = training_patterns(batch, aug, torch.Generator().manual_seed(3))
    other, _, _ = training_patterns(batch, aug, torch.Generator().manual_seed(4))
    assert first.shape == (len(batch), aug.q_grid[2]) and mask.shape == first.shape
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.allclose(first.amax(1), torch.ones(len(batch)))
    assert bool((first[~mask] == 0).all())
    assert bool(((conditions["size_A"] >= 5.0) & (conditions["size_A"] <= 10_000.0)).all())
    q = aug.grid
    for row, lo, hi in zip(mask, conditions["q_min"], conditions["q_max"]):
        assert torch.equal(row, (q >= lo) & (q <= hi))


def test_march_dollase_factors():
    """r^-3 along the texture axis, r^1.5 perpendicular to it (Dollase 1986)."""
    from pymatgen.core import Lattice, Structure

    crystal = Structure(Lattice.tetragonal(3.0, 5.0), ["Cu"], [[0, 0, 0]])
    b = CrystalBatch.from_structures([crystal])
    hkl = torch.tensor([[[0, 0, 1], [1, 0, 0], [1, 1, 0]]])
    factor = march_dollase(b.lattice, hkl, (0, 0, 1), 0.7)[0].numpy()
    np.testing.assert_allclose(factor, [0.7**-3, 0.7**1.5, 0.7**1.5], rtol=1e-12)
    grid = torch.linspace(10.0, 80.0, 7001, dtype=torch.float64)
    plain = powder_pattern(b, grid)[0]
    textured = powder_pattern(b, grid, preferred_orientation=((0, 0, 1), 0.7))[0]
    peak_001 = bragg_peaks(crystal, two_theta_range=(10, 80))[0]
    at = int(np.argmin(np.abs(grid.numpy() - peak_001["two_theta"])))
    assert float(textured[at] / plain[at]) == pytest.approx(0.7**-3, rel=1e-6)
