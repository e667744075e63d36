"""Rietveld recipe: a data profile, one contribution per crystalline phase (refine/phase.py) on a shared
background and instrument, a weighted residual, and symmetry-constrained parameters refined in stages by SciPy
least squares with an exact (forward-mode autograd) Jacobian, in the spirit of a diffpy.srfit FitRecipe.

Model (2theta in degrees):
    y_calc(x) = sum_phases s_p sum_lines r_l sum_k m_k |F_k|^2 LP_k P_k(r_MD) A_k(x) Phi(x - 2theta_k - Z - D cos(theta_k))
                + sum_n c_n T_n(x~)
with Chebyshev T_n on x rescaled to [-1, 1], zero shift Z (deg), sample displacement D = -2 s / R (s in mm,
R the goniometer radius), the March-Dollase factor P_k averaged over the equivalent reflections of k and the
Berar-Baldinozzi axial-divergence asymmetry A_k (physics.profiles.berar_baldinozzi; 1 unless refined).
Reflections are enumerated once per symmetry orbit (|F| is the same on the orbit while the constraints keep
the symmetry), systematic absences removed, which cuts the work by the multiplicity. Background, Z, D, the
asymmetry and the Kalpha2/Kalpha1 ratio r_2 are shared; scale, cell, coordinates, B, occupancies, peak widths
and size belong to each phase. Weight fractions follow Hill & Howard (J. Appl. Cryst. 20, 467 (1987)):
W_p = s_p (Z M V)_p / sum_q s_q (Z M V)_q, valid because the calculated intensities carry no 1/V^2 factor.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from pymatgen.core import Structure
from scipy.optimize import least_squares
from threadpoolctl import threadpool_limits

from xtalsolve import metrics
from xtalsolve.errors import XtalsolveError
from xtalsolve.pattern import Pattern
from xtalsolve.physics.powder import Instrument
from xtalsolve.physics.profiles import berar_baldinozzi, pseudo_voigt, pseudo_voigt_partials
from xtalsolve.refine.constraints import Symmetry, symmetry_of
from xtalsolve.refine.parameters import Parameter, ParameterSet
from xtalsolve.refine.phase import Phase, ReflectionSet, reflection_orbits  # noqa: F401  (re-exported)

GONIOMETER_RADIUS_MM = 240.0
"""Default Bragg-Brentano goniometer radius R (mm) for the sample displacement term -2 s cos(theta) / R."""

STAGES = (
    ("scale+background", ("scale", "background")),
    ("lattice+zero", ("lattice", "zero")),
    ("profile", ("profile", "texture")),
    ("positions", ("positions",)),
    ("biso", ("biso", "occupancy")),
)
"""Release order of a Rietveld refinement (each stage keeps the groups released before it)."""

# ----------------------------------------------------------------------------------------------------------------
# Data


@dataclass
class Profile:
    """Observed profile: x = 2theta (degrees), y, sigma (one standard deviation) and excluded (lo, hi) ranges."""

    x: np.ndarray
    y: np.ndarray
    sigma: np.ndarray
    excluded: list[tuple[float, float]] = field(default_factory=list)
    source: str = "<memory>"

    @classmethod
    def from_pattern(cls, pattern: Pattern, excluded=()) -> Profile:
        if pattern.unit != "2theta":
            raise XtalsolveError("refinement needs a 2theta pattern (give --x-unit 2theta)", pattern.source)
        return cls.from_arrays(pattern.x, pattern.y, pattern.sigma, excluded, pattern.source)

    @classmethod
    def from_arrays(cls, x, y, sigma=None, excluded=(), source="<memory>") -> Profile:
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if sigma is None:  # counting statistics, floored so that zero-count points keep a finite weight
            sigma = np.sqrt(np.maximum(np.abs(y), 1.0))
        sigma = np.asarray(sigma, dtype=float)
        if len(x) < 20 or not (np.all(np.diff(x) > 0) and np.all(sigma > 0) and np.isfinite(y).all()):
            raise XtalsolveError("pattern needs >= 20 points, increasing 2theta, finite y and sigma > 0", source)
        return cls(x, y, sigma, list(excluded), source)

    @property
    def mask(self) -> np.ndarray:
        keep = np.ones(len(self.x), dtype=bool)
        for lo, hi in self.excluded:
            keep &= ~((self.x >= lo) & (self.x <= hi))
        return keep


def instrument_for(wavelengths: str | float | tuple, radiation: str = "xray", **kwargs) -> Instrument:
    """Instrument from a wavelength (angstrom) or a manifest-style 'a;b' Kalpha1;Kalpha2 pair (ratio 0.5)."""
    if isinstance(wavelengths, str):
        wavelengths = tuple(float(v) for v in wavelengths.split(";"))
    if isinstance(wavelengths, (int, float)):
        wavelengths = (float(wavelengths),)
    if len(wavelengths) == 2:
        return Instrument(wavelength=wavelengths[0], wavelength2=wavelengths[1], ratio2=0.5, radiation=radiation, **kwargs)
    return Instrument(wavelength=wavelengths[0], radiation=radiation, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# The recipe


def phase_names(structures: list[Structure], names=None) -> list[str]:
    """Unique labels for the phases (given names, else reduced formulas), safe in file names and parameter names."""
    raw = list(names) if names is not None else [s.composition.reduced_formula for s in structures]
    if len(raw) != len(structures):
        raise XtalsolveError(f"{len(raw)} phase names for {len(structures)} structures", "names")
    out: list[str] = []
    for name in raw:
        clean = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "phase"
        unique, k = clean, 2
        while unique in out:
            unique, k = f"{clean}_{k}", k + 1
        out.append(unique)
    return out


def _per_phase(value, i: int):
    """A per-phase option given once for all phases or as a list with one entry per phase."""
    return value[i] if isinstance(value, (list, tuple)) else value


class Recipe:
    """Rietveld (or, with ``lebail=True``, Le Bail) refinement of one or more phases against one profile.

    profile: observed data; structures: one pymatgen Structure or a list (one contribution each; each idealised
    to its space group at ``symprec``, angstrom); instrument: wavelengths, radiation and start values of U, V, W,
    X, Y; n_background: Chebyshev terms (None: :func:`background_terms`); displacement: refine the sample
    displacement (mm); texture: March-Dollase axis (hkl) or None, or a list with one of those per phase (one ratio
    per textured phase); profile_params: which of w, v, u, x, y, size, strain the profile stage releases (per
    phase); biso, size: start values (a list gives one per phase); asymmetry: number of Berar-Baldinozzi terms
    refined in the profile stage (0, 2 = P1, P2 in 1/tan(theta), or 4); refine_ratio: refine the Kalpha2/Kalpha1
    ratio in the profile stage; occupancies: one occupancy per independent site (0-1),
    released with B; names: phase labels (default: reduced formulas).
    """

    def __init__(
        self,
        profile: Profile,
        structure: Structure | list[Structure],
        instrument: Instrument,
        n_background: int | None = None,
        symprec: float = 0.05,
        displacement: bool = False,
        texture: tuple[int, int, int] | list | None = None,
        profile_params: tuple[str, ...] = ("w", "v", "u", "x", "size"),
        biso: float | dict | list = 0.5,
        size: float | None | list = None,
        lebail: bool = False,
        n_fwhm: float = 20.0,
        asymmetry: int = 0,
        refine_ratio: bool = False,
        occupancies: bool = False,
        names: list[str] | None = None,
    ):
        structures = [structure] if isinstance(structure, Structure) else list(structure)
        if not structures or not all(isinstance(s, Structure) for s in structures):
            raise XtalsolveError("refinement needs one or more pymatgen Structures", "structure")
        if asymmetry not in (0, 2, 4):
            raise XtalsolveError(f"asymmetry must be 0, 2 or 4 Berar-Baldinozzi terms, not {asymmetry!r}", "asymmetry")
        self.profile = profile
        self.instrument = instrument
        self.lebail = lebail
        self.n_fwhm = n_fwhm
        self.n_groups = 8
        self.blur = 0.0  # extra Gaussian FWHM (degrees) used while the lattice is still far off
        self.wavelengths = [instrument.wavelength] + ([instrument.wavelength2] if instrument.wavelength2 else [])
        labels = phase_names(structures, names)
        textures = list(texture) if isinstance(texture, list) else [texture] * len(structures)
        if len(textures) != len(structures):
            raise XtalsolveError(f"{len(textures)} texture axes for {len(structures)} phases", "texture")
        self.phases = [
            Phase(s, instrument, self.wavelengths, float(profile.x.max()), name=label,
                  prefix="" if len(structures) == 1 else f"{label}:", symprec=symprec, lebail=lebail, texture=axis)
            for s, label, axis in zip(structures, labels, textures)
        ]
        mask = profile.mask
        self._mask = torch.as_tensor(mask)
        self._grid = torch.as_tensor(np.ascontiguousarray(profile.x))
        self._y = torch.as_tensor(profile.y[mask])
        self._sigma = torch.as_tensor(profile.sigma[mask])
        span = profile.x.max() - profile.x.min()
        n_background = background_terms(profile) if n_background is None else int(n_background)
        if n_background < 1:
            raise XtalsolveError(f"the background needs at least one Chebyshev term, not {n_background}", "--background")
        self._chebyshev = torch.as_tensor(
            np.polynomial.chebyshev.chebvander(2.0 * (profile.x - profile.x.min()) / span - 1.0, n_background - 1)
        )
        self.parameters = ParameterSet()
        ps = self.parameters
        for n in range(n_background):
            ps.add(Parameter(f"bkg{n}", 0.0, "background"))
        ps.add(Parameter("zero", instrument.zero_shift, "zero", (-1.5, 1.5)))
        if displacement:
            ps.add(Parameter("displacement", 0.0, "zero", (-2.0, 2.0)))
        if asymmetry:
            for k in range(1, 5):
                ps.add(Parameter(f"asym{k}", 0.0, "profile" if k <= asymmetry else "fixed", (-1.0, 1.0)))
        if instrument.wavelength2 is not None:
            ps.add(Parameter("ka2_ratio", instrument.ratio2, "profile" if refine_ratio else "fixed", (0.3, 0.7)))
        for i, phase in enumerate(self.phases):
            phase.add_parameters(ps, instrument, profile_params, _per_phase(biso, i) if not isinstance(biso, dict) else biso,
                                 _per_phase(size, i), occupancies)
        self.profile_params = tuple(profile_params)
        self._index = {name: i for i, name in enumerate(ps.names())}
        for phase in self.phases:
            phase.bind(self._index)
        self.stages: list[dict] = []
        self.covariance: np.ndarray | None = None
        self.free_names: list[str] = []

    # -- the first phase, for one-phase callers -----------------------------------------------------------------

    @property
    def structure(self) -> Structure:
        return self.phases[0].structure

    @property
    def symmetry(self) -> Symmetry:
        return self.phases[0].symmetry

    @property
    def cell(self):
        return self.phases[0].cell

    @property
    def sites(self):
        return self.phases[0].sites

    @property
    def reflections(self) -> ReflectionSet:
        return self.phases[0].reflections

    @property
    def element_names(self) -> list[str]:
        return self.phases[0].element_names

    @property
    def lebail_intensity(self) -> torch.Tensor:
        return self.phases[0].lebail_intensity

    @lebail_intensity.setter
    def lebail_intensity(self, value: torch.Tensor) -> None:
        self.phases[0].lebail_intensity = value

    def lattice_of(self, full: torch.Tensor) -> torch.Tensor:
        """(3, 3) cell of the first phase (rows a, b, c; angstrom)."""
        return self.phases[0].lattice_of(full)

    def frac_of(self, full: torch.Tensor) -> torch.Tensor:
        return self.phases[0].frac_of(full)

    def _march_dollase(self, full: torch.Tensor, lattice: torch.Tensor) -> torch.Tensor:
        return self.phases[0].march_dollase(full, lattice)

    # -- the forward model -----------------------------------------------------------------------------------

    def _p(self, full: torch.Tensor, name: str) -> torch.Tensor:
        return full[self._index[name]]

    def lines(self, full: torch.Tensor) -> list[tuple[float, torch.Tensor | float]]:
        """(wavelength in angstrom, relative weight) of each line; the Kalpha2 weight is a parameter."""
        if len(self.wavelengths) == 1:
            return [(self.wavelengths[0], 1.0)]
        return [(self.wavelengths[0], 1.0), (self.wavelengths[1], self._p(full, "ka2_ratio"))]

    def shift(self, full: torch.Tensor):
        """theta (rad) -> peak shift (deg 2theta) from the zero shift and the sample displacement."""
        zero = self._p(full, "zero")
        if "displacement" not in self._index:
            return lambda theta: zero
        disp = self._p(full, "displacement")
        return lambda theta: zero - torch.rad2deg(2.0 * disp * torch.cos(theta) / GONIOMETER_RADIUS_MM)

    def asymmetry(self, full: torch.Tensor):
        """The four Berar-Baldinozzi coefficients, or None when asymmetry is not modelled."""
        if "asym1" not in self._index:
            return None
        return [self._p(full, f"asym{k}") for k in range(1, 5)]

    def peaks(self, full: torch.Tensor, phase: Phase | None = None):
        """Per line: (centres (H,) deg, areas (H,) before the scale, fwhm (H,), eta (H,)) of one phase."""
        phase = phase or self.phases[0]
        return phase.peaks(full, self.instrument, self.lines(full), self.shift(full), self.blur)

    def background(self, full: torch.Tensor) -> torch.Tensor:
        coeffs = torch.stack([self._p(full, f"bkg{n}") for n in range(self._chebyshev.shape[1])])
        return self._chebyshev @ coeffs

    def phase_profile(self, full: torch.Tensor, phase: Phase) -> torch.Tensor:
        """Unscaled Bragg part of one phase on the full grid."""
        # both lines in one call, and peaks grouped by window size: a window is sized for the widest peak of its
        # group, so grouping keeps the sharp low-angle peaks from paying for the broad high-angle ones
        centres, areas, fwhm, eta = (torch.cat(parts) for parts in zip(*self.peaks(full, phase)))
        asym = self.asymmetry(full)
        total = torch.zeros_like(self._grid)
        for group in self._window_groups(fwhm, eta):
            index, values = peak_windows(self._grid, centres[group], areas[group], fwhm[group], eta[group],
                                         self.n_fwhm, asym)
            total = total.index_add(0, index.reshape(-1), values.reshape(-1))
        return total

    def _window_groups(self, fwhm: torch.Tensor, eta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Peak indices in up to ``n_groups`` groups of similar window size (reach = (3 + n_fwhm eta) FWHM)."""
        order = torch.argsort((fwhm * (3.0 + self.n_fwhm * eta)).detach())
        return torch.tensor_split(order, max(1, min(self.n_groups, len(order) // 40)))

    def bragg_profile(self, full: torch.Tensor) -> torch.Tensor:
        """Bragg part on the full grid: the first phase unscaled for one phase, else the scaled sum."""
        if len(self.phases) == 1:
            return self.phase_profile(full, self.phases[0])
        return sum(phase.p(full, "scale") * self.phase_profile(full, phase) for phase in self.phases)

    def calculate(self, full: torch.Tensor) -> torch.Tensor:
        """y_calc on the full grid."""
        bragg = sum(phase.p(full, "scale") * self.phase_profile(full, phase) for phase in self.phases)
        return bragg + self.background(full)

    # -- least squares ---------------------------------------------------------------------------------------

    def _full(self, free: torch.Tensor) -> torch.Tensor:
        base = torch.as_tensor(self.parameters.values())
        idx = torch.as_tensor(np.where(self.parameters.free_mask())[0])
        return base.scatter(0, idx, free)

    def _residual_t(self, free: torch.Tensor) -> torch.Tensor:
        return (self._y - self.calculate(self._full(free))[self._mask]) / self._sigma

    def residual(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self._residual_t(torch.as_tensor(x)).numpy()

    def jacobian(self, x: np.ndarray) -> np.ndarray:
        """Exact Jacobian of the weighted residual: the phase scales and the parameters that act through the
        peaks (cell, zero, displacement, widths, size, strain, Kalpha2 ratio, coordinates, B, occupancies,
        texture) by the chain rule through each peak's area, centre, FWHM and eta (:meth:`_peak_jacobian`), the
        asymmetry coefficients by forward-mode autograd through the whole profile, the Chebyshev coefficients in
        closed form."""
        t = torch.as_tensor(x)
        free = self.parameters.free
        background = [i for i, p in enumerate(free) if p.group == "background"]
        whole = [i for i, p in enumerate(free) if p.name.startswith("asym")]
        through_peaks = [i for i in range(len(free)) if i not in background + whole]
        jac = np.empty((int(self._mask.sum()), len(free)))
        if whole:
            other = torch.as_tensor(whole, dtype=torch.long)
            sub = lambda v: self._residual_t(t.scatter(0, other, v))  # noqa: E731
            jac[:, whole] = torch.func.jacfwd(sub)(t[other]).numpy()
        if through_peaks:
            jac[:, through_peaks] = self._peak_jacobian(t, through_peaks).numpy()
        if background:
            terms = [int(free[i].name[3:]) for i in background]
            jac[:, background] = -(self._chebyshev[self._mask][:, terms] / self._sigma.unsqueeze(-1)).numpy()
        return jac

    def _peak_jacobian(self, t: torch.Tensor, columns: list[int]) -> torch.Tensor:
        """Jacobian columns of the free parameters ``columns`` (indices into the free vector) that act through
        the peaks only, and of the phase scales s:

            d r / d p = -(s / sigma) sum_k [Phi_k dA_k/dp + A_k (dPhi_k/dc dc_k/dp + dPhi_k/dw dw_k/dp
                                                                + dPhi_k/deta deta_k/dp)],
            d r / d s = -(1 / sigma) sum_k A_k Phi_k,

        with Phi_k the unit-area profile of peak k (asymmetry included), A_k, c_k, w_k, eta_k its area, centre,
        FWHM and Lorentzian fraction. Forward-mode autograd differentiates only the (H,) peak quantities; each
        peak window and its three partials are formed once (physics.profiles.pseudo_voigt_partials) and
        combined by matrix products, where forward mode through the whole profile renders every peak once per
        parameter (that took over 90 % of a refinement)."""
        names = [self.parameters.free[i].name for i in columns]
        scale_names = {phase.prefix + "scale" for phase in self.phases}
        nonlinear = [i for i, name in zip(columns, names) if name not in scale_names]
        idx = torch.as_tensor(nonlinear, dtype=torch.long)
        with torch.no_grad():
            full = self._full(t)
            asym = self.asymmetry(full)
        total = torch.zeros(len(self._grid), len(columns), dtype=torch.float64)
        at = [columns.index(i) for i in nonlinear]
        for phase in self.phases:
            def quantities(v, phase=phase):
                centres, areas, fwhm, eta = (torch.cat(parts) for parts in
                                             zip(*self.peaks(self._full(t.scatter(0, idx, v)), phase)))
                values = torch.stack([areas, centres, fwhm, eta])
                return values, values

            if len(nonlinear):
                d, values = torch.func.jacfwd(quantities, has_aux=True)(t[idx])  # (4, H, n), (4, H)
            else:
                with torch.no_grad():
                    values = quantities(t[idx])[0]
            areas, centres, fwhm, eta = values
            scale = phase.p(full, "scale")
            # per peak, the (4, columns) weights of [Phi, dPhi/dc, dPhi/dw, dPhi/deta]
            weights = torch.zeros(len(areas), 4, len(columns), dtype=torch.float64)
            if len(nonlinear):
                weights[:, :, at] = torch.cat([d[:1], areas.view(1, -1, 1) * d[1:]]).permute(1, 0, 2) * scale
            if phase.prefix + "scale" in names:
                weights[:, 0, names.index(phase.prefix + "scale")] = areas
            for group in self._window_groups(fwhm, eta):
                index, partials = peak_window_partials(self._grid, centres[group], fwhm[group], eta[group],
                                                       self.n_fwhm, asym)
                _add_banded(total, index, partials, weights[group])
        return -total[self._mask] / self._sigma.unsqueeze(-1)

    def current(self) -> torch.Tensor:
        return torch.as_tensor(self.parameters.values())

    def rwp(self) -> float:
        with torch.no_grad():
            y_calc = self.calculate(self.current()).numpy()
        m = self.profile.mask
        return metrics.rwp(self.profile.y[m], y_calc[m], self.profile.sigma[m])

    def fit(self, max_nfev: int = 40) -> None:
        """One least-squares run over the currently released parameters (TRF with bounds)."""
        x0 = self.parameters.vector()
        if len(x0) == 0:
            return
        lower, upper = self.parameters.bounds()
        # the SVDs inside TRF are of a thin (points x parameters) matrix: one BLAS thread is fastest, and BLAS
        # threads competing with torch's for two cores made them 80x slower
        with threadpool_limits(1, user_api="blas"):
            result = least_squares(self.residual, x0, jac=self.jacobian, bounds=(lower, upper), method="trf",
                                   x_scale="jac", max_nfev=max_nfev, xtol=1e-8, ftol=1e-8)
        self.parameters.set_vector(result.x)
        self._last_jacobian = result.jac

    # -- starting values -------------------------------------------------------------------------------------

    def initialise(self) -> None:
        """Background from the lower envelope, W from the narrowest strong peak, scales from the peak area
        (shared equally among the phases)."""
        x, y = self.profile.x, self.profile.y
        step = float(np.median(np.diff(x)))
        window = max(3, round(1.5 / step))
        from scipy.ndimage import minimum_filter1d, uniform_filter1d

        envelope = uniform_filter1d(minimum_filter1d(y, window), window)
        cheb = self._chebyshev.numpy()
        coeffs, *_ = np.linalg.lstsq(cheb[self.profile.mask], envelope[self.profile.mask], rcond=None)
        for n, c in enumerate(coeffs):
            self.parameters[f"bkg{n}"].value = float(c)
        net = y - cheb @ coeffs
        area = np.sum(np.clip(net, 0, None)[self.profile.mask])
        if "w" in self.profile_params:
            fwhm = _strongest_peak_fwhm(x, net)
            for phase in self.phases:
                self.parameters[phase.prefix + "w"].value = float(np.clip(0.6 * fwhm**2, 1e-5, 0.5))
        for phase in self.phases:
            with torch.no_grad():
                bragg = self.phase_profile(self.current(), phase).numpy()
            share = area / len(self.phases)
            self.parameters[phase.prefix + "scale"].value = float(share / max(np.sum(bragg[self.profile.mask]), 1e-300))

    def _correlation(self, net: np.ndarray, full: torch.Tensor) -> float:
        m = self.profile.mask
        with torch.no_grad():
            calc = (self.calculate(full) - self.background(full)).numpy()[m]
        return float(np.corrcoef(calc, net[m])[0, 1])

    def scan_cell(self, span: float = 0.05, step: float = 0.001, axis_span: float = 0.025, passes: int = 0) -> float:
        """Coarse search before the least squares, whose basin is about one peak width wide: for each phase in
        turn, the isotropic cell factor, then each cell length on its own (coordinate-wise, ``passes`` times),
        maximising the correlation of the broadened model with the net data. Returns the isotropic factor
        applied to the first phase."""
        net = self.profile.y - self.background(self.current()).detach().numpy()
        old_blur, self.blur = self.blur, max(self.blur, 0.15)

        def best_of(factors, apply):
            scores = []
            for f in factors:
                full = self.current().clone()
                apply(full, f)
                scores.append(self._correlation(net, full))
            return factors[int(np.argmax(scores))]

        factors = []
        for phase in self.phases:
            names = phase.lattice_names()
            start = {n: self.parameters[n].value for n in names}

            def isotropic(full, f, names=names, start=start):
                for n in names:  # G = B p is homogeneous: scaling the cell by f scales every parameter by f^2
                    full[self._index[n]] = start[n] * f * f

            factor = best_of(np.arange(1.0 - span, 1.0 + span + 1e-12, step), isotropic)
            factors.append(factor)
            for n in names:
                self.parameters[n].value = start[n] * factor**2
            lengths = [n for n in names if n[-2:] in ("11", "22", "33")]
            for _ in range(passes if len(lengths) > 1 else 0):
                for n in lengths:
                    value = self.parameters[n].value

                    def one_axis(full, f, n=n, value=value):
                        full[self._index[n]] = value * f * f

                    self.parameters[n].value = value * best_of(np.arange(1 - axis_span, 1 + axis_span + 1e-12, step),
                                                               one_axis) ** 2
        self.blur = old_blur
        return float(factors[0])

    def swapped_starts(self, tolerance: float = 0.03) -> list[dict[str, float]]:
        """Alternative cell starts for pseudo-symmetric cells: for every pair of free cell lengths within
        ``tolerance`` of each other (e.g. tetragonal BaTiO3, c/a = 1.01), the start with the two exchanged. A
        start perturbed by more than the splitting may have them in the wrong order, and least squares cannot
        pass one length through the other; trying both orientations is what a crystallographer would do."""
        out = []
        for phase in self.phases:
            names = [n for n in phase.lattice_names() if n[-2:] in ("11", "22", "33")]
            for i, a in enumerate(names):
                for b in names[i + 1 :]:
                    ga, gb = self.parameters[a].value, self.parameters[b].value
                    if abs(math.sqrt(ga / gb) - 1.0) < tolerance:
                        out.append({a: gb, b: ga})
        return out

    # -- the staged refinement -------------------------------------------------------------------------------

    def _lattice_stage(self, max_nfev: int, blur_schedule, scan: bool) -> None:
        if scan:
            self.scan_cell()
        for blur in blur_schedule:  # coarse to fine: broadened peaks widen the basin of the lattice
            self.blur = blur
            self.fit(max_nfev=max_nfev // 2)
        self.blur = 0.0
        self.fit(max_nfev=max_nfev)

    def refine(self, stages=STAGES, progress=None, max_nfev: int = 40, blur_schedule=(0.4, 0.15),
               scan: bool = True, orientations: bool = True, early_biso: bool = True) -> RefinementResult:
        """Run the stages (each a least-squares call over everything released so far), then the esd's.

        The lattice stage is run from several starts and the lowest Rwp is kept: with ``orientations``, each
        swapped start of a pseudo-symmetric cell; with ``early_biso``, each of those once more with the
        displacement parameters (B) released as well, which stay released from then on when that start wins.
        An intensity fall-off that the start B (0.5 angstrom^2) does not describe (B of 4 angstrom^2 in a
        laboratory corundum pattern) otherwise misleads the cell, profile and positions stages, which end in a
        false minimum that the B stage cannot leave; releasing B that early can also lead the cell astray
        (Na2LiAlF6), hence both starts (docs/refinement.md, session 20)."""
        t0 = time.perf_counter()
        self.initialise()
        self.parameters.fix_all()
        for name, groups in stages:
            self.parameters.release(*groups)
            record = {"stage": name}
            if "lattice" in groups:
                saved = self.parameters.values()
                biso = [p for p in self.parameters.group("biso") if not p.refined] if early_biso else []
                starts = [{}] + (self.swapped_starts() if orientations else [])
                trials = [(swap, release) for release in ([False, True] if biso else [False]) for swap in starts]
                best = None
                for swap, release in trials:
                    self._restore(saved)
                    for p in biso:
                        p.refined = release
                    for key, value in swap.items():
                        self.parameters[key].value = value
                    self._lattice_stage(max_nfev, blur_schedule, scan)
                    rwp = self.rwp()
                    if best is None or rwp < best[0]:
                        best = (rwp, self.parameters.values(), swap, release)
                self._restore(best[1])
                for p in biso:
                    p.refined = best[3]
                if len(starts) > 1:
                    record["orientations_tried"] = len(starts)
                    record["swapped"] = sorted(best[2])
                if biso:
                    record["biso_released"] = best[3]
            else:
                self.fit(max_nfev=max_nfev)
            record |= {"rwp": self.rwp(), "n_free": len(self.parameters.free),
                       "seconds": round(time.perf_counter() - t0, 2)}
            self.stages.append(record)
            if progress is not None:
                progress(self.stages[-1])
        return self.conclude(time.perf_counter() - t0)

    def conclude(self, seconds: float) -> RefinementResult:
        """esd's from the last least-squares Jacobian, then the result (``seconds`` of wall time)."""
        self._esds()
        return self.result(seconds)

    def _restore(self, values: np.ndarray) -> None:
        for p, v in zip(self.parameters, values):
            p.value = float(v)

    def _esds(self) -> None:
        """esd's = sqrt(diag((J^T W J)^-1) * GoF^2) from the exact Jacobian at the minimum."""
        x = self.parameters.vector()
        jac = self.jacobian(x)
        r = self.residual(x)
        dof = max(len(r) - len(x), 1)
        chi2 = float(r @ r) / dof
        self.covariance = np.linalg.pinv(jac.T @ jac) * chi2
        self.free_names = [p.name for p in self.parameters.free]
        for p, var in zip(self.parameters.free, np.diag(self.covariance)):
            p.esd = float(np.sqrt(max(var, 0.0)))

    def _cov_of(self, names: list[str]) -> np.ndarray:
        cov = np.zeros((len(names), len(names)))
        if self.covariance is None:
            return cov
        pos = {n: i for i, n in enumerate(self.free_names)}
        for a, na in enumerate(names):
            for b, nb in enumerate(names):
                if na in pos and nb in pos:
                    cov[a, b] = self.covariance[pos[na], pos[nb]]
        return cov

    def _propagate(self, fn, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Values of fn(full) and their esd's, propagated from the covariance of ``names`` by autograd."""
        base = self.current()
        idx = torch.as_tensor([self._index[n] for n in names], dtype=torch.long)
        wrapped = lambda p: fn(base.scatter(0, idx, p))  # noqa: E731
        values = wrapped(base[idx]).detach().numpy()
        jac = torch.func.jacrev(wrapped)(base[idx]).numpy()
        esd = np.sqrt(np.clip(np.diag(jac @ self._cov_of(names) @ jac.T), 0, None))
        esd[esd < 1e-12 * np.maximum(np.abs(values), 1.0)] = 0.0
        return values, esd

    # -- results ---------------------------------------------------------------------------------------------

    def cell_parameters(self, phase: Phase | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(a, b, c, alpha, beta, gamma) in angstrom / degrees and their esd's (propagated by autograd)."""
        phase = phase or self.phases[0]
        values, esd = self._propagate(phase.cell6, phase.lattice_names())
        esd[esd < 1e-9] = 0.0
        return values, esd

    def weight_fractions(self) -> tuple[np.ndarray, np.ndarray]:
        """Hill-Howard weight fractions W_p = s_p (Z M V)_p / sum_q s_q (Z M V)_q and their esd's (from the
        covariance of the scales, cells and occupancies)."""
        names = [n for phase in self.phases for n in [phase.prefix + "scale", *phase.lattice_names()]
                 + [phase.prefix + f"occ.{s.label}" for s in phase.sites if phase.refine_occupancy]]

        def fractions(full):
            k = torch.stack([phase.p(full, "scale") * torch.prod(torch.stack(phase.cell_mass_volume(full)))
                             for phase in self.phases])
            return k / k.sum()

        return self._propagate(fractions, names)

    def refined_structure(self, phase: Phase | None = None) -> Structure:
        """The refined structure (pymatgen) in the standard setting of its space group."""
        return (phase or self.phases[0]).refined_structure(self.current())

    def site_table(self, phase: Phase | None = None) -> list[dict]:
        return (phase or self.phases[0]).site_table(self.current(), self.parameters, self._cov_of)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def partition_all(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Rietveld partition of the observed net intensity among the reflection orbits of every phase (Le
        Bail's formula): I_obs,k = sum_i c_k(x_i) (y_obs,i - y_b,i) / (y_calc,i - y_b,i), with c_k the calculated
        contribution of orbit k (all lines, scaled). Per phase: (2theta of line 1 in degrees, I_obs, I_calc)."""
        full = self.current()
        with torch.no_grad():
            y_calc = self.calculate(full).numpy()
            bg = self.background(full).numpy()
            asym = self.asymmetry(full)
            out = []
            m = self.profile.mask
            net_calc = y_calc - bg
            safe = np.abs(net_calc) > 1e-9 * max(np.abs(net_calc).max(), 1e-300)
            ratio = np.where(m & safe, (self.profile.y - bg) / np.where(safe, net_calc, 1.0), 0.0)
            for phase in self.phases:
                scale = float(phase.p(full, "scale"))
                peaks = self.peaks(full, phase)
                obs = np.zeros(len(phase._mult))
                calc = np.zeros(len(phase._mult))
                for centres, areas, fwhm, eta in peaks:
                    index, values = peak_windows(self._grid, centres, areas * scale, fwhm, eta, self.n_fwhm, asym)
                    index, values = index.numpy(), values.numpy()
                    calc += (values * m[index]).sum(1)
                    obs += (values * ratio[index]).sum(1)
                out.append((peaks[0][0].numpy(), obs, calc))
        return out

    def partition(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The Rietveld partition of the first phase (see :meth:`partition_all`)."""
        return self.partition_all()[0]

    def reflection_table(self, phase_index: int = 0, partitions=None) -> dict:
        """Line-1 reflections inside the data range: 2theta, hkl, I_calc and the partitioned I_obs."""
        two_theta, obs, calc = (partitions or self.partition_all())[phase_index]
        inside = (two_theta >= self.profile.x.min()) & (two_theta <= self.profile.x.max()) & (calc > 0)
        return {"two_theta": two_theta[inside], "hkl": self.phases[phase_index].reflections.hkl[inside],
                "i_calc": calc[inside], "i_obs": obs[inside]}

    def rwp_contributions(self) -> np.ndarray:
        """Each phase's share of Rwp: sqrt(sum_i w_i (y_o - y_c)_i^2 f_p,i / sum_i w_i y_o,i^2), f_p,i = the
        phase's fraction of the calculated Bragg intensity at point i; their squares add up to Rwp^2 less the
        share of points where no phase has intensity."""
        full = self.current()
        m = self.profile.mask
        with torch.no_grad():
            parts = np.array([float(phase.p(full, "scale")) * self.phase_profile(full, phase).numpy()
                              for phase in self.phases])[:, m]
            y_calc = self.calculate(full).numpy()[m]
        total = parts.sum(0)
        share = np.where(total > 1e-12 * max(total.max(), 1e-300), parts / np.where(total > 0, total, 1.0), 0.0)
        w = 1.0 / self.profile.sigma[m] ** 2
        y = self.profile.y[m]
        return np.sqrt((share * w * (y - y_calc) ** 2).sum(1) / (w * y * y).sum())

    def result(self, seconds: float) -> RefinementResult:
        m = self.profile.mask
        full = self.current()
        with torch.no_grad():
            y_calc = self.calculate(full).numpy()
            bg = self.background(full).numpy()
        n_free = len(self.parameters.free)
        y, s = self.profile.y[m], self.profile.sigma[m]
        partitions = self.partition_all()
        fractions, fraction_esd = self.weight_fractions() if not self.lebail else (np.ones(len(self.phases)) / len(self.phases), np.zeros(len(self.phases)))
        contributions = self.rwp_contributions()
        phases = []
        for i, phase in enumerate(self.phases):
            table = self.reflection_table(i, partitions)
            r_bragg = metrics.r_bragg(table["i_obs"], table["i_calc"]) if len(table["i_obs"]) and not self.lebail else None
            cell, cell_esd = self.cell_parameters(phase)
            structure = self.refined_structure(phase)
            spacegroup = symmetry_of(structure, 1e-3) if not self.lebail else phase.symmetry
            scale = self.parameters[phase.prefix + "scale"]
            phases.append(PhaseResult(
                name=phase.name, structure=structure, space_group=f"{spacegroup.symbol} ({spacegroup.number})",
                symmetry=phase.symmetry, cell=cell, cell_esd=cell_esd,
                sites=self.site_table(phase) if not self.lebail else [], r_bragg=r_bragg,
                weight_fraction=float(fractions[i]), weight_fraction_esd=float(fraction_esd[i]),
                rwp_contribution=float(contributions[i]), scale=scale.value, scale_esd=scale.esd,
                ticks=table["two_theta"], tick_hkl=table["hkl"]))
        first = phases[0]
        return RefinementResult(
            structure=first.structure, space_group=first.space_group, symmetry=first.symmetry,
            cell=first.cell, cell_esd=first.cell_esd, sites=first.sites,
            rwp=metrics.rwp(y, y_calc[m], s), rp=metrics.rp(y, y_calc[m]),
            gof=metrics.gof(y, y_calc[m], s, n_free), r_bragg=first.r_bragg,
            r_expected=metrics.r_expected(y, s, n_free),
            parameters=self.parameters.as_dict(), stages=list(self.stages), seconds=seconds,
            x=self.profile.x, y_obs=self.profile.y, y_calc=y_calc, background=bg, mask=m,
            ticks=first.ticks, tick_hkl=first.tick_hkl, wavelengths=list(self.wavelengths),
            mode="lebail" if self.lebail else "rietveld", phases=phases,
        )


@dataclass
class PhaseResult:
    """One phase of a refinement: its refined structure, space group, cell (angstrom, degrees) with esd's,
    sites, R_Bragg, Hill-Howard weight fraction with esd, share of Rwp, scale and reflection ticks (deg)."""

    name: str
    structure: Structure
    space_group: str
    symmetry: Symmetry
    cell: np.ndarray
    cell_esd: np.ndarray
    sites: list[dict]
    r_bragg: float | None
    weight_fraction: float
    weight_fraction_esd: float
    rwp_contribution: float
    scale: float
    scale_esd: float | None
    ticks: np.ndarray
    tick_hkl: np.ndarray

    def summary(self) -> dict:
        return {
            "name": self.name, "formula": self.structure.composition.reduced_formula,
            "space_group": self.space_group, "weight_fraction": self.weight_fraction,
            "weight_fraction_esd": self.weight_fraction_esd, "rwp_contribution": self.rwp_contribution,
            "r_bragg": self.r_bragg, "scale": self.scale, "scale_esd": self.scale_esd,
            "cell": dict(zip(("a", "b", "c", "alpha", "beta", "gamma"), self.cell.tolist())),
            "cell_esd": dict(zip(("a", "b", "c", "alpha", "beta", "gamma"), self.cell_esd.tolist())),
            "sites": self.sites,
        }


@dataclass
class RefinementResult:
    """Everything a report needs. cell = (a, b, c, alpha, beta, gamma) (angstrom, degrees)."""

    structure: Structure
    space_group: str
    symmetry: Symmetry
    cell: np.ndarray
    cell_esd: np.ndarray
    sites: list[dict]
    rwp: float
    rp: float
    gof: float
    r_bragg: float | None
    r_expected: float
    parameters: dict
    stages: list[dict]
    seconds: float
    x: np.ndarray
    y_obs: np.ndarray
    y_calc: np.ndarray
    background: np.ndarray
    mask: np.ndarray
    ticks: np.ndarray
    tick_hkl: np.ndarray
    wavelengths: list[float]
    mode: str = "rietveld"
    phases: list[PhaseResult] = field(default_factory=list)

    def summary(self) -> dict:
        """Plain data for summary.json."""
        return {
            "mode": self.mode,
            "formula": self.structure.composition.reduced_formula,
            "space_group": self.space_group,
            "rwp": self.rwp, "rp": self.rp, "gof": self.gof, "r_bragg": self.r_bragg, "r_expected": self.r_expected,
            "cell": dict(zip(("a", "b", "c", "alpha", "beta", "gamma"), self.cell.tolist())),
            "cell_esd": dict(zip(("a", "b", "c", "alpha", "beta", "gamma"), self.cell_esd.tolist())),
            "sites": self.sites,
            "parameters": self.parameters,
            "stages": self.stages,
            "wavelengths_A": self.wavelengths,
            "seconds": round(self.seconds, 2),
            "phases": [phase.summary() for phase in self.phases],
        }


def background_terms(profile: Profile, per_degrees: float = 5.0, fewest: int = 8, most: int = 24) -> int:
    """Default number of Chebyshev background terms: one per ``per_degrees`` of 2theta range (a capillary or
    amorphous hump needs them over a long scan), between ``fewest`` and ``most``, and no more than one per four
    widths of the strongest peak (or fewest), so that broad nanocrystal peaks cannot be taken for background."""
    from scipy.ndimage import minimum_filter1d

    x, y = profile.x[profile.mask], profile.y[profile.mask]
    span = float(x.max() - x.min())
    step = float(np.median(np.diff(x)))
    envelope = minimum_filter1d(y, max(3, round(max(1.5, span / 10.0) / step)))  # wider than any peak
    fwhm = _strongest_peak_fwhm(x, y - envelope)
    return int(np.clip(round(span / per_degrees), fewest, max(fewest, min(most, span / (4.0 * fwhm)))))


def _strongest_peak_fwhm(x: np.ndarray, y: np.ndarray) -> float:
    """FWHM (x units) of the strongest peak of a background-free profile, by walking down to half height."""
    top = int(np.argmax(y))
    half = y[top] / 2.0
    lo = top
    while lo > 0 and y[lo] > half:
        lo -= 1
    hi = top
    while hi < len(y) - 1 and y[hi] > half:
        hi += 1
    return float(max(x[hi] - x[lo], 2 * np.median(np.diff(x))))


def _window_layout(grid, centres, fwhm, eta, n_fwhm):
    """Index (H, W) into ``grid`` of windows of +-(3 + n_fwhm eta) FWHM of the widest peak around each centre,
    the mask of those inside the grid, and the offsets dx = x - centre (degrees)."""
    step = float(torch.min(torch.diff(grid)))
    reach = float((fwhm * (3.0 + n_fwhm * eta)).detach().max()) if len(fwhm) else 0.0
    half = min(math.ceil(reach / step), len(grid))
    offsets = torch.arange(-half, half + 1)
    index = torch.searchsorted(grid, centres.detach().contiguous()).unsqueeze(-1) + offsets
    inside = (index >= 0) & (index < len(grid))
    index = index.clamp(0, len(grid) - 1)
    return index, inside, grid[index] - centres.unsqueeze(-1)


def peak_window_partials(grid, centres, fwhm, eta, n_fwhm, asymmetry=None):
    """Windows as :func:`peak_windows` (index (H, W)) with the unit-area profile of each peak and its
    derivatives with respect to the peak's centre, FWHM and eta: (H, W, 4), zero outside the grid. With
    asymmetry, the product rule through forward-mode autograd of the Berar-Baldinozzi factor."""
    index, inside, dx = _window_layout(grid, centres, fwhm, eta, n_fwhm)
    w, e = fwhm.unsqueeze(-1), eta.unsqueeze(-1)
    partials = pseudo_voigt_partials(dx, w, e)
    if asymmetry is not None:
        c = centres.unsqueeze(-1)
        factor, d_centre = torch.func.jvp(lambda c: berar_baldinozzi(grid[index] - c, w, c, *asymmetry), (c,),
                                          (torch.ones_like(c),))
        d_fwhm = torch.func.jvp(lambda w: berar_baldinozzi(dx, w, c, *asymmetry), (w,), (torch.ones_like(w),))[1]
        value = partials[..., 0]
        partials = torch.stack([value * factor, partials[..., 1] * factor + value * d_centre,
                                partials[..., 2] * factor + value * d_fwhm, partials[..., 3] * factor], dim=-1)
    return index, partials * inside.unsqueeze(-1)


def _add_banded(total: torch.Tensor, index: torch.Tensor, partials: torch.Tensor, weights: torch.Tensor,
                chunk: int = 64) -> None:
    """total[i] += sum_k sum_w [index[k, w] == i] partials[k, w] @ weights[k], for index (H, W) into the rows of
    total (G, n), partials (H, W, q), weights (H, q, n). Peaks are taken in order of position, ``chunk`` at a
    time, so each chunk touches a band of rows only: its values are laid into a dense (band, chunk q) block and
    multiplied by the chunk's weights in one matrix product (a per-peak batched product of inner size q = 4
    ran several times slower)."""
    order = torch.argsort(index[:, 0])
    n_q = partials.shape[-1]
    for start in range(0, len(order), chunk):
        sel = order[start:start + chunk]
        rows = index[sel]
        lo, hi = int(rows[:, 0].min()), int(rows[:, -1].max())
        block = torch.zeros((hi - lo + 1) * len(sel), n_q, dtype=total.dtype)
        block.index_add_(0, ((rows - lo) * len(sel) + torch.arange(len(sel)).unsqueeze(-1)).reshape(-1),
                         partials[sel].reshape(-1, n_q))
        total[lo:hi + 1] += block.view(hi - lo + 1, -1) @ weights[sel].reshape(-1, weights.shape[-1])


def peak_windows(grid, centres, areas, fwhm, eta, n_fwhm, asymmetry=None):
    """Per-peak values on windows of +-(3 + n_fwhm eta) FWHM of the widest peak (as physics.powder.render_peaks
    lays them out): index (H, W) into ``grid`` and values (H, W), zero outside the grid. ``asymmetry``: the four
    Berar-Baldinozzi coefficients (or None). Written here rather than calling render_peaks because the asymmetry
    multiplies each window and the Rietveld partition needs the per-peak values."""
    index, inside, dx = _window_layout(grid, centres, fwhm, eta, n_fwhm)
    values = pseudo_voigt(dx, fwhm.unsqueeze(-1), eta.unsqueeze(-1))
    if asymmetry is not None:
        values = values * berar_baldinozzi(dx, fwhm.unsqueeze(-1), centres.unsqueeze(-1), *asymmetry)
    return index, values * areas.unsqueeze(-1) * inside
