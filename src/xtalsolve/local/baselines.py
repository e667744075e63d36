"""Baselines for spectrum -> local structure.

- :class:`TemplateMatcher`: nearest library spectra (L2 distance between edge-aligned normalised feature vectors);
  their clusters are the prediction. :meth:`TemplateMatcher.mixture` is linear-combination fitting (LCF, as in
  Athena): the spectrum as a non-negative mixture of library spectra, for samples with several kinds of site
  (magnetite: one tetrahedral, two octahedral Fe).
- :func:`fit_first_shell`: EXAFS-style single-shell fit, chi(k) = N S02 |F(k)| / (k R^2) exp(-2 k^2 sigma2)
  exp(-2R / lambda(k)) sin(2kR + phi(k)), least squares on N, R, sigma2 (and an E0 shift), with the
  amplitude |F|, phase phi and mean free path lambda of the absorber-ligand path given as arrays on k
  (from FEFF's ``feffNNNN.dat`` or any other source); in k-space, or in R-space over the first-shell peak of
  the windowed Fourier transform (:func:`chi_r`), as Artemis / Larch users fit.
- :class:`ExafsConditions`: what separates measured EXAFS from FEFF's ideal chi(k) (the sample's S02 against the
  analyst's assumed one, thermal disorder, noise) and the space the analyst fits in; :data:`IDEAL_EXAFS`,
  :data:`REALISTIC_EXAFS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

from xtalsolve.errors import XtalsolveError
from xtalsolve.local.clusters import Cluster, FirstShell
from xtalsolve.local.library import SpectrumLibrary

KTOE = 3.8099821161  # hbar^2 / (2 m_e) in eV angstrom^2: E - E0 = KTOE * k^2


class TemplateMatcher:
    """Nearest-neighbour search over a :class:`SpectrumLibrary` (features must share its grid)."""

    def __init__(self, library: SpectrumLibrary):
        if len(library) == 0:
            raise XtalsolveError("empty template library", "library")
        self.library = library

    def query(self, features: np.ndarray, k: int = 8, exclude: set[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Indices and L2 distances of the ``k`` nearest library spectra; ``exclude`` drops material keys."""
        d = np.linalg.norm(self.library.features - features[None, :], axis=1) / np.sqrt(len(features))
        if exclude:
            d = np.where([m.get("material_key") in exclude for m in self.library.meta], np.inf, d)
        idx = np.argsort(d, kind="stable")[:k]
        idx = idx[np.isfinite(d[idx])]
        return idx, d[idx]

    def mixture(self, features: np.ndarray, sum_weight: float = 10.0) -> tuple[np.ndarray, float]:
        """Linear-combination fit: non-negative weights w (one per library spectrum, summing to about 1) that
        minimise |sum_i w_i f_i - features| (scipy's NNLS; the sum is held near 1 by an extra row of weight
        ``sum_weight``, as a normalised mixture must). Returns (w, RMS residual per point)."""
        from scipy.optimize import nnls

        basis = self.library.features.T
        a = np.vstack([basis, np.full((1, basis.shape[1]), sum_weight)])
        b = np.concatenate([features, [sum_weight]])
        weights, _ = nnls(a, b, maxiter=50 * basis.shape[1])
        residual = float(np.sqrt(np.mean((basis @ weights - features) ** 2)))
        return weights, residual

    def predict(self, features: np.ndarray, k: int = 8, absorber: str | None = None,
                exclude: set[str] | None = None) -> list[Cluster]:
        """Clusters of the ``k`` nearest spectra (best first); meta gains ``template_distance``."""
        idx, dist = self.query(features, k, exclude)
        out = []
        for i, dd in zip(idx, dist):
            cl = self.library.cluster(int(i), absorber)
            cl.meta["template_distance"] = float(dd)
            cl.meta["template_index"] = int(i)
            out.append(cl)
        return out


@dataclass(frozen=True)
class Alignment:
    """Theory-to-measurement mapping of a template library (:meth:`SpectrumLibrary.aligned`): energy shift (eV),
    energy-scale stretch, Gaussian FWHM (eV), and the RMS residual of the linear-combination fit it gives."""

    shift_eV: float
    stretch: float
    fwhm_eV: float
    residual: float

    def as_dict(self) -> dict:
        return {"shift_eV": self.shift_eV, "stretch": self.stretch, "fwhm_eV": self.fwhm_eV,
                "lcf_residual": round(self.residual, 5)}

    def to_computed_axis(self, grid: np.ndarray, features: np.ndarray) -> np.ndarray:
        """The inverse energy mapping: a measured spectrum (``features`` on ``grid``, E - E0 in eV) resampled so
        that its features sit where the computed spectra have them (value at E taken from shift + stretch E;
        ends extended by their end values). This is what a model trained on computed spectra is given; the
        broadening is not undone."""
        return np.interp(self.shift_eV + self.stretch * np.asarray(grid, float), grid, features)


ALIGN_SHIFTS_EV = tuple(np.arange(-3.0, 3.01, 1.0))
ALIGN_STRETCHES = tuple(np.round(np.arange(0.9, 1.501, 0.05), 3))
ALIGN_FWHMS_EV = (0.0, 1.0, 2.0, 3.0, 4.0)


def fit_alignment(library: SpectrumLibrary, features: np.ndarray, shifts=ALIGN_SHIFTS_EV,
                  stretches=ALIGN_STRETCHES, fwhms=ALIGN_FWHMS_EV) -> Alignment:
    """The one (shift, stretch, broadening) of the whole library that lets a non-negative mixture of its spectra
    (:meth:`TemplateMatcher.mixture`) fit the measured ``features`` best: a grid search over the given values.

    One mapping for every template, fitted to one spectrum: it corrects what the theory gets wrong for all
    sites alike (E0, the energy scale of the scattering features, the instrument's resolution), and it cannot
    choose the geometry, which stays with the templates. Measured Fe K of hematite, wustite and magnetite: the
    mixture's residual falls from 0.04-0.06 to 0.01-0.02 per point at stretches of 1.2-1.4 (docs/spectra.md)."""
    best = None
    for fwhm in fwhms:
        broad = library.broadened(fwhm)
        for stretch in stretches:
            for shift in shifts:
                residual = TemplateMatcher(broad.aligned(shift, stretch)).mixture(features)[1]
                if best is None or residual < best.residual:
                    best = Alignment(float(shift), float(stretch), float(fwhm), residual)
    return best


# ------------------------------------------------------------------------------------------------ EXAFS-style fit


@dataclass(frozen=True)
class ShellFit:
    """Result of a single-shell fit: N, R (angstrom), sigma2 (angstrom^2), dE0 (eV), residual (rms)."""

    n: float
    r_A: float
    sigma2_A2: float
    de0_eV: float
    rms: float


def shell_chi(k, n, r, sigma2, amp, phase, lam, s02=1.0):
    """Single-scattering EXAFS of one shell (k in 1/angstrom; amp, phase, lam on the same k)."""
    k = np.maximum(k, 1e-6)
    return n * s02 * amp / (k * r**2) * np.exp(-2 * k**2 * sigma2) * np.exp(-2 * r / lam) * np.sin(2 * k * r + phase)


def kspace_window(k, kmin: float, kmax: float, dk: float = 1.0) -> np.ndarray:
    """Hanning-sill window on k (1/angstrom): sin^2 rise over [kmin - dk/2, kmin + dk/2], 1 in between, mirror-image
    fall about kmax (the "hanning" window of Athena / Larch)."""
    k = np.asarray(k, float)
    rise = np.clip((k - kmin + dk / 2) / dk, 0.0, 1.0)
    fall = np.clip((kmax + dk / 2 - k) / dk, 0.0, 1.0)
    return np.sin(0.5 * np.pi * rise) ** 2 * np.sin(0.5 * np.pi * fall) ** 2


def chi_r(k, chi, r, kweight: int = 2, kmin: float = 3.0, kmax: float = 12.0, dk: float = 1.0) -> np.ndarray:
    """Complex EXAFS Fourier transform chi(R) = 1/sqrt(pi) sum_k k^w chi(k) W(k) exp(2ikR) dk at distances ``r``
    (angstrom; the first-shell peak sits ~0.3-0.5 angstrom below the bond length, the phase shift). ``k`` must be
    uniform. Written out here (a dense sum, ~100 R x 200 k) because it is one line and it is linear in chi, which
    the R-space fit uses; Larch's ``xftf`` computes the same transform but brings a large dependency."""
    return fourier_matrix(k, r, kweight, kmin, kmax, dk) @ np.asarray(chi, float)


def fourier_matrix(k, r, kweight: int = 2, kmin: float = 3.0, kmax: float = 12.0, dk: float = 1.0) -> np.ndarray:
    """The (len(r), len(k)) complex matrix of :func:`chi_r` (weight, window and step included): chi(R) = M chi(k)."""
    k, r = np.asarray(k, float), np.asarray(r, float)
    weight = k**kweight * kspace_window(k, kmin, kmax, dk) * float(k[1] - k[0]) / np.sqrt(np.pi)
    return np.exp(2j * np.outer(r, k)) * weight


def fit_first_shell(k, chi, amp, phase, lam, kweight: int = 2, s02: float = 1.0,
                    start=(4.0, 1.8, 0.003), r_window: tuple[float, float] | None = None,
                    kmin: float | None = None, kmax: float | None = None) -> ShellFit:
    """Least-squares fit of N, R, sigma2 and an E0 shift to ``chi(k)`` (k^kweight weighted), with the amplitude
    reduction ``s02`` the analyst assumes.

    ``k``, ``amp``, ``phase``, ``lam`` are arrays on the same k grid (1/angstrom). The E0 shift moves k as
    k' = sqrt(k^2 - dE0 / KTOE); the path functions are interpolated on k'. Without ``r_window`` the residual is
    k^w (model - chi) on every k; with ``r_window`` = (rmin, rmax) angstrom it is the real and imaginary parts of
    :func:`chi_r` of (model - chi) on rmin..rmax (window kmin..kmax, default the ends of ``k`` less 0.5 1/angstrom;
    ``k`` must then be uniform), which isolates the first shell from the farther ones as an analyst's fit does.
    """
    k, chi = np.asarray(k, float), np.asarray(chi, float)

    def model(p):
        n, r, s2, de0 = p
        kp = np.sqrt(np.maximum(k**2 - de0 / KTOE, 1e-8))
        return shell_chi(kp, n, r, s2, np.interp(kp, k, amp), np.interp(kp, k, phase), np.interp(kp, k, lam), s02)

    if r_window is None:
        def resid(p):
            return (model(p) - chi) * k**kweight
    else:
        lo = float(k[0]) + 0.5 if kmin is None else kmin
        hi = float(k[-1]) - 0.5 if kmax is None else kmax
        transform = fourier_matrix(k, np.arange(r_window[0], r_window[1] + 1e-9, 0.02), kweight, lo, hi)

        def resid(p):
            z = transform @ (model(p) - chi)
            return np.concatenate([z.real, z.imag])

    best = None
    for r0 in np.linspace(start[1] - 0.2, start[1] + 0.2, 5):  # phase wrapping: several R starts
        res = least_squares(resid, [start[0], r0, start[2], 0.0],
                            bounds=([0.1, 0.8, 0.0, -15.0], [16.0, 4.0, 0.05, 15.0]))
        if best is None or res.cost < best.cost:
            best = res
    n, r, s2, de0 = best.x
    return ShellFit(float(n), float(r), float(s2), float(de0), float(np.sqrt(np.mean(best.fun**2))))


@dataclass(frozen=True)
class ExafsConditions:
    """What the EXAFS-style baseline is given beyond FEFF's ideal chi(k) of a cluster, and how it fits.

    The sample's S02 is drawn uniformly from ``s02_range`` while the analyst assumes ``s02_assumed`` (S02 and N
    are one product in the EXAFS amplitude, so an S02 off by 10 % puts N off by 10 %); thermal disorder multiplies
    chi by exp(-2 k^2 sigma2) with sigma2 drawn from ``sigma2_range`` (angstrom^2; fitted back by the free sigma2,
    which also correlates with N); white noise has a standard deviation of ``noise`` times the RMS of chi on
    kmin..kmax (1/angstrom). ``r_window`` (angstrom) fits in R-space (:func:`fit_first_shell`); None, in k-space."""

    s02_range: tuple[float, float] = (1.0, 1.0)
    s02_assumed: float = 1.0
    sigma2_range: tuple[float, float] = (0.0, 0.0)
    noise: float = 0.0
    r_window: tuple[float, float] | None = None
    kmin: float = 3.0
    kmax: float = 12.0

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


#: FEFF's own chi(k), S02 known, no noise, k-space fit of a single shell: the baseline's best case on paper (the
#: farther shells, which the single shell cannot fit, are its only handicap).
IDEAL_EXAFS = ExafsConditions()
#: An analyst's everyday case: S02 known to +-10 % (0.8-1.0, assumed 0.9), room-temperature sigma2 0.001-0.003
#: angstrom^2, noise 5 % of the chi RMS, fit in R-space over the first-shell peak (0.9-2.0 angstrom).
REALISTIC_EXAFS = ExafsConditions(s02_range=(0.8, 1.0), s02_assumed=0.9, sigma2_range=(0.001, 0.003), noise=0.05,
                                  r_window=(0.9, 2.0))


# ---------------------------------------------------------------------------------------------- FEFF path functions


@dataclass(frozen=True)
class FeffPath:
    """One scattering path from ``feffNNNN.dat``: k (1/angstrom), amplitude |F| x reduction factor, total phase
    (2 phi_c + phi_F, radians), mean free path lambda (angstrom), degeneracy and half path length reff (angstrom)."""

    k: np.ndarray
    amp: np.ndarray
    phase: np.ndarray
    lam: np.ndarray
    degeneracy: float
    reff_A: float


def read_feff_path(text: str) -> FeffPath:
    """Parse FEFF's ``feffNNNN.dat`` text (columns k, real[2*phc], mag[feff], phase[feff], red factor, lambda, ...)."""
    lines = text.splitlines()
    head = next(i for i, ln in enumerate(lines) if "nleg, deg, reff" in ln)
    _, deg, reff, *_ = lines[head].split()
    start = next(i for i, ln in enumerate(lines) if ln.strip().startswith("k") and "real[2*phc]" in ln) + 1
    data = np.array([[float(x) for x in ln.split()[:6]] for ln in lines[start:] if ln.strip()])
    return FeffPath(data[:, 0], data[:, 2] * data[:, 4], data[:, 1] + data[:, 3], data[:, 5], float(deg), float(reff))


def feff_exafs(cluster: Cluster, rpath: float, edge: str = "K", kmax: float = 16.0,
               nleg: int = 2) -> tuple[list[FeffPath], np.ndarray]:
    """FEFF10 EXAFS of ``cluster`` without SCF (paths up to half length ``rpath`` angstrom and ``nleg`` legs).

    Returns the scattering paths (``feffNNNN.dat``) and FEFF's chi(k) as an array (k, chi).
    """
    import tempfile

    from xtalsolve.local.feff import FeffSettings, feff_available, feff_input, quiet_stdout

    if not feff_available():
        raise XtalsolveError("FEFF10 is not installed: pip install feff10-rs", "feff10")
    import feff10

    text = feff_input(cluster, FeffSettings(edge=edge), "exafs", cards=[f"EXAFS {kmax}", f"RPATH {rpath:.3f}",
                                                                        f"NLEG {nleg}"], print_flags="1 0 0 0 0 3")
    with tempfile.TemporaryDirectory(prefix="feffexafs_") as wd:
        try:
            with quiet_stdout():
                feff10.run(text, wd)
            paths = [read_feff_path(p.read_text()) for p in sorted(Path(wd).glob("feff[0-9][0-9][0-9][0-9].dat"))]
            chi = np.loadtxt(Path(wd, "chi.dat"), comments="#")[:, :2]
        except Exception as exc:
            raise XtalsolveError(f"FEFF10 EXAFS run failed: {str(exc).splitlines()[0]}", "feff10") from exc
    return paths, chi


def first_shell_path(cluster: Cluster, ligand: str = "O", edge: str = "K", kmax: float = 16.0) -> tuple[FeffPath,
                                                                                                      np.ndarray]:
    """FEFF10 single-scattering path to the first ``ligand`` shell of ``cluster`` and FEFF's chi(k) of that shell
    alone (absorber + first shell, no SCF: the first-shell path functions barely depend on it)."""
    from xtalsolve.local.clusters import first_shell_cluster

    shell = first_shell_cluster(cluster, ligand)
    if len(shell) == 1:
        raise XtalsolveError(f"no {ligand} in the first shell", "cluster")
    paths, chi = feff_exafs(shell, float(shell.distances[1:].max()) + 0.05, edge, kmax)
    return paths[0], chi


def cluster_chi(cluster: Cluster, rpath: float = 4.0, kmax: float = 14.0) -> np.ndarray:
    """FEFF10 chi(k) of ``cluster`` (single scattering to half path length ``rpath`` angstrom) as (k, chi)."""
    return feff_exafs(cluster, rpath, kmax=kmax)[1]


def exafs_first_shell(cluster: Cluster, reference: FeffPath, ligand: str = "O",
                      conditions: ExafsConditions = IDEAL_EXAFS, seed: int = 0, rpath: float = 4.0,
                      chi: np.ndarray | None = None) -> FirstShell:
    """EXAFS-style analysis of a cluster: FEFF chi(k) of the whole cluster (single scattering to ``rpath``; or the
    given ``chi`` as (k, chi) from :func:`cluster_chi`), degraded as ``conditions`` say (draws seeded by
    ``seed``), and a single-shell fit with the ``reference`` path (from a model compound, as an analyst would).
    CN = fitted N rounded; bond lengths = fitted R; no angles (EXAFS does not give them)."""
    c = conditions
    if chi is None:
        chi = cluster_chi(cluster, rpath, kmax=c.kmax + 2.0)
    rng = np.random.default_rng(seed)
    k = chi[:, 0]
    y = chi[:, 1] * rng.uniform(*c.s02_range) * np.exp(-2 * k**2 * rng.uniform(*c.sigma2_range))
    fit_range = (k >= c.kmin - 1.0) & (k <= c.kmax + 1.0) if c.r_window else (k >= c.kmin) & (k <= c.kmax)
    in_window = (k >= c.kmin) & (k <= c.kmax)
    y = y + rng.normal(0.0, c.noise * float(np.sqrt(np.mean(y[in_window] ** 2))), k.size)
    k, y = k[fit_range], y[fit_range]
    fit = fit_first_shell(k, y, np.interp(k, reference.k, reference.amp), np.interp(k, reference.k, reference.phase),
                          np.interp(k, reference.k, reference.lam), s02=c.s02_assumed,
                          start=(4.0, reference.reff_A, 0.003), r_window=c.r_window, kmin=c.kmin, kmax=c.kmax)
    n = max(round(fit.n), 0)
    return FirstShell(ligand, float("nan"), n, np.full(n, fit.r_A), np.zeros(0))
