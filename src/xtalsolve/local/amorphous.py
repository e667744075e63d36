"""Amorphous (glass) models: network geometry, total neutron scattering against measured data, absorber sites.

The glass models are periodic boxes (pymatgen Structures, e.g. from ``tools/glass_meltquench.py``). Here:

- :func:`network_geometry`: coordination numbers, bond lengths (angstrom) and the two bond-angle distributions
  (degrees) of an A-X network (Si-O: O-Si-O inside the tetrahedra, Si-O-Si between them) from pymatgen's periodic
  neighbour list;
- :func:`neutron_gr`, :func:`gr_to_sq`, :func:`neutron_sq`: the model's neutron reduced PDF G(r) (the project's
  :mod:`xtalsolve.physics.pdf`) and total structure factor S(Q) - 1 (Faber-Ziman, normalised by <b>^2) from it;
- :func:`read_sq` and :func:`sq_to_gr`: a measured S(Q) file and its sine transform, so that model and data
  are compared in both spaces with the same Q window; :func:`agreement`: Pearson and R-factor;
- :func:`spread_sites`: absorber sites that span the coordination and bond-length spread of a glass (for spectra).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pymatgen.core import Structure

from xtalsolve.errors import XtalsolveError
from xtalsolve.local.clusters import shell_cutoff


@dataclass(frozen=True)
class NetworkGeometry:
    """A-X network of a periodic model. ``cn``: X neighbours of each A atom (indices ``centres``);
    ``bonds_A``: every A-X distance (angstrom); ``x_a_x_deg`` / ``a_x_a_deg``: angles (degrees) at A and at X."""

    centres: np.ndarray
    cn: np.ndarray
    mean_bond_A: np.ndarray
    bonds_A: np.ndarray
    x_a_x_deg: np.ndarray
    a_x_a_deg: np.ndarray

    def cn_counts(self) -> dict[int, int]:
        values, counts = np.unique(self.cn, return_counts=True)
        return dict(zip(map(int, values), map(int, counts)))

    def summary(self) -> dict:
        """Scalar checks (angstrom, degrees): CN histogram and fractions, mean bond, angle modes and means."""

        def mode(a: np.ndarray, lo: float, hi: float) -> float:
            """Peak of a Gaussian kernel density (bandwidth 4 degrees; a histogram of ~400 angles is too noisy)."""
            x = np.arange(lo, hi, 0.25)
            return float(x[np.argmax(np.exp(-0.5 * ((x[:, None] - a[None, :]) / 4.0) ** 2).sum(axis=1))])

        return {
            "cn_counts": self.cn_counts(),
            "fraction_fourfold": float(np.mean(self.cn == 4)),
            "mean_bond_A": float(self.bonds_A.mean()),
            "bond_std_A": float(self.bonds_A.std()),
            "x_a_x_mean_deg": float(self.x_a_x_deg.mean()),
            "x_a_x_std_deg": float(self.x_a_x_deg.std()),
            "a_x_a_mode_deg": mode(self.a_x_a_deg, 100.0, 180.0),
            "a_x_a_mean_deg": float(self.a_x_a_deg.mean()),
            "a_x_a_std_deg": float(self.a_x_a_deg.std()),
        }


def network_geometry(structure: Structure, centre: str = "Si", ligand: str = "O",
                     cutoff: float | None = None) -> NetworkGeometry:
    """Coordination, bonds and angles of the ``centre``-``ligand`` network (bonded within ``cutoff`` angstrom;
    default the first-shell cutoff of :mod:`xtalsolve.local.clusters`, 2.2 angstrom for Si-O)."""
    rc = cutoff if cutoff is not None else shell_cutoff(centre, ligand)
    sym = np.array([s.specie.symbol for s in structure])
    if not (sym == centre).any() or not (sym == ligand).any():
        raise XtalsolveError(f"structure holds no {centre}-{ligand} pairs", "structure")
    ci, pi, images, dist = structure.get_neighbor_list(rc)
    keep = (sym[ci] == centre) & (sym[pi] == ligand)
    ci, pi, images, dist = ci[keep], pi[keep], images[keep], dist[keep]
    # bond vectors through the neighbour's periodic image: r_j + image L - r_i (Cartesian, angstrom)
    vec = structure.cart_coords[pi] + images @ structure.lattice.matrix - structure.cart_coords[ci]
    centres = np.flatnonzero(sym == centre)
    cn = np.array([(ci == a).sum() for a in centres])
    mean_bond = np.array([dist[ci == a].mean() if (ci == a).any() else np.nan for a in centres])
    x_a_x = _angles_by_vertex(ci, vec)
    # angles at the ligand: the two bond vectors seen from X are -vec of its two bonds
    a_x_a = _angles_by_vertex(pi, -vec)
    return NetworkGeometry(centres, cn, mean_bond, dist, x_a_x, a_x_a)


def _angles_by_vertex(vertex: np.ndarray, vec: np.ndarray) -> np.ndarray:
    """All angles (degrees) between pairs of bond vectors that share a vertex atom."""
    out = []
    u = vec / np.linalg.norm(vec, axis=1, keepdims=True)
    for v in np.unique(vertex):
        b = u[vertex == v]
        if len(b) > 1:
            i, j = np.triu_indices(len(b), 1)
            out.append(np.degrees(np.arccos(np.clip(np.sum(b[i] * b[j], axis=1), -1.0, 1.0))))
    return np.concatenate(out) if out else np.zeros(0)


# ------------------------------------------------------------------------------------------- total scattering


def neutron_gr(structure: Structure, r: np.ndarray, uiso: float = 0.003, qmax: float | None = None) -> np.ndarray:
    """Neutron reduced PDF G(r) (1/angstrom^2) of a periodic model on ``r`` (uniform, angstrom) from
    :func:`xtalsolve.physics.pdf.simulate_pdf`; ``uiso`` (angstrom^2) only smooths a single MD snapshot, whose
    atoms already carry their thermal displacements; ``qmax`` (1/angstrom) applies the measurement's Q cut."""
    from xtalsolve.physics.pdf import simulate_pdf

    r = np.asarray(r, float)
    step = float(r[1] - r[0])
    g = simulate_pdf(structure, r_min=float(r[0]), r_max=float(r[-1]), r_step=step, radiation="neutron", uiso=uiso,
                     **({"qmax": qmax} if qmax else {}))[0]
    return g[: len(r)]


def neutron_sq(structure: Structure, q: np.ndarray, uiso: float = 0.003, dr: float = 0.01) -> np.ndarray:
    """Neutron total S(Q) - 1 (Faber-Ziman, <b>^2-normalised) of a periodic model at ``q`` (1/angstrom), from its
    G(r) up to half the shortest box edge (the minimum-image range); see :func:`gr_to_sq`."""
    r = np.arange(dr, 0.5 * min(structure.lattice.abc), dr)
    return gr_to_sq(r, neutron_gr(structure, r, uiso), q)


def gr_to_sq(r: np.ndarray, g: np.ndarray, q: np.ndarray) -> np.ndarray:
    """S(Q) - 1 from G(r) on a uniform grid r (angstrom) up to r_max = r[-1] + step:
    Q [S(Q) - 1] = integral_0^rmax G(r) sin(Qr) M(r) dr, with the Lorch window M(r) = sinc(r / rmax) against the
    termination ripple of the finite box. It broadens S(Q) by ~ 2 pi / rmax: for a 21 angstrom box the first sharp
    diffraction peak (1.5 1/angstrom) loses about half its height."""
    r, g, q = np.asarray(r, float), np.asarray(g, float), np.asarray(q, float)
    r_max = float(r[-1] + (r[1] - r[0]))
    gw = g * np.sinc(r / r_max)
    return np.trapezoid(gw[None, :] * np.sin(q[:, None] * r[None, :]), r, axis=1) / q


def sq_to_gr(q: np.ndarray, s_minus_1: np.ndarray, r: np.ndarray, qmax: float) -> np.ndarray:
    """Measured G(r) = 2/pi integral_Qmin^Qmax Q [S(Q) - 1] sin(Qr) dQ (1/angstrom^2), no window: the Q-space box
    cut that ``neutron_gr(..., qmax=qmax)`` applies to the model."""
    m = q <= qmax
    q, f = q[m], q[m] * s_minus_1[m]
    return 2.0 / np.pi * np.trapezoid(f[None, :] * np.sin(np.outer(r, q)), q, axis=1)


def read_sq(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q (1/angstrom), S(Q) - 1 and its sigma from a 4-column histogram file (bin, Q, value, error; ``#`` comments),
    as in the Gudrun/Dissolve ``NeutronSiO2sq.dat`` of ../shared/data/amorphous."""
    try:
        data = np.loadtxt(path, comments="#")
    except (OSError, ValueError) as exc:
        raise XtalsolveError(f"cannot read S(Q): {exc}", str(path)) from exc
    if data.ndim != 2 or data.shape[1] < 4 or len(data) < 10:
        raise XtalsolveError("expected >= 10 rows of bin, Q, S(Q)-1, error", str(path))
    q, s, e = data[:, 1], data[:, 2], data[:, 3]
    if not (np.all(np.isfinite(data[:, 1:4])) and np.all(np.diff(q) > 0)):
        raise XtalsolveError("S(Q) has non-finite values or non-increasing Q", str(path))
    return q, s, e


def agreement(model: np.ndarray, data: np.ndarray) -> dict:
    """Pearson r and R-factor sqrt(sum (model - data)^2 / sum data^2) (Wright's R_chi) of two curves."""
    model, data = np.asarray(model, float), np.asarray(data, float)
    return {"pearson": float(np.corrcoef(model, data)[0, 1]),
            "r_factor": float(np.sqrt(np.sum((model - data) ** 2) / np.sum(data**2)))}


# ---------------------------------------------------------------------------------------------- absorber sites


def spread_sites(geometry: NetworkGeometry, n: int) -> list[int]:
    """``n`` centre-atom indices spanning the glass: every site that is not four-fold (3-, 5-, 6-fold defects),
    then four-fold sites at evenly spaced quantiles of their mean bond length (deterministic)."""
    defects = [int(a) for a, c in zip(geometry.centres, geometry.cn) if c != 4]
    four = geometry.centres[geometry.cn == 4]
    order = four[np.argsort(geometry.mean_bond_A[geometry.cn == 4], kind="stable")]
    m = max(0, n - len(defects))
    pick = order[np.unique(np.round(np.linspace(0, len(order) - 1, m)).astype(int))] if m and len(order) else []
    return sorted(defects[:n] + [int(i) for i in pick])
