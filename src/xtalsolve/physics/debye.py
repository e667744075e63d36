"""Scattering of finite nanoparticles by the Debye equation: a sphere cut from a crystal, I(Q) from its atom pairs.

    I(Q) = sum_i f_i^2 + sum_{i != j} f_i f_j exp(-(B_i + B_j) s^2) sin(Q r_ij) / (Q r_ij),   s = Q / (4 pi)

in electron units (squared form factors, X-rays) or fm^2 (neutrons), for the whole particle; Q in 1/angstrom.
Displacements are uncorrelated and isotropic: only the pair terms carry the Debye-Waller factor, so the
self term keeps the thermal diffuse intensity (as in DebyeCalculator and diffpy's DebyePDFCalculator).

Two evaluations of the pair sum, chosen by ``method``:
- ``"exact"``: sinc(Q r_ij) for every pair, in chunks of bounded memory; exact gradients by autograd. ``"auto"``
  takes it while n_pairs * n_Q <= 2e7 (a few hundred atoms on a full 2theta grid), the histogram above that.
- ``"histogram"``: the pair distances of each pair of atom kinds (element, B) are spread onto a uniform distance
  grid of spacing ``bin_width`` with linear (cloud-in-cell) weights, and the sum runs over grid nodes. Each pair
  term is replaced by its linear interpolant between nodes, an absolute error below (Q dr)^2 / 24 per pair (the
  bound of |d^2 sinc / dr^2| <= Q^2 / 3); on average it damps the pair part like exp(-(Q dr)^2 / 12). The default
  dr = 0.035 / Q_max (clipped to 0.001-0.01 angstrom) keeps that damping below 1e-4 of the pair part at Q_max.
  Cost ~ n_pairs + n_nodes * n_Q instead of n_pairs * n_Q: on one CPU core a 30 angstrom Au particle (887 atoms,
  4,251 2theta points) takes 0.3 s, an 80 angstrom one (15,707 atoms, 1.2e8 pairs) 22 s. Gradients flow through
  the spreading weights (those of the piecewise-linear interpolant: 0.3 % from the exact gradient in a test).

Hand-written in torch (rather than calling DebyeCalculator) so that the pattern is differentiable with respect to
the lattice and fractional coordinates of the parent crystal and shares form factors with the Bragg model.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from xtalsolve.crystal.batch import CrystalBatch
from xtalsolve.errors import XtalsolveError
from xtalsolve.physics.scattering import check_elements, neutron_scattering_length, xray_form_factor

MEMORY_BUDGET = 4_000_000
"""Largest number of float64 elements (32 MB) of any intermediate array; loops chunk to stay below it."""

EXACT_WORK_LIMIT = 20_000_000
"""``method="auto"`` sums pairs exactly when n_pairs * n_Q is at most this (about a second on one core)."""


# --------------------------------------------------------------------------------------------- particle


def _center_frac(center, frac: np.ndarray) -> np.ndarray:
    if isinstance(center, str):
        if center == "atom":
            return frac[0]
        if center == "origin":
            return np.zeros(3)
        raise XtalsolveError(
            f"unknown particle centre {center!r}; use 'atom', 'origin' or 3 fractional coordinates", "center"
        )
    c = np.asarray(center, dtype=float)
    if c.shape != (3,) or not np.all(np.isfinite(c)):
        raise XtalsolveError(f"particle centre {center!r} is not 3 fractional coordinates", "center")
    return c


def particle_sites(
    lattice: torch.Tensor, frac: torch.Tensor, diameter_A: float, center="atom"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Atoms of the crystal (lattice (3, 3) rows in angstrom, frac (N, 3)) inside a sphere.

    The sphere has diameter ``diameter_A`` (angstrom) and is centred on the first site (``"atom"``), the cell
    origin (``"origin"``) or a point given in fractional coordinates. Atoms at distance <= D/2 + 1e-6 angstrom are
    kept, so that whole symmetric shells on the surface stay or go together. Returns positions (M, 3) in angstrom
    relative to the centre (differentiable with respect to ``lattice`` and ``frac``; which atoms are inside is
    decided on detached values) and the index (M,) of each atom's site in ``frac``.
    """
    radius = 0.5 * float(diameter_A)
    cell = lattice.detach().cpu().double().numpy()
    f = frac.detach().cpu().double().numpy()
    c = _center_frac(center, f)
    # |n_k + f_k - c_k| <= R |column k of inv(cell)|: the slab half-width of the sphere along each cell axis.
    reach = radius * np.linalg.norm(np.linalg.inv(cell), axis=0)
    axes = [np.arange(math.floor(c[k] - reach[k]) - 1, math.ceil(c[k] + reach[k]) + 2) for k in range(3)]
    shifts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    inside_site, inside_shift = [], []
    step = max(1, MEMORY_BUDGET // (3 * len(f)))
    for start in range(0, len(shifts), step):
        n = shifts[start : start + step]
        cart = (f[None, :, :] + n[:, None, :] - c) @ cell  # (T, N, 3)
        t_idx, s_idx = np.nonzero(np.linalg.norm(cart, axis=-1) <= radius + 1e-6)
        inside_site.append(s_idx)
        inside_shift.append(n[t_idx])
    site = torch.as_tensor(np.concatenate(inside_site), device=lattice.device)
    shift = torch.as_tensor(np.concatenate(inside_shift), dtype=lattice.dtype, device=lattice.device)
    c_t = torch.as_tensor(c, dtype=lattice.dtype, device=lattice.device)
    return (frac[site] + shift - c_t) @ lattice, site


def cut_particle(structure, diameter_A: float, center="atom") -> tuple[np.ndarray, np.ndarray]:
    """A spherical particle of diameter ``diameter_A`` (angstrom) cut from a periodic pymatgen ``Structure``.

    The sphere is centred on the structure's first site (``center="atom"``, the default), on the cell origin
    (``"origin"``) or on a point given as 3 fractional coordinates; all lattice translations that can reach the
    sphere are enumerated. Returns positions (M, 3) in angstrom, relative to the centre, and atomic numbers (M,).
    """
    if not structure.is_ordered:
        raise XtalsolveError(
            f"{structure.composition.reduced_formula} has partially occupied sites; a particle needs an ordered crystal"
        )
    diameter = _check_diameter(diameter_A)
    batch = CrystalBatch.from_structures([structure])
    positions, site = particle_sites(batch.lattice[0], batch.frac[0], diameter, center)
    return positions.numpy(), batch.numbers[0][site].numpy()


def _check_diameter(diameter_A) -> float:
    try:
        d = float(diameter_A)
    except (TypeError, ValueError):
        raise XtalsolveError(f"particle diameter {diameter_A!r} is not a number", "diameter") from None
    if not (math.isfinite(d) and 0.0 < d <= 500.0):
        raise XtalsolveError(f"particle diameter {diameter_A!r} angstrom is outside 0-500 angstrom", "diameter")
    return d


# ------------------------------------------------------------------------------------------- Debye sum


def _atom_kinds(numbers: torch.Tensor, biso: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group atoms by (Z, B): kind index per atom (M,), Z (K,) and B (K,) of each kind (B keeps its gradient)."""
    key = torch.stack([numbers.to(biso.dtype), biso.detach()], 1)
    kinds, kind = torch.unique(key, dim=0, return_inverse=True)
    member = torch.zeros(len(kinds), dtype=torch.long, device=kind.device)
    member[kind] = torch.arange(len(kind), device=kind.device)  # one atom of each kind
    return kind, kinds[:, 0].round().long(), biso[member]


def _pair_blocks(positions: torch.Tensor, kind: torch.Tensor, n_kinds: int, max_pairs: int):
    """Yield (r, kind_pair, keep) for blocks of rows against all later columns, flattened: every pair i < j
    appears once with ``keep`` True; the other entries (j <= i) have ``keep`` False and r = 1. At most about
    ``max_pairs`` entries per block. r is differentiable (no sqrt(0) on the masked diagonal)."""
    n_atoms = len(positions)
    start = 0
    while start < n_atoms - 1:
        stop = start + max(1, min(n_atoms - 1 - start, max_pairs // max(1, n_atoms - start)))
        diff = positions[start:stop].unsqueeze(1) - positions[start:].unsqueeze(0)
        rows = torch.arange(start, stop, device=positions.device).unsqueeze(1)
        keep = torch.arange(start, n_atoms, device=positions.device).unsqueeze(0) > rows
        r2 = torch.where(keep, (diff * diff).sum(-1), torch.ones((), dtype=diff.dtype, device=diff.device))
        kind_pair = kind[start:stop].unsqueeze(1) * n_kinds + kind[start:].unsqueeze(0)
        yield torch.sqrt(r2).reshape(-1), kind_pair.reshape(-1), keep.reshape(-1)
        start = stop


def _divide_by_q(sin_sums: torch.Tensor, zero_limit: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_p w_p sin(Q r_p) / (Q r_p) from sum_p (w_p / r_p) sin(Q r_p), with the limit sum_p w_p at Q = 0."""
    q_safe = torch.where(q > 0, q, torch.ones_like(q))
    return torch.where(q > 0, sin_sums / q_safe, zero_limit.unsqueeze(1))


def _pair_sinc_sums_exact(positions, kind, n_kinds, q):
    """S[a, b](Q) = sum over pairs i < j with kinds (a, b) of sinc(Q r_ij); (K * K, P)."""
    n_kp = n_kinds * n_kinds
    sin_sums = torch.zeros(n_kp, q.numel(), dtype=positions.dtype, device=positions.device)
    counts = torch.zeros(n_kp, dtype=positions.dtype, device=positions.device)
    for r, kind_pair, keep in _pair_blocks(positions, kind, n_kinds, max(1, MEMORY_BUDGET // max(1, q.numel()))):
        onehot = torch.nn.functional.one_hot(kind_pair, n_kp).to(r.dtype) * keep.unsqueeze(1)  # (pairs, K*K)
        sin_sums = sin_sums + (onehot / r.unsqueeze(1)).T @ torch.sin(r.unsqueeze(1) * q.unsqueeze(0))
        counts = counts + onehot.sum(0)
    return _divide_by_q(sin_sums, counts, q)


def _pair_sinc_sums_histogram(positions, kind, n_kinds, q, bin_width):
    """As ``_pair_sinc_sums_exact``, through linear-weight distance histograms with nodes r_n = n * bin_width.

    The node sum sum_n (H_n / r_n) sin(Q r_n) is split with n = c * B + f, sin(Q r_n) = sin(Q r_c) cos(Q r_f) +
    cos(Q r_c) sin(Q r_f), into matrix products that need only (C + B) * n_Q sines instead of n_nodes * n_Q.
    """
    dtype, device = positions.dtype, positions.device
    n_kp = n_kinds * n_kinds
    with torch.no_grad():
        span = 2.0 * torch.linalg.norm(positions - positions.mean(0), dim=1).max().item()
    n_nodes = int(span / bin_width) + 3
    block = max(1, math.ceil(math.sqrt(n_nodes)))
    n_blocks = math.ceil(n_nodes / block)
    hist = torch.zeros(n_kp * n_blocks * block, dtype=dtype, device=device)
    for r, kind_pair, keep in _pair_blocks(positions, kind, n_kinds, MEMORY_BUDGET):
        x = r / bin_width
        node = torch.where(keep, torch.floor(x.detach()).long(), 0)  # masked entries (r = 1) carry no weight
        t = x - node
        flat = kind_pair * (n_blocks * block) + node
        hist = hist.index_add(0, flat, (1.0 - t) * keep).index_add(0, flat + 1, t * keep)
    hist = hist.view(n_kp, n_blocks, block)
    r = torch.arange(n_blocks * block, dtype=dtype, device=device).view(n_blocks, block) * bin_width
    v = hist / torch.where(r > 0, r, torch.ones_like(r))  # node 0 (r = 0) is added separately: sinc(0) = 1
    v = torch.where(r > 0, v, torch.zeros_like(v))
    fine = r[0].unsqueeze(1) * q.unsqueeze(0)  # (B, P)
    cos_fine, sin_fine = torch.cos(fine), torch.sin(fine)
    sin_sums = torch.zeros(n_kp, q.numel(), dtype=dtype, device=device)
    step = max(1, MEMORY_BUDGET // max(1, n_kp * q.numel()))
    for start in range(0, n_blocks, step):
        coarse = r[start : start + step, 0].unsqueeze(1) * q.unsqueeze(0)  # (C', P)
        vc = v[:, start : start + step]  # (K*K, C', B)
        sin_sums = sin_sums + (torch.sin(coarse) * (vc @ cos_fine) + torch.cos(coarse) * (vc @ sin_fine)).sum(1)
    at_zero = hist[:, 0, 0].unsqueeze(1)
    return _divide_by_q(sin_sums, hist.sum((1, 2)), q) + torch.where(q > 0, at_zero, torch.zeros_like(at_zero))


def default_bin_width(q_max: float) -> float:
    """Histogram spacing (angstrom): 0.035 / Q_max, clipped to 0.001-0.01 (pair-term damping < 1e-4 at Q_max)."""
    return float(np.clip(0.035 / max(q_max, 1e-9), 1e-3, 1e-2))


def debye_intensity(
    positions,
    numbers,
    q,
    biso=0.0,
    form_factor_table: str = "waasmaier-kirfel",
    radiation: str = "xray",
    method: str = "auto",
    bin_width: float | None = None,
) -> torch.Tensor:
    """I(Q) of a finite group of atoms by the Debye scattering equation (formula in the module docstring).

    positions (M, 3) angstrom, numbers (M,) atomic numbers, q (P,) in 1/angstrom (Q = 0 allowed: I = (sum f)^2),
    biso a scalar or (M,) isotropic B in angstrom^2. X-ray form factors from ``form_factor_table`` (electron
    units), or neutron scattering lengths (fm) with ``radiation="neutron"``. ``method``: "exact", "histogram" or
    "auto" (exact while n_pairs * n_Q <= ``EXACT_WORK_LIMIT``). ``bin_width`` (angstrom) for the histogram
    defaults to :func:`default_bin_width`. Returns I(Q) (P,) as float64 (or the dtype of a float tensor input),
    differentiable with respect to positions and a tensor biso.
    """
    positions = torch.as_tensor(positions)
    if not positions.is_floating_point():
        positions = positions.double()
    dtype, device = positions.dtype, positions.device
    numbers = torch.as_tensor(numbers, device=device).long()
    q = torch.as_tensor(q, dtype=dtype, device=device).reshape(-1)
    if positions.ndim != 2 or positions.shape[1] != 3 or numbers.shape != (positions.shape[0],):
        raise XtalsolveError("positions must be (M, 3) and numbers (M,)", "positions")
    if len(numbers) == 0:
        raise XtalsolveError("the particle has no atoms", "positions")
    if torch.any(q < 0) or not torch.all(torch.isfinite(q)):
        raise XtalsolveError("Q values must be finite and >= 0", "q")
    if radiation not in ("xray", "neutron"):
        raise XtalsolveError(f"unknown radiation kind {radiation!r}; use xray or neutron", "radiation")
    check_elements(numbers.cpu().numpy(), radiation)
    b = torch.as_tensor(biso, dtype=dtype, device=device)
    b = b.expand(len(numbers)) if b.numel() == 1 else b.reshape(-1)
    if b.shape != numbers.shape or torch.any(b < 0):
        raise XtalsolveError("biso must be a non-negative scalar or one value per atom", "biso")

    kind, kind_z, kind_b = _atom_kinds(numbers, b)
    n_kinds = len(kind_z)
    n_pairs = len(numbers) * (len(numbers) - 1) // 2
    if method == "auto":
        method = "exact" if n_pairs * q.numel() <= EXACT_WORK_LIMIT else "histogram"
    if method == "exact":
        sums = _pair_sinc_sums_exact(positions, kind, n_kinds, q)
    elif method == "histogram":
        width = default_bin_width(float(q.max())) if bin_width is None else float(bin_width)
        if not (0.0 < width <= 0.1):
            raise XtalsolveError(f"histogram bin width {bin_width!r} angstrom is outside 0-0.1", "bin_width")
        sums = _pair_sinc_sums_histogram(positions, kind, n_kinds, q, width)
    else:
        raise XtalsolveError(f"unknown Debye summation {method!r}; use auto, exact or histogram", "method")

    s2 = (q / (4.0 * math.pi)) ** 2
    if radiation == "xray":
        f = xray_form_factor(kind_z, s2, form_factor_table)  # (P, K)
    else:
        f = neutron_scattering_length(kind_z, dtype=dtype).expand(q.numel(), n_kinds)
    count = torch.bincount(kind, minlength=n_kinds).to(dtype)
    self_term = (f * f * count).sum(1)
    ff = f.unsqueeze(2) * f.unsqueeze(1)  # (P, K, K)
    debye_waller = torch.exp(-(kind_b.unsqueeze(1) + kind_b.unsqueeze(0)) * s2.view(-1, 1, 1))
    pair_term = 2.0 * (ff * debye_waller * sums.T.reshape(-1, n_kinds, n_kinds)).sum((1, 2))
    return self_term + pair_term


# --------------------------------------------------------------------------------------- patterns


def polarisation(two_theta_deg: torch.Tensor) -> torch.Tensor:
    """Polarisation 1 + cos^2 2theta of an unpolarised beam, normalised like the Bragg model's LP factor.

    ``xtalsolve.physics.powder.lorentz_polarisation`` is (1 + cos^2 2theta) / (sin^2 theta cos theta) (pymatgen's
    convention). The Debye sum is already the orientational average of a powder, so the Lorentz part
    1 / (sin^2 theta cos theta) is built in: the area of a Bragg peak of the pattern I(Q(2theta)) (1 + cos^2
    2theta), integrated over 2theta in radians, is m |F|^2 LP * N_cells lambda^3 / (16 pi V_cell). Multiplying by
    the full LP factor would count the Lorentz factor twice.
    """
    return 1.0 + torch.cos(torch.deg2rad(two_theta_deg)) ** 2


def nanoparticle_pattern(
    batch: CrystalBatch,
    grid: torch.Tensor,
    unit: str,
    diameter_A: float,
    wavelength: float = 1.54184,
    biso=0.0,
    center="atom",
    radiation: str = "xray",
    form_factor_table: str = "waasmaier-kirfel",
    method: str = "auto",
    bin_width: float | None = None,
) -> torch.Tensor:
    """Debye patterns (B, P) of spherical particles of diameter ``diameter_A`` cut from each crystal of ``batch``.

    ``grid`` is 2theta in degrees (``unit="2theta"``: I(Q) times the polarisation factor, see :func:`polarisation`;
    none for neutrons) or Q in 1/angstrom (``unit="q"``: I(Q) itself). biso (angstrom^2): scalar or (B, N) per
    site. Differentiable with respect to ``batch.lattice``, ``batch.frac`` and a tensor biso. Occupancies must be 1.
    """
    grid = torch.as_tensor(grid, dtype=batch.lattice.dtype, device=batch.lattice.device)
    if unit == "2theta":
        q = 4.0 * math.pi * torch.sin(torch.deg2rad(grid) / 2.0) / wavelength
    elif unit == "q":
        q = grid
    else:
        raise XtalsolveError(f"Debye patterns are computed on a 2theta or q grid, not {unit!r}", "unit")
    if torch.any(batch.mask & (batch.occupancy < 1.0 - 1e-9)):
        raise XtalsolveError("partially occupied sites: a particle needs an ordered crystal")
    b = torch.as_tensor(biso, dtype=grid.dtype, device=grid.device)
    per_site = b.numel() > 1
    if per_site and b.shape != batch.numbers.shape:
        raise XtalsolveError("biso must be a number or one value per site (B, N)", "biso")
    rows = []
    for k in range(len(batch)):
        keep = batch.mask[k]
        positions, site = particle_sites(batch.lattice[k], batch.frac[k][keep], diameter_A, center)
        b_atoms = b[k][keep][site] if per_site else b
        rows.append(
            debye_intensity(
                positions, batch.numbers[k][keep][site], q, b_atoms, form_factor_table, radiation, method, bin_width
            )
        )
    out = torch.stack(rows)
    if unit == "2theta" and radiation == "xray":
        out = out * polarisation(grid)
    return out


def simulate_nanoparticle(
    structures,
    diameter_A: float,
    wavelength: float = 1.54184,
    two_theta: tuple[float, float, float] | None = (5.0, 90.0, 0.02),
    q: tuple[float, float, float] | None = None,
    biso: float = 0.0,
    center="atom",
    radiation: str = "xray",
    form_factor_table: str = "waasmaier-kirfel",
) -> np.ndarray:
    """Powder patterns (n_structures, n_points) of spherical nanoparticles by the Debye equation.

    diameter_A: particle diameter in angstrom; wavelength in angstrom; two_theta = (min, max, step) in degrees or
    q = (min, max, step) in 1/angstrom (q takes precedence). Intensity per particle in electron units, times the
    polarisation factor on a 2theta grid (same convention as ``simulate_powder``; see :func:`polarisation`).
    """
    from pymatgen.core import Structure

    from xtalsolve.physics.powder import make_grid
    from xtalsolve.radiation import check_wavelength

    structures = [structures] if isinstance(structures, Structure) else list(structures)
    wavelength = check_wavelength(wavelength)
    diameter = _check_diameter(diameter_A)
    grid, unit = make_grid(None if q is not None else two_theta, q)
    out = np.empty((len(structures), len(grid)))
    with torch.no_grad():
        for k, structure in enumerate(structures):
            if not structure.is_ordered:
                raise XtalsolveError(
                    f"{structure.composition.reduced_formula} has partially occupied sites; "
                    "a particle needs an ordered crystal"
                )
            batch = CrystalBatch.from_structures([structure])
            out[k] = nanoparticle_pattern(
                batch, torch.as_tensor(grid), unit, diameter, wavelength, biso, center, radiation, form_factor_table
            )[0].numpy()
    return out
