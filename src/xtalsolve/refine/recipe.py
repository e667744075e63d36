"""Rietveld recipe: a data profile, a forward model with its background and scale, a weighted residual, and
symmetry-constrained parameters refined in stages by SciPy least squares with an exact (forward-mode autograd)
Jacobian, in the spirit of a diffpy.srfit FitRecipe.

Model (2theta in degrees):
    y_calc(x) = s * sum_lines r_l sum_k m_k |F_k|^2 LP_k P_k(r_MD) Phi(x - 2theta_k - Z - D cos(theta_k)) + sum_n c_n T_n(x~)
with Chebyshev T_n on x rescaled to [-1, 1], zero shift Z (deg), sample displacement D = -2 s / R (s in mm,
R the goniometer radius) and the March-Dollase factor P_k averaged over the equivalent reflections of k.
Reflections are enumerated once per symmetry orbit (|F| is the same on the orbit while the constraints keep
the symmetry), systematic absences removed, which cuts the work by the multiplicity.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from pymatgen.core import Lattice, Structure
from scipy.optimize import least_squares

from xtalsolve import metrics
from xtalsolve.crystal.batch import CrystalBatch
from xtalsolve.errors import XtalsolveError
from xtalsolve.pattern import Pattern
from xtalsolve.physics.powder import (
    Instrument,
    Reflections,
    bragg_intensities,
    enumerate_reflections,
    peak_shape,
    render_peaks,
)
from xtalsolve.physics.profiles import pseudo_voigt
from xtalsolve.physics.scattering import check_elements
from xtalsolve.refine.constraints import (
    _METRIC_INDEX,
    LatticeConstraint,
    Symmetry,
    site_constraints,
    symmetrize,
    symmetry_of,
)
from xtalsolve.refine.parameters import Parameter, ParameterSet

GONIOMETER_RADIUS_MM = 240.0
"""Default Bragg-Brentano goniometer radius R (mm) for the sample displacement term -2 s cos(theta) / R."""

STAGES = (
    ("scale+background", ("scale", "background")),
    ("lattice+zero", ("lattice", "zero")),
    ("profile", ("profile", "texture")),
    ("positions", ("positions",)),
    ("biso", ("biso",)),
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
# Reflections grouped by symmetry


@dataclass
class ReflectionSet:
    """One representative hkl per symmetry orbit (absences removed): hkl (H, 3), multiplicity (H,) counted over
    one Friedel half, and the members of each orbit (for preferred orientation): member_hkl (M, 3) with
    member_orbit (M,) the orbit index of each."""

    hkl: np.ndarray
    multiplicity: np.ndarray
    member_hkl: np.ndarray
    member_orbit: np.ndarray


def reflection_orbits(lattice: np.ndarray, d_min: float, symmetry: Symmetry) -> ReflectionSet:
    """Reflections with d >= d_min (angstrom) of the cell ``lattice`` grouped into orbits of the Laue group."""
    hkl = enumerate_reflections(torch.as_tensor(lattice[None]), d_min).hkl[0].numpy()
    rotations = symmetry.point_rotations
    images = np.einsum("hi,rij->hrj", hkl, rotations)  # h R for every rotation: the equivalent reflections
    images = np.concatenate([images, -images], axis=1)
    codes = images @ np.array([1_000_000, 1_000, 1]) + 0  # lexicographic key (|h| < 500)
    keys = codes.max(axis=1)
    # systematic absence: some op (R, t) with h R = h and h.t not an integer
    fixed = np.all(np.einsum("hi,nij->hnj", hkl, symmetry.rotations) == hkl[:, None, :], axis=2)
    phase = np.einsum("hi,ni->hn", hkl, symmetry.translations)
    absent = np.any(fixed & (np.abs(phase - np.round(phase)) > 1e-6), axis=1)
    hkl, keys = hkl[~absent], keys[~absent]
    _, first, orbit, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
    return ReflectionSet(hkl[first], counts.astype(float), hkl, orbit.ravel())


# ----------------------------------------------------------------------------------------------------------------
# The recipe


class Recipe:
    """Rietveld (or, with ``lebail=True``, Le Bail) refinement of one phase against one profile.

    profile: observed data; structure: candidate (idealised to its space group at ``symprec``, angstrom);
    instrument: wavelengths, radiation and start values of U, V, W, X, Y; n_background: Chebyshev terms;
    displacement: refine the sample displacement (mm); texture: March-Dollase axis (hkl) or None;
    profile_params: which of w, v, u, x, y, size, strain the profile stage releases.
    """

    def __init__(
        self,
        profile: Profile,
        structure: Structure,
        instrument: Instrument,
        n_background: int = 8,
        symprec: float = 0.05,
        displacement: bool = False,
        texture: tuple[int, int, int] | None = None,
        profile_params: tuple[str, ...] = ("w", "v", "u", "x", "size"),
        biso: float | dict = 0.5,
        size: float | None = None,
        lebail: bool = False,
        n_fwhm: float = 20.0,
    ):
        self.profile = profile
        self.instrument = instrument
        self.lebail = lebail
        self.n_fwhm = n_fwhm
        self.n_groups = 8
        self.blur = 0.0  # extra Gaussian FWHM (degrees) used while the lattice is still far off
        check_elements(np.array([e.Z for e in structure.composition.elements]), instrument.radiation)
        self.structure = symmetrize(structure, symprec)
        self.symmetry = symmetry_of(self.structure, 1e-3)
        self.cell = LatticeConstraint(self.structure.lattice, self.symmetry)
        self.sites = site_constraints(self.structure, self.symmetry) if not lebail else []
        self.lines = [(instrument.wavelength, 1.0)]
        if instrument.wavelength2 is not None:
            self.lines.append((instrument.wavelength2, instrument.ratio2))
        mask = profile.mask
        self._mask = torch.as_tensor(mask)
        self._grid = torch.as_tensor(profile.x)
        self._y = torch.as_tensor(profile.y[mask])
        self._sigma = torch.as_tensor(profile.sigma[mask])
        span = profile.x.max() - profile.x.min()
        self._chebyshev = torch.as_tensor(
            np.polynomial.chebyshev.chebvander(2.0 * (profile.x - profile.x.min()) / span - 1.0, n_background - 1)
        )
        self._setup_atoms()
        self._setup_reflections()
        self.parameters = self._make_parameters(n_background, displacement, texture, profile_params, biso, size)
        self._index = {name: i for i, name in enumerate(self.parameters.names())}
        self.stages: list[dict] = []
        self.covariance: np.ndarray | None = None
        self.free_names: list[str] = []

    # -- set-up ----------------------------------------------------------------------------------------------

    def _setup_atoms(self):
        """P1 atom list (one entry per species of each site) and the linear map from coordinates to frac."""
        rows, numbers, occupancy, elements = [], [], [], []
        for i, site in enumerate(self.structure):
            for species, occ in site.species.items():
                rows.append(i)
                numbers.append(species.Z)
                occupancy.append(occ)
                elements.append(species.symbol if hasattr(species, "symbol") else species.element.symbol)
        self._atom_site = np.array(rows)
        self.element_names = sorted(set(elements), key=elements.index)
        self._atom_element = torch.as_tensor([self.element_names.index(e) for e in elements])
        self._numbers = torch.as_tensor(numbers)[None]
        self._occupancy = torch.as_tensor(occupancy, dtype=torch.float64)[None]
        self._frac0 = torch.as_tensor(self.structure.frac_coords[self._atom_site])
        n_free = sum(len(s.names) for s in self.sites)
        site_map = np.zeros((len(self.structure), 3, n_free))
        column = 0
        for s in self.sites:
            r = len(s.names)
            site_map[s.members, :, column : column + r] = s.matrices
            column += r
        self._coord_map = torch.as_tensor(site_map[self._atom_site])  # (atoms, 3, free coordinates)

    def _setup_reflections(self):
        lam_max = max(wl for wl, _ in self.lines)
        two_theta_max = min(float(self.profile.x.max()) + 3.0, 179.0)
        d_min = 0.96 * lam_max / (2.0 * math.sin(math.radians(two_theta_max) / 2.0))  # margin for a growing cell
        d_min = max(d_min, 0.5 * lam_max * 1.0001)
        self.reflections = reflection_orbits(self.structure.lattice.matrix, d_min, self.symmetry)
        hkl = torch.as_tensor(self.reflections.hkl)
        self._refl = Reflections(hkl[None], torch.ones(1, len(hkl), dtype=torch.bool))
        self._hkl = hkl.double()
        self._mult = torch.as_tensor(self.reflections.multiplicity)
        self._member_hkl = torch.as_tensor(self.reflections.member_hkl).double()
        self._member_orbit = torch.as_tensor(self.reflections.member_orbit)
        self.lebail_intensity = torch.ones(len(hkl), dtype=torch.float64)

    def _make_parameters(self, n_background, displacement, texture, profile_params, biso, size) -> ParameterSet:
        ps = ParameterSet()
        ps.add(Parameter("scale", 1.0, "scale", (0.0, math.inf)))
        for n in range(n_background):
            ps.add(Parameter(f"bkg{n}", 0.0, "background"))
        for name, value in zip(self.cell.names, self.cell.start):
            bounds = (0.7 * value, 1.4 * value) if name in ("G11", "G22", "G33") else (-math.inf, math.inf)
            ps.add(Parameter(f"lattice.{name}", value, "lattice", bounds))
        ps.add(Parameter("zero", self.instrument.zero_shift, "zero", (-1.5, 1.5)))
        if displacement:
            ps.add(Parameter("displacement", 0.0, "zero", (-2.0, 2.0)))
        inst = self.instrument
        start = {"w": inst.w, "v": inst.v, "u": inst.u, "x": inst.x, "y": inst.y, "size": size or 2000.0, "strain": 0.0}
        bounds = {"w": (1e-6, 1.0), "v": (-1.0, 1.0), "u": (-0.5, 2.0), "x": (0.0, 1.0), "y": (0.0, 1.0),
                  "size": (20.0, 1e5), "strain": (0.0, 0.05)}
        self.profile_params = tuple(profile_params)
        for name in ("w", "v", "u", "x", "y", "size", "strain"):
            ps.add(Parameter(name, start[name], "profile" if name in profile_params else "fixed", bounds[name]))
        if texture is not None:
            self.texture_axis = torch.as_tensor(texture, dtype=torch.float64)
            ps.add(Parameter("march_dollase", 1.0, "texture", (0.3, 3.0)))
        for s in self.sites:
            for name, value in zip(s.names, s.start):
                ps.add(Parameter(f"{s.label}.{name}", value, "positions", (value - 0.1, value + 0.1)))
        for element in self.element_names if not self.lebail else []:
            value = biso.get(element, 0.5) if isinstance(biso, dict) else biso
            ps.add(Parameter(f"B.{element}", value, "biso", (-1.0, 12.0)))
        return ps

    # -- the forward model -----------------------------------------------------------------------------------

    def _p(self, full: torch.Tensor, name: str) -> torch.Tensor:
        return full[self._index[name]]

    def lattice_of(self, full: torch.Tensor) -> torch.Tensor:
        """(3, 3) cell (rows a, b, c; angstrom) from the metric parameters, by Cholesky."""
        idx = [self._index[f"lattice.{n}"] for n in self.cell.names]
        p = full[idx]
        basis = torch.as_tensor(self.cell.basis)
        g6 = torch.as_tensor(self.cell.metric0) + basis @ (p - torch.as_tensor(self.cell.start))
        rows = [[g6[_METRIC_INDEX.index((min(i, j), max(i, j)))] for j in range(3)] for i in range(3)]
        metric = torch.stack([torch.stack(r) for r in rows])
        factor, info = torch.linalg.cholesky_ex(metric)
        if int(info) != 0:  # a trial step left the metric indefinite: lift its spectrum just enough; the cell is
            # then badly wrong, the residual large, and the trust region steps back instead of the fit crashing
            lift = (1e-3 - torch.linalg.eigvalsh(metric.detach()).min()).clamp(min=0.0)
            factor = torch.linalg.cholesky(metric + lift * torch.eye(3, dtype=metric.dtype))
        return factor

    def frac_of(self, full: torch.Tensor) -> torch.Tensor:
        """(atoms, 3) fractional coordinates from the free coordinate parameters."""
        names = [f"{s.label}.{n}" for s in self.sites for n in s.names]
        if not names:
            return self._frac0
        idx = [self._index[n] for n in names]
        start = torch.as_tensor(np.concatenate([s.start for s in self.sites]))
        return self._frac0 + self._coord_map @ (full[idx] - start)

    def _theta(self, lattice: torch.Tensor, wavelength: float) -> torch.Tensor:
        g2 = torch.einsum("hi,ij,hj->h", self._hkl, torch.linalg.inv(lattice @ lattice.T), self._hkl)
        return torch.asin(torch.clamp(0.5 * wavelength * torch.sqrt(g2), max=1.0 - 1e-9))

    def _march_dollase(self, full: torch.Tensor, lattice: torch.Tensor) -> torch.Tensor:
        """March-Dollase factor of every orbit, averaged over its member reflections."""
        r = self._p(full, "march_dollase")
        recip = torch.linalg.inv(lattice).T  # rows: reciprocal vectors (without 2 pi)
        normals = self._member_hkl @ recip
        axis = self.texture_axis @ recip
        cos2 = (normals * axis).sum(-1) ** 2 / ((normals**2).sum(-1) * (axis**2).sum())
        factor = (r * r * cos2 + (1.0 - cos2) / r) ** -1.5
        total = torch.zeros(len(self._mult), dtype=factor.dtype).index_add(0, self._member_orbit, factor)
        counts = torch.zeros(len(self._mult), dtype=factor.dtype).index_add(0, self._member_orbit, torch.ones_like(factor))
        return total / counts

    def peaks(self, full: torch.Tensor):
        """Per line: (centres (H,) deg, areas (H,) before the scale, fwhm (H,), eta (H,))."""
        lattice = self.lattice_of(full)
        prof = {k: self._p(full, k) for k in ("u", "v", "w", "x", "y")}
        prof["w"] = prof["w"] + self.blur**2
        size, strain = self._p(full, "size"), self._p(full, "strain")
        texture = self._march_dollase(full, lattice) if "march_dollase" in self._index else 1.0
        out = []
        if not self.lebail:
            batch = CrystalBatch(lattice[None], self.frac_of(full)[None], self._numbers, self._occupancy)
            biso = torch.stack([self._p(full, f"B.{e}") for e in self.element_names])[self._atom_element][None]
        for wavelength, weight in self.lines:
            if self.lebail:
                theta = self._theta(lattice, wavelength)
                area = self.lebail_intensity * weight
            else:
                theta, intensity = bragg_intensities(batch, self._refl, wavelength, biso, self.instrument.radiation,
                                                     monochromator_2theta=self.instrument.monochromator_2theta)
                theta, area = theta[0], intensity[0] * self._mult * weight
            fwhm, eta = peak_shape(theta[None], wavelength, self.instrument, size=size, strain=strain, **prof)
            shift = self._p(full, "zero")
            if "displacement" in self._index:
                shift = shift - torch.rad2deg(2.0 * self._p(full, "displacement") * torch.cos(theta) / GONIOMETER_RADIUS_MM)
            out.append((torch.rad2deg(2.0 * theta) + shift, area * texture, fwhm[0], eta[0]))
        return out

    def background(self, full: torch.Tensor) -> torch.Tensor:
        coeffs = torch.stack([self._p(full, f"bkg{n}") for n in range(self._chebyshev.shape[1])])
        return self._chebyshev @ coeffs

    def bragg_profile(self, full: torch.Tensor) -> torch.Tensor:
        """Unscaled Bragg part on the full grid."""
        # both lines in one call, and peaks grouped by window size: render_peaks sizes one window for all peaks
        # from the widest, so grouping keeps the sharp low-angle peaks from paying for the broad high-angle ones
        centres, areas, fwhm, eta = (torch.cat(parts) for parts in zip(*self.peaks(full)))
        reach = (fwhm * (3.0 + self.n_fwhm * eta)).detach()
        order = torch.argsort(reach)
        total = torch.zeros_like(self._grid)
        for group in torch.tensor_split(order, max(1, min(self.n_groups, len(order) // 40))):
            total = total + render_peaks(self._grid, centres[group][None], areas[group][None], fwhm[group][None],
                                         eta[group][None], self.n_fwhm)[0]
        return total

    def calculate(self, full: torch.Tensor) -> torch.Tensor:
        """y_calc on the full grid."""
        return self._p(full, "scale") * self.bragg_profile(full) + self.background(full)

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
        """Exact Jacobian of the weighted residual: forward-mode autograd for the non-linear parameters (one
        column each), the linear ones (scale, Chebyshev coefficients) in closed form."""
        t = torch.as_tensor(x)
        free = self.parameters.free
        linear = [i for i, p in enumerate(free) if p.group in ("scale", "background")]
        other = torch.as_tensor([i for i in range(len(free)) if i not in linear], dtype=torch.long)
        jac = np.empty((int(self._mask.sum()), len(free)))
        if len(other):
            sub = lambda v: self._residual_t(t.scatter(0, other, v))
            jac[:, other.numpy()] = torch.func.jacfwd(sub)(t[other]).numpy()
        if linear:
            with torch.no_grad():
                full = self._full(t)
                bragg = self.bragg_profile(full)[self._mask] if any(free[i].name == "scale" for i in linear) else None
            for i in linear:
                name = free[i].name
                column = bragg if name == "scale" else self._chebyshev[self._mask, int(name[3:])]
                jac[:, i] = -(column / self._sigma).numpy()
        return jac

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
        result = least_squares(self.residual, x0, jac=self.jacobian, bounds=(lower, upper), method="trf",
                               x_scale="jac", max_nfev=max_nfev, xtol=1e-8, ftol=1e-8)
        self.parameters.set_vector(result.x)
        self._last_jacobian = result.jac

    # -- starting values -------------------------------------------------------------------------------------

    def initialise(self) -> None:
        """Background from the lower envelope, W from the narrowest strong peak, scale from the peak area."""
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
        if "w" in self.profile_params:
            fwhm = _strongest_peak_fwhm(x, net)
            self.parameters["w"].value = float(np.clip(0.6 * fwhm**2, 1e-5, 0.5))
        with torch.no_grad():
            bragg = self.bragg_profile(self.current()).numpy()
        area = np.sum(np.clip(net, 0, None)[self.profile.mask])
        self.parameters["scale"].value = float(area / max(np.sum(bragg[self.profile.mask]), 1e-300))

    def _correlation(self, net: np.ndarray, full: torch.Tensor) -> float:
        m = self.profile.mask
        with torch.no_grad():
            calc = self.bragg_profile(full).numpy()[m]
        return float(np.corrcoef(calc, net[m])[0, 1])

    def scan_cell(self, span: float = 0.05, step: float = 0.001, axis_span: float = 0.025, passes: int = 0) -> float:
        """Coarse search before the least squares, whose basin is about one peak width wide: the isotropic cell
        factor, then each cell length on its own (coordinate-wise, ``passes`` times), maximising the
        correlation of the broadened model with the net data. Returns the isotropic factor applied."""
        net = self.profile.y - self.background(self.current()).detach().numpy()
        names = [f"lattice.{n}" for n in self.cell.names]
        old_blur, self.blur = self.blur, max(self.blur, 0.15)

        def best_of(factors, apply):
            scores = []
            for f in factors:
                full = self.current().clone()
                apply(full, f)
                scores.append(self._correlation(net, full))
            return factors[int(np.argmax(scores))]

        start = {n: self.parameters[n].value for n in names}

        def isotropic(full, f):
            for n in names:  # G = B p is homogeneous: scaling the cell by f scales every parameter by f^2
                full[self._index[n]] = start[n] * f * f

        factor = best_of(np.arange(1.0 - span, 1.0 + span + 1e-12, step), isotropic)
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
        return float(factor)

    # -- the staged refinement -------------------------------------------------------------------------------

    def refine(self, stages=STAGES, progress=None, max_nfev: int = 40, blur_schedule=(0.4, 0.15),
               scan: bool = True) -> RefinementResult:
        """Run the stages (each a least-squares call over everything released so far), then the esd's."""
        t0 = time.perf_counter()
        self.initialise()
        self.parameters.fix_all()
        for name, groups in stages:
            self.parameters.release(*groups)
            if "lattice" in groups:
                if scan:
                    self.scan_cell()
                for blur in blur_schedule:  # coarse to fine: broadened peaks widen the basin of the lattice
                    self.blur = blur
                    self.fit(max_nfev=max_nfev // 2)
                self.blur = 0.0
            self.fit(max_nfev=max_nfev)
            self.stages.append({"stage": name, "rwp": self.rwp(), "n_free": len(self.parameters.free),
                                "seconds": round(time.perf_counter() - t0, 2)})
            if progress is not None:
                progress(self.stages[-1])
        self._esds()
        return self.result(time.perf_counter() - t0)

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

    # -- results ---------------------------------------------------------------------------------------------

    def cell_parameters(self) -> tuple[np.ndarray, np.ndarray]:
        """(a, b, c, alpha, beta, gamma) in angstrom / degrees and their esd's (propagated by autograd)."""
        names = [f"lattice.{n}" for n in self.cell.names]
        idx = [self._index[n] for n in names]
        base = self.current()

        def cell6(p):
            lat = self.lattice_of(base.scatter(0, torch.as_tensor(idx), p))
            a, b, c = lat.norm(dim=1)
            cos = lambda u, v: (u * v).sum() / (u.norm() * v.norm())
            ang = [torch.rad2deg(torch.acos(cos(lat[1], lat[2]))), torch.rad2deg(torch.acos(cos(lat[0], lat[2]))),
                   torch.rad2deg(torch.acos(cos(lat[0], lat[1])))]
            return torch.stack([a, b, c, *ang])

        p = base[idx]
        values = cell6(p).detach().numpy()
        jac = torch.func.jacrev(cell6)(p).numpy()
        esd = np.sqrt(np.clip(np.diag(jac @ self._cov_of(names) @ jac.T), 0, None))
        esd[esd < 1e-9] = 0.0
        return values, esd

    def refined_structure(self) -> Structure:
        """The refined structure (pymatgen) in the standard setting of its space group."""
        full = self.current()
        with torch.no_grad():
            frac = self.frac_of(full).numpy()
        (a, b, c, al, be, ga), _ = self.cell_parameters()
        coords = np.zeros((len(self.structure), 3))
        coords[self._atom_site] = frac
        return Structure(Lattice.from_parameters(a, b, c, al, be, ga), self.structure.species_and_occu, coords % 1.0,
                         site_properties=None)

    def site_table(self) -> list[dict]:
        """Independent sites: label, species/occupancy, fractional x, y, z with esd's, B (angstrom^2) with esd."""
        rows = []
        full = self.current()
        frac = self.frac_of(full).detach().numpy()
        for s in self.sites:
            rep = int(s.members[0])
            names = [f"{s.label}.{n}" for n in s.names]
            cov = self._cov_of(names)
            a = s.matrices[0]
            esd = np.sqrt(np.clip(np.diag(a @ cov @ a.T), 0, None)) if names else np.zeros(3)
            atom = int(np.where(self._atom_site == rep)[0][0])
            element = self.element_names[int(self._atom_element[atom])]
            b = self.parameters[f"B.{element}"] if f"B.{element}" in self else None
            rows.append({"label": s.label, "species": {str(k): float(v) for k, v in self.structure[rep].species.items()},
                         "frac": frac[atom].tolist(), "frac_esd": esd.tolist(), "multiplicity": len(s.members),
                         "biso": None if b is None else b.value, "biso_esd": None if b is None else b.esd})
        return rows

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def partition(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rietveld partition of the observed net intensity among the reflection orbits (Le Bail's formula):
        I_obs,k = sum_i c_k(x_i) (y_obs,i - y_b,i) / (y_calc,i - y_b,i), with c_k the calculated contribution
        of orbit k (all lines, scaled). Returns (2theta of line 1 in degrees, I_obs, I_calc), all orbits."""
        full = self.current()
        with torch.no_grad():
            y_calc = self.calculate(full).numpy()
            bg = self.background(full).numpy()
            scale = float(self._p(full, "scale"))
            peaks = self.peaks(full)
        obs = np.zeros(len(self._mult))
        calc = np.zeros(len(self._mult))
        m = self.profile.mask
        net_calc = y_calc - bg
        safe = np.abs(net_calc) > 1e-9 * max(np.abs(net_calc).max(), 1e-300)
        ratio = np.where(m & safe, (self.profile.y - bg) / np.where(safe, net_calc, 1.0), 0.0)
        for centres, areas, fwhm, eta in peaks:
            index, values = _peak_windows(self._grid, centres, areas * scale, fwhm, eta, self.n_fwhm)
            calc += (values * m[index]).sum(1)
            obs += (values * ratio[index]).sum(1)
        return peaks[0][0].numpy(), obs, calc

    def reflection_table(self) -> dict:
        """Line-1 reflections inside the data range: 2theta, hkl, I_calc and the partitioned I_obs."""
        two_theta, obs, calc = self.partition()
        inside = (two_theta >= self.profile.x.min()) & (two_theta <= self.profile.x.max()) & (calc > 0)
        return {"two_theta": two_theta[inside], "hkl": self.reflections.hkl[inside], "i_calc": calc[inside],
                "i_obs": obs[inside]}

    def result(self, seconds: float) -> RefinementResult:
        m = self.profile.mask
        full = self.current()
        with torch.no_grad():
            y_calc = self.calculate(full).numpy()
            bg = self.background(full).numpy()
        n_free = len(self.parameters.free)
        y, s = self.profile.y[m], self.profile.sigma[m]
        table = self.reflection_table()
        r_bragg = metrics.r_bragg(table["i_obs"], table["i_calc"]) if len(table["i_obs"]) and not self.lebail else None
        cell, cell_esd = self.cell_parameters()
        spacegroup = symmetry_of(self.refined_structure(), 1e-3) if not self.lebail else self.symmetry
        return RefinementResult(
            structure=self.refined_structure(),
            space_group=f"{spacegroup.symbol} ({spacegroup.number})",
            symmetry=self.symmetry,
            cell=cell, cell_esd=cell_esd, sites=self.site_table() if not self.lebail else [],
            rwp=metrics.rwp(y, y_calc[m], s), rp=metrics.rp(y, y_calc[m]),
            gof=metrics.gof(y, y_calc[m], s, n_free), r_bragg=r_bragg,
            r_expected=metrics.r_expected(y, s, n_free),
            parameters=self.parameters.as_dict(), stages=list(self.stages), seconds=seconds,
            x=self.profile.x, y_obs=self.profile.y, y_calc=y_calc, background=bg, mask=m,
            ticks=table["two_theta"], tick_hkl=table["hkl"], wavelengths=[wl for wl, _ in self.lines],
            mode="lebail" if self.lebail else "rietveld",
        )


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
        }


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


def _peak_windows(grid, centres, areas, fwhm, eta, n_fwhm):
    """Per-peak values on their windows, as render_peaks lays them out: index (H, W) and values (H, W), numpy.
    Needed separately from render_peaks for the Rietveld partition of observed intensity among reflections."""
    step = float(torch.min(torch.diff(grid)))
    reach = float((fwhm * (3.0 + n_fwhm * eta)).max()) if len(fwhm) else 0.0
    half = min(math.ceil(reach / step), len(grid))
    offsets = torch.arange(-half, half + 1)
    index = torch.searchsorted(grid, centres.contiguous()).unsqueeze(-1) + offsets
    inside = (index >= 0) & (index < len(grid))
    index = index.clamp(0, len(grid) - 1)
    values = pseudo_voigt(grid[index] - centres.unsqueeze(-1), fwhm.unsqueeze(-1), eta.unsqueeze(-1))
    values = values * areas.unsqueeze(-1) * inside
    return index.numpy(), values.numpy()
