"""Bragg powder diffraction of periodic crystals: batched, differentiable, structure in -> pattern out.

The model (kinematic, as in any Rietveld code):
    y(x) = sum_hkl  m_hkl |F_hkl|^2 LP(theta_hkl) Phi(x - x_hkl)
with every reflection inside the limiting sphere enumerated (so multiplicities come from enumeration, and
Friedel mates are folded, m = 2), F_hkl = sum_j occ_j f_j(s) exp(-B_j s^2) exp(2 pi i h.x_j), s = sin(theta)/lambda,
LP the Lorentz-polarisation factor and Phi a unit-area Thompson-Cox-Hastings pseudo-Voigt whose widths come from
the instrument (Caglioti U, V, W; Lorentzian X, Y), the crystallite size (Scherrer) and microstrain.

Written by hand in PyTorch (not taken from pymatgen) because the diffusion guidance and the Rietveld refinement
need gradients with respect to lattice, fractional coordinates, displacement and profile parameters, for many
structures at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch

from xtalsolve.crystal.batch import CrystalBatch, ragged_slots
from xtalsolve.errors import XtalsolveError
from xtalsolve.physics.profiles import check_derivatives, profile_widths, pseudo_voigt
from xtalsolve.physics.scattering import (
    check_elements,
    neutron_scattering_length,
    xray_form_factor,
    xray_form_factor_slope,
)
from xtalsolve.radiation import check_wavelength

Number = float | torch.Tensor


@dataclass(frozen=True)
class Instrument:
    """Diffractometer: wavelength (angstrom), radiation ("xray" or "neutron"), Caglioti U, V, W (deg^2,
    Gaussian), Lorentzian X (deg, X tan theta) and Y (deg, Y / cos theta), zero shift (deg 2theta), and the
    monochromator 2theta (deg) for the polarisation factor (None: unpolarised beam, no monochromator).
    A second line (e.g. Cu Kalpha2 at 1.54439 A) is added with intensity ratio ``ratio2`` when ``wavelength2``
    is set."""

    wavelength: float = 1.54184
    wavelength2: float | None = None
    ratio2: float = 0.5
    radiation: str = "xray"
    u: float = 0.0
    v: float = 0.0
    w: float = 0.0025
    x: float = 0.0
    y: float = 0.0
    zero_shift: float = 0.0
    monochromator_2theta: float | None = None

    @property
    def lines(self) -> list[tuple[float, float]]:
        """(wavelength in angstrom, intensity share) of each line: the first at 1, the second at ``ratio2``."""
        second = [(self.wavelength2, self.ratio2)] if self.wavelength2 is not None else []
        return [(self.wavelength, 1.0)] + second

    def __post_init__(self):
        check_wavelength(self.wavelength)
        if self.wavelength2 is not None:
            check_wavelength(self.wavelength2)
        if self.radiation not in ("xray", "neutron"):
            raise XtalsolveError(f"unknown radiation kind {self.radiation!r}; use xray or neutron")


@dataclass
class Reflections:
    """Enumerated reflections of a batch: hkl (B, H, 3) integer indices (one Friedel half), mask (B, H)."""

    hkl: torch.Tensor
    mask: torch.Tensor


def enumerate_reflections(lattice: torch.Tensor | np.ndarray, d_min: float) -> Reflections:
    """All hkl with d >= d_min (angstrom), one of each Friedel pair, for each cell of ``lattice`` (B, 3, 3).

    Integer bookkeeping, not differentiable: done once per lattice (a refinement enumerates from the start
    cell with a margin on d_min). The whole batch at once: for every (h, k) in a box that holds each cell's
    limiting sphere (|h| <= |a| / d_min, as |h| = |G.a| <= |G| |a|) the range of l inside the sphere is the
    root interval of the quadratic 1/d^2(l) = 1/d_min^2, so no l outside it is visited. Within a structure the
    reflections come in lexicographic (h, k, l) order with h > 0, or h = 0 and k > 0, or h = k = 0 and l > 0.
    """
    cells = np.asarray(torch.as_tensor(lattice).detach().cpu().double()).reshape(-1, 3, 3)
    g_max2 = (1.0 / d_min) ** 2 * (1 + 1e-12)
    n_cells = len(cells)
    b = np.floor(np.linalg.norm(cells, axis=2) / d_min + 1e-9).astype(int).max(0)
    m = np.linalg.inv(cells @ cells.transpose(0, 2, 1))  # reciprocal metrics: 1/d^2 = h.m.h
    h = np.arange(0, b[0] + 1, dtype=float)[None, :, None]
    k = np.arange(-b[1], b[1] + 1, dtype=float)[None, None, :]
    mm = lambda i, j: m[:, i, j].reshape(-1, 1, 1)  # noqa: E731
    constant = mm(0, 0) * h * h + mm(1, 1) * k * k + 2.0 * mm(0, 1) * h * k - g_max2  # (B, h, k)
    linear = 2.0 * (mm(0, 2) * h + mm(1, 2) * k)
    quadratic = mm(2, 2)
    root = np.sqrt(np.clip(linear * linear - 4.0 * quadratic * constant, 0.0, None))
    l_lo = np.ceil((-linear - root) / (2.0 * quadratic)) - 1  # one l of slack each side, cut exactly below
    l_hi = np.floor((-linear + root) / (2.0 * quadratic)) + 1
    l_lo = np.where((h == 0) & (k == 0), np.maximum(l_lo, 1), l_lo)  # one Friedel half
    count = np.where((h == 0) & (k < 0), 0, l_hi - l_lo + 1)  # h = 0 rows need k >= 0 (the other half)
    row, offset = ragged_slots(np.clip(count, 0, None).astype(np.int64).ravel())  # row of the (B, h, k) box
    at_row = lambda x: np.broadcast_to(x, constant.shape).ravel()[row]  # noqa: E731
    il = at_row(l_lo) + offset
    keep = at_row(constant) + il * (at_row(linear) + at_row(quadratic) * il) <= 0.0  # 1/d^2 <= 1/d_min^2
    owner, ih, ik = np.unravel_index(row[keep], constant.shape)
    hkl_flat = np.stack([ih, ik - b[1], il[keep]], axis=1).astype(np.int64)
    counts = np.bincount(owner, minlength=n_cells)
    n_max = max(1, int(counts.max()) if len(counts) else 1)
    slot = ragged_slots(counts)[1]
    hkl = np.zeros((n_cells, n_max, 3), dtype=np.int64)
    mask = np.zeros((n_cells, n_max), dtype=bool)
    hkl[owner, slot] = hkl_flat
    mask[owner, slot] = True
    return Reflections(torch.from_numpy(hkl), torch.from_numpy(mask))


def _per_structure(value: Number | None, batch_size: int, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) parameter as a (B, 1) tensor."""
    t = torch.as_tensor(0.0 if value is None else value, dtype=like.dtype, device=like.device)
    return t.reshape(-1, 1).expand(batch_size, 1) if t.numel() in (1, batch_size) else t


def species_per_structure(numbers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct atomic numbers of each structure, padded: species (B, E) and each site's index into it (B, N)."""
    elements, element_index = torch.unique(numbers, return_inverse=True)  # batch-wide, sorted
    present = torch.zeros(numbers.shape[0], len(elements), dtype=torch.long, device=numbers.device)
    present.scatter_(1, element_index, 1)
    rank = present.cumsum(1) - 1  # position of each present element among the structure's own
    site_species = torch.gather(rank, 1, element_index)
    species = torch.zeros(numbers.shape[0], int(present.sum(1).max()), dtype=numbers.dtype, device=numbers.device)
    species.scatter_(1, site_species, numbers)
    return species, site_species


class _LorentzPolarisation(torch.autograd.Function):
    """The Lorentz-polarisation factor with its closed-form derivative in theta (see lorentz_polarisation)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(theta, radiation, monochromator_2theta):
        return lorentz_polarisation(theta, radiation, monochromator_2theta)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output)
        ctx.save_for_forward(inputs[0], output)
        ctx.options = inputs[1:]

    @staticmethod
    def _slope(ctx):
        # d/dtheta of 1/(sin^2 cos) is (tan - 2 cot) times it; of (1 + c cos^2 2theta), -4 c cos 2theta sin 2theta
        theta, value = ctx.saved_tensors
        radiation, monochromator_2theta = ctx.options
        lorentz_slope = torch.tan(theta) - 2.0 / torch.tan(theta)
        if radiation == "neutron":
            return value * lorentz_slope
        c = 1.0 if monochromator_2theta is None else math.cos(math.radians(monochromator_2theta)) ** 2
        cos2, sin2 = torch.cos(2.0 * theta), torch.sin(2.0 * theta)
        return value * (lorentz_slope - 4.0 * c * cos2 * sin2 / (1.0 + c * cos2 * cos2))

    @staticmethod
    def jvp(ctx, d_theta, *_):
        return _LorentzPolarisation._slope(ctx) * d_theta

    @staticmethod
    def backward(ctx, grad):
        return _LorentzPolarisation._slope(ctx) * grad, None, None


def lorentz_polarisation(theta: torch.Tensor, radiation: str, monochromator_2theta: float | None,
                         derivatives: str = "autograd") -> torch.Tensor:
    """Lorentz-polarisation factor for powder diffraction.

    X-rays: (1 + c cos^2 2theta) / (sin^2 theta cos theta) * 2 / (1 + c), c = cos^2 2theta_m of the monochromator
    (c = 1 without one, which is pymatgen's convention). Neutrons: 1 / (sin^2 theta cos theta).
    ``derivatives`` "closed-form": the derivative in theta written out (cheaper in forward mode).
    """
    check_derivatives(derivatives)
    if derivatives == "closed-form":
        return _LorentzPolarisation.apply(theta, radiation, monochromator_2theta)
    lorentz = 1.0 / (torch.sin(theta) ** 2 * torch.cos(theta))
    if radiation == "neutron":
        return lorentz
    c = 1.0 if monochromator_2theta is None else math.cos(math.radians(monochromator_2theta)) ** 2
    return lorentz * (1.0 + c * torch.cos(2.0 * theta) ** 2) * 2.0 / (1.0 + c)


def scattering_factors(species: torch.Tensor, s2: torch.Tensor, table: str, slope: bool = False):
    """Scattering factors (B, H, E) of each structure's species (B, E) at s2 (B, H) (1/angstrom^2): X-ray form
    factors of ``table`` (electrons) or, for table "neutron", the bound coherent scattering lengths (fm);
    with ``slope``, also d f / d s2 (zero for neutrons)."""
    if table == "neutron":
        f = torch.nan_to_num(neutron_scattering_length(species, dtype=s2.dtype)).unsqueeze(1)
        f = f.expand(-1, s2.shape[1], -1)
        return (f, torch.zeros_like(f)) if slope else f
    f = xray_form_factor(species, s2, table)
    return (f, xray_form_factor_slope(species, s2, table)) if slope else f


def _structure_factor_parts(frac, s2, occupancy, biso, hkl, species, site_species, table):
    """The per-site pieces of F and the partial derivatives of |F|^2 (see :class:`_SquaredStructureFactor`)."""
    f, slope = scattering_factors(species, s2, table, slope=True)
    index = site_species.unsqueeze(1).expand(-1, s2.shape[1], -1)
    f_site, slope_site = torch.gather(f, 2, index), torch.gather(slope, 2, index)  # (B, H, N)
    phase = torch.bmm(hkl, (2.0 * math.pi) * frac.transpose(1, 2))
    cos_phase, sin_phase = torch.cos(phase), torch.sin(phase)
    if biso is None:
        debye_waller, b = torch.ones_like(f_site), 0.0
    else:
        debye_waller, b = torch.exp(-biso.unsqueeze(1) * s2.unsqueeze(-1)), biso.unsqueeze(1)
    fd = f_site * debye_waller  # d g / d occ
    g = occupancy.unsqueeze(1) * fd  # each site's weight in F
    f_real = (g * cos_phase).sum(-1, keepdim=True)
    f_imag = (g * sin_phase).sum(-1, keepdim=True)
    by_weight = 2.0 * (f_real * cos_phase + f_imag * sin_phase)  # d|F|^2 / d g
    by_phase = 2.0 * g * (f_imag * cos_phase - f_real * sin_phase)  # d|F|^2 / d (2 pi h.x)
    by_s2 = (by_weight * occupancy.unsqueeze(1) * debye_waller * (slope_site - b * f_site)).sum(-1)
    return by_phase, by_weight * fd, by_weight * g, by_s2


def _squared_structure_factor(frac, s2, occupancy, biso, hkl, species, site_species, table):
    """|F|^2 in plain torch operations (see :func:`squared_structure_factor`)."""
    # F = sum_e f_e(s) sum_{j in e} occ_j T_j(s) exp(2 pi i h.x_j): the geometric sums per species e are one
    # batched matrix product with the (B, N, E) matrix of occupancies by species, so that form factors are
    # evaluated once per species and never gathered onto sites
    f_species = scattering_factors(species, s2, table)
    bsz, n_sites = occupancy.shape
    occupancy_by_species = torch.zeros(bsz, n_sites, species.shape[1], dtype=s2.dtype, device=s2.device)
    occupancy_by_species.scatter_(2, site_species.unsqueeze(-1), occupancy.unsqueeze(-1))
    phase = torch.bmm(hkl, (2.0 * math.pi) * frac.transpose(1, 2))  # (B, H, N)
    cos_phase, sin_phase = torch.cos(phase), torch.sin(phase)
    if biso is not None:
        debye_waller = torch.exp(-biso.unsqueeze(1) * s2.unsqueeze(-1))
        cos_phase, sin_phase = cos_phase * debye_waller, sin_phase * debye_waller
    f_real = (torch.bmm(cos_phase, occupancy_by_species) * f_species).sum(-1)
    f_imag = (torch.bmm(sin_phase, occupancy_by_species) * f_species).sum(-1)
    return f_real**2 + f_imag**2


class _SquaredStructureFactor(torch.autograd.Function):
    """|F_h|^2 = |sum_j occ_j f_j(s2) exp(-B_j s2) exp(2 pi i h.x_j)|^2 with hand-written derivatives

        d|F|^2/dx_j   = 2 pi h  2 g_j (F_i cos_j - F_r sin_j),   g_j = occ_j f_j exp(-B_j s2)
        d|F|^2/docc_j = 2 f_j exp(-B_j s2) (F_r cos_j + F_i sin_j)
        d|F|^2/dB_j   = -s2 2 g_j (F_r cos_j + F_i sin_j)
        d|F|^2/ds2    = sum_j 2 occ_j exp(-B_j s2) (f_j' - B_j f_j) (F_r cos_j + F_i sin_j)

    for both reverse mode (the solver's gradients) and forward mode (the Rietveld Jacobian). Hand-written
    because forward-mode autograd pushed one dense tangent per refined parameter through every (B, H, N)
    intermediate of F; here a tangent costs one matrix product with the partials. The partials are recomputed
    from the inputs when a derivative is asked for, so a plain evaluation costs no more than before."""

    generate_vmap_rule = True

    @staticmethod
    def forward(frac, s2, occupancy, biso, hkl, species, site_species, table):
        return _squared_structure_factor(frac, s2, occupancy, biso, hkl, species, site_species, table)

    @staticmethod
    def setup_context(ctx, inputs, output):
        frac, s2, occupancy, biso, hkl, species, site_species, table = inputs
        ctx.save_for_backward(frac, s2, occupancy, biso, hkl, species, site_species)
        ctx.save_for_forward(frac, s2, occupancy, biso, hkl, species, site_species)
        ctx.table = table

    @staticmethod
    def backward(ctx, grad):
        frac, s2, occupancy, biso, hkl, species, site_species = ctx.saved_tensors
        by_phase, by_occ, by_g, by_s2 = _structure_factor_parts(frac, s2, occupancy, biso, hkl, species,
                                                                site_species, ctx.table)
        grads = [None] * 8
        if ctx.needs_input_grad[0]:
            grads[0] = (2.0 * math.pi) * torch.bmm((by_phase * grad.unsqueeze(-1)).transpose(1, 2), hkl)
        if ctx.needs_input_grad[1]:
            grads[1] = by_s2 * grad
        if ctx.needs_input_grad[2]:
            grads[2] = (by_occ * grad.unsqueeze(-1)).sum(1)
        if ctx.needs_input_grad[3]:
            grads[3] = -(by_g * (grad * s2).unsqueeze(-1)).sum(1)
        return tuple(grads)

    @staticmethod
    def jvp(ctx, d_frac, d_s2, d_occupancy, d_biso, *_):
        frac, s2, occupancy, biso, hkl, species, site_species = ctx.saved_tensors
        by_phase, by_occ, by_g, by_s2 = _structure_factor_parts(frac, s2, occupancy, biso, hkl, species,
                                                                site_species, ctx.table)
        tangent = torch.zeros_like(s2)
        if d_frac is not None:
            tangent = tangent + (2.0 * math.pi) * (torch.bmm(by_phase, d_frac) * hkl).sum(-1)
        if d_s2 is not None:
            tangent = tangent + by_s2 * d_s2
        if d_occupancy is not None:
            tangent = tangent + torch.bmm(by_occ, d_occupancy.unsqueeze(-1)).squeeze(-1)
        if d_biso is not None:
            tangent = tangent - s2 * torch.bmm(by_g, d_biso.unsqueeze(-1)).squeeze(-1)
        return tangent


def squared_structure_factor(frac: torch.Tensor, s2: torch.Tensor, occupancy: torch.Tensor,
                             biso: torch.Tensor | None, hkl: torch.Tensor, species: torch.Tensor,
                             site_species: torch.Tensor, table: str, derivatives: str = "autograd") -> torch.Tensor:
    """|F_hkl|^2 (B, H) of sites at ``frac`` (B, N, 3) with ``occupancy`` (B, N) and per-site B ``biso``
    (B, N, angstrom^2; None: no Debye-Waller factor), at s2 = (sin(theta)/lambda)^2 (B, H, 1/angstrom^2) of
    the reflections ``hkl`` (B, H, 3, float); ``species`` (B, E) and ``site_species`` (B, N) as from
    :func:`species_per_structure` (for neutrons: the sites' atomic numbers and arange(N)); ``table`` a form-factor
    table or "neutron". Differentiable in frac, s2, occupancy and biso. ``derivatives``: "autograd" (torch
    differentiates the operations; the cheaper reverse mode for batches of trial structures) or "closed-form"
    (:class:`_SquaredStructureFactor`; the cheaper forward mode, one tangent per refined parameter)."""
    check_derivatives(derivatives)
    if derivatives == "closed-form":
        return _SquaredStructureFactor.apply(frac, s2, occupancy, biso, hkl, species, site_species, table)
    return _squared_structure_factor(frac, s2, occupancy, biso, hkl, species, site_species, table)


def bragg_intensities(
    batch: CrystalBatch,
    reflections: Reflections,
    wavelength: float,
    biso: Number = 0.0,
    radiation: str = "xray",
    form_factors: str = "waasmaier-kirfel",
    monochromator_2theta: float | None = None,
    derivatives: str = "autograd",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bragg angles and integrated intensities of the enumerated reflections.

    biso: isotropic displacement B (angstrom^2), scalar, (B,) per structure or (B, N) per site.
    derivatives: how |F|^2 and the Lorentz-polarisation factor are differentiated (see
    :func:`squared_structure_factor`).
    Returns theta (B, H) in radians and intensity (B, H) = m |F|^2 LP (zero where masked or beyond 2theta = 180).
    """
    lattice, frac = batch.lattice, batch.frac
    bsz, n_sites = batch.numbers.shape
    hkl = reflections.hkl.to(device=lattice.device, dtype=lattice.dtype)
    inv_metric = torch.linalg.inv(lattice @ lattice.transpose(1, 2))
    g2 = torch.einsum("bhi,bij,bhj->bh", hkl, inv_metric, hkl)  # (1/d)^2
    s2 = 0.25 * g2
    sin_theta = 0.5 * wavelength * torch.sqrt(torch.clamp(g2, min=1e-30))
    valid = reflections.mask.to(lattice.device) & (sin_theta < 1.0 - 1e-9)
    theta = torch.asin(torch.where(valid, sin_theta, torch.full_like(sin_theta, 0.5)))

    if radiation == "neutron":
        species = batch.numbers
        site_species = torch.arange(n_sites, device=lattice.device).expand(bsz, n_sites)
        table = "neutron"
    else:
        species, site_species = species_per_structure(batch.numbers)
        table = form_factors
    b = torch.as_tensor(biso, dtype=lattice.dtype, device=lattice.device)
    if b.numel() == bsz * n_sites and b.dim() == 2:  # per-site Debye-Waller factors weight the sums
        f_squared = squared_structure_factor(frac, s2, batch.occupancy, b, hkl, species, site_species, table,
                                             derivatives)
    else:  # one B per structure: a factor on |F|^2
        f_squared = squared_structure_factor(frac, s2, batch.occupancy, None, hkl, species, site_species, table,
                                             derivatives)
        f_squared = f_squared * torch.exp(-2.0 * b.reshape(-1, 1) * s2)
    intensity = 2.0 * f_squared * lorentz_polarisation(theta, radiation, monochromator_2theta, derivatives)
    return theta, torch.where(valid, intensity, torch.zeros_like(intensity))


def march_dollase(
    lattice: torch.Tensor, hkl: torch.Tensor, axis_hkl, ratio: Number
) -> torch.Tensor:
    """March-Dollase preferred-orientation factor (B, H) of each reflection (W. A. Dollase, J. Appl. Cryst. 19,
    267 (1986)): (r^2 cos^2 a + sin^2 a / r)^(-3/2), a = angle between the reflection's normal and the
    preferred reciprocal-lattice direction ``axis_hkl``; r = 1 is a random powder, r < 1 platelets along it.
    Every equivalent reflection is enumerated, so no average over the form is needed."""
    inv_t = torch.linalg.inv(lattice).transpose(1, 2)  # rows: reciprocal vectors a*, b*, c*
    normals = torch.einsum("bhi,bij->bhj", hkl.to(lattice.dtype), inv_t)
    axis = torch.einsum("i,bij->bj", torch.as_tensor(axis_hkl, dtype=lattice.dtype, device=lattice.device), inv_t)
    cos2 = (torch.einsum("bhj,bj->bh", normals, axis) ** 2 / (
        (normals**2).sum(-1).clamp(min=1e-30) * (axis**2).sum(-1, keepdim=True)))
    r = _per_structure(ratio, lattice.shape[0], cos2)
    return (r * r * cos2 + (1.0 - cos2) / r) ** -1.5


def peak_shape(
    theta: torch.Tensor,
    wavelength: float,
    instrument: Instrument,
    size: Number | None = None,
    strain: Number = 0.0,
    u: Number | None = None,
    v: Number | None = None,
    w: Number | None = None,
    x: Number | None = None,
    y: Number | None = None,
    derivatives: str = "autograd",
) -> tuple[torch.Tensor, torch.Tensor]:
    """FWHM (degrees 2theta) and Lorentzian fraction of every reflection (TCH pseudo-Voigt).

    Gaussian: Caglioti U, V, W (deg^2) and microstrain; Lorentzian: crystallite size (Scherrer, angstrom; None =
    infinite) and X tan theta + Y / cos theta (deg). U..Y default to the instrument's; each may be a scalar
    tensor (refined) or (B,). ``derivatives`` "closed-form": the same widths by :func:`profile_widths` (cheaper
    in forward mode), else by autograd through the operations.
    """
    bsz = theta.shape[0]
    per = lambda value, default: _per_structure(default if value is None else value, bsz, theta)  # noqa: E731
    return profile_widths(theta, wavelength, per(u, instrument.u), per(v, instrument.v), per(w, instrument.w),
                          per(x, instrument.x), per(y, instrument.y), per(strain, 0.0),
                          None if size is None else per(size, None), derivatives)


def merge_coincident_peaks(theta: torch.Tensor, intensity: torch.Tensor, tolerance_deg: float = 2e-4):
    """Sum reflections that fall on the same 2theta (bins of ``tolerance_deg``, wider than float32 rounding of
    equivalent reflections, far narrower than any peak) and drop extinct ones.

    Not differentiable (it regroups); used where only the pattern is wanted, where it cuts rendering work by the
    multiplicity of each peak. Returns theta (B, H') and intensity (B, H'), zero-padded.
    """
    theta, intensity = theta.detach(), intensity.detach()
    live = intensity > 1e-10 * intensity.amax(1, keepdim=True).clamp(min=1e-300)
    far = torch.iinfo(torch.int64).max
    key = torch.where(live, torch.round(torch.rad2deg(2.0 * theta) / tolerance_deg).long(), torch.full_like(live, far, dtype=torch.int64))
    key, order = torch.sort(key, dim=1, stable=True)
    starts = torch.ones_like(key, dtype=torch.bool)
    starts[:, 1:] = key[:, 1:] != key[:, :-1]
    group = torch.cumsum(starts.long(), 1) - 1  # (B, H) index of each reflection's peak
    n_peaks = int(torch.where(key != far, group + 1, torch.zeros_like(group)).amax()) if key.numel() else 0
    n_peaks = max(n_peaks, 1)
    group = group.clamp(max=n_peaks - 1)
    kept = key != far
    merged = torch.zeros(theta.shape[0], n_peaks, dtype=intensity.dtype, device=intensity.device)
    merged.scatter_add_(1, group, torch.where(kept, torch.gather(intensity, 1, order), torch.zeros_like(intensity)))
    # each peak's position is its first reflection's; every other reflection writes to a spare last column
    centre = torch.full((theta.shape[0], n_peaks + 1), math.radians(45.0), dtype=theta.dtype, device=theta.device)
    centre.scatter_(1, torch.where(starts & kept, group, torch.full_like(group, n_peaks)), torch.gather(theta, 1, order))
    centre = centre[:, :n_peaks]
    return centre, merged


def render_peaks(
    grid: torch.Tensor, centres: torch.Tensor, areas: torch.Tensor, fwhm: torch.Tensor, eta: torch.Tensor, n_fwhm: float = 40.0
) -> torch.Tensor:
    """Sum of unit-area pseudo-Voigts times ``areas`` on an increasing ``grid`` (P,); peaks (B, H) -> (B, P).

    Each peak is evaluated only within a window of +-(3 + n_fwhm eta) FWHM (the Gaussian beyond 3 FWHM is below
    1e-10 of its height; the Lorentzian tails beyond n_fwhm hold < 1/(pi n_fwhm) of its area); a window as wide
    as the grid falls back to dense evaluation.
    """
    n_points = grid.shape[0]
    steps = torch.diff(grid) if n_points > 1 else torch.ones(1, dtype=grid.dtype)
    step, widest_step = float(steps.min()), float(steps.max())
    reach = (fwhm * (3.0 + n_fwhm * eta)).detach().max() if fwhm.numel() else 0.0
    half = int(math.ceil(float(reach) / step))
    bsz, n_peaks = centres.shape
    if n_peaks == 0:
        return torch.zeros(bsz, n_points, dtype=areas.dtype, device=areas.device)
    fwhm, eta, areas = fwhm.unsqueeze(-1), eta.unsqueeze(-1), areas.unsqueeze(-1)
    if 2 * half + 1 >= n_points:  # broad peaks: every point sees every peak
        return pseudo_voigt(grid.view(1, 1, -1) - centres.unsqueeze(-1), fwhm, eta, areas).sum(1)
    # grid with one sentinel point at each end: window points off the grid land there and are dropped
    padded = torch.cat([grid[:1] - step, grid, grid[-1:] + step])
    offsets = torch.arange(-half + 1, half + 2, device=grid.device)
    if widest_step - step <= 1e-3 * step:  # uniform grid: the index is arithmetic, no search needed
        first, mean_step = float(grid[0]), float(grid[-1] - grid[0]) / (n_points - 1)
        nearest = torch.ceil((centres.detach() - first) / mean_step).long()
    else:
        nearest = torch.searchsorted(grid, centres.detach().contiguous())
    index = (nearest.unsqueeze(-1) + offsets).clamp_(0, n_points + 1)
    values = pseudo_voigt(padded[index] - centres.unsqueeze(-1), fwhm, eta, areas)
    out = torch.zeros(bsz, n_points + 2, dtype=values.dtype, device=values.device)
    return out.scatter_add(1, index.reshape(bsz, -1), values.reshape(bsz, -1))[:, 1:-1]


CRYSTALLITE_SHAPES = ("lorentzian", "sphere", "cube")
"""Size-broadening models: "lorentzian" (Scherrer width in a TCH pseudo-Voigt, the usual Rietveld choice, which
also stands in for a spread of sizes) or the exact profile of one crystallite shape of size D: "sphere" of
diameter D, "cube" of edge D (the Laue interference function D sinc^2(D dQ / 2) of reflections along an edge)."""


def check_shape(shape: str) -> str:
    """``shape`` if it is one of :data:`CRYSTALLITE_SHAPES`, else a clear error."""
    if shape not in CRYSTALLITE_SHAPES:
        raise XtalsolveError(f"unknown crystallite shape {shape!r}; choose from {', '.join(CRYSTALLITE_SHAPES)}",
                             "--crystallite-shape")
    return shape


def _exact_profile(shape: str, size) -> bool:
    """Whether size broadening is rendered as the exact profile of ``shape`` (not the Lorentzian); checks it."""
    return check_shape(shape) != "lorentzian" and size is not None


def size_transfer(length: torch.Tensor, size, shape: str) -> torch.Tensor:
    """Fourier coefficients A(L) of the size-broadening profile of crystallites of ``size`` (angstrom; scalar or
    (B,)) at column lengths ``length`` (angstrom, (K,)): the common-volume function of the crystallite and its
    copy shifted by L, normalised to A(0) = 1 (so the profile has unit area). Returns (B, K) or (1, K).
    Sphere of diameter D: 1 - 3/2 (L/D) + 1/2 (L/D)^3; cube of edge D along an edge: 1 - L/D; both 0 beyond D
    (Warren, X-ray Diffraction, ch. 13). The profile in Q is the cosine transform of A(L)."""
    size = torch.as_tensor(size, dtype=length.dtype, device=length.device).reshape(-1, 1)
    t = (length.abs().unsqueeze(0) / size).clamp(max=1.0)
    if shape == "sphere":
        return 1.0 - 1.5 * t + 0.5 * t**3
    if check_shape(shape) == "cube":
        return 1.0 - t
    raise XtalsolveError("the Lorentzian has no finite-crystallite transfer function", "--crystallite-shape")


def render_binned(
    grid: torch.Tensor, centres: torch.Tensor, areas: torch.Tensor, fwhm: torch.Tensor, eta: torch.Tensor,
    oversample: int = 4, size=None, shape: str = "lorentzian",
) -> torch.Tensor:
    """Fast approximate rendering for training data and screening: sticks binned on a grid ``oversample`` times
    finer than the uniform ``grid`` (linear split between neighbouring bins keeps area and centroid), convolved
    by FFT with one pseudo-Voigt per pattern whose FWHM and eta are the intensity-weighted means of its peaks,
    then averaged over each grid point's bin (so that peaks narrower than the grid keep their area).

    Exact when all peaks of a pattern share one width, as Scherrer size broadening does on a Q grid; the Q
    dependence of strain and instrument widths is averaged. Not for refinement (use :func:`render_peaks`).

    ``shape`` "sphere" or "cube" (a Q grid, 1/angstrom): the size broadening of crystallites of ``size``
    angstrom is that exact profile, applied as its Fourier coefficients :func:`size_transfer` (the FFT's
    conjugate variable of Q is the column length L = 2 pi k / (n step)), so it is exact and never truncated;
    ``fwhm`` and ``eta`` then describe the other broadening only.
    """
    bsz = centres.shape[0]
    n_points = grid.shape[0]
    step = float(grid[1] - grid[0]) / oversample
    weight = areas / areas.sum(1, keepdim=True).clamp(min=1e-30)
    width = (weight * fwhm).sum(1, keepdim=True)
    mix = (weight * eta).sum(1, keepdim=True)
    shaped = _exact_profile(shape, size)
    if shaped:  # the remaining (instrument) peak may be narrower than a fine bin: keep it sampled, unit area
        width = width.clamp(min=2.0 * step)
    pad = n_points * oversample  # zero padding as long as the grid: no wrap-around of tails inside it
    n_fine = n_points * oversample + 2 * pad
    position = (centres - float(grid[0])) / step + pad
    lower = torch.floor(position)
    upper_share = position - lower
    hist = torch.zeros(bsz, n_fine, dtype=areas.dtype, device=areas.device)
    for index, share in ((lower, 1.0 - upper_share), (lower + 1, upper_share)):
        inside = (index >= 0) & (index < n_fine)
        hist.scatter_add_(1, index.clamp(0, n_fine - 1).long(), areas * share * inside)
    offsets = torch.arange(n_fine, dtype=areas.dtype, device=areas.device)
    offsets = torch.where(offsets < n_fine / 2, offsets, offsets - n_fine) * step  # circular, centred on 0
    kernel = pseudo_voigt(offsets.unsqueeze(0), width, mix)
    if shaped:
        kernel = kernel / (kernel.sum(1, keepdim=True) * step)
    spectrum = torch.fft.rfft(hist, n=n_fine) * torch.fft.rfft(kernel, n=n_fine)
    if shaped:
        length = 2.0 * math.pi * torch.arange(n_fine // 2 + 1, dtype=areas.dtype, device=areas.device) / (n_fine * step)
        spectrum = spectrum * size_transfer(length, size, shape)
    fine = torch.fft.irfft(spectrum, n=n_fine)
    start = pad - oversample // 2  # average each grid point's bin: peaks narrower than the grid keep their area
    return fine[:, start : start + n_points * oversample].reshape(bsz, n_points, oversample).mean(-1)


def powder_pattern(
    batch: CrystalBatch,
    grid: torch.Tensor,
    unit: str = "2theta",
    instrument: Instrument = Instrument(),
    size: Number | None = None,
    strain: Number = 0.0,
    biso: Number = 0.0,
    zero_shift: Number | None = None,
    form_factors: str = "waasmaier-kirfel",
    reflections: Reflections | None = None,
    n_fwhm: float = 40.0,
    merge: bool = False,
    profile: dict | None = None,
    preferred_orientation: tuple | None = None,
    binned: bool = False,
    shape: str = "lorentzian",
    oversample: int = 4,
) -> torch.Tensor:
    """Differentiable powder pattern (B, P) of a batch on ``grid`` (2theta in degrees or Q in 1/angstrom).

    Intensity is per unit x (peak areas are m |F|^2 LP); gradients flow to lattice, frac, biso, size, strain and
    zero shift. ``reflections`` may be passed to reuse an enumeration (e.g. during a refinement). ``merge``
    sums coincident reflections before rendering: faster, but cuts gradients to lattice and coordinates.
    ``profile`` may override the instrument's u, v, w, x, y with (refinable) tensors.
    ``preferred_orientation`` = (axis_hkl, ratio): March-Dollase texture along that reciprocal direction.
    ``binned`` renders with :func:`render_binned` (uniform grids; training data and screening), ``oversample``
    fine points per grid point.
    ``shape``: the size-broadening model (:data:`CRYSTALLITE_SHAPES`); "sphere" and "cube" need ``binned`` on a
    Q grid.
    """
    wavelength = instrument.wavelength
    grid = torch.as_tensor(grid, dtype=batch.lattice.dtype, device=batch.lattice.device)
    if instrument.wavelength2 is not None:  # doublet: the same crystal seen with both lines
        settings = dict(size=size, strain=strain, biso=biso, zero_shift=zero_shift, form_factors=form_factors,
                        reflections=reflections, n_fwhm=n_fwhm, merge=merge, profile=profile,
                        preferred_orientation=preferred_orientation, binned=binned, shape=shape,
                        oversample=oversample)
        line1 = replace(instrument, wavelength2=None)
        line2 = replace(instrument, wavelength=instrument.wavelength2, wavelength2=None)
        return powder_pattern(batch, grid, unit, line1, **settings) + instrument.ratio2 * powder_pattern(
            batch, grid, unit, line2, **settings
        )
    if reflections is None:
        reflections = enumerate_reflections(batch.lattice, _d_min_for(grid, unit, wavelength))
    theta, intensity = bragg_intensities(
        batch, reflections, wavelength, biso, instrument.radiation, form_factors, instrument.monochromator_2theta
    )
    if preferred_orientation is not None:
        axis_hkl, ratio = preferred_orientation
        intensity = intensity * march_dollase(batch.lattice, reflections.hkl.to(batch.lattice.device), axis_hkl, ratio)
    if merge:
        theta, intensity = merge_coincident_peaks(theta, intensity)
    return render_sticks(theta, intensity, grid, unit, instrument, size, strain, zero_shift, profile, binned, shape,
                         oversample, n_fwhm)


def render_sticks(theta: torch.Tensor, intensity: torch.Tensor, grid: torch.Tensor, unit: str, instrument: Instrument,
                  size: Number | None = None, strain: Number = 0.0, zero_shift: Number | None = None,
                  profile: dict | None = None, binned: bool = False, shape: str = "lorentzian", oversample: int = 4,
                  n_fwhm: float = 40.0) -> torch.Tensor:
    """Peaks at Bragg angles ``theta`` (B, H, radians) with integrated intensities (B, H) as a pattern (B, P) on
    ``grid`` (2theta deg or Q 1/angstrom) through one line (``instrument.wavelength``) of the instrument: the
    rendering half of :func:`powder_pattern`, with the same arguments."""
    wavelength = instrument.wavelength
    shaped = _exact_profile(shape, size)
    if shaped and not (binned and unit == "q"):
        raise XtalsolveError(f"the {shape} size profile is rendered on a uniform Q grid only (binned)")
    fwhm, eta = peak_shape(theta, wavelength, instrument, None if shaped else size, strain, **(profile or {}))
    zero = instrument.zero_shift if zero_shift is None else zero_shift
    two_theta = torch.rad2deg(2.0 * theta) + _per_structure(zero, theta.shape[0], theta)
    render = partial(render_binned, size=size, shape=shape, oversample=oversample) if binned \
        else partial(render_peaks, n_fwhm=n_fwhm)
    if unit == "2theta":
        return render(grid, two_theta, intensity, fwhm, eta)
    if unit == "q":
        half_angle = torch.deg2rad(two_theta) / 2.0
        q_centres = 4.0 * math.pi * torch.sin(half_angle) / wavelength
        q_fwhm = (2.0 * math.pi / wavelength) * torch.cos(half_angle) * torch.deg2rad(fwhm)
        return render(grid, q_centres, intensity, q_fwhm, eta)
    raise XtalsolveError(f"powder patterns are computed on a 2theta or q grid, not {unit!r}")


def _d_min_for(grid: torch.Tensor, unit: str, wavelength: float, margin_deg: float = 2.0) -> float:
    """Smallest d (angstrom) whose peak can reach the grid (upper end plus a margin for the tails)."""
    if unit == "q":
        q_max = float(grid.max()) + 4.0 * math.pi * math.sin(math.radians(margin_deg) / 2.0) / wavelength
        return max(2.0 * math.pi / q_max, wavelength / 2.0)
    two_theta_max = min(float(grid.max()) + margin_deg, 180.0)
    return wavelength / (2.0 * math.sin(math.radians(two_theta_max) / 2.0))


def make_grid(two_theta: tuple[float, float, float] | None = None, q: tuple[float, float, float] | None = None):
    """(grid, unit) from a (min, max, step) range in 2theta (degrees) or Q (1/angstrom), endpoints included."""
    if (two_theta is None) == (q is None):
        raise XtalsolveError("give exactly one of a 2theta range and a q range")
    lo, hi, step = two_theta if q is None else q
    unit = "2theta" if q is None else "q"
    upper = 180.0 if unit == "2theta" else 100.0
    if not (0.0 <= lo < hi <= upper and 0.0 < step <= hi - lo):
        raise XtalsolveError(f"bad {unit} range ({lo}, {hi}, {step}): need 0 <= min < max <= {upper} and 0 < step")
    n = int(round((hi - lo) / step)) + 1
    if n > 1_000_000:
        raise XtalsolveError(f"{unit} grid of {n} points is too fine (more than 1,000,000)")
    return lo + step * np.arange(n), unit


def simulate_powder(
    structures,
    wavelength: float = 1.54184,
    two_theta: tuple[float, float, float] | None = (5.0, 90.0, 0.02),
    q: tuple[float, float, float] | None = None,
    size: float | None = None,
    biso: float = 0.0,
    strain: float = 0.0,
    instrument: Instrument | None = None,
    radiation: str = "xray",
    form_factors: str = "waasmaier-kirfel",
    chunk_size: int = 32,
    dtype: torch.dtype = torch.float32,
    shape: str = "lorentzian",
) -> np.ndarray:
    """Powder patterns (n_structures, n_points) of pymatgen Structures, batched inside.

    wavelength in angstrom; two_theta = (min, max, step) in degrees, or q = (min, max, step) in 1/angstrom
    (q takes precedence); size = crystallite size in angstrom (None: no size broadening); shape = its profile
    (:data:`CRYSTALLITE_SHAPES`); biso in angstrom^2;
    strain = microstrain Delta d / d. ``instrument`` overrides wavelength/radiation and sets the resolution.
    The model of :func:`powder_pattern` (merged peaks), computed by its compiled pattern-only twin
    (:mod:`xtalsolve.physics.compiled`, float64) on torch's number of threads. Patterns whose size broadening
    spans many grid points are rendered on a uniform Q grid by FFT (:func:`render_binned`) in ``dtype``, in
    chunks of ``chunk_size`` structures.
    """
    from pymatgen.core import Structure

    from xtalsolve.physics import compiled

    structures = [structures] if isinstance(structures, Structure) else list(structures)
    if size is not None and not (np.isfinite(size) and size > 0):
        raise XtalsolveError(f"crystallite size must be a positive number of angstrom, not {size!r}", "--size")
    if not (np.isfinite(biso) and biso >= 0):
        raise XtalsolveError(f"B_iso must be >= 0 angstrom^2, not {biso!r}", "--biso")
    if instrument is None:
        instrument = Instrument(wavelength=wavelength, radiation=radiation)
    grid_np, unit = make_grid(None if q is not None else two_theta, q)
    if not structures:
        return np.zeros((0, len(grid_np)))
    # an exact shape profile is rendered on a uniform Q grid (render_binned)
    if not (_exact_profile(shape, size) or _is_broad(grid_np, unit, instrument.wavelength, size)):
        return compiled.powder_patterns(structures, grid_np, unit, instrument, size, strain, biso, form_factors)
    grid = torch.as_tensor(grid_np, dtype=dtype)
    settings = dict(size=size, strain=strain, biso=biso, form_factors=form_factors, shape=shape)
    return _size_broadened_via_q(structures, grid, unit, instrument, chunk_size, **settings).numpy()


def _is_broad(grid: np.ndarray, unit: str, wavelength: float, size: float | None, max_points: int = 400) -> bool:
    """Whether size-broadened Lorentzian windows (+-40 FWHM) would span more than ``max_points`` grid points."""
    if size is None or len(grid) < 2:
        return False
    q_fwhm = 2.0 * math.pi * 0.9 / size  # Scherrer width in Q, the same for every reflection
    if unit == "q":
        return 40.0 * q_fwhm / float(np.min(np.diff(grid))) > max_points
    two_theta_fwhm = np.degrees(0.9 * wavelength / (size * math.cos(math.radians(float(grid[-1]) / 2.0))))
    return 40.0 * two_theta_fwhm / float(np.min(np.diff(grid))) > max_points


def _size_broadened_via_q(structures, grid, unit, instrument, chunk_size, size, strain, biso, form_factors,
                          shape) -> torch.Tensor:
    """Broad (size-dominated) patterns rendered where Scherrer widths are constant: on a uniform Q grid by
    binning + FFT (:func:`render_binned`), then mapped to ``grid`` conserving area (y_2theta = y_Q dQ/d2theta).
    Exact for the size term; the slow angle dependence of the narrower instrument and strain widths is averaged.
    Bragg peaks (merged) from the compiled model, one line of the instrument at a time."""
    from xtalsolve.physics import compiled

    lines = instrument.lines
    q_target = grid if unit == "q" else torch.cat(
        [4.0 * math.pi * torch.sin(torch.deg2rad(grid) / 2.0) / lam for lam, _ in lines])  # every line's range
    q_lo, q_hi = float(q_target.min()), float(q_target.max())
    q_fwhm = 2.0 * math.pi * 0.9 / float(size)  # Scherrer width: sample it with >= 16 points
    n_q = int(min(max(16 * (q_hi - q_lo) / q_fwhm, 512), 4 * len(grid)))
    q_uniform = torch.linspace(q_lo, q_hi, n_q, dtype=grid.dtype)
    out = torch.zeros(len(structures), len(grid), dtype=grid.dtype)
    for lam, share in lines:
        single = replace(instrument, wavelength=lam, wavelength2=None)
        two_theta, intensity, _ = compiled.bragg_sticks(structures, lam, _d_min_for(q_uniform, "q", lam), biso,
                                                        instrument.radiation, form_factors,
                                                        instrument.monochromator_2theta)
        theta = torch.deg2rad(torch.as_tensor(two_theta, dtype=grid.dtype)) / 2.0
        intensity = torch.as_tensor(intensity, dtype=grid.dtype)
        y_q = torch.cat([render_sticks(theta[k : k + chunk_size], intensity[k : k + chunk_size], q_uniform, "q",
                                       single, size, strain, binned=True, shape=shape)
                         for k in range(0, len(structures), chunk_size)])
        if unit == "q":
            out = out + share * _interpolate(grid, q_uniform, y_q)
            continue
        q_of_grid = 4.0 * math.pi * torch.sin(torch.deg2rad(grid) / 2.0) / lam  # each line maps through its own
        jacobian = (2.0 * math.pi / lam) * torch.cos(torch.deg2rad(grid) / 2.0) * (math.pi / 180.0)
        out = out + share * _interpolate(q_of_grid, q_uniform, y_q) * jacobian
    return out


def _interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Row-wise linear interpolation of fp (B, M) given at increasing xp (M,) onto x (P,)."""
    index = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    weight = ((x - xp[index - 1]) / (xp[index] - xp[index - 1])).clamp(0.0, 1.0)
    return fp[:, index - 1] * (1.0 - weight) + fp[:, index] * weight


def bragg_peaks(
    structure,
    wavelength: float = 1.54184,
    two_theta_range: tuple[float, float] = (0.0, 90.0),
    biso: float = 0.0,
    radiation: str = "xray",
    form_factors: str = "waasmaier-kirfel",
    monochromator_2theta: float | None = None,
    tolerance_deg: float = 1e-5,
) -> list[dict]:
    """Integrated reflections of one Structure: [{"two_theta": deg, "d": angstrom, "intensity": m|F|^2 LP,
    "hkl": [(h, k, l), ...]}, ...], equivalent reflections (same 2theta within ``tolerance_deg``) merged and
    extinct ones (below 1e-10 of the strongest) left out; hkl lists one of each Friedel pair."""
    batch = CrystalBatch.from_structures([structure])
    check_elements(batch.numbers.numpy(), radiation)
    lo, hi = two_theta_range
    reflections = enumerate_reflections(batch.lattice, wavelength / (2.0 * math.sin(math.radians(min(hi, 180.0)) / 2.0)))
    with torch.no_grad():
        theta, intensity = bragg_intensities(
            batch, reflections, wavelength, biso, radiation, form_factors, monochromator_2theta
        )
    two_theta = np.degrees(2.0 * theta[0].numpy())
    intensity = intensity[0].numpy()
    hkl = reflections.hkl[0].numpy()
    keep = reflections.mask[0].numpy() & (two_theta >= lo) & (two_theta <= hi) & (intensity > 1e-10 * intensity.max())
    keys = np.round(two_theta[keep] / tolerance_deg).astype(np.int64)
    peaks: dict[int, dict] = {}
    for key, tt, value, index in zip(keys, two_theta[keep], intensity[keep], hkl[keep]):
        peak = peaks.setdefault(
            key, {"two_theta": float(tt), "d": wavelength / (2 * math.sin(math.radians(tt) / 2)), "intensity": 0.0, "hkl": []}
        )
        peak["intensity"] += float(value)
        peak["hkl"].append(tuple(int(i) for i in index))
    return [peaks[k] for k in sorted(peaks)]


def cluster_peaks(two_theta, intensity, tolerance_deg: float = 5e-5) -> tuple[np.ndarray, np.ndarray]:
    """Peak list with peaks closer than ``tolerance_deg`` summed (position of the first): makes stick lists of
    different codes comparable where near-coincident reflections were binned differently."""
    order = np.argsort(two_theta)
    tt, ii = np.asarray(two_theta, dtype=float)[order], np.asarray(intensity, dtype=float)[order]
    groups = np.split(np.arange(len(tt)), np.flatnonzero(np.diff(tt) > tolerance_deg) + 1)
    return np.array([tt[g[0]] for g in groups]), np.array([ii[g].sum() for g in groups])
