"""Debye scattering of nanoparticles, validated against DebyeCalculator (an independent Debye code) at small
sizes and against the Bragg pattern broadened by the exact sphere line profile at large size."""

from __future__ import annotations

import math
import time
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from pymatgen.core import Structure
from scipy.integrate import cumulative_trapezoid

from xtalsolve.crystal.batch import CrystalBatch
from xtalsolve.errors import XtalsolveError
from xtalsolve.physics.debye import (
    cut_particle,
    debye_intensity,
    nanoparticle_pattern,
    simulate_nanoparticle,
)
from xtalsolve.physics.scattering import xray_form_factor

from prototypes import cubic, mncuf6, rocksalt  # noqa: E402

CU_KA = 1.54184




def gold() -> Structure:
    return cubic(4.0782, {"Au": [[0, 0, 0]]})




def debyecalculator_iq(numbers, positions, biso, radiation="xray"):
    """I(Q) from DebyeCalculator for the very same atoms (passed as (numbers, xyz), not re-cut by it)."""
    debyecalculator = pytest.importorskip("debyecalculator")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calc = debyecalculator.DebyeCalculator(
            qmin=0.0, qmax=15.0, qstep=0.01, biso=biso, device="cpu", dtype=torch.float64, radiation_type=radiation
        )
        q, iq = calc.iq((np.asarray(numbers, dtype=np.int64), np.asarray(positions, dtype=float)))
    return q, iq


# ------------------------------------------------------------------------------ particle cutting


def test_cut_particle_matches_pymatgen_neighbour_search():
    structure = rocksalt()
    positions, numbers = cut_particle(structure, 15.0)  # centred on the first site (Na at the origin)
    reference = structure.get_sites_in_sphere([0.0, 0.0, 0.0], 7.5 + 1e-6)
    assert len(numbers) == len(reference) == 81  # 1 + 6 + 12 + 8 + 6 + 24 + 24 shells up to 7.5 angstrom
    ours = sorted(zip(np.round(np.linalg.norm(positions, axis=1), 6), numbers))
    theirs = sorted((round(site.nn_distance, 6), site.specie.Z) for site in reference)
    assert ours == theirs
    assert np.allclose(positions.mean(0), 0.0, atol=1e-9)  # whole shells: the particle is centred


def test_cut_particle_centres():
    structure = gold()
    _, on_atom = cut_particle(structure, 2 * 2.8837 + 0.01)  # first atom and its 12 nearest neighbours
    assert len(on_atom) == 13
    positions, _ = cut_particle(structure, 4.0782 * math.sqrt(3) / 2 * 2 + 0.01, center=(0.25, 0.25, 0.25))
    assert len(positions) == 4 + 12  # tetrahedral hole: 4 atoms at a sqrt(3)/4, 12 at a sqrt(11)/4 < a sqrt(3)/2
    with pytest.raises(XtalsolveError):
        cut_particle(structure, 10.0, center="middle")
    with pytest.raises(XtalsolveError):
        cut_particle(structure, -1.0)


def test_disordered_structure_is_refused():
    structure = gold()
    structure.replace_species({"Au": {"Au": 0.5, "Ag": 0.5}})
    with pytest.raises(XtalsolveError, match="ordered"):
        cut_particle(structure, 10.0)
    with pytest.raises(XtalsolveError, match="ordered"):
        simulate_nanoparticle(structure, 10.0)


# ------------------------------------------------------------------------------ Debye sum


def test_dimer_and_forward_limit_are_analytic():
    d = 2.5
    positions = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, d]])
    q = torch.tensor([0.0, 1.0, 3.0, 7.0], dtype=torch.float64)
    i_q = debye_intensity(positions, [26, 26], q, radiation="neutron")
    b = 9.45  # Fe coherent scattering length (fm), Sears 1992
    expected = 2 * b * b * (1 + torch.sinc(q * d / math.pi))
    assert torch.allclose(i_q, expected, rtol=1e-3)
    # X-rays at Q = 0: (sum_i f_i(0))^2, by both summations
    positions, numbers = cut_particle(rocksalt(), 12.0)
    for method in ("exact", "histogram"):
        forward = debye_intensity(positions, numbers, [0.0], method=method)
        f0 = {11: 11.0, 17: 17.0}  # f(0) = Z for neutral atoms, within the table's fit accuracy
        assert float(forward[0]) == pytest.approx(sum(f0[int(z)] for z in numbers) ** 2, rel=2e-3)


@pytest.mark.parametrize(
    ("name", "structure", "diameter"), [("Au", gold(), 14.0), ("NaCl", rocksalt(), 15.0), ("MnCuF6", mncuf6(), 13.0)]
)
def test_small_particles_match_debyecalculator(name, structure, diameter):
    positions, numbers = cut_particle(structure, diameter)
    q, reference = debyecalculator_iq(numbers, positions, biso=0.5)
    ours = debye_intensity(positions, numbers, q, biso=0.5, method="exact").numpy()
    # DebyeCalculator sums each pair once and halves the self term: I_DC = I / 2 (same Waasmaier-Kirfel table).
    deviation = np.abs(ours / 2 / reference - 1).max()  # pointwise, Q = 0-15 1/angstrom; measured <= 4e-8
    assert deviation < 1e-6, f"{name}: {deviation:.2e}"


def test_histogram_summation_matches_debyecalculator():
    positions, numbers = cut_particle(rocksalt(), 24.0)  # 341 atoms
    for radiation in ("xray", "neutron"):
        q, reference = debyecalculator_iq(numbers, positions, biso=0.3, radiation=radiation)
        ours = debye_intensity(positions, numbers, q, 0.3, radiation=radiation, method="histogram").numpy() / 2
        # documented bound: the pair part is damped by ~(Q dr)^2 / 12 <= 1e-4; measured <= 3e-5 pointwise
        assert np.abs(ours / reference - 1).max() < 2e-4, radiation


def test_gradients_flow_to_lattice_and_coordinates():
    batch = CrystalBatch.from_structures([rocksalt()])
    lattice = batch.lattice.clone().requires_grad_(True)
    frac = batch.frac.clone().requires_grad_(True)
    grid = torch.linspace(1.0, 6.0, 40, dtype=torch.float64)
    weights = torch.linspace(0.5, 1.5, 40, dtype=torch.float64)

    def weighted(lattice, frac):
        pattern = nanoparticle_pattern(CrystalBatch(lattice, frac, batch.numbers, batch.occupancy), grid, "q", 10.0)
        return (pattern * weights).sum()

    weighted(lattice, frac).backward()
    assert torch.all(torch.isfinite(frac.grad)) and lattice.grad.abs().sum() > 0
    # finite difference along an isotropic expansion of the cell (the same atoms stay inside the sphere)
    h = 1e-6
    numeric = (weighted(batch.lattice * (1 + h), batch.frac) - weighted(batch.lattice * (1 - h), batch.frac)) / (2 * h)
    assert (lattice.grad * batch.lattice).sum().item() == pytest.approx(numeric.item(), rel=1e-5)


def test_gradcheck_positions_and_displacements():
    positions, numbers = cut_particle(rocksalt(), 8.0)  # 19 atoms, two kinds
    rng = np.random.default_rng(0)
    positions = torch.tensor(positions + rng.normal(0.0, 0.05, positions.shape), requires_grad=True)
    biso = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    q = torch.linspace(0.0, 6.0, 12, dtype=torch.float64)
    exact = partial(debye_intensity, numbers=numbers, q=q, method="exact")
    assert torch.autograd.gradcheck(lambda p, b: exact(p, biso=b), (positions, biso), fast_mode=True)
    # the histogram path gives the gradient of the linear interpolant between nodes: close, not exact
    reference = torch.autograd.grad(exact(positions, biso=biso).sum(), positions)[0]
    histogram = debye_intensity(positions, numbers, q, biso, method="histogram")
    approximate = torch.autograd.grad(histogram.sum(), positions)[0]
    assert (approximate - reference).norm() < 0.01 * reference.norm()


def test_thirty_angstrom_particle_runs_in_seconds():
    start = time.perf_counter()
    pattern = simulate_nanoparticle(gold(), 30.0, CU_KA, two_theta=(5.0, 90.0, 0.02))
    elapsed = time.perf_counter() - start
    assert pattern.shape == (1, 4251) and np.all(np.isfinite(pattern)) and np.all(pattern > 0)
    assert elapsed < 15.0, f"D = 30 angstrom took {elapsed:.1f} s"


def test_bad_input_is_refused():
    with pytest.raises(XtalsolveError):
        debye_intensity(np.zeros((2, 3)) + [[0, 0, 0], [0, 0, 1]], [1, 1], [-1.0])
    with pytest.raises(XtalsolveError):
        debye_intensity(np.zeros((2, 3)), [1], [1.0])
    with pytest.raises(XtalsolveError):
        debye_intensity([[0, 0, 0], [0, 0, 1.0]], [1, 1], [1.0], method="fast")
    with pytest.raises(XtalsolveError):
        simulate_nanoparticle(gold(), 10.0, wavelength=-1.0)


# ------------------------------------------------------------------------------ large particle limit


def sphere_bragg_pattern(two_theta, wavelength, peaks, n_cells, diameter):
    """Bragg pattern of a continuum sphere of diameter D (angstrom) with the exact powder line profile:

        I(Q) = sum_hkl m |F|^2 N_c^2 / (2 Q G) int_{|Q-G|}^{Q+G} Phi(k D / 2)^2 k dk,  Phi(x) = 3 (sin x - x cos x) / x^3

    (the plane integral of the sphere's squared shape transform around each reciprocal lattice point; its FWHM
    is 1.1067 lambda / (D cos theta) and its integral breadth 4/3 lambda / (D cos theta)), times 1 + cos^2 2theta.
    ``peaks``: (2theta in degrees, m |F|^2) of the reflections.
    """
    radius = diameter / 2
    k = np.linspace(1e-9, 60.0, 600_001)
    x = k * radius
    psi = cumulative_trapezoid((3 * (np.sin(x) - x * np.cos(x)) / x**3) ** 2 * k, k, initial=0.0)
    q = 4 * np.pi * np.sin(np.radians(two_theta) / 2) / wavelength
    out = np.zeros_like(q)
    for centre, mf2 in peaks:
        g = 4 * np.pi * np.sin(np.radians(centre) / 2) / wavelength
        out += mf2 * n_cells**2 / (2 * q * g) * (np.interp(q + g, k, psi) - np.interp(np.abs(q - g), k, psi))
    return out * (1 + np.cos(np.radians(two_theta)) ** 2)


def lp_factor(two_theta_deg):
    theta = np.radians(np.asarray(two_theta_deg) / 2)
    return (1 + np.cos(2 * theta) ** 2) / (np.sin(theta) ** 2 * np.cos(theta))


def test_large_particle_converges_to_scherrer_broadened_bragg_pattern():
    from pymatgen.analysis.diffraction.xrd import XRDCalculator

    from xtalsolve.physics.powder import Instrument, bragg_peaks, simulate_powder

    structure, diameter, window = gold(), 60.0, (30.0, 120.0, 0.02)
    two_theta = np.arange(window[0], window[1] + 1e-9, window[2])
    debye = simulate_nanoparticle(structure, diameter, CU_KA, two_theta=window, form_factor_table="pymatgen")[0]
    positions, _ = cut_particle(structure, diameter)
    n_cells = len(positions) / len(structure)
    d_eff = (6 * n_cells * structure.volume / np.pi) ** (1 / 3)  # diameter of a sphere of the particle's volume
    # The small-angle (particle shape) term (N f Phi(Q D / 2))^2 is left out of the references below: from 30 deg
    # on its envelope 9 (N f)^2 / (Q D / 2)^4 is below 1e-3 of the strongest peak.
    q_low = 4 * np.pi * np.sin(np.radians(window[0] / 2)) / CU_KA
    f_low = xray_form_factor(torch.tensor([79]), torch.tensor(q_low / (4 * np.pi)) ** 2, "pymatgen").item()
    small_angle = (
        9 * (len(positions) * f_low) ** 2 / (q_low * d_eff / 2) ** 4 * (1 + np.cos(np.radians(window[0])) ** 2)
    )
    assert small_angle < 1e-3 * debye.max()

    # 1. Independent reference: pymatgen's stick intensities (m |F|^2 LP, max 100) with the exact sphere profile;
    #    one least-squares scale.
    sticks = XRDCalculator(wavelength=CU_KA).get_pattern(structure, two_theta_range=(0, 125))
    peaks = [(t, i / lp_factor(t)) for t, i in zip(sticks.x, sticks.y)]
    reference = sphere_bragg_pattern(two_theta, CU_KA, peaks, n_cells, d_eff)
    reference *= (debye @ reference) / (reference @ reference)
    assert np.linalg.norm(debye - reference) / np.linalg.norm(reference) < 0.02

    centres = np.array([t for t, _ in peaks if window[0] < t < window[1]])
    edges = np.concatenate([[window[0]], (centres[1:] + centres[:-1]) / 2, [window[1]]])
    strong = 0
    for lo, hi, centre in zip(edges[:-1], edges[1:], centres):
        part = (two_theta >= lo) & (two_theta < hi)
        tt, y = two_theta[part], debye[part]
        top = np.argmax(y)
        curve = np.polyfit(tt[top - 1 : top + 2], y[top - 1 : top + 2], 2)
        above = tt[y >= y[top] / 2]
        fwhm = above.max() - above.min()
        assert abs(-curve[1] / (2 * curve[0]) - centre) < 0.05 * fwhm  # peak position
        if y.max() > 0.2 * debye.max():
            strong += 1
            area = np.trapezoid(y, tt) / np.trapezoid(reference[part], tt)
            assert area == pytest.approx(1.0, abs=0.02), f"{centre:.2f} deg: area ratio {area:.4f}"
            scherrer = np.degrees(1.1067 * CU_KA / (d_eff * np.cos(np.radians(centre / 2))))
            assert fwhm == pytest.approx(scherrer, rel=0.03), f"{centre:.2f} deg: FWHM {fwhm:.3f} vs {scherrer:.3f}"
    assert strong >= 4

    # 2. Absolute scale against the Bragg model: peak areas m |F|^2 LP N_c lambda^3 / (16 pi V_cell) per particle.
    bragg = bragg_peaks(structure, CU_KA, (0, 125), form_factors="pymatgen")
    peaks = [(p["two_theta"], p["intensity"] / lp_factor(p["two_theta"])) for p in bragg]
    absolute = sphere_bragg_pattern(two_theta, CU_KA, peaks, n_cells, d_eff)
    assert np.linalg.norm(debye - absolute) / np.linalg.norm(absolute) < 0.02

    # 3. The Bragg model's Scherrer size (K = 0.9 on the FWHM) that matches a sphere of diameter D is
    #    0.9 / 1.1067 D = 0.81 D; peak positions agree.
    bragg_pattern = simulate_powder(
        structure, two_theta=window, size=0.9 / 1.1067 * d_eff, instrument=Instrument(wavelength=CU_KA, w=0.0)
    )[0]
    for lo, hi, centre in zip(edges[:-1], edges[1:], centres):
        part = (two_theta >= lo) & (two_theta < hi)
        if debye[part].max() > 0.2 * debye.max():
            widths = []
            for y in (debye[part], bragg_pattern[part]):
                above = two_theta[part][y >= y.max() / 2]
                widths.append(above.max() - above.min())
            assert widths[1] == pytest.approx(widths[0], rel=0.05)
            assert abs(two_theta[part][np.argmax(bragg_pattern[part])] - centre) < 0.03


@pytest.mark.parametrize("diameter", [15.0, 30.0])
def test_sphere_size_profile_follows_debye_scattering_of_small_spheres(diameter):
    """The Bragg model with the exact size profile of a sphere (shape="sphere") against the Debye scattering of
    a gold sphere cut from the crystal (validated above against DebyeCalculator): far closer than the
    Lorentzian of Rietveld practice. What is left (~5-8 %) is the Lorentz-polarisation factor taken at each
    peak's centre across peaks 3-6 degrees wide, and the powder average of the shape transform."""
    from xtalsolve.physics.powder import Instrument, simulate_powder

    structure, window = gold(), (30.0, 120.0, 0.02)
    debye = simulate_nanoparticle(structure, diameter, CU_KA, two_theta=window, form_factor_table="pymatgen")[0]
    positions, _ = cut_particle(structure, diameter)
    d_eff = (6 * len(positions) / len(structure) * structure.volume / np.pi) ** (1 / 3)
    errors = {}
    for shape in ("lorentzian", "sphere"):
        y = simulate_powder([structure], CU_KA, two_theta=window, size=d_eff, shape=shape, form_factors="pymatgen",
                            instrument=Instrument(wavelength=CU_KA, w=1e-6), dtype=torch.float64)[0]
        design = np.vstack([y, np.ones_like(y)]).T  # scale and a flat background (the diffuse scattering)
        coef, *_ = np.linalg.lstsq(design, debye, rcond=None)
        errors[shape] = np.linalg.norm(design @ coef - debye) / np.linalg.norm(debye)
    assert errors["sphere"] < 0.09
    assert errors["sphere"] < 0.65 * errors["lorentzian"]
