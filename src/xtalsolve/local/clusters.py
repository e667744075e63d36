"""Absorber-centred clusters: cutting from a crystal, perturbing, and first-shell descriptors.

A :class:`Cluster` holds Cartesian positions in angstrom with the absorber at index 0 and at the origin.
Everything here is pure NumPy on small arrays; pymatgen does the periodic neighbour search.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from itertools import combinations

import numpy as np
from pymatgen.core import Element, Structure

from xtalsolve.errors import XtalsolveError

# First-shell cutoffs (angstrom) per (absorber, ligand). Si-O: longest bond in 6-fold stishovite-like sites is
# ~1.85 A, the next neighbours (O-O 2.6, Si-Si 3.0) are well beyond 2.2. Fe-O: octahedral Fe2+ bonds reach ~2.3-2.4 A
# in silicates; the second-shell O lies beyond 3.0 A.
FIRST_SHELL_CUTOFF_A: dict[tuple[str, str], float] = {
    ("Si", "O"): 2.2,
    ("Fe", "O"): 2.6,
    ("Ti", "O"): 2.5,
    ("Al", "O"): 2.3,
}
# When a pair is not tabulated, the cutoff is this factor times the shortest absorber-ligand distance.
GENERIC_CUTOFF_FACTOR = 1.3


@dataclass(frozen=True)
class Cluster:
    """Absorber-centred cluster.

    species: element symbols, absorber first. positions: (N, 3) Cartesian, angstrom, absorber at the origin.
    meta: provenance (structure id, site index, perturbation, ...), JSON-serialisable.
    """

    species: tuple[str, ...]
    positions: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        pos = np.asarray(self.positions, dtype=float)
        if pos.ndim != 2 or pos.shape[1] != 3 or len(pos) != len(self.species):
            raise XtalsolveError(f"cluster positions must be (N, 3) with N={len(self.species)}", "cluster")
        object.__setattr__(self, "positions", pos)

    @property
    def absorber(self) -> str:
        return self.species[0]

    @property
    def distances(self) -> np.ndarray:
        """Distance of every atom from the absorber (angstrom)."""
        return np.linalg.norm(self.positions, axis=1)

    def __len__(self) -> int:
        return len(self.species)

    def to_xyz(self, comment: str = "") -> str:
        """XYZ text (angstrom)."""
        lines = [str(len(self)), comment.replace("\n", " ")]
        lines += [f"{s:2s} {x:12.6f} {y:12.6f} {z:12.6f}" for s, (x, y, z) in zip(self.species, self.positions)]
        return "\n".join(lines) + "\n"


def cut_cluster(
    structure: Structure,
    site: int,
    radius: float | None = None,
    n_atoms: int | None = 49,
    meta: dict | None = None,
) -> Cluster:
    """Cluster around ``structure[site]``: all atoms within ``radius`` (angstrom), or the ``n_atoms`` nearest.

    With both given, the nearest ``n_atoms`` within ``radius``. Atoms are sorted by distance (ties by species,
    then coordinates, so the result is deterministic); the absorber sits at the origin. Shells are not split
    arbitrarily only if ``n_atoms`` falls on a shell boundary; FEFF is insensitive to the last partial shell.
    """
    if not 0 <= site < len(structure):
        raise XtalsolveError(f"site {site} out of range (structure has {len(structure)} sites)", "site")
    if radius is None and n_atoms is None:
        raise XtalsolveError("give radius or n_atoms", "cluster")
    if structure.is_ordered is False:
        raise XtalsolveError("disordered structures are not supported for cluster cutting", "structure")
    r = radius if radius is not None else 4.0
    centre = structure[site].coords
    while True:
        nbrs = structure.get_neighbors(structure[site], r)
        if n_atoms is None or len(nbrs) >= n_atoms - 1 or radius is not None:
            break
        r *= 1.25
    vec = np.array([n.coords - centre for n in nbrs]).reshape(-1, 3)
    sp = [n.specie.symbol for n in nbrs]
    d = np.linalg.norm(vec, axis=1)
    order = np.lexsort((vec[:, 2], vec[:, 1], vec[:, 0], sp, np.round(d, 6)))
    if n_atoms is not None:
        order = order[: n_atoms - 1]
    species = (structure[site].specie.symbol, *[sp[i] for i in order])
    positions = np.vstack([np.zeros(3), vec[order]])
    info = {"site": int(site), "radius_A": radius, "n_atoms": len(species)}
    info.update(meta or {})
    return Cluster(species, positions, info)


# ---------------------------------------------------------------------------------------------------- descriptors


def shell_cutoff(absorber: str, ligand: str, distances: np.ndarray | None = None) -> float:
    """First-shell cutoff (angstrom): tabulated for known pairs, else 1.3 x the shortest bond."""
    if (absorber, ligand) in FIRST_SHELL_CUTOFF_A:
        return FIRST_SHELL_CUTOFF_A[(absorber, ligand)]
    if distances is None or len(distances) == 0:
        raise XtalsolveError(f"no cutoff known for {absorber}-{ligand}", "cutoff")
    return GENERIC_CUTOFF_FACTOR * float(np.min(distances))


def first_shell_indices(cluster: Cluster, ligand: str = "O", cutoff: float | None = None) -> np.ndarray:
    """Indices of ligand atoms bonded to the absorber (distance <= cutoff, angstrom), nearest first."""
    d = cluster.distances
    idx = np.array([i for i, s in enumerate(cluster.species) if i > 0 and s == ligand], dtype=int)
    if len(idx) == 0:
        return idx
    rc = cutoff if cutoff is not None else shell_cutoff(cluster.absorber, ligand, d[idx])
    idx = idx[d[idx] <= rc]
    return idx[np.argsort(d[idx], kind="stable")]


def first_shell_cluster(cluster: Cluster, ligand: str = "O") -> Cluster:
    """The absorber and its first-shell ``ligand`` atoms only (nearest first), as a cluster of its own."""
    idx = first_shell_indices(cluster, ligand)
    return Cluster((cluster.absorber,) + (ligand,) * len(idx), np.vstack([np.zeros(3), cluster.positions[idx]]))


def bond_angles(vectors: np.ndarray) -> np.ndarray:
    """All ligand-absorber-ligand angles (degrees) between the given bond vectors (M, 3), sorted."""
    u = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    ang = [np.degrees(np.arccos(np.clip(u[i] @ u[j], -1.0, 1.0))) for i, j in combinations(range(len(u)), 2)]
    return np.sort(np.array(ang, dtype=float))


@dataclass(frozen=True)
class FirstShell:
    """First coordination shell: CN, bond lengths (angstrom, sorted), ligand-absorber-ligand angles (degrees)."""

    ligand: str
    cutoff_A: float
    coordination_number: int
    bond_lengths_A: np.ndarray
    angles_deg: np.ndarray

    @property
    def mean_bond_length_A(self) -> float:
        return float(np.mean(self.bond_lengths_A)) if len(self.bond_lengths_A) else float("nan")

    def as_dict(self) -> dict:
        return {
            "ligand": self.ligand,
            "cutoff_A": self.cutoff_A,
            "coordination_number": self.coordination_number,
            "bond_lengths_A": [round(float(x), 4) for x in self.bond_lengths_A],
            "mean_bond_length_A": round(self.mean_bond_length_A, 4),
            "angles_deg": [round(float(x), 2) for x in self.angles_deg],
        }


def first_shell(cluster: Cluster, ligand: str = "O", cutoff: float | None = None) -> FirstShell:
    """First-shell descriptors of ``cluster`` for absorber-``ligand`` bonds.

    The coordination number counts ligands within ``cutoff`` (angstrom; default :data:`FIRST_SHELL_CUTOFF_A`,
    or 1.3 x the shortest bond for untabulated pairs).
    """
    idx = first_shell_indices(cluster, ligand, cutoff)
    d = cluster.distances
    ligand_d = d[[i for i, s in enumerate(cluster.species) if i > 0 and s == ligand]]
    rc = cutoff if cutoff is not None else shell_cutoff(cluster.absorber, ligand, ligand_d if len(ligand_d) else None)
    vec = cluster.positions[idx]
    return FirstShell(ligand, float(rc), len(idx), d[idx], bond_angles(vec) if len(idx) > 1 else np.zeros(0))


# --------------------------------------------------------------------------------------------------- perturbations


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def stretch_bonds(cluster: Cluster, seed: int, sigma_A: float = 0.03, ligand: str = "O") -> Cluster:
    """Change each first-shell bond length by an independent normal step (sigma in angstrom) along the bond."""
    rng = np.random.default_rng(seed)
    pos = cluster.positions.copy()
    for i in first_shell_indices(cluster, ligand):
        pos[i] += rng.normal(0.0, sigma_A) * _unit(pos[i])
    return _with(cluster, pos, {"kind": "stretch", "seed": seed, "sigma_A": sigma_A})


def bend_angles(cluster: Cluster, seed: int, sigma_deg: float = 4.0, ligand: str = "O") -> Cluster:
    """Rotate each first-shell bond vector by a random small angle (normal, sigma in degrees) at fixed length."""
    rng = np.random.default_rng(seed)
    pos = cluster.positions.copy()
    for i in first_shell_indices(cluster, ligand):
        r = np.linalg.norm(pos[i])
        axis = _unit(np.cross(pos[i], rng.normal(size=3)))
        theta = np.radians(rng.normal(0.0, sigma_deg))
        u = _unit(pos[i])
        pos[i] = r * (np.cos(theta) * u + np.sin(theta) * np.cross(axis, u))  # Rodrigues, axis perpendicular to u
    return _with(cluster, pos, {"kind": "bend", "seed": seed, "sigma_deg": sigma_deg})


def rattle(cluster: Cluster, seed: int, sigma_A: float = 0.05) -> Cluster:
    """Displace every non-absorber atom by isotropic normal noise (sigma per axis, angstrom)."""
    rng = np.random.default_rng(seed)
    pos = cluster.positions.copy()
    pos[1:] += rng.normal(0.0, sigma_A, size=pos[1:].shape)
    return _with(cluster, pos, {"kind": "rattle", "seed": seed, "sigma_A": sigma_A})


def vacancy(cluster: Cluster, seed: int, ligand: str = "O") -> Cluster:
    """Remove one randomly chosen first-shell ligand (CN drops by one)."""
    rng = np.random.default_rng(seed)
    idx = first_shell_indices(cluster, ligand)
    if len(idx) == 0:
        raise XtalsolveError(f"no {ligand} in the first shell to remove", "vacancy")
    drop = int(rng.choice(idx))
    keep = [i for i in range(len(cluster)) if i != drop]
    out = Cluster(tuple(cluster.species[i] for i in keep), cluster.positions[keep], dict(cluster.meta))
    return _with(out, out.positions, {"kind": "vacancy", "seed": seed, "removed_index": drop})


PERTURBATIONS = {"stretch": stretch_bonds, "bend": bend_angles, "rattle": rattle, "vacancy": vacancy}


def perturb(cluster: Cluster, kind: str, seed: int, **kwargs) -> Cluster:
    """Apply the named perturbation (``stretch``, ``bend``, ``rattle``, ``vacancy``) with an explicit seed."""
    if kind not in PERTURBATIONS:
        raise XtalsolveError(f"unknown perturbation {kind!r}; choose from {sorted(PERTURBATIONS)}", "perturbation")
    return PERTURBATIONS[kind](cluster, seed, **kwargs)


def _with(cluster: Cluster, positions: np.ndarray, step: dict) -> Cluster:
    meta = dict(cluster.meta)
    meta["perturbation"] = [*meta.get("perturbation", []), step]
    return replace(cluster, positions=positions, meta=meta)


def is_element(symbol: str) -> bool:
    """True when ``symbol`` is a chemical element symbol."""
    try:
        Element(symbol)
        return True
    except ValueError:
        return False
