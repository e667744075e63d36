"""Profile and intensity parameters added to the Rietveld model: Berar-Baldinozzi peak asymmetry (moments, and
against the Finger-Cox-Jephcoat axial-divergence geometry integrated by brute force), a refinable
Kalpha2/Kalpha1 ratio and site occupancies (recovered from patterns of the independent simulate_powder path),
and their autograd Jacobian columns against finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure
from scipy.optimize import least_squares

from tests.conftest import assert_jacobian_matches_differences
from xtalsolve.physics.powder import Instrument, simulate_powder
from xtalsolve.physics.profiles import berar_baldinozzi, pseudo_voigt, pseudo_voigt_partials
from xtalsolve.refine import perturb, symmetrize
from xtalsolve.refine.recipe import STAGES, Profile, Recipe

GRID = (20.0, 80.0, 0.02)


def rutile(ti_occupancy: float = 1.0) -> Structure:
    return symmetrize(Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.594, 2.959),
                                                [{"Ti": ti_occupancy}, "O"], [[0, 0, 0], [0.3049, 0.3049, 0]]))


def simulated(structure: Structure, instrument: Instrument, counts: float = 5e4, seed: int = 0) -> Profile:
    y = simulate_powder(structure, two_theta=GRID, size=600.0, biso=0.6, instrument=instrument)[0]
    x = GRID[0] + GRID[2] * np.arange(len(y))
    observed = np.random.default_rng(seed).poisson(counts * y / y.max() + 50.0).astype(float)
    return Profile.from_arrays(x, observed, np.sqrt(np.maximum(observed, 1.0)))


# -- peak asymmetry ----------------------------------------------------------------------------------------------


def test_pseudo_voigt_partials_match_autograd():
    """The closed-form value and derivatives (centre, FWHM, eta) of the unit-area pseudo-Voigt that the Rietveld
    Jacobian uses, against forward-mode autograd of pseudo_voigt, for Gaussian, mixed and Lorentzian peaks."""
    dx = torch.linspace(-3.0, 3.0, 61, dtype=torch.float64).expand(3, 61)
    fwhm = torch.tensor([[0.3], [0.8], [1.5]], dtype=torch.float64)
    eta = torch.tensor([[0.0], [0.4], [1.0]], dtype=torch.float64)
    centre = torch.zeros(3, 1, dtype=torch.float64)
    profile = lambda c, w, e: pseudo_voigt(dx - c, w, e)  # noqa: E731
    partials = pseudo_voigt_partials(dx, fwhm, eta)
    one = torch.ones(3, 1, dtype=torch.float64)
    expected = [profile(centre, fwhm, eta),
                torch.func.jvp(lambda c: profile(c, fwhm, eta), (centre,), (one,))[1],
                torch.func.jvp(lambda w: profile(centre, w, eta), (fwhm,), (one,))[1],
                torch.func.jvp(lambda e: profile(centre, fwhm, e), (eta,), (one,))[1]]
    for k, reference in enumerate(expected):
        assert torch.allclose(partials[..., k], reference, rtol=1e-10, atol=1e-12 * float(reference.abs().max())), k
        assert float(reference.abs().max()) > 0.1, k


def test_asymmetry_conserves_area_and_moves_the_centroid_to_low_angle():
    dx = torch.linspace(-4.0, 4.0, 40001, dtype=torch.float64)
    step = float(dx[1] - dx[0])
    fwhm, eta = torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)
    symmetric = pseudo_voigt(dx, fwhm, eta)
    # (2theta, P1..P4, sign of the centroid shift): P1 < 0 moves intensity to low angle; a P3 < 0 term moves it
    # to low angle below 90 deg and to high angle above (1/tan(2 theta) changes sign), as axial divergence does;
    # the Fb terms (P2, P4) change the shape and are checked for area only
    for two_theta, p1, p2, p3, p4, sign in ((25.0, -0.05, 0.0, 0.0, 0.0, -1), (40.0, 0.0, 0.0, -0.03, 0.0, -1),
                                             (60.0, -0.02, 0.0, 0.0, 0.0, -1), (130.0, 0.0, 0.0, -0.03, 0.0, 1),
                                             (30.0, 0.0, 0.05, 0.0, -0.05, 0)):
        factor = berar_baldinozzi(dx, fwhm, torch.tensor(two_theta, dtype=torch.float64), p1, p2, p3, p4)
        profile = symmetric * factor
        assert float(profile.sum() * step) == pytest.approx(float(symmetric.sum() * step), rel=1e-10)
        centroid = float((dx * profile).sum() / profile.sum())
        assert sign * centroid > 1e-4 or sign == 0
    assert torch.equal(berar_baldinozzi(dx, fwhm, torch.tensor(30.0), 0.0, 0.0), torch.ones_like(dx))


def fcj_profile(two_theta: float, grid: np.ndarray, s_over_l: float = 0.03, h_over_l: float = 0.03,
                gauss_fwhm: float = 0.06, n: int = 300) -> np.ndarray:
    """Axial divergence by brute force (Finger, Cox & Jephcoat, J. Appl. Cryst. 27, 892 (1994) geometry): rays
    from n points along the sample's axial length 2S to n points along the receiving slit's 2H at distance L
    leave the equatorial plane by tan(psi) = (h_d - h_s) / L; a ray on the Debye cone of half-angle 2theta then
    reaches the detector at cos(2phi) = cos(2theta) / cos(psi). The histogram of 2phi is convolved with a
    Gaussian instrument function; unit area on ``grid`` (degrees)."""
    h = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    tilt = (h[None, :] * h_over_l - h[:, None] * s_over_l).ravel()
    apparent = np.degrees(np.arccos(np.clip(np.cos(np.radians(two_theta)) * np.sqrt(1.0 + tilt**2), -1, 1)))
    step = grid[1] - grid[0]
    hist, _ = np.histogram(apparent, bins=np.append(grid - step / 2, grid[-1] + step / 2))
    sigma = gauss_fwhm / np.sqrt(8 * np.log(2))
    kernel_x = np.arange(-5 * sigma, 5 * sigma + step / 2, step)
    y = np.convolve(hist, np.exp(-0.5 * (kernel_x / sigma) ** 2), mode="same")
    return y / (y.sum() * step)


def test_asymmetry_describes_fcj_axial_divergence():
    """Peaks at 15, 30 and 60 deg with the FCJ shape: one pair (P1, P2) shared by all peaks (each with its own
    position, area, width, eta) cuts the misfit of the symmetric pseudo-Voigt by more than 2x, with P1 < 0."""
    angles = (15.0, 30.0, 60.0)
    data = []
    for tt in angles:
        grid = np.arange(tt - 1.5, tt + 1.5, 0.005)
        data.append((torch.as_tensor(grid), fcj_profile(tt, grid)))
        centroid = (grid * data[-1][1]).sum() / data[-1][1].sum()
        assert centroid < tt - 0.005  # the reference itself: axial divergence shifts intensity to low angle

    def residual(p, n_asym):
        out = []
        asym = [*p[4 * len(angles):], 0.0, 0.0][:2] if n_asym else None
        for k, (g, y) in enumerate(data):
            c, a, w, e = (torch.tensor(v, dtype=torch.float64) for v in p[4 * k : 4 * k + 4])
            v = pseudo_voigt(g - c, w, e)
            if asym is not None:
                v = v * berar_baldinozzi(g - c, w, c, *asym)
            out.append((a * v).numpy() - y)
        return np.concatenate(out)

    misfit = {}
    for n_asym in (0, 2):
        p0 = [v for tt in angles for v in (tt, 1.0, 0.08, 0.3)] + [0.0] * n_asym
        lower = [v for tt in angles for v in (tt - 1, 0.5, 0.01, 0.0)] + [-1.0] * n_asym
        upper = [v for tt in angles for v in (tt + 1, 2.0, 1.0, 1.0)] + [1.0] * n_asym
        fit = least_squares(residual, p0, args=(n_asym,), bounds=(lower, upper))
        misfit[n_asym] = np.sqrt(np.mean(fit.fun**2))
        if n_asym:
            assert fit.x[-2] < 0
    assert misfit[2] < 0.5 * misfit[0]


# -- Kalpha2 ratio and occupancies --------------------------------------------------------------------------------


def test_kalpha2_ratio_recovered():
    truth = rutile()
    doublet = Instrument(wavelength=1.54056, wavelength2=1.54439, ratio2=0.42, w=0.002)
    start = Instrument(wavelength=1.54056, wavelength2=1.54439, ratio2=0.5, w=0.002)
    recipe = Recipe(simulated(truth, doublet), truth, start, n_background=3, profile_params=("size",),
                    biso=0.6, size=600.0, refine_ratio=True)
    result = recipe.refine(stages=(STAGES[0], ("profile", ("profile",))), max_nfev=20)
    ratio = result.parameters["ka2_ratio"]
    assert ratio["value"] == pytest.approx(0.42, abs=0.015)
    assert 0 < ratio["esd"] < 0.01


def test_occupancy_recovered():
    instrument = Instrument(wavelength=1.5406, w=0.004)
    profile = simulated(rutile(0.85), instrument, seed=2)
    recipe = Recipe(profile, rutile(1.0), instrument, n_background=3, profile_params=("size",), biso=0.6,
                    size=600.0, occupancies=True)
    assert recipe.parameters["occ.Ti1"].bounds == (0.0, 1.0)
    recipe.parameters["occ.O1"].group = "fixed"  # scale and all occupancies together are degenerate
    result = recipe.refine(stages=(STAGES[0], ("occupancy", ("occupancy",))), max_nfev=20)
    (ti,) = [s for s in result.sites if s["label"] == "Ti1"]
    assert ti["species"]["Ti"] == pytest.approx(0.85, abs=0.03)
    assert 0 < ti["occupancy_esd"] < 0.03
    assert result.structure.composition["Ti"] == pytest.approx(2 * ti["species"]["Ti"])


def test_occupancies_are_off_by_default():
    instrument = Instrument(wavelength=1.5406, w=0.004)
    recipe = Recipe(simulated(rutile(), instrument), rutile(), instrument, n_background=2)
    assert not any(name.startswith("occ.") for name in recipe.parameters.names())
    assert "ka2_ratio" not in recipe.parameters and "asym1" not in recipe.parameters


def test_jacobian_of_new_parameters_matches_finite_differences():
    truth = rutile(0.9)
    instrument = Instrument(wavelength=1.54056, wavelength2=1.54439, ratio2=0.5, w=0.004)
    recipe = Recipe(simulated(truth, instrument), perturb(truth, 0.003, 0.02, seed=1), instrument, n_background=2,
                    displacement=True, asymmetry=4, refine_ratio=True, occupancies=True)
    recipe.initialise()
    for k, value in enumerate((-0.03, 0.02, 0.01, -0.01), start=1):
        recipe.parameters[f"asym{k}"].value = value
    recipe.parameters.fix_all()
    recipe.parameters.release("profile", "occupancy", "zero", "lattice")
    names = [p.name for p in recipe.parameters.free]
    assert {"asym1", "asym2", "asym3", "asym4", "ka2_ratio", "occ.Ti1", "occ.O1"} <= set(names)
    assert_jacobian_matches_differences(recipe, names)
