"""Batched local fit of candidate crystals to a pattern, before they are ranked.

A sampled candidate of the right structure type usually has its cell a percent or two off and its atoms a tenth
of an angstrom away: its sharp peaks then miss the measured ones and its raw mismatch is no better than that of
a wrong structure. Ranking raw candidates therefore fails; ranking them after a short local fit does not.
Fitting every candidate with the full Rietveld engine (SciPy least squares per crystal) costs seconds each, so
this module fits all candidates at once: one autograd pass of the batched forward model per iteration, Adam on
a symmetric strain of the cell (rotation free, 6 numbers per crystal) and on the fractional coordinates, both
projected onto what the crystal's own space group allows (P1 for a candidate without symmetry), against
:class:`~xtalsolve.diffusion.guidance.PatternLoss` (free scale and background in closed form), compared coarse
to fine (both patterns blurred alike, the blur shrinking to zero), as the guidance does during sampling.
Written here rather than with SciPy because it must run on a whole batch with one gradient evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pymatgen.core import Structure

from xtalsolve.crystal.batch import CrystalBatch
from xtalsolve.diffusion.guidance import PatternLoss, fit_size


@dataclass(frozen=True)
class PolishSettings:
    """Adam iterations, learning rates (strain: dimensionless; coordinates: fractional units) and the blur
    (1/angstrom) at the first iteration, shrinking linearly to 0 at ``sharp_from`` of the way through. The first
    ``lattice_only`` fraction moves the cell only: peak positions depend on the cell alone, and coordinates
    moved to compensate a wrong cell end in a false minimum.

    Before the descent, trial cells are tried without gradients, in two stages: the cell as drawn,
    ``prescan_scalings`` isotropic scalings evenly spaced up to +-``prescan_scale`` in length (a drawn cell is
    mostly off in volume: these keep the shape of a nearly right one) and ``prescan_starts`` strains drawn
    uniformly in a box of half-width ``prescan_span`` (orthonormal coordinates of the crystal's allowed strain
    subspace), compared at blur ``prescan_blurs[0]``; then around each of the
    ``prescan_keep`` best, ``prescan_local_starts`` Gaussian steps of ``prescan_local_scale``, compared at
    ``prescan_blurs[1]``; the best is the start. A powder fit of the cell is multimodal (a peak can lock onto its
    neighbour), and a prototype's cell is not the compound's: its axes can be 20 % off in opposite directions
    (FeAs2 from the Rb2O type of Pnnm: a -20 %, c +9 %; ZnGaPS from NaCNO's R3m: c +17 %), far outside the basin
    that gradient descent can find, and out of reach of the earlier prescan (isotropic scalings of +-12 % and
    random strains of 6 %), which left the right type of 10 of the 26 PXRDnet materials missed at 100 A with a
    wrong cell. No scalings and no starts: no prescan. The descent then starts at a blur no coarser than
    ``prescan_blur``; ``max_strain`` bounds every strain component throughout.

    ``isotropic``: the cell keeps its shape and is only scaled (prescan and descent): for patterns too broad to
    fix a cell's shape (see ``SolveSettings.fit_structure``).

    ``forward_dtype``: precision of the patterns computed in the prescan and the descent (the parameters and the
    final residual, by which candidates are ranked, stay float64). float32 halves the time of the fit on this
    CPU (512 trial crystals against a 100 A PXRDnet-style pattern: 3.4 s -> 1.7 s), and its residuals agree with
    float64 to 1e-5 relative, well below the differences between trial cells that the fit has to tell apart.

    ``lr_strain`` is small because the prescan has already placed the cell within about a local step (2 % in
    length): Adam moves each parameter by about its learning rate per step whatever the gradient, and 0.01 threw
    a correctly placed cell out of the narrow minimum of a sharp measured pattern (MnS rock salt, lab Cu Kalpha:
    the minimum is +-0.5 % in a wide; the fitted a ended 7 % off and the true structure type ranked last)."""

    steps: int = 80
    lr_strain: float = 0.004
    lr_frac: float = 0.004
    blur_start: float = 0.3
    sharp_from: float = 0.7
    lattice_only: float = 0.4
    max_strain: float = 0.4
    refit_size_at: tuple[float, ...] = (0.0, 0.5)
    prescan_scalings: int = 24
    prescan_scale: float = 0.12
    prescan_starts: int = 72
    prescan_span: float = 0.25
    prescan_keep: int = 4
    prescan_local_starts: int = 8
    prescan_local_scale: float = 0.02
    prescan_blurs: tuple[float, float] = (0.15, 0.07)
    prescan_blur: float = 0.1
    isotropic: bool = False
    forward_dtype: torch.dtype = torch.float32


_ISOTROPIC = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
"""The strain parameters (Voigt order) of a uniform scaling of the cell."""


def _symmetric(params: torch.Tensor) -> torch.Tensor:
    """(B, 6) -> (B, 3, 3) symmetric strain (xx, yy, zz, yz, xz, xy)."""
    xx, yy, zz, yz, xz, xy = params.unbind(-1)
    return torch.stack([torch.stack([xx, xy, xz], -1), torch.stack([xy, yy, yz], -1),
                        torch.stack([xz, yz, zz], -1)], -2)


@dataclass(frozen=True)
class SymmetryProjectors:
    """Linear maps that keep a crystal's space group during the fit: ``strain`` (B, 6, 6) takes strain
    parameters to the part every point-group rotation leaves unchanged (R e R^T = e), ``shift`` (B, 3N, 3N) takes
    fractional shifts of the N sites to the part every operation maps onto itself (the group average of
    W delta moved to the image site). Identity for P1."""

    strain: torch.Tensor
    shift: torch.Tensor

    @classmethod
    def identity(cls, batch_size: int, n_sites: int) -> SymmetryProjectors:
        eye = lambda n: torch.eye(n, dtype=torch.float64).expand(batch_size, n, n)  # noqa: E731
        return cls(eye(6), eye(3 * n_sites))

    @classmethod
    def of(cls, structures: Sequence[Structure], n_sites: int, symprec: float = 1e-3) -> SymmetryProjectors:
        """Projectors of each structure's space group found by spglib at ``symprec`` (angstrom), padded to
        ``n_sites`` sites (padding rows are zero)."""
        strain = np.zeros((len(structures), 6, 6))
        shift = np.zeros((len(structures), 3 * n_sites, 3 * n_sites))
        for b, structure in enumerate(structures):
            strain[b], block = _projectors(structure, symprec)
            shift[b, : block.shape[0], : block.shape[1]] = block
        return cls(torch.from_numpy(strain), torch.from_numpy(shift))


_VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


def _projectors(structure: Structure, symprec: float) -> tuple[np.ndarray, np.ndarray]:
    """(6, 6) strain and (3N, 3N) fractional-shift projectors of one structure's space group (spglib)."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    n = len(structure)
    try:
        operations = SpacegroupAnalyzer(structure, symprec=symprec).get_symmetry_operations(cartesian=False)
    except Exception:  # noqa: BLE001 - spglib fails on degenerate cells: no symmetry to keep
        operations = []
    frac = structure.frac_coords
    lattice = structure.lattice.matrix  # rows a, b, c: cartesian = frac @ lattice
    strain = np.zeros((6, 6))
    shift = np.zeros((3 * n, 3 * n))
    used = 0
    for op in operations:
        w, t = op.rotation_matrix, op.translation_vector
        image = frac @ w.T + t
        gap = image[:, None, :] - frac[None, :, :]
        gap -= np.round(gap)
        distance = np.linalg.norm(gap @ lattice, axis=-1)
        target = distance.argmin(1)
        if distance[np.arange(n), target].max() > 10 * symprec or len(set(target)) < n:
            continue  # not an operation of these coordinates at this tolerance
        for i, j in enumerate(target):
            shift[3 * j : 3 * j + 3, 3 * i : 3 * i + 3] += w
        # the same rotation in cartesian coordinates acting on the row-vector strain: e -> R e R^T
        r = lattice.T @ w @ np.linalg.inv(lattice.T)
        for k, (p, q) in enumerate(_VOIGT):
            e = np.zeros((3, 3))
            e[p, q] = e[q, p] = 1.0
            rotated = r @ e @ r.T
            strain[:, k] += [rotated[a, c] for a, c in _VOIGT]
        used += 1
    if used == 0:
        return np.eye(6), np.eye(3 * n)
    return strain / used, shift / used


def free_parameters(structure: Structure, symprec: float = 0.01) -> int:
    """Structural degrees of freedom of ``structure`` in its space group (spglib at ``symprec`` angstrom):
    independent cell strains plus free fractional coordinates."""
    strain, shift = _projectors(structure, symprec)
    return int(np.linalg.matrix_rank(strain, tol=1e-6) + np.linalg.matrix_rank(shift, tol=1e-6))


def free_coordinates(structure: Structure, symprec: float = 1e-3) -> int:
    """Free fractional coordinates of ``structure`` in its space group (spglib at ``symprec`` angstrom)."""
    return int(np.linalg.matrix_rank(_projectors(structure, symprec)[1], tol=1e-6))


def _contacts_ok(lattice: torch.Tensor, frac: torch.Tensor, radii: torch.Tensor, factor: float) -> torch.Tensor:
    """(M,) True where no two atoms of the trial coordinates ``frac`` (M, N, 3) in the one cell ``lattice``
    (3, 3) are closer than ``factor`` x the sum of their radii (angstrom), over the 27 nearest cell images."""
    images = torch.cartesian_prod(*[torch.arange(-1.0, 2.0, dtype=frac.dtype)] * 3)  # (27, 3)
    gap = frac[:, :, None, :] - frac[:, None, :, :]
    gap = gap - torch.round(gap)
    cart = (gap[:, :, :, None, :] + images) @ lattice  # (M, N, N, 27, 3)
    distance = cart.norm(dim=-1)
    n = frac.shape[1]
    distance[:, torch.arange(n), torch.arange(n), 13] = torch.inf  # an atom and itself (image 0, 0, 0)
    limit = factor * (radii[:, None] + radii[None, :])
    return (distance.amin(-1) >= limit).all(-1).all(-1)


def scan_coordinates(structure: Structure, loss: PatternLoss, trials: int = 2048, keep: int = 4, seed: int = 0,
                     symprec: float = 1e-3, contact: float = 0.6, distinct: float = 0.05,
                     dtype: torch.dtype = torch.float32) -> list[Structure]:
    """The ``keep`` best of ``trials`` random placements of the atoms of ``structure`` within its space group
    (spglib at ``symprec`` angstrom), its cell fixed, by the residual of ``loss`` (sharp comparison, the
    crystallite size ``loss.size`` or fitted to ``structure``); the structure itself is trial 0. Placements with
    two atoms closer than ``contact`` x the sum of their atomic radii are skipped, and a placement is kept only
    if some atom is more than ``distinct`` (fractional) away from where every better kept one put it, up to a
    common translation.

    The direct-space grid search of classical structure solution, for models with few free coordinates: the
    local fit reaches the nearest minimum of a multimodal residual, and where an orbit sits on the wrong one of
    its free positions (ZnGaPS in R3m with P and S a third of the polar axis apart) no descent moves it across,
    while a few thousand placements cover a torus of up to three or four free coordinates densely. Placements
    are orthonormal coordinates of the allowed shifts drawn uniformly from a box much wider than one period and
    wrapped into the cell, so every free coordinate is close to uniform on its circle."""
    _, projector = _projectors(structure, symprec)
    u, singular, _ = np.linalg.svd(projector)
    basis = u[:, singular > 0.5]  # (3N, m) orthonormal basis of the symmetric shifts
    n = len(structure)
    rng = np.random.default_rng(seed)
    span = 10.0 * np.sqrt(3 * n)
    moves = rng.uniform(-span, span, size=(trials, basis.shape[1])) @ basis.T
    frac = np.remainder(structure.frac_coords[None] + moves.reshape(trials, n, 3), 1.0)
    frac[0] = structure.frac_coords
    lattice = torch.tensor(structure.lattice.matrix, dtype=torch.float64)
    frac = torch.as_tensor(frac)
    radii = torch.tensor([float(site.specie.atomic_radius or 1.5) for site in structure])
    fine = _contacts_ok(lattice, frac, radii, contact)
    fine[0] = True
    frac = frac[fine]
    one = CrystalBatch.from_structures([structure], dtype=torch.float64)
    with torch.no_grad():
        size = loss.size if loss.size is not None else fit_size(loss, one)
        size = torch.as_tensor(size, dtype=torch.float64).reshape(-1)[:1]
        residuals = []
        for lo in range(0, len(frac), 512):
            part = frac[lo:lo + 512]
            m = len(part)
            batch = CrystalBatch(lattice.expand(m, 3, 3), part, one.numbers.expand(m, -1),
                                 one.occupancy.expand(m, -1))
            residuals.append(torch.nan_to_num(loss.residual(batch.to(dtype=dtype), size=size.expand(m)),
                                              nan=np.inf))
        order = torch.cat(residuals).argsort()
    chosen = []  # the best placements that differ: near copies of one minimum would fill every slot
    for i in order.tolist():
        gap = frac[chosen] - frac[i] if chosen else None
        if gap is not None:  # a common translation (a free origin) does not make a placement new
            gap = gap - torch.round(gap)
            gap = gap - gap.mean(1, keepdim=True)
        if gap is None or ((gap - torch.round(gap)).abs().amax((1, 2)) > distinct).all():
            chosen.append(i)
            if len(chosen) == keep:
                break
    species = [site.species for site in structure]
    return [Structure(structure.lattice, species, frac[i].numpy(), properties=dict(structure.properties))
            for i in chosen]


def _trial_residuals(batch: CrystalBatch, loss: PatternLoss, strains: torch.Tensor, size: torch.Tensor, blur: float,
                     max_strain: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Residuals (B, K) of every crystal of ``batch`` under each of its K trial strains (B, K, 6), no gradients,
    the patterns computed in ``dtype``; evaluated in chunks of about 512 crystals (memory)."""
    bsz, k = strains.shape[:2]
    residuals = torch.empty(bsz, k, dtype=torch.float64)
    chunk = max(1, 512 // bsz)
    for lo in range(0, k, chunk):
        part = strains[:, lo:lo + chunk]
        c = part.shape[1]
        deform = torch.eye(3, dtype=torch.float64) + _symmetric(part.clamp(-max_strain, max_strain))
        trial = CrystalBatch((batch.lattice[:, None] @ deform).reshape(-1, 3, 3), batch.frac.repeat_interleave(c, 0),
                             batch.numbers.repeat_interleave(c, 0), batch.occupancy.repeat_interleave(c, 0))
        value = loss.residual(trial.to(dtype=dtype), size=size.repeat_interleave(c), blur=blur)
        residuals[:, lo:lo + c] = torch.nan_to_num(value, nan=np.inf).reshape(bsz, c)
    return residuals


def prescan_strain(batch: CrystalBatch, loss: PatternLoss, symmetry: SymmetryProjectors,
                   settings: PolishSettings, seed: int = 0) -> torch.Tensor:
    """Starting strain parameters (B, 6): per crystal the best trial cell of the two-stage search described in
    :class:`PolishSettings` (a wide uniform box, then local steps around the best few), no gradients. The
    crystallite size is fitted once per crystal first when ``loss`` has none."""
    bsz = len(batch)
    gen = torch.Generator().manual_seed(seed)
    basis, singular, _ = torch.linalg.svd(symmetry.strain)  # orthonormal basis of the allowed strains
    basis = basis * (singular > 0.5).to(basis.dtype)[:, None, :]
    scalings = torch.linspace(-settings.prescan_scale, settings.prescan_scale, settings.prescan_scalings,
                              dtype=torch.float64)
    isotropic = ((torch.exp(scalings) - 1.0)[:, None] * _ISOTROPIC).expand(bsz, -1, -1)  # the cell's shape kept
    box = (torch.rand(bsz, settings.prescan_starts, 6, generator=gen, dtype=torch.float64) * 2 - 1) \
        * settings.prescan_span
    wide = torch.cat([isotropic, torch.einsum("bij,bkj->bki", basis, box)], 1)
    wide[:, 0] = 0.0  # the cell as drawn, in place of the smallest scaling
    keep = min(settings.prescan_keep, wide.shape[1])
    with torch.no_grad():
        size = loss.size if loss.size is not None else fit_size(loss, batch)
        size = torch.as_tensor(size, dtype=torch.float64).reshape(-1).expand(bsz)
        best = _trial_residuals(batch, loss, wide, size, settings.prescan_blurs[0], settings.max_strain,
                                settings.forward_dtype)
        centres = wide[torch.arange(bsz)[:, None], best.topk(keep, largest=False).indices]  # (B, keep, 6)
        n_local = max(settings.prescan_local_starts, 1)
        steps = torch.randn(bsz, keep * n_local, 6, generator=gen, dtype=torch.float64) * settings.prescan_local_scale
        local = centres.repeat_interleave(n_local, 1) + torch.einsum("bij,bkj->bki", basis, steps)
        local[:, ::n_local] = centres  # each kept cell itself
        residuals = _trial_residuals(batch, loss, local, size, settings.prescan_blurs[1], settings.max_strain,
                                     settings.forward_dtype)
    return local[torch.arange(bsz), residuals.argmin(1)]


def polish_batch(batch: CrystalBatch, loss: PatternLoss, settings: PolishSettings = PolishSettings(),
                 symmetry: SymmetryProjectors | None = None, seed: int = 0) -> tuple[CrystalBatch, torch.Tensor]:
    """Fit every crystal of ``batch`` to ``loss``'s pattern (cell strain + coordinates, kept in each crystal's
    space group by ``symmetry``, default P1); returns the fitted batch and its final (unblurred) residual norms
    (B,). ``loss.size`` None: the crystallite size is fitted per crystal at the fractions
    ``settings.refit_size_at`` of the run and left set on the returned batch's loss. ``seed``: of the prescan's
    random trial cells."""
    batch = batch.to(dtype=torch.float64)
    own_size = loss.size is None
    bsz, n_sites = batch.numbers.shape
    symmetry = symmetry or SymmetryProjectors.identity(bsz, n_sites)
    if settings.isotropic:  # strain parameters projected onto a uniform scaling of the cell
        symmetry = SymmetryProjectors(torch.outer(_ISOTROPIC, _ISOTROPIC).div(3.0).expand(bsz, 6, 6),
                                      symmetry.shift)
    blur_start = settings.blur_start
    if settings.prescan_starts > 0 or settings.prescan_scalings > 0:
        start = prescan_strain(batch, loss, symmetry, settings, seed)
        blur_start = min(blur_start, settings.prescan_blur)  # the prescan placed the cell: no coarser than it
    else:
        start = torch.zeros(len(batch), 6, dtype=torch.float64)
    strain = start.clone().requires_grad_(True)
    shift = torch.zeros_like(batch.frac, requires_grad=True)
    optimiser = torch.optim.Adam([{"params": [strain], "lr": settings.lr_strain},
                                  {"params": [shift], "lr": settings.lr_frac}])
    mask = batch.mask.to(torch.float64)[..., None]
    refit_steps = {int(f * settings.steps) for f in settings.refit_size_at}

    def current() -> CrystalBatch:
        eye = torch.eye(3, dtype=torch.float64)
        allowed = torch.bmm(symmetry.strain, strain.unsqueeze(-1)).squeeze(-1)
        deform = eye + _symmetric(allowed.clamp(-settings.max_strain, settings.max_strain))
        moved = torch.bmm(symmetry.shift, shift.reshape(bsz, -1, 1)).reshape(bsz, n_sites, 3)
        return CrystalBatch(batch.lattice @ deform, batch.frac + moved * mask, batch.numbers, batch.occupancy)

    try:
        for step in range(settings.steps):
            if own_size and step in refit_steps:
                loss.size = None
                with torch.no_grad():
                    loss.size = fit_size(loss, current())
            progress = step / max(settings.steps * settings.sharp_from, 1)
            blur = blur_start * max(1.0 - progress, 0.0)
            optimiser.zero_grad()
            value = loss(current().to(dtype=settings.forward_dtype), blur=blur)
            value.sum().backward()
            for p in (strain, shift):
                if p.grad is not None:
                    p.grad = torch.nan_to_num(p.grad)
            if step < settings.lattice_only * settings.steps:
                shift.grad = None
            optimiser.step()
        with torch.no_grad():
            fitted = current()
            final = loss(fitted)
    finally:
        if own_size:
            loss.size = None
    out = CrystalBatch(fitted.lattice.detach(), torch.remainder(fitted.frac.detach(), 1.0) * mask,
                       batch.numbers, batch.occupancy)
    return out, final.detach()


def polish(structures: Sequence[Structure], loss: PatternLoss, settings: PolishSettings = PolishSettings(),
           chunk: int = 64, seed: int = 0) -> tuple[list[Structure], np.ndarray]:
    """Public entry: fit pymatgen ``structures`` to the pattern of ``loss``, each within its own space group
    (spglib, 1e-3 angstrom); returns the fitted structures and their residual norms, in the input order. Done
    in chunks of ``chunk`` crystals (memory). The fit is multimodal and its prescan random: another ``seed``
    can end a crystal in another minimum (how the solver restarts its best candidates)."""
    fitted, residuals = [], []
    for start in range(0, len(structures), chunk):
        part = list(structures[start:start + chunk])
        batch = CrystalBatch.from_structures(part, dtype=torch.float64)
        out, res = polish_batch(batch, loss, settings, SymmetryProjectors.of(part, batch.numbers.shape[1]), seed)
        fitted += out.to_structures()
        residuals.append(res.numpy())
    return fitted, np.concatenate(residuals) if residuals else np.zeros(0)


__all__ = ["PolishSettings", "SymmetryProjectors", "free_coordinates", "free_parameters", "polish", "polish_batch",
           "scan_coordinates"]
