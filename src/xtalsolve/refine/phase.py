"""One crystalline contribution to a powder pattern (a diffpy.srfit "contribution"): the symmetrised structure,
its constraints, its reflection orbits and its own parameters (scale, cell, coordinates, B, occupancies, peak
widths, crystallite size, texture), and its peaks for given wavelengths. Background, zero shift, sample
displacement, peak asymmetry and the Kalpha2 ratio are shared by all phases and live in the recipe.

Parameter names carry the phase's prefix ("" for a single phase, "<name>:" when there are several), so a
one-phase recipe keeps the plain names (scale, lattice.G11, O1.x, B.O, w, size, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from pymatgen.core import Lattice, Structure

from xtalsolve.crystal.batch import CrystalBatch
from xtalsolve.physics.powder import Instrument, Reflections, bragg_intensities, enumerate_reflections, peak_shape
from xtalsolve.physics.scattering import check_elements
from xtalsolve.refine.constraints import _METRIC_INDEX, LatticeConstraint, Symmetry, site_constraints, symmetrize, symmetry_of
from xtalsolve.refine.parameters import Parameter, ParameterSet

PROFILE_NAMES = ("w", "v", "u", "x", "y", "size", "strain")


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
    hkl = enumerate_reflections(torch.as_tensor(np.array(lattice)[None]), d_min).hkl[0].numpy()
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


class Phase:
    """A crystalline phase of a Rietveld model.

    structure: candidate (idealised to its space group at ``symprec``, angstrom); name: label used in reports;
    prefix: parameter-name prefix; wavelengths: the lines (angstrom) the reflections must cover up to
    ``two_theta_max`` (degrees); lebail: intensities free (atoms ignored); texture: March-Dollase axis or None.
    """

    def __init__(self, structure: Structure, instrument: Instrument, wavelengths: list[float], two_theta_max: float,
                 name: str = "phase", prefix: str = "", symprec: float = 0.05, lebail: bool = False,
                 texture: tuple[int, int, int] | None = None):
        self.name, self.prefix, self.lebail = name, prefix, lebail
        check_elements(np.array([e.Z for e in structure.composition.elements]), instrument.radiation)
        self.structure = symmetrize(structure, symprec)
        self.symmetry = symmetry_of(self.structure, 1e-3)
        self.cell = LatticeConstraint(self.structure.lattice, self.symmetry)
        self.sites = site_constraints(self.structure, self.symmetry) if not lebail else []
        self.texture_axis = None if texture is None else torch.as_tensor(texture, dtype=torch.float64)
        self._index: dict[str, int] = {}
        self._setup_atoms()
        self._setup_reflections(max(wavelengths), two_theta_max)

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
        atom_of_site = np.zeros(len(self.structure), dtype=int)
        column = 0
        for k, s in enumerate(self.sites):
            r = len(s.names)
            site_map[s.members, :, column : column + r] = s.matrices
            atom_of_site[s.members] = k
            column += r
        self._coord_map = torch.as_tensor(site_map[self._atom_site])  # (atoms, 3, free coordinates)
        self._atom_independent = torch.as_tensor(atom_of_site[self._atom_site])  # independent site of each atom

    def _setup_reflections(self, lam_max: float, two_theta_max: float):
        two_theta_max = min(two_theta_max + 3.0, 179.0)
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

    def add_parameters(self, ps: ParameterSet, instrument: Instrument, profile_params, biso, size,
                       occupancies: bool = False) -> None:
        """This phase's parameters, named with its prefix, appended to ``ps``."""
        pre = self.prefix
        ps.add(Parameter(pre + "scale", 1.0, "scale", (0.0, math.inf)))
        for name, value in zip(self.cell.names, self.cell.start):
            bounds = (0.7 * value, 1.4 * value) if name in ("G11", "G22", "G33") else (-math.inf, math.inf)
            ps.add(Parameter(f"{pre}lattice.{name}", value, "lattice", bounds))
        start = {"w": instrument.w, "v": instrument.v, "u": instrument.u, "x": instrument.x, "y": instrument.y,
                 "size": size or 2000.0, "strain": 0.0}
        bounds = {"w": (1e-6, 1.0), "v": (-1.0, 1.0), "u": (-0.5, 2.0), "x": (0.0, 1.0), "y": (0.0, 1.0),
                  "size": (20.0, 1e5), "strain": (0.0, 0.05)}
        self.profile_params = tuple(profile_params)
        for name in PROFILE_NAMES:
            ps.add(Parameter(pre + name, start[name], "profile" if name in profile_params else "fixed", bounds[name]))
        if self.texture_axis is not None:
            ps.add(Parameter(pre + "march_dollase", 1.0, "texture", (0.3, 3.0)))
        for s in self.sites:
            for name, value in zip(s.names, s.start):
                ps.add(Parameter(f"{pre}{s.label}.{name}", value, "positions", (value - 0.1, value + 0.1)))
        for element in self.element_names if not self.lebail else []:
            value = biso.get(element, 0.5) if isinstance(biso, dict) else biso
            ps.add(Parameter(f"{pre}B.{element}", value, "biso", (-1.0, 12.0)))
        self.refine_occupancy = occupancies and not self.lebail
        for s in self.sites if self.refine_occupancy else []:
            occ = float(max(self.structure[int(s.members[0])].species.values()))
            ps.add(Parameter(f"{pre}occ.{s.label}", occ, "occupancy", (0.0, 1.0)))

    def bind(self, index: dict[str, int]) -> None:
        """The recipe's name -> position map of the full parameter vector."""
        self._index = index

    def p(self, full: torch.Tensor, name: str) -> torch.Tensor:
        return full[self._index[self.prefix + name]]

    def has(self, name: str) -> bool:
        return self.prefix + name in self._index

    # -- the model -------------------------------------------------------------------------------------------

    def lattice_of(self, full: torch.Tensor) -> torch.Tensor:
        """(3, 3) cell (rows a, b, c; angstrom) from the metric parameters, by Cholesky."""
        idx = [self._index[f"{self.prefix}lattice.{n}"] for n in self.cell.names]
        p = full[idx]
        basis = torch.as_tensor(self.cell.basis)
        g6 = torch.as_tensor(self.cell.metric0) + basis @ (p - torch.as_tensor(self.cell.start))
        g = {(i, j): g6[_METRIC_INDEX.index((min(i, j), max(i, j)))] for i in range(3) for j in range(3)}
        return cholesky3(g)

    def frac_of(self, full: torch.Tensor) -> torch.Tensor:
        """(atoms, 3) fractional coordinates from the free coordinate parameters."""
        names = [f"{self.prefix}{s.label}.{n}" for s in self.sites for n in s.names]
        if not names:
            return self._frac0
        idx = [self._index[n] for n in names]
        start = torch.as_tensor(np.concatenate([s.start for s in self.sites]))
        return self._frac0 + self._coord_map @ (full[idx] - start)

    def occupancy_of(self, full: torch.Tensor) -> torch.Tensor:
        """(1, atoms) occupancies; a refined site occupancy scales every species on that site."""
        if not self.refine_occupancy:
            return self._occupancy
        occ0 = torch.as_tensor([float(max(self.structure[int(s.members[0])].species.values())) for s in self.sites])
        occ = torch.stack([self.p(full, f"occ.{s.label}") for s in self.sites])
        return self._occupancy * (occ / occ0)[self._atom_independent][None]

    def theta(self, lattice: torch.Tensor, wavelength: float) -> torch.Tensor:
        g2 = torch.einsum("hi,ij,hj->h", self._hkl, torch.linalg.inv(lattice @ lattice.T), self._hkl)
        return torch.asin(torch.clamp(0.5 * wavelength * torch.sqrt(g2), max=1.0 - 1e-9))

    def march_dollase(self, full: torch.Tensor, lattice: torch.Tensor) -> torch.Tensor:
        """March-Dollase factor of every orbit, averaged over its member reflections."""
        r = self.p(full, "march_dollase")
        recip = torch.linalg.inv(lattice).T  # rows: reciprocal vectors (without 2 pi)
        normals = self._member_hkl @ recip
        axis = self.texture_axis @ recip
        cos2 = (normals * axis).sum(-1) ** 2 / ((normals**2).sum(-1) * (axis**2).sum())
        factor = (r * r * cos2 + (1.0 - cos2) / r) ** -1.5
        total = torch.zeros(len(self._mult), dtype=factor.dtype).index_add(0, self._member_orbit, factor)
        counts = torch.zeros(len(self._mult), dtype=factor.dtype).index_add(0, self._member_orbit, torch.ones_like(factor))
        return total / counts

    def peaks(self, full: torch.Tensor, instrument: Instrument, lines, shift, blur: float = 0.0):
        """Per line (wavelength, weight tensor): (2theta centres (H,) deg, areas (H,) before the scale, fwhm (H,),
        eta (H,)); ``shift(theta)`` gives the zero/displacement shift (deg) of each reflection."""
        lattice = self.lattice_of(full)
        prof = {k: self.p(full, k) for k in ("u", "v", "w", "x", "y")}
        prof["w"] = prof["w"] + blur**2
        size, strain = self.p(full, "size"), self.p(full, "strain")
        texture = self.march_dollase(full, lattice) if self.texture_axis is not None else 1.0
        out = []
        if not self.lebail:
            batch = CrystalBatch(lattice[None], self.frac_of(full)[None], self._numbers, self.occupancy_of(full))
            biso = torch.stack([self.p(full, f"B.{e}") for e in self.element_names])[self._atom_element][None]
        for wavelength, weight in lines:
            if self.lebail:
                theta = self.theta(lattice, wavelength)
                area = self.lebail_intensity * weight
            else:
                # closed-form derivatives of |F|^2, LP and widths: the Rietveld Jacobian is taken in forward mode
                theta, intensity = bragg_intensities(batch, self._refl, wavelength, biso, instrument.radiation,
                                                     monochromator_2theta=instrument.monochromator_2theta,
                                                     derivatives="closed-form")
                theta, area = theta[0], intensity[0] * self._mult * weight
            fwhm, eta = peak_shape(theta[None], wavelength, instrument, size=size, strain=strain, **prof,
                                   derivatives="closed-form")
            out.append((torch.rad2deg(2.0 * theta) + shift(theta), area * texture, fwhm[0], eta[0]))
        return out

    # -- results ---------------------------------------------------------------------------------------------

    def cell_mass_volume(self, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mass of the cell contents (amu; Z M, with refined occupancies) and the cell volume (angstrom^3)."""
        masses = torch.as_tensor([sp.atomic_mass if hasattr(sp, "atomic_mass") else sp.element.atomic_mass
                                  for site in self.structure for sp in site.species], dtype=torch.float64)
        mass = (masses * self.occupancy_of(full)[0]).sum()
        return mass, torch.abs(torch.linalg.det(self.lattice_of(full)))

    def cell6(self, full: torch.Tensor) -> torch.Tensor:
        """(a, b, c, alpha, beta, gamma) in angstrom / degrees (differentiable)."""
        lat = self.lattice_of(full)
        a, b, c = lat.norm(dim=1)
        cos = lambda u, v: (u * v).sum() / (u.norm() * v.norm())  # noqa: E731
        ang = [torch.rad2deg(torch.acos(cos(lat[1], lat[2]))), torch.rad2deg(torch.acos(cos(lat[0], lat[2]))),
               torch.rad2deg(torch.acos(cos(lat[0], lat[1])))]
        return torch.stack([a, b, c, *ang])

    def lattice_names(self) -> list[str]:
        return [f"{self.prefix}lattice.{n}" for n in self.cell.names]

    def refined_structure(self, full: torch.Tensor) -> Structure:
        """The refined structure (pymatgen) in the standard setting of its space group."""
        with torch.no_grad():
            frac = self.frac_of(full).numpy()
            a, b, c, al, be, ga = self.cell6(full).numpy()
            occupancy = self.occupancy_of(full)[0].numpy()
        coords = np.zeros((len(self.structure), 3))
        coords[self._atom_site] = frac
        species = []
        for i, site in enumerate(self.structure):
            rows = np.where(self._atom_site == i)[0]
            species.append({sp: float(occupancy[r]) for sp, r in zip(site.species.keys(), rows)})
        return Structure(Lattice.from_parameters(a, b, c, al, be, ga), species, coords % 1.0)

    def site_table(self, full: torch.Tensor, parameters: ParameterSet, cov_of) -> list[dict]:
        """Independent sites: label, species/occupancy (with esd when refined), fractional x, y, z with esd's,
        B (angstrom^2) with esd."""
        rows = []
        frac = self.frac_of(full).detach().numpy()
        occupancy = self.occupancy_of(full)[0].detach().numpy()
        for s in self.sites:
            rep = int(s.members[0])
            names = [f"{self.prefix}{s.label}.{n}" for n in s.names]
            cov = cov_of(names)
            a = s.matrices[0]
            esd = np.sqrt(np.clip(np.diag(a @ cov @ a.T), 0, None)) if names else np.zeros(3)
            atoms = np.where(self._atom_site == rep)[0]
            atom = int(atoms[0])
            element = self.element_names[int(self._atom_element[atom])]
            b = parameters[f"{self.prefix}B.{element}"] if self.has(f"B.{element}") else None
            row = {"label": s.label,
                   "species": {str(k): float(occupancy[r]) for k, r in zip(self.structure[rep].species.keys(), atoms)},
                   "frac": frac[atom].tolist(), "frac_esd": esd.tolist(), "multiplicity": len(s.members),
                   "biso": None if b is None else b.value, "biso_esd": None if b is None else b.esd}
            if self.refine_occupancy:
                row["occupancy_esd"] = parameters[f"{self.prefix}occ.{s.label}"].esd
            rows.append(row)
        return rows


def cholesky3(g: dict) -> torch.Tensor:
    """Lower-triangular L with L L^T = G for a 3 x 3 metric given as {(i, j): G_ij}: the rows of L are cell
    vectors (angstrom) with that metric. Written out rather than ``torch.linalg.cholesky`` because under the
    forward-mode Jacobian (vmap of jvp) the library call is decomposed in Python at ~50 ms per call, which made
    it the most expensive step of a small refinement. A trial step that leaves the metric indefinite gets its
    pivots floored at 1e-6 angstrom^2: the cell is then badly wrong, the residual large, and the trust region
    steps back instead of the fit crashing."""
    floor = 1e-6
    l00 = torch.sqrt(torch.clamp(g[0, 0], min=floor))
    l10 = g[1, 0] / l00
    l20 = g[2, 0] / l00
    l11 = torch.sqrt(torch.clamp(g[1, 1] - l10 * l10, min=floor))
    l21 = (g[2, 1] - l20 * l10) / l11
    l22 = torch.sqrt(torch.clamp(g[2, 2] - l20 * l20 - l21 * l21, min=floor))
    zero = torch.zeros_like(l00)
    return torch.stack([torch.stack([l00, zero, zero]), torch.stack([l10, l11, zero]), torch.stack([l20, l21, l22])])
