"""The pattern-only path of the Bragg powder model, compiled with numba: many structures in, patterns out.

``simulate_powder`` wants patterns of many structures, not gradients. The torch model (:mod:`powder`) spends
that call in dispatching some 150 medium-sized tensor operations per batch over padded, ragged sets of
reflections; here each structure is one loop nest on one core, the structures spread over the cores:

- reflections enumerated row by row inside the limiting sphere (one of each Friedel pair, the same set and
  order as :func:`powder.enumerate_reflections`);
- phase factors exp(2 pi i h.x) by recurrence along l: one complex multiplication per site and reflection
  instead of a sine and a cosine;
- structure factors summed per species, and form factors, angles and Lorentz-polarisation evaluated once per
  distinct d (equivalent reflections share them);
- reflections on the same 2theta merged (as :func:`powder.merge_coincident_peaks`) and each peak rendered
  within its own window of +-(3 + n_fwhm eta) FWHM.

Written by hand because no library computes full powder profiles of thousands of structures at this speed
(pymatgen's calculator gives sticks, one structure at a time, in Python). Same physics and conventions as
:mod:`powder` (Lorentz-polarisation, TCH pseudo-Voigt, Scherrer, microstrain, Caglioti), computed in float64;
tests/test_compiled_powder.py compares the two. Not differentiable: the solver and the refinement use the
torch model.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import njit

from xtalsolve.errors import XtalsolveError
from xtalsolve.physics.profiles import SCHERRER_K
from xtalsolve.physics.scattering import (
    FORM_FACTOR_TABLES,
    MOTT_BETHE_PREFACTOR,
    _neutron_lengths_fm,
    _pymatgen_mott_bethe,
    _waasmaier_kirfel,
    check_elements,
)

@njit(cache=True)
def _reciprocal_metric(cell):
    """inv(cell cell^T) of a (3, 3) cell: 1/d^2 = h.m.h (adjugate over determinant: no LAPACK call per cell)."""
    g = np.empty((3, 3))
    for i in range(3):
        for j in range(3):
            g[i, j] = cell[i, 0] * cell[j, 0] + cell[i, 1] * cell[j, 1] + cell[i, 2] * cell[j, 2]
    m = np.empty((3, 3))
    m[0, 0] = g[1, 1] * g[2, 2] - g[1, 2] * g[2, 1]
    m[0, 1] = g[0, 2] * g[2, 1] - g[0, 1] * g[2, 2]
    m[0, 2] = g[0, 1] * g[1, 2] - g[0, 2] * g[1, 1]
    m[1, 1] = g[0, 0] * g[2, 2] - g[0, 2] * g[2, 0]
    m[1, 2] = g[0, 2] * g[1, 0] - g[0, 0] * g[1, 2]
    m[2, 2] = g[0, 0] * g[1, 1] - g[0, 1] * g[1, 0]
    m[1, 0], m[2, 0], m[2, 1] = m[0, 1], m[0, 2], m[1, 2]  # symmetric
    determinant = g[0, 0] * m[0, 0] + g[0, 1] * m[1, 0] + g[0, 2] * m[2, 0]
    return m / determinant


@njit(cache=True)
def _row_range(m, h, k, g_max2):
    """The l range (lo, hi) of row (h, k) that holds every reflection with 1/d^2 <= g_max2, and the row's
    quadratic 1/d^2(l) - g_max2 = constant + l (linear + quadratic l); lo > hi when the row misses the sphere."""
    constant = m[0, 0] * h * h + m[1, 1] * k * k + 2.0 * m[0, 1] * h * k - g_max2
    linear = 2.0 * (m[0, 2] * h + m[1, 2] * k)
    quadratic = m[2, 2]
    disc = linear * linear - 4.0 * quadratic * constant
    if disc < 0.0:  # the row passes outside the sphere
        return 1, 0, constant, linear, quadratic
    root = math.sqrt(disc)
    lo = math.ceil((-linear - root) / (2.0 * quadratic)) - 1  # one l of slack each side, cut exactly below
    hi = math.floor((-linear + root) / (2.0 * quadratic)) + 1
    if h == 0 and k == 0:
        lo = max(lo, 1)  # one Friedel half
    return int(lo), int(hi), constant, linear, quadratic


@njit(cache=True)
def _box(cell, d_min):
    """Largest |h|, |k|, |l| of the box that holds the limiting sphere (|h| <= |a| / d_min)."""
    hmax = int(math.floor(math.sqrt((cell[0] ** 2).sum()) / d_min + 1e-9))
    kmax = int(math.floor(math.sqrt((cell[1] ** 2).sum()) / d_min + 1e-9))
    lmax = int(math.floor(math.sqrt((cell[2] ** 2).sum()) / d_min + 1e-9))
    return hmax, kmax, lmax


@njit(cache=True, nogil=True)
def _count_reflections(cells, d_min, counts):
    """Number of reflections with d >= d_min (angstrom), one of each Friedel pair, of each cell (B, 3, 3),
    written to counts (B,)."""
    g_max2 = (1.0 / d_min) ** 2 * (1.0 + 1e-12)
    for b in range(cells.shape[0]):
        m = _reciprocal_metric(cells[b])
        hmax, kmax, _ = _box(cells[b], d_min)
        n = 0
        for h in range(hmax + 1):
            for k in range(-kmax if h > 0 else 0, kmax + 1):
                lo, hi, constant, linear, quadratic = _row_range(m, h, k, g_max2)
                for l in range(lo, hi + 1):
                    if constant + l * (linear + quadratic * l) <= 0.0:
                        n += 1
        counts[b] = n


@njit(cache=True, nogil=True)
def _bragg_sticks(cells, frac, occupancy, site_species, site_start, species_start, f_constant, f_a, f_b,
                  mott_bethe, d_min, wavelength, biso, neutron, polarisation_c, tolerance_deg, counts,
                  out_two_theta, out_intensity, out_n):
    """Merged Bragg peaks of each structure: out_two_theta (deg), out_intensity (m |F|^2 LP) and their number
    out_n, written in place. Sites of structure b are site_start[b]:site_start[b + 1] of frac (S, 3), occupancy
    (S,) and site_species (S, index into the structure's species); species of structure b are species_start[b]:
    species_start[b + 1] of the coefficient rows f_constant (K,), f_a, f_b (K, G):
    f(s2) = f_constant + (1 or -41.78214 s2 with mott_bethe) sum_g a_g exp(-b_g s2).

    Two passes per structure: the geometric sums sum_{j in e} occ_j exp(2 pi i h.x_j) of each species e for
    every reflection, then the reflections in order of 1/d^2, where form factors, angles and the
    Lorentz-polarisation factor are evaluated once for each distinct d (equivalent reflections share them)."""
    g_max2 = (1.0 / d_min) ** 2 * (1.0 + 1e-12)
    n_gauss = f_a.shape[1]
    for b in range(cells.shape[0]):
        s0, s1 = site_start[b], site_start[b + 1]
        e0, e1 = species_start[b], species_start[b + 1]
        n_sites, n_species = s1 - s0, e1 - e0
        m = _reciprocal_metric(cells[b])
        hmax, kmax, lmax = _box(cells[b], d_min)
        lmax += 2  # the rows' one l of slack each side
        g2s = np.empty(counts[b])
        sum_re = np.zeros((counts[b], n_species))
        sum_im = np.zeros((counts[b], n_species))
        # occ_j exp(2 pi i h x_j), exp(2 pi i k y_j), exp(2 pi i l z_j) of every h, k, l of the box: a row's
        # start is two complex products per site, its steps along l one
        x_re, x_im = np.empty((hmax + 1, n_sites)), np.empty((hmax + 1, n_sites))
        y_re, y_im = np.empty((2 * kmax + 1, n_sites)), np.empty((2 * kmax + 1, n_sites))
        z_re, z_im = np.empty((2 * lmax + 1, n_sites)), np.empty((2 * lmax + 1, n_sites))
        for j in range(n_sites):
            for h in range(hmax + 1):
                angle = 2.0 * math.pi * h * frac[s0 + j, 0]
                x_re[h, j] = occupancy[s0 + j] * math.cos(angle)
                x_im[h, j] = occupancy[s0 + j] * math.sin(angle)
            for k in range(-kmax, kmax + 1):
                angle = 2.0 * math.pi * k * frac[s0 + j, 1]
                y_re[k + kmax, j] = math.cos(angle)
                y_im[k + kmax, j] = math.sin(angle)
            for l in range(-lmax, lmax + 1):
                angle = 2.0 * math.pi * l * frac[s0 + j, 2]
                z_re[l + lmax, j] = math.cos(angle)
                z_im[l + lmax, j] = math.sin(angle)
        step_re, step_im = z_re[lmax + 1], z_im[lmax + 1]  # exp(2 pi i z_j)
        phase_re = np.empty(n_sites)
        phase_im = np.empty(n_sites)
        n = 0
        for h in range(hmax + 1):
            for k in range(-kmax if h > 0 else 0, kmax + 1):
                lo, hi, constant, linear, quadratic = _row_range(m, h, k, g_max2)
                if lo > hi:
                    continue
                for j in range(n_sites):  # occ_j exp(2 pi i (h x + k y + lo z)), then stepped along l
                    hk_re = x_re[h, j] * y_re[k + kmax, j] - x_im[h, j] * y_im[k + kmax, j]
                    hk_im = x_re[h, j] * y_im[k + kmax, j] + x_im[h, j] * y_re[k + kmax, j]
                    phase_re[j] = hk_re * z_re[lo + lmax, j] - hk_im * z_im[lo + lmax, j]
                    phase_im[j] = hk_re * z_im[lo + lmax, j] + hk_im * z_re[lo + lmax, j]
                for l in range(lo, hi + 1):
                    if constant + l * (linear + quadratic * l) <= 0.0:
                        g2s[n] = constant + g_max2 + l * (linear + quadratic * l)
                        for j in range(n_sites):
                            e = site_species[s0 + j]
                            sum_re[n, e] += phase_re[j]
                            sum_im[n, e] += phase_im[j]
                        n += 1
                    for j in range(n_sites):  # next l
                        re = phase_re[j] * step_re[j] - phase_im[j] * step_im[j]
                        phase_im[j] = phase_re[j] * step_im[j] + phase_im[j] * step_re[j]
                        phase_re[j] = re
        # intensities in order of 1/d^2
        order = np.argsort(g2s[:n])
        two_theta = np.empty(n)
        intensity = np.zeros(n)
        f = np.empty(n_species)
        last_g2 = -1.0
        scale = 0.0
        theta_deg = 0.0
        reachable = False
        strongest = 0.0
        for i in order:
            g2 = g2s[i]
            if abs(g2 - last_g2) > 1e-13 * g2:  # a new d: form factors, angle, LP and Debye-Waller
                last_g2 = g2
                s2 = 0.25 * g2
                sin_theta = 0.5 * wavelength * math.sqrt(max(g2, 1e-30))
                reachable = sin_theta < 1.0 - 1e-9
                if reachable:
                    for e in range(n_species):
                        row = e0 + e
                        gaussians = 0.0
                        for g in range(n_gauss):
                            gaussians += f_a[row, g] * math.exp(-f_b[row, g] * s2)
                        f[e] = f_constant[row] + (-MOTT_BETHE_PREFACTOR * s2 * gaussians if mott_bethe else gaussians)
                    sin2 = sin_theta * sin_theta
                    lp = 1.0 / (sin2 * math.sqrt(1.0 - sin2))
                    if not neutron:
                        cos2t = 1.0 - 2.0 * sin2
                        lp *= (1.0 + polarisation_c * cos2t * cos2t) * 2.0 / (1.0 + polarisation_c)
                    scale = 2.0 * lp * (math.exp(-2.0 * biso[b] * s2) if biso[b] != 0.0 else 1.0)
                    theta_deg = math.degrees(2.0 * math.asin(sin_theta))
            if not reachable:
                continue
            f_re = 0.0
            f_im = 0.0
            for e in range(n_species):
                f_re += f[e] * sum_re[i, e]
                f_im += f[e] * sum_im[i, e]
            two_theta[i] = theta_deg
            intensity[i] = scale * (f_re * f_re + f_im * f_im)
            strongest = max(strongest, intensity[i])
        # merge reflections in the same bin of tolerance_deg (at the 2theta of the first one enumerated, as
        # merge_coincident_peaks), drop extinct ones; bins come in increasing order
        n_peaks = 0
        last_key = np.int64(-1)
        first = n
        for i in order:
            if intensity[i] <= 1e-10 * strongest:
                continue
            key = np.int64(round(two_theta[i] / tolerance_deg))
            if n_peaks == 0 or key != last_key:
                out_two_theta[b, n_peaks] = two_theta[i]
                out_intensity[b, n_peaks] = intensity[i]
                n_peaks += 1
                last_key = key
                first = i
            else:
                out_intensity[b, n_peaks - 1] += intensity[i]
                if i < first:
                    out_two_theta[b, n_peaks - 1] = two_theta[i]
                    first = i
        out_n[b] = n_peaks


@njit(cache=True)
def _tch(theta, wavelength, u, v, w, x, y, strain, size):
    """TCH pseudo-Voigt FWHM (deg 2theta) and eta at Bragg angle theta (radians): profiles.profile_widths."""
    t = math.tan(theta)
    c = 1.0 / math.cos(theta)
    strain_width = math.degrees(4.0 * strain * t)
    g = math.sqrt(max(u * t * t + v * t + w, 1e-12) + strain_width * strain_width)
    lorentz = x * t + y * c
    if size > 0.0:
        lorentz += math.degrees(SCHERRER_K * wavelength * c / size)
    fwhm = (g**5 + 2.69269 * g**4 * lorentz + 2.42843 * g**3 * lorentz**2 + 4.47163 * g**2 * lorentz**3
            + 0.07842 * g * lorentz**4 + lorentz**5) ** 0.2
    q = lorentz / fwhm
    eta = min(max(1.36603 * q - 0.47719 * q * q + 0.11116 * q**3, 0.0), 1.0)
    return fwhm, eta


@njit(cache=True, nogil=True)
def _render(grid, uniform, two_theta, intensity, n_peaks, in_q, wavelength, zero_shift, u, v, w, x, y, strain,
            size, n_fwhm, out):
    """Add each structure's peaks (two_theta deg, intensity) as unit-area TCH pseudo-Voigts times their
    intensity to out (B, P) on ``grid`` (2theta deg, or Q 1/angstrom with in_q), each within +-(3 + n_fwhm eta)
    FWHM of its centre. size <= 0: no size broadening."""
    n_points = grid.shape[0]
    first = grid[0]
    step = (grid[-1] - grid[0]) / (n_points - 1) if n_points > 1 else 1.0
    gauss_norm = math.sqrt(4.0 * math.log(2.0) / math.pi)
    gauss_rate = 4.0 * math.log(2.0)
    for b in range(two_theta.shape[0]):
        for p in range(n_peaks[b]):
            theta = math.radians(two_theta[b, p]) / 2.0
            fwhm, eta = _tch(theta, wavelength, u, v, w, x, y, strain, size)
            centre = two_theta[b, p] + zero_shift
            if in_q:
                half = math.radians(centre) / 2.0
                centre = 4.0 * math.pi * math.sin(half) / wavelength
                fwhm = (2.0 * math.pi / wavelength) * math.cos(half) * math.radians(fwhm)
            reach = fwhm * (3.0 + n_fwhm * eta)
            if uniform:
                lo = max(int(math.ceil((centre - reach - first) / step)), 0)
                hi = min(int(math.floor((centre + reach - first) / step)), n_points - 1)
            else:
                lo = np.searchsorted(grid, centre - reach)
                hi = np.searchsorted(grid, centre + reach, side="right") - 1
            area = intensity[b, p]
            gauss_height = (1.0 - eta) * area * gauss_norm / fwhm
            rate = -gauss_rate / (fwhm * fwhm)
            hwhm = 0.5 * fwhm
            lorentz_height = eta * area * hwhm / math.pi
            for i in range(lo, hi + 1):
                d2 = (grid[i] - centre) ** 2
                value = gauss_height * math.exp(d2 * rate)
                if eta > 0.0:
                    value += lorentz_height / (d2 + hwhm * hwhm)
                out[b, i] += value


def _over_threads(n: int, work) -> None:
    """work(lo, hi) on contiguous blocks of range(n), on torch's number of threads: the kernels release the GIL
    (a thread pool compiles in half the time of numba's parallel loops and runs as fast)."""
    threads = max(1, torch.get_num_threads())
    if threads == 1 or n < 2:
        work(0, n)
        return
    edges = np.linspace(0, n, min(n, 4 * threads) + 1).astype(int)  # a few blocks per thread: balance
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda k: work(edges[k], edges[k + 1]), range(len(edges) - 1)))


def _form_factor_rows(table: str, radiation: str):
    """(constant (Z,), a (Z, G), b (Z, G), mott_bethe) rows by atomic number of a scattering table."""
    if radiation == "neutron":
        lengths = np.nan_to_num(_neutron_lengths_fm())
        return lengths, np.zeros((len(lengths), 1)), np.zeros((len(lengths), 1)), False
    if table == "pymatgen":
        a, b = _pymatgen_mott_bethe()
        return np.arange(len(a), dtype=float), a, b, True
    if table not in FORM_FACTOR_TABLES:
        raise XtalsolveError(f"unknown form-factor table {table!r}; use one of {', '.join(FORM_FACTOR_TABLES)}")
    a, b, c = _waasmaier_kirfel()
    return c, a, b, False


def _flatten(structures):
    """Cells (B, 3, 3), and the sites of all structures flat: fractional coordinates (S, 3), occupancies (S,),
    each site's species index within its structure (S,), site offsets (B + 1,), and the structures' distinct
    atomic numbers flat with their offsets (B + 1,)."""
    cells = np.empty((len(structures), 3, 3))
    frac, occupancy, site_species, numbers = [], [], [], []
    site_start, species_start = [0], [0]
    for i, structure in enumerate(structures):
        cells[i] = structure.lattice.matrix
        own: dict[int, int] = {}
        for site in structure:
            for element, share in site.species.items():
                z = element.Z
                frac.append(site.frac_coords)
                occupancy.append(share)
                site_species.append(own.setdefault(z, len(own)))
        if not own:
            raise XtalsolveError(f"structure {structure.composition.reduced_formula} has no atoms")
        numbers.extend(own)
        site_start.append(len(frac))
        species_start.append(len(numbers))
    return (cells, np.array(frac, dtype=float).reshape(-1, 3), np.array(occupancy, dtype=float),
            np.array(site_species, dtype=np.int64), np.array(site_start, dtype=np.int64), np.array(numbers, dtype=np.int64),
            np.array(species_start, dtype=np.int64))


def bragg_sticks(structures, wavelength: float, d_min: float, biso: float = 0.0, radiation: str = "xray",
                 form_factors: str = "waasmaier-kirfel", monochromator_2theta: float | None = None,
                 tolerance_deg: float = 2e-4):
    """Merged Bragg peaks of many structures: two_theta (B, K) in degrees, intensity (B, K) = m |F|^2 LP
    (zero-padded) and the number of peaks of each (B,), for reflections with d >= d_min (angstrom); reflections
    in the same bin of ``tolerance_deg`` (as :func:`powder.merge_coincident_peaks`: far below any peak width,
    above the round-off of equivalent reflections) are summed at the first one's 2theta."""
    cells, frac, occupancy, site_species, site_start, numbers, species_start = _flatten(structures)
    check_elements(numbers, radiation)
    constant, a, b, mott_bethe = _form_factor_rows(form_factors, radiation)
    d_min, wavelength = float(d_min), float(wavelength)
    n = len(structures)
    counts = np.zeros(n, np.int64)
    _over_threads(n, lambda lo, hi: _count_reflections(cells[lo:hi], d_min, counts[lo:hi]))
    out_two_theta = np.zeros((n, max(int(counts.max()), 1)))
    out_intensity = np.zeros_like(out_two_theta)
    out_n = np.zeros(n, np.int64)
    c = 1.0 if monochromator_2theta is None else math.cos(math.radians(monochromator_2theta)) ** 2
    rows = (constant[numbers], a[numbers], b[numbers], bool(mott_bethe), d_min, wavelength)
    biso = np.full(n, float(biso))
    _over_threads(n, lambda lo, hi: _bragg_sticks(
        cells[lo:hi], frac, occupancy, site_species, site_start[lo : hi + 1], species_start[lo : hi + 1], *rows,
        biso[lo:hi], radiation == "neutron", float(c), float(tolerance_deg), counts[lo:hi], out_two_theta[lo:hi],
        out_intensity[lo:hi], out_n[lo:hi]))
    return out_two_theta, out_intensity, out_n


def powder_patterns(structures, grid: np.ndarray, unit: str, instrument, size: float | None = None,
                    strain: float = 0.0, biso: float = 0.0, form_factors: str = "waasmaier-kirfel",
                    d_min: float | None = None, n_fwhm: float = 40.0) -> np.ndarray:
    """Patterns (B, P) of pymatgen Structures on ``grid`` (2theta deg or Q 1/angstrom, increasing): the same
    model as :func:`powder.powder_pattern` with merged peaks, a Lorentzian (Scherrer) size term and an
    :class:`powder.Instrument`'s profile, zero shift and second line. ``d_min`` (angstrom) defaults to the
    smallest d whose peak can reach the grid. Runs on torch's number of threads."""
    from xtalsolve.physics.powder import _d_min_for

    grid = np.ascontiguousarray(grid, dtype=float)
    out = np.zeros((len(structures), len(grid)))
    steps = np.diff(grid)
    uniform = len(grid) < 2 or float(steps.max() - steps.min()) <= 1e-3 * float(steps.min())
    profile = [float(value) for value in (instrument.zero_shift, instrument.u, instrument.v, instrument.w,
                                          instrument.x, instrument.y, strain)]
    for wavelength, share in instrument.lines:
        limit = d_min or _d_min_for(grid, unit, wavelength)
        two_theta, intensity, n_peaks = bragg_sticks(structures, wavelength, limit, biso, instrument.radiation,
                                                     form_factors, instrument.monochromator_2theta)
        intensity = share * intensity
        settings = (unit == "q", float(wavelength), *profile, -1.0 if size is None else float(size), float(n_fwhm))
        _over_threads(len(structures), lambda lo, hi: _render(grid, uniform, two_theta[lo:hi], intensity[lo:hi],
                                                              n_peaks[lo:hi], *settings, out[lo:hi]))
    return out
