"""Symmetry constraints of a Rietveld model: the metric tensor by crystal system and atomic coordinates by
Wyckoff position, both as affine maps from free parameters, built from spglib's operations of the candidate.

Lattice: the metric tensor G (angstrom^2, in the cell's own basis) must satisfy R^T G R = G for every rotation
R of the space group; the invariant subspace is the range of the Reynolds projector G -> <R^T G R>, and the
free parameters are chosen (reduced row echelon form) to be individual elements of G (G11 = a^2, G13 = a c
cos beta, ...). The cell follows from G by Cholesky (rows = a, b, c), which keeps everything differentiable.

Coordinates: for each symmetry-independent site x0 with stabiliser S = {(R, t): R x0 + t = x0 mod 1}, allowed
displacements d satisfy R d = d for R in S; P = <R>_S is the projector onto them. An equivalent site g(x0)
(g = (R_g, t_g)) moves by R_g d. Free parameters are coordinates of x0 (pivots of the echelon basis), so a site
(x, x, 0) has one parameter x and a site (0, 0, 1/2) none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import spglib
from pymatgen.core import Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from xtalsolve.errors import XtalsolveError

METRIC_NAMES = ("G11", "G22", "G33", "G12", "G13", "G23")
_METRIC_INDEX = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


def _echelon_basis(columns: np.ndarray, tol: float = 1e-8) -> tuple[np.ndarray, list[int]]:
    """A basis of span(columns) (n x m) whose pivot rows form the identity: returns (n x r basis, pivots)."""
    u, s, _ = np.linalg.svd(columns, full_matrices=False)
    rank = int((s > tol * max(1.0, s.max() if s.size else 0.0)).sum())
    if rank == 0:
        return np.zeros((columns.shape[0], 0)), []
    rows = u[:, :rank].T.copy()  # r x n, rows span the space
    pivots = []
    col = 0
    for r in range(rank):  # Gauss-Jordan elimination with partial pivoting
        while col < rows.shape[1]:
            best = r + int(np.argmax(np.abs(rows[r:, col])))
            if abs(rows[best, col]) > tol:
                break
            col += 1
        rows[[r, best]] = rows[[best, r]]
        rows[r] /= rows[r, col]
        for other in range(rank):
            if other != r:
                rows[other] -= rows[other, col] * rows[r]
        pivots.append(col)
        col += 1
    rows[np.abs(rows) < 1e-12] = 0.0
    return rows.T, pivots


@dataclass
class Symmetry:
    """Space-group operations of a structure in its own basis: rotations (n, 3, 3) int, translations (n, 3)."""

    number: int
    symbol: str
    rotations: np.ndarray
    translations: np.ndarray
    equivalent_atoms: np.ndarray

    @property
    def point_rotations(self) -> np.ndarray:
        """The distinct rotation parts (point group incl. those of centring translations)."""
        return np.unique(self.rotations.reshape(len(self.rotations), 9), axis=0).reshape(-1, 3, 3)


def _species_ids(structure: Structure) -> list[int]:
    """An integer per distinct site species (a disordered site is its own kind) for spglib."""
    kinds: dict[str, int] = {}
    return [kinds.setdefault(str(sorted(site.species.items())), len(kinds) + 1) for site in structure]


def symmetry_of(structure: Structure, symprec: float = 1e-3) -> Symmetry:
    """spglib's symmetry of ``structure`` as given (no change of setting)."""
    cell = (structure.lattice.matrix, structure.frac_coords, _species_ids(structure))
    data = spglib.get_symmetry_dataset(cell, symprec=symprec)
    if data is None:
        raise XtalsolveError("spglib found no symmetry for the structure (overlapping atoms?)")
    return Symmetry(data.number, data.international, data.rotations, data.translations, data.equivalent_atoms)


def symmetrize(structure: Structure, symprec: float = 0.05) -> Structure:
    """The candidate idealised to its space group found at ``symprec`` (angstrom), in the conventional standard
    setting (so cell constraints read as usual: a = b for tetragonal, beta free for monoclinic, ...)."""
    try:
        refined = SpacegroupAnalyzer(structure, symprec=symprec).get_refined_structure(keep_site_properties=False)
    except Exception as err:  # spglib failures surface as assorted errors
        raise XtalsolveError(f"symmetry analysis failed at symprec={symprec}: {err}") from err
    return refined.get_sorted_structure()


class LatticeConstraint:
    """Metric tensor G = G0 + sum_k B_k (p_k - p0_k) with p = the free elements of G (angstrom^2)."""

    def __init__(self, lattice: Lattice, symmetry: Symmetry):
        metric0 = lattice.matrix @ lattice.matrix.T
        basis6 = []
        for i, j in _METRIC_INDEX:
            e = np.zeros((3, 3))
            e[i, j] = e[j, i] = 1.0
            # Reynolds average: the part of e invariant under the group (R acts on fractional columns)
            avg = np.mean([r.T @ e @ r for r in symmetry.point_rotations], axis=0)
            basis6.append([avg[a, b] for a, b in _METRIC_INDEX])
        basis, pivots = _echelon_basis(np.array(basis6).T)  # (6, r)
        self.basis = basis  # column k: change of the six metric elements per unit of parameter k
        self.names = [METRIC_NAMES[p] for p in pivots]
        self.start = np.array([metric0[_METRIC_INDEX[p]] for p in pivots])
        self.metric0 = np.array([metric0[a, b] for a, b in _METRIC_INDEX])

    def metric6(self, p):
        """The six metric elements (array or tensor) for parameters p."""
        return self.metric0 + self.basis @ (p - self.start) if isinstance(p, np.ndarray) else None


@dataclass
class SiteConstraint:
    """An independent site: label, its free coordinate names (e.g. ["x", "z"]), start values, and for every
    equivalent atom of the P1 cell (indices ``members``) the (3, r) matrix A with x_j = x_j0 + A (p - p0)."""

    label: str
    names: list[str]
    start: np.ndarray
    members: np.ndarray
    matrices: np.ndarray  # (len(members), 3, r)


def _wrap(d: np.ndarray) -> np.ndarray:
    return d - np.round(d)


def site_constraints(structure: Structure, symmetry: Symmetry, tol: float = 1e-3) -> list[SiteConstraint]:
    """Wyckoff constraints for every symmetry-independent site of ``structure`` (which must carry the exact
    symmetry, e.g. from ``symmetrize``)."""
    frac = structure.frac_coords
    rot, trans = symmetry.rotations, symmetry.translations
    out = []
    counts: dict[str, int] = {}
    for rep in np.unique(symmetry.equivalent_atoms):
        x0 = frac[rep]
        images = np.einsum("nij,j->ni", rot, x0) + trans  # every op applied to the representative
        stabiliser = np.all(np.abs(_wrap(images - x0)) < tol, axis=1)
        projector = rot[stabiliser].astype(float).mean(axis=0)
        basis, pivots = _echelon_basis(projector)  # (3, r)
        members = np.where(symmetry.equivalent_atoms == rep)[0]
        matrices = []
        for j in members:
            match = np.where(np.all(np.abs(_wrap(images - frac[j])) < tol, axis=1))[0]
            if len(match) == 0:
                raise XtalsolveError(f"site {j} is not a symmetry image of site {rep}; symmetry is inconsistent")
            matrices.append(rot[match[0]] @ basis)
        element = structure[int(rep)].species.elements[0].symbol
        counts[element] = counts.get(element, 0) + 1
        label = f"{element}{counts[element]}"
        out.append(SiteConstraint(label, ["xyz"[p] for p in pivots], x0[pivots].copy(), members,
                                  np.array(matrices).reshape(len(members), 3, len(pivots))))
    return out


def perturb(structure: Structure, lattice_frac: float, position_A: float, seed: int = 0,
            symprec: float = 1e-3) -> Structure:
    """A copy of a symmetric structure with its free cell parameters scaled by 1 +- ``lattice_frac`` (random
    signs) and each independent site moved by ``position_A`` (angstrom) along a random allowed direction,
    keeping the space group (for validation runs)."""
    rng = np.random.default_rng(seed)
    symmetry = symmetry_of(structure, symprec)
    cell = LatticeConstraint(structure.lattice, symmetry)
    factors = 1.0 + lattice_frac * rng.choice([-1.0, 1.0], size=len(cell.start))
    p = cell.start.copy()
    for k, name in enumerate(cell.names):  # scale lengths by the factor: diagonal metric elements by its square
        p[k] *= factors[k] ** 2 if name in ("G11", "G22", "G33") else factors[k]
    metric = cell.metric0 + cell.basis @ (p - cell.start)
    g = np.zeros((3, 3))
    for value, (i, j) in zip(metric, _METRIC_INDEX):
        g[i, j] = g[j, i] = value
    lattice = Lattice(np.linalg.cholesky(g))
    frac = structure.frac_coords.copy()
    for site in site_constraints(structure, symmetry):
        if not site.names:
            continue
        q = rng.normal(size=len(site.names))
        rep_matrix = site.matrices[0]
        step = np.linalg.norm(structure.lattice.get_cartesian_coords(rep_matrix @ q))
        q *= position_A / max(step, 1e-12)
        for j, a in zip(site.members, site.matrices):
            frac[j] = frac[j] + a @ q
    return Structure(lattice, structure.species_and_occu, frac)
