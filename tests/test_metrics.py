"""Metrics against analytic cases and pymatgen's StructureMatcher."""

import time

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from xtalsolve import metrics
from xtalsolve.errors import XtalsolveError
from xtalsolve.metrics import (
    TOLERANCES,
    MatchResult,
    cosine_similarity,
    de_gelder,
    fit_scale,
    gof,
    match,
    match_at_k,
    match_rate,
    match_table,
    pearson,
    r_bragg,
    r_expected,
    reduced_chi2,
    rp,
    rwp,
)


@pytest.fixture
def general():
    """Orthorhombic cell with three unequal edges and a site in a general position (no accidental symmetry)."""
    coords = [[0, 0, 0], [0.5, 0.5, 0.5], [0.1, 0.3, 0.2]]
    return Structure(Lattice.orthorhombic(4.0, 7.0, 11.0), ["Na", "Cl", "Cl"], coords)


@pytest.fixture
def cscl():
    return Structure(Lattice.orthorhombic(4.0, 5.0, 6.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def test_tolerance_sets_are_the_published_ones():
    assert TOLERANCES["loose"] == (0.5, 0.3, 10.0)
    assert TOLERANCES["strict"] == (0.3, 0.2, 5.0)


@pytest.mark.parametrize("tolerance", ["loose", "strict"])
def test_identical_supercell_permuted_shifted_all_match(general, tolerance):
    ok, rms = match(general, general, tolerance)
    assert ok and rms < 1e-8
    supercell = general.copy().make_supercell([2, 1, 3])
    assert match(supercell, general, tolerance).matched
    assert match(general, supercell, tolerance).matched
    permuted = Structure.from_sites([general[i] for i in (2, 0, 1)])
    shifted = permuted.copy()
    shifted.translate_sites(range(len(shifted)), [0.37, 0.11, 0.71])
    ok, rms = match(shifted, general, tolerance)
    assert ok and rms < 1e-8


def test_rms_is_displacement_over_volume_per_atom_cube_root(cscl):
    # Moving Cl by d along c: the optimal translation splits it, each site moves d/2; RMS = (d/2) / (V/N)^(1/3).
    d = 1.0
    moved = cscl.copy()
    moved.translate_sites([1], [0, 0, d / 6.0])
    ok, rms = match(moved, cscl, "strict")
    assert ok
    assert rms == pytest.approx((d / 2) / (cscl.volume / 2) ** (1 / 3), rel=1e-9)


def test_cases_that_discriminate_strict_from_loose(general, cscl):
    # 5 % uniaxial strain is removed by ltol in both sets (and scale=True): not a discriminating case.
    s = general.copy()
    s.lattice = Lattice.orthorhombic(4.0 * 1.05, 7.0, 11.0)
    assert match(s, general, "strict").matched and match(s, general, "loose").matched
    # 40 % uniaxial strain: after volume rescaling a grows by 1.4^(2/3) = 1.25, between ltol 0.2 and 0.3.
    s.lattice = Lattice.orthorhombic(4.0 * 1.4, 7.0, 11.0)
    assert not match(s, general, "strict").matched
    assert match(s, general, "loose").matched
    s.lattice = Lattice.orthorhombic(4.0 * 1.6, 7.0, 11.0)  # 1.6^(2/3) = 1.37 > 1.3: neither
    assert not match(s, general, "loose").matched
    # gamma 90 -> 97 degrees: outside angle_tol 5, inside 10.
    s.lattice = Lattice.from_parameters(4, 7, 11, 90, 90, 97)
    assert not match(s, general, "strict").matched
    assert match(s, general, "loose").matched
    # A 2.5 angstrom site displacement: beyond stol 0.3, within 0.5.
    moved = cscl.copy()
    moved.translate_sites([1], [0, 0, 2.5 / 6.0])
    assert match(moved, cscl, "strict") == MatchResult(False, None, "no_match")
    assert match(moved, cscl, "loose").matched


def test_wrong_composition_and_broken_candidates_never_match(general):
    wrong = general.copy()
    wrong.replace_species({"Cl": "Br"})
    assert match(wrong, general) == MatchResult(False, None, "wrong_composition")
    collapsed = Structure(np.diag([4.0, 7.0, 1e-9]), ["Na", "Cl", "Cl"], general.frac_coords)
    result = match(collapsed, general)
    assert not result.matched and result.status == "invalid" and result.n_failed == 1


def test_matcher_exceptions_and_timeouts_count_as_no_match(general, monkeypatch):
    def boom(self, s1, s2):
        raise RuntimeError("pathological lattice")

    monkeypatch.setattr(metrics.StructureMatcher, "get_rms_dist", boom)
    assert match(general, general).status == "error"

    monkeypatch.setattr(metrics.StructureMatcher, "get_rms_dist", lambda self, s1, s2: time.sleep(5))
    start = time.perf_counter()
    result = match(general, general, timeout_s=0.2)
    assert result.status == "timeout" and not result.matched
    assert time.perf_counter() - start < 2


def test_match_at_k_takes_the_best_of_the_first_k(cscl):
    far, near = cscl.copy(), cscl.copy()
    far.translate_sites([1], [0, 0, 1.5 / 6.0])
    near.translate_sites([1], [0, 0, 0.5 / 6.0])
    wrong = Structure(cscl.lattice, ["Na", "Br"], cscl.frac_coords)
    candidates = [wrong, far, near]
    assert not match_at_k(candidates, cscl, k=1, tolerance="strict").matched
    at2 = match_at_k(candidates, cscl, k=2, tolerance="strict")
    at3 = match_at_k(candidates, cscl, k=3, tolerance="strict")
    assert at2.matched and at2.index == 1
    assert at3.index == 2 and at3.rms == pytest.approx(match(near, cscl, "strict").rms)
    assert at3.rms < at2.rms


def test_match_rate_counts_all_references_and_averages_rms_over_matches(cscl, general):
    summary = match_rate([(True, 0.1), (False, None), (True, 0.3), MatchResult(False, None, "error", n_failed=1)])
    assert (summary.n, summary.n_matched, summary.n_failed) == (4, 2, 1)
    assert summary.rate == 0.5 and summary.rmse == pytest.approx(0.2)
    table = match_table([[cscl, general], [cscl]], [general, general], ks=(1, 2))
    assert table[("loose", 1)].rate == 0.0 and table[("loose", 2)].rate == 0.5
    assert table[("strict", 2)].rmse == pytest.approx(0.0, abs=1e-8)


# ---- profile statistics -----------------------------------------------------------------------------------


def test_profile_r_factors_by_hand():
    y_obs, y_calc, sigma = np.array([10.0, 20.0, 30.0]), np.array([12.0, 18.0, 30.0]), np.array([1.0, 2.0, 3.0])
    # w = 1, 1/4, 1/9; sum w (yo-yc)^2 = 4 + 1 + 0 = 5; sum w yo^2 = 100 + 100 + 100 = 300
    assert rwp(y_obs, y_calc, sigma) == pytest.approx(np.sqrt(5 / 300))
    assert rp(y_obs, y_calc) == pytest.approx(4 / 60)
    assert r_expected(y_obs, sigma, n_params=1) == pytest.approx(np.sqrt(2 / 300))
    assert reduced_chi2(y_obs, y_calc, sigma, n_params=1) == pytest.approx(5 / 2)
    assert gof(y_obs, y_calc, sigma, n_params=1) == pytest.approx(
        rwp(y_obs, y_calc, sigma) / r_expected(y_obs, sigma, n_params=1)
    )
    # background-subtracted: yb = 5 -> sum |yo - yb| = 45; sum w (yo-yb)^2 = 25 + 225/4 + 625/9
    assert rp(y_obs, y_calc, background=5.0 * np.ones(3)) == pytest.approx(4 / 45)
    assert rwp(y_obs, y_calc, sigma, background=np.full(3, 5.0)) == pytest.approx(
        np.sqrt(5 / (25 + 225 / 4 + 625 / 9))
    )
    assert r_bragg([100.0, 50.0], [90.0, 55.0]) == pytest.approx(15 / 150)


def test_identical_profiles_and_poisson_noise():
    rng = np.random.default_rng(0)
    y_true = 1000 + 5000 * np.exp(-0.5 * ((np.arange(4000) - 2000) / 15.0) ** 2)
    assert rwp(y_true, y_true, np.sqrt(y_true)) == 0.0 and rp(y_true, y_true) == 0.0
    y_obs = rng.poisson(y_true).astype(float)
    sigma = np.sqrt(np.maximum(y_obs, 1.0))
    assert gof(y_obs, y_true, sigma) == pytest.approx(1.0, abs=0.05)  # the true model fits to within noise
    assert fit_scale(y_obs, 0.5 * y_true, sigma) == pytest.approx(2.0, rel=1e-2)


def test_profile_input_errors():
    with pytest.raises(XtalsolveError):
        rwp([1.0, 2.0], [1.0])
    with pytest.raises(XtalsolveError):
        gof([1.0, 2.0], [1.0, 2.0], sigma=None)
    with pytest.raises(XtalsolveError):
        rwp([1.0, 2.0], [1.0, 2.0], sigma=[1.0, 0.0])
    with pytest.raises(XtalsolveError):
        r_expected([1.0, 2.0], [1.0, 1.0], n_params=2)


# ---- pattern similarity -----------------------------------------------------------------------------------


def peak(center, n=500, width=3.0):
    x = np.arange(n, dtype=float)
    return np.exp(-0.5 * ((x - center) / width) ** 2)


def test_pearson_and_cosine_match_numpy():
    rng = np.random.default_rng(1)
    a, b = rng.random(200), rng.random(200)
    assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert cosine_similarity(a, 3 * a) == pytest.approx(1.0)
    assert pearson(a, -a) == pytest.approx(-1.0)
    batch = np.stack([a, b, 2 * a])
    assert np.allclose(cosine_similarity(a, batch), [1.0, cosine_similarity(a, b), 1.0])


def test_de_gelder_identical_symmetric_and_decreasing_with_shift():
    ref = peak(250) + 0.5 * peak(100)
    assert de_gelder(ref, 4.0 * ref, width=10) == pytest.approx(1.0)
    shifted = [peak(250 + s) + 0.5 * peak(100 + s) for s in range(0, 30, 3)]
    values = [de_gelder(ref, other, width=10) for other in shifted]
    assert all(np.diff(values) < 0) and values[-1] > 0
    assert de_gelder(ref, shifted[3], 10) == pytest.approx(de_gelder(shifted[3], ref, 10))
    # Shift tolerance: a 9-point shift kills the cosine overlap of 3-point-wide peaks (exp(-81/36) = 0.105)
    # but not de Gelder's S with a 30-point triangle.
    assert cosine_similarity(ref, shifted[3]) < 0.2 < 0.5 < de_gelder(ref, shifted[3], width=30)
    # Width <= 1 point is the plain cosine; width in x units equals width in points / step.
    assert de_gelder(ref, shifted[1], width=1) == pytest.approx(cosine_similarity(ref, shifted[1]))
    x = 5.0 + 0.02 * np.arange(500)
    assert de_gelder(ref, shifted[2], width=0.2, x=x) == pytest.approx(de_gelder(ref, shifted[2], width=10))
    batch = np.stack(shifted[:3])
    assert np.allclose(de_gelder(ref, batch, 10), values[:3])


def test_de_gelder_equals_brute_force_definition():
    rng = np.random.default_rng(2)
    a, b, width = rng.random(40), rng.random(40), 4.0

    def c(f, g):
        full = np.correlate(g, f, mode="full")  # full[k] = sum_i f_i g_(i + k - (n-1))
        lags = np.arange(-39, 40)
        return np.sum(np.clip(1 - np.abs(lags) / width, 0, None) * full)

    assert de_gelder(a, b, width) == pytest.approx(c(a, b) / np.sqrt(c(a, a) * c(b, b)))
