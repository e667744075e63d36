"""How good is a solution: structure match rate / RMSE, profile R factors, pattern similarity.

Structure matching follows the crystal-structure-prediction literature:

* ``"loose"`` = StructureMatcher(stol=0.5, ltol=0.3, angle_tol=10), the CDVAE / DiffCSP MP-20 protocol
  (Xie et al., ICLR 2022; Jiao et al., NeurIPS 2023) and most PXRD-to-structure papers that compare with them.
* ``"strict"`` = pymatgen's defaults StructureMatcher(stol=0.3, ltol=0.2, angle_tol=5), used by PXRDnet
  (Guo et al., Nat. Mater. 2025). Loose tolerances can pair different space groups (pymatgen#3796): report both.

Everything else is StructureMatcher's default (primitive_cell=True, scale=True, attempt_supercell=False), so a
candidate in a supercell, with permuted sites or an origin shift, matches. A match is a non-``None``
``StructureMatcher.get_rms_dist``; its RMS is the root-mean-square site displacement after the optimal lattice
mapping and translation, normalised by (V/N)^(1/3) (dimensionless, V in angstrom^3, N sites). @k is the best
(lowest RMS) of the first k candidates; a set's match rate counts every reference, its RMSE averages over the
matched ones only (DiffCSP's ``compute_metrics``). Unlike DiffCSP no SMACT/distance validity filter is applied.

Profile statistics use the conventional definitions of B. H. Toby, Powder Diffraction 21, 67 (2006), with weights
w = 1/sigma^2, returned as fractions (multiply by 100 for %).
"""

from __future__ import annotations

import logging
import signal
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np
from pymatgen.analysis.structure_matcher import SpeciesComparator, StructureMatcher
from pymatgen.core import Structure

from xtalsolve.errors import XtalsolveError

log = logging.getLogger(__name__)


class Tolerance(NamedTuple):
    """StructureMatcher tolerances: stol (site, in units of (V/N)^(1/3)), ltol (fractional length), angle (deg)."""

    stol: float
    ltol: float
    angle_tol: float


TOLERANCES: dict[str, Tolerance] = {
    "loose": Tolerance(0.5, 0.3, 10.0),  # CDVAE / DiffCSP MP-20 protocol
    "strict": Tolerance(0.3, 0.2, 5.0),  # pymatgen defaults, PXRDnet
}

DEFAULT_TIMEOUT_S = 60.0
"""Seconds one candidate-reference comparison may take before it counts as no match (pymatgen#2593)."""


# ---------------------------------------------------------------------------------------------------------------
# Structure matching


@dataclass(frozen=True)
class MatchResult:
    """Outcome of comparing candidate(s) with a reference; unpacks as ``matched, rms = result``.

    status: "match", "no_match", "wrong_composition", "invalid" (non-finite or collapsed cell), "error"
    (StructureMatcher raised) or "timeout". index: which candidate gave the best match (@k), else None.
    n_failed: candidates that ended in "invalid", "error" or "timeout".
    """

    matched: bool
    rms: float | None
    status: str = "match"
    index: int | None = None
    n_failed: int = 0

    def __iter__(self):
        return iter((self.matched, self.rms))


@dataclass(frozen=True)
class MatchSummary:
    """Aggregate over references: rate = n_matched / n (fraction); rmse = mean RMS over matched (nan if none)."""

    n: int
    n_matched: int
    rate: float
    rmse: float
    n_failed: int


FAILED = ("invalid", "error", "timeout")


def _tolerance(tolerance: str | Tolerance | Sequence[float]) -> Tolerance:
    if isinstance(tolerance, str):
        if tolerance not in TOLERANCES:
            raise XtalsolveError(f"unknown tolerance {tolerance!r}; use one of {', '.join(TOLERANCES)}", "tolerance")
        return TOLERANCES[tolerance]
    if len(tolerance) != 3 or not all(float(t) > 0 for t in tolerance):
        raise XtalsolveError("a tolerance is (stol, ltol, angle_tol), all positive", "tolerance")
    return Tolerance(*(float(t) for t in tolerance))


@lru_cache(maxsize=8)
def _matcher(tol: Tolerance) -> StructureMatcher:
    return StructureMatcher(stol=tol.stol, ltol=tol.ltol, angle_tol=tol.angle_tol)


class _Timeout(Exception):
    pass


def _with_timeout(fn, timeout_s):
    """Run ``fn()`` under SIGALRM (Unix main thread only; elsewhere without a limit)."""
    usable = timeout_s and hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if not usable:
        return fn()

    def _raise(signum, frame):
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _sane(structure: Structure) -> bool:
    """Finite lattice and coordinates, and a cell that has not collapsed (> 0.1 angstrom^3 per site)."""
    lattice = structure.lattice.matrix
    if not (np.isfinite(lattice).all() and np.isfinite(structure.frac_coords).all()) or len(structure) == 0:
        return False
    return abs(np.linalg.det(lattice)) / len(structure) > 0.1


def match(
    candidate: Structure,
    reference: Structure,
    tolerance: str | Tolerance = "loose",
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> MatchResult:
    """Does ``candidate`` match ``reference``? Returns (matched, normalised RMS or None) plus a status.

    Never raises on a bad candidate: exceptions and timeouts inside StructureMatcher count as no match (logged).
    A candidate whose reduced composition differs from the reference's never matches.
    """
    tol = _tolerance(tolerance)
    if not _sane(candidate):
        return MatchResult(False, None, "invalid", n_failed=1)
    comparator = SpeciesComparator()
    if comparator.get_hash(candidate.composition) != comparator.get_hash(reference.composition):
        return MatchResult(False, None, "wrong_composition")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rms = _with_timeout(lambda: _matcher(tol).get_rms_dist(candidate, reference), timeout_s)
    except _Timeout:
        log.warning("StructureMatcher timed out after %s s on %s", timeout_s, candidate.composition.reduced_formula)
        return MatchResult(False, None, "timeout", n_failed=1)
    except Exception as err:  # noqa: BLE001 - a benchmark must survive any failure on a weird candidate
        log.warning("StructureMatcher failed on %s: %r", candidate.composition.reduced_formula, err)
        return MatchResult(False, None, "error", n_failed=1)
    if rms is None:
        return MatchResult(False, None, "no_match")
    return MatchResult(True, float(rms[0]), "match")


def best_of(results: Sequence[MatchResult], k: int | None = None) -> MatchResult:
    """The lowest-RMS match among the first ``k`` per-candidate results (all when k is None)."""
    results = list(results)[:k]
    n_failed = sum(r.status in FAILED for r in results)
    hits = [(r.rms, i) for i, r in enumerate(results) if r.matched]
    if hits:
        rms, index = min(hits)
        return MatchResult(True, rms, "match", index, n_failed)
    status = "error" if results and n_failed == len(results) else "no_match"
    return MatchResult(False, None, status, None, n_failed)


def match_at_k(
    candidates: Sequence[Structure],
    reference: Structure,
    k: int,
    tolerance: str | Tolerance = "loose",
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> MatchResult:
    """Best (lowest RMS) match among the first ``k`` candidates; ``index`` says which one."""
    if k < 1:
        raise XtalsolveError(f"k must be >= 1, got {k}", "k")
    return best_of([match(c, reference, tolerance, timeout_s) for c in list(candidates)[:k]])


def match_rate(results: Sequence[MatchResult | tuple]) -> MatchSummary:
    """Match rate over references and mean RMS over the matched ones (the CSP-literature convention)."""
    results = list(results)
    if not results:
        raise XtalsolveError("no match results to aggregate", "results")
    rms = [rms for matched, rms in results if matched]
    n_failed = sum(getattr(r, "n_failed", 0) for r in results)
    return MatchSummary(
        n=len(results),
        n_matched=len(rms),
        rate=len(rms) / len(results),
        rmse=float(np.mean(rms)) if rms else float("nan"),
        n_failed=n_failed,
    )


def match_table(
    candidates: Sequence[Sequence[Structure]],
    references: Sequence[Structure],
    ks: Sequence[int] = (1,),
    tolerances: Sequence[str] = ("loose", "strict"),
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> dict[tuple[str, int], MatchSummary]:
    """Summaries keyed (tolerance, k) for candidate lists (ranked, best first) against their references.

    Each candidate is compared once per tolerance; @k reuses those comparisons.
    """
    if len(candidates) != len(references):
        raise XtalsolveError(f"{len(candidates)} candidate lists for {len(references)} references", "candidates")
    k_max = max(ks)
    table = {}
    for tolerance in tolerances:
        per_reference = [
            [match(c, ref, tolerance, timeout_s) for c in list(cands)[:k_max]]
            for cands, ref in zip(candidates, references)
        ]
        for k in ks:
            table[(tolerance, k)] = match_rate([best_of(results, k) for results in per_reference])
    return table


# ---------------------------------------------------------------------------------------------------------------
# Profile statistics (Toby 2006)


def _arrays(source: str, *arrays):
    out = [np.asarray(a, dtype=float) for a in arrays]
    shape = out[0].shape
    if out[0].ndim != 1 or len(out[0]) == 0 or any(a.shape != shape for a in out):
        raise XtalsolveError("profiles must be non-empty 1-D arrays of equal length", source)
    if not all(np.isfinite(a).all() for a in out):
        raise XtalsolveError("profiles contain NaN or infinite values", source)
    return out


def _weights(sigma, n: int, required: bool) -> np.ndarray:
    if sigma is None:
        if required:
            raise XtalsolveError("needs sigma (one standard deviation per point)", "sigma")
        return np.ones(n)
    (sigma,) = _arrays("sigma", np.broadcast_to(np.asarray(sigma, dtype=float), (n,)))
    if (sigma <= 0).any():
        raise XtalsolveError("sigma must be > 0 everywhere", "sigma")
    return 1.0 / sigma**2


def _net(y_obs, background):
    """y_obs, or y_obs - background for the background-subtracted variants."""
    return y_obs if background is None else y_obs - _arrays("background", background)[0]


def fit_scale(y_obs, y_calc, sigma=None) -> float:
    """Weighted least-squares scale c minimising sum w (y_obs - c y_calc)^2."""
    y_obs, y_calc = _arrays("y_calc", y_obs, y_calc)
    w = _weights(sigma, len(y_obs), required=False)
    denominator = np.sum(w * y_calc**2)
    if denominator == 0:
        raise XtalsolveError("calculated profile is zero everywhere", "y_calc")
    return float(np.sum(w * y_obs * y_calc) / denominator)


def rp(y_obs, y_calc, background=None) -> float:
    """Profile R factor Rp = sum |yo - yc| / sum |yo| (or / sum |yo - yb| with ``background``)."""
    y_obs, y_calc = _arrays("y_calc", y_obs, y_calc)
    return float(np.sum(np.abs(y_obs - y_calc)) / np.sum(np.abs(_net(y_obs, background))))


def rwp(y_obs, y_calc, sigma=None, background=None) -> float:
    """Weighted profile R factor Rwp = sqrt(sum w (yo - yc)^2 / sum w yo^2), w = 1/sigma^2.

    sigma None gives unit weights (the unweighted R2 of simulated patterns); with ``background`` the denominator
    uses yo - yb (the background-subtracted Rwp').
    """
    y_obs, y_calc = _arrays("y_calc", y_obs, y_calc)
    w = _weights(sigma, len(y_obs), required=False)
    return float(np.sqrt(np.sum(w * (y_obs - y_calc) ** 2) / np.sum(w * _net(y_obs, background) ** 2)))


def _dof(n: int, n_params: int) -> int:
    if not 0 <= n_params < n:
        raise XtalsolveError(f"n_params must be in [0, {n - 1}] for {n} points, got {n_params}", "n_params")
    return n - n_params


def r_expected(y_obs, sigma, n_params: int = 0, background=None) -> float:
    """Expected R factor Rexp = sqrt((N - P) / sum w yo^2) (yo - yb with ``background``)."""
    (y_obs,) = _arrays("y_obs", y_obs)
    w = _weights(sigma, len(y_obs), required=True)
    return float(np.sqrt(_dof(len(y_obs), n_params) / np.sum(w * _net(y_obs, background) ** 2)))


def reduced_chi2(y_obs, y_calc, sigma, n_params: int = 0) -> float:
    """Reduced chi^2 = sum w (yo - yc)^2 / (N - P) = (Rwp / Rexp)^2."""
    y_obs, y_calc = _arrays("y_calc", y_obs, y_calc)
    w = _weights(sigma, len(y_obs), required=True)
    return float(np.sum(w * (y_obs - y_calc) ** 2) / _dof(len(y_obs), n_params))


def gof(y_obs, y_calc, sigma, n_params: int = 0) -> float:
    """Goodness of fit as GSAS-II and TOPAS report it: GoF = Rwp / Rexp = sqrt(reduced chi^2) (1 = ideal)."""
    return float(np.sqrt(reduced_chi2(y_obs, y_calc, sigma, n_params)))


def r_bragg(observed_integrated, calculated_integrated) -> float:
    """Bragg R factor R_B = sum |I_obs - I_calc| / sum |I_obs| over reflections (integrated intensities)."""
    i_obs, i_calc = _arrays("calculated_integrated", observed_integrated, calculated_integrated)
    return float(np.sum(np.abs(i_obs - i_calc)) / np.sum(np.abs(i_obs)))


# ---------------------------------------------------------------------------------------------------------------
# Pattern similarity (last axis = pattern points; leading axes broadcast, e.g. one reference vs n candidates)


def _pair(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape[-1:] != b.shape[-1:] or a.shape[-1] < 2:
        raise XtalsolveError("patterns must share the same grid (last axis, >= 2 points)", "pattern")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise XtalsolveError("patterns contain NaN or infinite values", "pattern")
    return a, b


def _ratio(num, den):
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return float(out) if out.ndim == 0 else out


def cosine_similarity(a, b):
    """a.b / (|a| |b|) in [-1, 1]; [0, 1] for non-negative patterns; 1 = identical up to a positive scale."""
    a, b = _pair(a, b)
    return _ratio(np.sum(a * b, -1), np.sqrt(np.sum(a * a, -1) * np.sum(b * b, -1)))


def pearson(a, b):
    """Pearson correlation coefficient in [-1, 1] (cosine of the mean-centred patterns); nan for a flat pattern."""
    a, b = _pair(a, b)
    return cosine_similarity(a - a.mean(-1, keepdims=True), b - b.mean(-1, keepdims=True))


def de_gelder(a, b, width: float, x=None):
    """Weighted cross-correlation similarity of de Gelder, Wehrens & Hageman, J. Comput. Chem. 22, 273 (2001).

    S = c_ab / sqrt(c_aa c_bb), c_fg = sum_r w(r) sum_i f_i g_(i+r), triangle weight w(r) = 1 - |r|/l for
    |r| < l. ``width`` is l in points, or in x units when the (uniform) grid ``x`` is given. S is 1 for identical
    patterns (up to scale), symmetric in a and b, in [0, 1] for non-negative patterns, equals the cosine
    similarity for l <= 1 point, and decays smoothly as peaks shift apart (instead of dropping at once).
    """
    a, b = _pair(a, b)
    if x is not None:
        x = np.asarray(x, dtype=float)
        step = np.diff(x)
        if x.shape != a.shape[-1:] or (step <= 0).any() or np.ptp(step) > 1e-6 * abs(step.mean()):
            raise XtalsolveError("de Gelder similarity needs a strictly increasing, uniform x grid", "x")
        width = width / step.mean()
    if not width > 0:
        raise XtalsolveError(f"width must be > 0, got {width}", "width")
    n = a.shape[-1]
    lags = np.arange(-min(int(np.ceil(width)) - 1, n - 1), min(int(np.ceil(width)), n))
    weights = 1.0 - np.abs(lags) / width

    def correlation(f, g):
        # Direct sum over the few lags inside the triangle: O(points x lags), no FFT wrap-around to handle.
        total = 0.0
        for lag, weight in zip(lags, weights):
            if lag >= 0:
                total = total + weight * np.sum(f[..., : n - lag] * g[..., lag:], -1)
            else:
                total = total + weight * np.sum(f[..., -lag:] * g[..., : n + lag], -1)
        return total

    return _ratio(correlation(a, b), np.sqrt(correlation(a, a) * correlation(b, b)))
