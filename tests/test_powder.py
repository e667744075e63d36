"""Bragg powder model against pymatgen's XRDCalculator / NDCalculator and analytic cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pymatgen.analysis.diffraction.neutron import ATOMIC_SCATTERING_LEN as NEUTRON_LENGTHS
from pymatgen.analysis.diffraction.neutron import NDCalculator
from pymatgen.analysis.diffraction.xrd import XRDCalculator
from pymatgen.core import Lattice, Structure

from xtalsolve import simulate_powder
from xtalsolve.crystal import CrystalBatch
from xtalsolve.errors import XtalsolveError
from xtalsolve.physics.powder import Instrument, bragg_peaks, cluster_peaks, make_grid, powder_pattern
from xtalsolve.physics.profiles import SCHERRER_K


def compare_with_reference(structure, reference, **kwargs):
    """Both stick lists clustered within 5e-5 deg (both codes bin coincident reflections at 1e-5 deg, so
    near-coincident ones of pseudo-symmetric cells may land in neighbouring bins in one code only)."""
    ours = bragg_peaks(structure, **kwargs)
    t_ours, i_ours = cluster_peaks([p["two_theta"] for p in ours], [p["intensity"] for p in ours])
    t_ref, i_ref = cluster_peaks(reference.x, reference.y)
    i_ours, i_ref = i_ours / i_ours.max(), i_ref / i_ref.max()
    ours, ref = i_ours > 1e-4, i_ref > 1e-4  # pymatgen drops peaks below 1e-5 of the strongest
    return t_ours[ours], i_ours[ours], t_ref[ref], i_ref[ref]


def test_matches_pymatgen_on_100_mp20_structures(mp20_sample):
    """Same form-factor table as pymatgen: identical positions, relative intensities within 1 %."""
    calculator = XRDCalculator()
    worst = 0.0
    for structure in mp20_sample:
        reference = calculator.get_pattern(structure, scaled=False, two_theta_range=(0, 90))
        t_ours, i_ours, t_ref, i_ref = compare_with_reference(structure, reference, form_factors="pymatgen")
        assert len(t_ours) == len(t_ref), structure.composition
        np.testing.assert_allclose(t_ours, t_ref, atol=5e-5)
        strong = i_ref > 0.01
        worst = max(worst, np.max(np.abs(i_ours[strong] / i_ref[strong] - 1)))
        np.testing.assert_allclose(i_ours, i_ref, atol=1e-4)
    assert worst < 0.01


def test_default_table_close_to_pymatgen(mp20_sample):
    """Waasmaier-Kirfel (default) vs pymatgen's Mott-Bethe fit: same peaks; the two form-factor fits differ by up
    to ~1.5 % below s = 0.5 1/A (up to 3 % in intensity; more for weak peaks from partial cancellations in F)."""
    calculator = XRDCalculator()
    for structure in mp20_sample[:30]:
        reference = calculator.get_pattern(structure, scaled=False, two_theta_range=(0, 90))
        t_ours, i_ours, t_ref, i_ref = compare_with_reference(structure, reference)
        for position, intensity in zip(t_ref[i_ref > 0.05], i_ref[i_ref > 0.05]):
            nearest = np.argmin(np.abs(t_ours - position))
            assert t_ours[nearest] == pytest.approx(position, abs=5e-5)
            assert i_ours[nearest] == pytest.approx(intensity, abs=0.03)


def test_neutron_matches_pymatgen(mp20_sample):
    calculator = NDCalculator(wavelength=1.54184)
    covered = [s for s in mp20_sample if all(el.symbol in NEUTRON_LENGTHS for el in s.composition)]
    assert len(covered) > 80
    for structure in covered[:20]:
        reference = calculator.get_pattern(structure, scaled=False, two_theta_range=(0, 90))
        t_ours, i_ours, t_ref, i_ref = compare_with_reference(structure, reference, radiation="neutron")
        np.testing.assert_allclose(t_ours, t_ref, atol=5e-5)
        np.testing.assert_allclose(i_ours, i_ref, atol=1e-4, rtol=1e-3)


def test_debye_waller_per_element_matches_pymatgen(mp20_sample):
    """Per-site B (one value per element, as the refinement passes them) against pymatgen's
    debye_waller_factors; a uniform per-site B equals the scalar B."""
    from xtalsolve.physics.powder import bragg_intensities, enumerate_reflections

    for structure in [s for s in mp20_sample if len(s.composition) >= 2][:5]:
        b_of = {el.symbol: 0.3 + 0.7 * i for i, el in enumerate(structure.composition)}
        reference = XRDCalculator(debye_waller_factors=b_of).get_pattern(structure, scaled=False, two_theta_range=(0, 90))
        batch = CrystalBatch.from_structures([structure])
        reflections = enumerate_reflections(batch.lattice, 1.54184 / (2 * math.sin(math.radians(45.0))))
        per_site = torch.tensor([[b_of[site.specie.symbol] for site in structure]], dtype=torch.float64)
        theta, intensity = bragg_intensities(batch, reflections, 1.54184, per_site, form_factors="pymatgen")
        two_theta = np.degrees(2 * theta[0].numpy())
        t_ours, i_ours = cluster_peaks(two_theta[reflections.mask[0].numpy()], intensity[0][reflections.mask[0]].numpy())
        t_ref, i_ref = cluster_peaks(reference.x, reference.y)
        strong = i_ref / i_ref.max() > 0.01
        matched = [np.argmin(np.abs(t_ours - t)) for t in t_ref[strong]]
        np.testing.assert_allclose(i_ours[matched] / i_ours.max(), i_ref[strong] / i_ref.max(), rtol=0.01)
        uniform = bragg_intensities(batch, reflections, 1.54184, torch.full_like(per_site, 0.8))[1]
        scalar = bragg_intensities(batch, reflections, 1.54184, 0.8)[1]
        np.testing.assert_allclose(uniform, scalar, rtol=1e-10, atol=1e-12 * float(scalar.max()))


def test_fcc_extinctions_and_multiplicity():
    """fcc: only unmixed hkl; simple cubic (100) carries multiplicity 6 from enumeration."""
    fcc = Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.0), ["Cu"], [[0, 0, 0]])
    for peak in bragg_peaks(fcc, two_theta_range=(0, 150)):
        h, k, l = np.abs(peak["hkl"][0]) % 2
        assert h == k == l, peak
    simple = Structure(Lattice.cubic(3.0), ["Po"], [[0, 0, 0]])
    first = bragg_peaks(simple, wavelength=1.0, two_theta_range=(0, 40), form_factors="pymatgen")[0]
    theta = math.radians(first["two_theta"] / 2)
    s2 = (1 / (2 * 3.0)) ** 2
    from pymatgen.analysis.diffraction.xrd import ATOMIC_SCATTERING_PARAMS

    a, b = np.array(ATOMIC_SCATTERING_PARAMS["Po"]).T
    f = 84 - 41.78214 * s2 * np.sum(a * np.exp(-b * s2))
    lp = (1 + math.cos(2 * theta) ** 2) / (math.sin(theta) ** 2 * math.cos(theta))
    assert len(first["hkl"]) == 3  # one Friedel half of the six {100}
    assert first["intensity"] == pytest.approx(6 * f * f * lp, rel=1e-10)


def test_peak_area_position_and_scherrer_width(rocksalt):
    """A rendered peak has area m|F|^2 LP, sits at 2theta_hkl and has the Scherrer FWHM."""
    wavelength, size = 1.54056, 200.0
    grid, unit = make_grid((20.0, 40.0, 0.001))
    instrument = Instrument(wavelength=wavelength, w=0.0)
    batch = CrystalBatch.from_structures([rocksalt])
    y = powder_pattern(batch, torch.as_tensor(grid), unit, instrument, size=size).numpy()[0]
    peaks = [p for p in bragg_peaks(rocksalt, wavelength, (20, 40)) if p["intensity"] > 0]
    strongest = max(peaks, key=lambda p: p["intensity"])
    window = np.abs(grid - strongest["two_theta"]) < 1.5
    area = np.trapezoid(y[window], grid[window])
    expected = math.degrees(SCHERRER_K * wavelength / (size * math.cos(math.radians(strongest["two_theta"] / 2))))
    inside = 2 / math.pi * math.atan(2 * 1.5 / expected)  # share of a Lorentzian's area within +-1.5 deg
    assert area == pytest.approx(strongest["intensity"] * inside, rel=5e-3)
    assert grid[window][np.argmax(y[window])] == pytest.approx(strongest["two_theta"], abs=1e-3)
    half = y[window] >= y[window].max() / 2
    fwhm = grid[window][half][-1] - grid[window][half][0]
    assert fwhm == pytest.approx(expected, rel=0.01)


def test_q_grid_peak_positions(rocksalt):
    pattern = simulate_powder([rocksalt], wavelength=0.5, q=(1.0, 5.0, 0.0005))[0]
    grid = make_grid(q=(1.0, 5.0, 0.0005))[0]
    d200 = 5.64 / 2
    near = np.abs(grid - 2 * math.pi / d200) < 0.05
    assert grid[near][np.argmax(pattern[near])] == pytest.approx(2 * math.pi / d200, abs=1e-3)


def test_batch_equals_single_and_zero_shift(mp20_sample):
    structures = mp20_sample[:5]
    together = simulate_powder(structures, size=80.0, dtype=torch.float64)
    apart = np.vstack([simulate_powder([s], size=80.0, dtype=torch.float64) for s in structures])
    np.testing.assert_allclose(together, apart, rtol=1e-9, atol=1e-9 * together.max())
    single_precision = simulate_powder(structures, size=80.0)  # the default, float32
    np.testing.assert_allclose(single_precision, together, atol=1e-4 * together.max())
    exact = {"two_theta": (5, 90, 0.02), "dtype": torch.float64}
    shifted = simulate_powder(structures[:1], instrument=Instrument(zero_shift=0.2), **exact)
    plain = simulate_powder(structures[:1], **exact)
    np.testing.assert_allclose(shifted[0][10:], plain[0][:-10], rtol=1e-6, atol=1e-6 * plain.max())


def test_gradients_match_finite_differences(rocksalt):
    distorted = rocksalt.get_primitive_structure()
    distorted.perturb(0.05, min_distance=0.01)  # lower the symmetry so that coordinates matter
    batch = CrystalBatch.from_structures([distorted])
    grid = torch.linspace(20.0, 60.0, 200, dtype=torch.float64)

    def pattern(lattice, frac):
        b = CrystalBatch(lattice, frac, batch.numbers, batch.occupancy)
        return powder_pattern(b, grid, "2theta", Instrument(w=0.05), size=150.0, biso=0.5).sum()

    lattice = batch.lattice.clone().requires_grad_(True)
    frac = batch.frac.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(pattern, (lattice, frac), eps=1e-6, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("table", ["waasmaier-kirfel", "pymatgen", "neutron"])
@pytest.mark.parametrize("per_site_b", [True, False])
@pytest.mark.parametrize("derivatives", ["closed-form", "autograd"])
def test_structure_factor_derivatives_match_finite_differences(table, per_site_b, derivatives):
    """The hand-written |F|^2 derivatives (reverse and forward mode, batched as jacfwd / jacrev use them) in
    coordinates, s2, occupancies and per-site B, for both X-ray tables and neutrons, padding included; and the
    same values and derivatives by autograd."""
    from xtalsolve.physics.powder import species_per_structure, squared_structure_factor

    gen = torch.Generator().manual_seed(0)
    n_structures, n_sites, n_refl = 2, 5, 7
    frac = torch.rand(n_structures, n_sites, 3, dtype=torch.float64, generator=gen).requires_grad_()
    s2 = (0.3 * torch.rand(n_structures, n_refl, dtype=torch.float64, generator=gen)).requires_grad_()
    occupancy = torch.rand(n_structures, n_sites, dtype=torch.float64, generator=gen).requires_grad_()
    biso = torch.rand(n_structures, n_sites, dtype=torch.float64, generator=gen).requires_grad_()
    hkl = torch.randint(-3, 4, (n_structures, n_refl, 3), generator=gen).double()
    numbers = torch.tensor([[8, 8, 14, 26, 0], [1, 6, 6, 8, 92]])
    if table == "neutron":
        species, site_species = numbers, torch.arange(n_sites).expand(n_structures, n_sites)
    else:
        species, site_species = species_per_structure(numbers)

    def f_squared(frac, s2, occupancy, *b):
        return squared_structure_factor(frac, s2, occupancy, b[0] if b else None, hkl, species, site_species, table,
                                        derivatives)

    inputs = (frac, s2, occupancy) + ((biso,) if per_site_b else ())
    if derivatives == "closed-form":
        reference = squared_structure_factor(*inputs[:3], biso if per_site_b else None, hkl, species, site_species,
                                             table, "autograd")
        assert torch.allclose(f_squared(*inputs), reference, rtol=1e-12)
    assert torch.autograd.gradcheck(f_squared, inputs, check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=True)


@pytest.mark.parametrize("with_size", [True, False])
def test_closed_form_widths_match_autograd(with_size):
    """peak_shape(derivatives="closed-form") gives the same TCH widths as the composed functions, and its
    hand-written derivatives in theta, U, V, W, X, Y, strain and size pass gradcheck in both modes."""
    from xtalsolve.physics.powder import Instrument, peak_shape

    gen = torch.Generator().manual_seed(1)
    theta = (0.1 + 1.2 * torch.rand(2, 6, dtype=torch.float64, generator=gen)).requires_grad_()
    profile = [(0.01 + 0.05 * torch.rand(2, 1, dtype=torch.float64, generator=gen)).requires_grad_() for _ in "uvwxy"]
    strain = (1e-3 * torch.rand(2, 1, dtype=torch.float64, generator=gen)).requires_grad_()
    size = (50.0 + 100.0 * torch.rand(2, 1, dtype=torch.float64, generator=gen)).requires_grad_()

    def widths(theta, u, v, w, x, y, strain, *size, derivatives="closed-form"):
        return peak_shape(theta, 1.54, Instrument(), size[0] if size else None, strain, u, v, w, x, y,
                          derivatives=derivatives)

    inputs = (theta, *profile, strain) + ((size,) if with_size else ())
    for closed, reference in zip(widths(*inputs), widths(*inputs, derivatives="autograd")):
        assert torch.allclose(closed, reference, rtol=1e-13, atol=0.0)
    assert torch.autograd.gradcheck(widths, inputs, check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=True)


@pytest.mark.parametrize("radiation, monochromator", [("xray", None), ("xray", 26.6), ("neutron", None)])
def test_closed_form_lorentz_polarisation(radiation, monochromator):
    from xtalsolve.physics.powder import lorentz_polarisation

    theta = torch.linspace(0.05, 1.5, 9, dtype=torch.float64).view(1, -1).requires_grad_()
    closed = lambda t: lorentz_polarisation(t, radiation, monochromator, "closed-form")  # noqa: E731
    assert torch.allclose(closed(theta), lorentz_polarisation(theta, radiation, monochromator), rtol=1e-14)
    assert torch.autograd.gradcheck(closed, (theta,), check_forward_ad=True, check_batched_grad=True,
                                    check_batched_forward_grad=True)


def test_form_factor_slope_is_the_derivative_of_the_table():
    from xtalsolve.physics.scattering import xray_form_factor, xray_form_factor_slope

    numbers = torch.tensor([1, 8, 26, 92])
    s2 = torch.linspace(0.0, 2.0, 11, dtype=torch.float64).requires_grad_()
    for table in ("waasmaier-kirfel", "pymatgen"):
        f = xray_form_factor(numbers, s2, table)
        autograd = torch.stack([torch.autograd.grad(f[:, u].sum(), s2, retain_graph=True)[0]
                                for u in range(len(numbers))], -1)
        assert torch.allclose(xray_form_factor_slope(numbers, s2.detach(), table), autograd, rtol=1e-10, atol=1e-12)


def test_kalpha_doublet_adds_second_line(rocksalt):
    single = simulate_powder([rocksalt], instrument=Instrument(wavelength=1.54056))
    doublet = simulate_powder([rocksalt], instrument=Instrument(wavelength=1.54056, wavelength2=1.54439))
    assert doublet.sum() == pytest.approx(1.5 * single.sum(), rel=0.02)


def test_bad_requests_raise_clear_errors(rocksalt):
    with pytest.raises(XtalsolveError, match="wavelength"):
        simulate_powder([rocksalt], wavelength=-1.0)
    with pytest.raises(XtalsolveError, match="range"):
        simulate_powder([rocksalt], two_theta=(90, 10, 0.02))
    with pytest.raises(XtalsolveError, match="no xray scattering data"):
        simulate_powder([Structure(Lattice.cubic(3), ["Es"], [[0, 0, 0]])])
    with pytest.raises(XtalsolveError, match="no neutron scattering data for Ac"):
        simulate_powder([Structure(Lattice.cubic(3), ["Ac"], [[0, 0, 0]])], radiation="neutron")


@pytest.mark.parametrize("size, tolerance", [(10.0, 0.03), (100.0, 0.015)])
def test_fast_broad_path_matches_exact_rendering(mp20_sample, size, tolerance):
    """simulate_powder renders broad patterns through a uniform Q grid (binned + FFT), where size broadening is
    a constant-width Lorentzian; powder_pattern draws each peak as a symmetric pseudo-Voigt in 2theta, cut at
    +-40 FWHM. They agree to 1.5 % of the maximum at D = 100 A; at D = 10 A (FWHM ~ 9 deg) the symmetric shape is
    the approximation and they differ by up to 3 %."""
    structures = mp20_sample[:6]
    grid, unit = make_grid((5.0, 90.0, 0.02))
    fast = simulate_powder(structures, two_theta=(5.0, 90.0, 0.02), size=size, dtype=torch.float64)
    batch = CrystalBatch.from_structures(structures)
    exact = powder_pattern(batch, torch.as_tensor(grid), unit, Instrument(), size=size, merge=True).numpy()
    error = np.abs(fast - exact).max(1) / exact.max(1)
    assert error.max() < tolerance


def test_cube_size_profile_is_the_laue_interference_function():
    """shape="cube": every reflection broadened by the exact profile of a cube of edge D along an edge,
    D sinc^2(D dQ / 2) / (2 pi) per unit area; absolute areas kept."""
    po = Structure(Lattice.cubic(3.0), ["Po"], [[0, 0, 0]])
    size, wavelength = 25.0, 1.54184
    q = torch.arange(0.5, 8.0 + 1e-9, 0.005, dtype=torch.float64)
    batch = CrystalBatch.from_structures([po], dtype=torch.float64)
    y = powder_pattern(batch, q, "q", Instrument(wavelength=wavelength, w=1e-6), size=size, binned=True,
                       shape="cube")[0].numpy()
    qn, laue = q.numpy(), np.zeros(len(q))
    for peak in bragg_peaks(po, wavelength, (0.0, 180.0)):
        centre = 4 * np.pi * np.sin(np.radians(peak["two_theta"] / 2)) / wavelength
        laue += peak["intensity"] * size / (2 * np.pi) * np.sinc(size * (qn - centre) / (2 * np.pi)) ** 2
    inside = (qn > 1.5) & (qn < 7.0)  # away from the ends, where reflections beyond the grid are cut
    assert np.linalg.norm(y[inside] - laue[inside]) / np.linalg.norm(laue[inside]) < 0.01


def test_unknown_crystallite_shape_and_unsupported_renderer_are_refused():
    with pytest.raises(XtalsolveError, match="unknown crystallite shape"):
        simulate_powder([Structure(Lattice.cubic(3.0), ["Po"], [[0, 0, 0]])], size=20.0, shape="prism")
    batch = CrystalBatch.from_structures([Structure(Lattice.cubic(3.0), ["Po"], [[0, 0, 0]])])
    with pytest.raises(XtalsolveError, match="uniform Q grid"):
        powder_pattern(batch, torch.linspace(10, 80, 100), "2theta", size=20.0, shape="sphere")
