"""Atomic pair distribution function G(r) of periodic crystals (optionally spherical nanoparticles): batched,
differentiable, structure in -> G(r) out.

The definition is that of PDFgui / diffpy.pdffit2 (Farrow et al., J. Phys.: Condens. Matter 19, 335219 (2007)):

    G(r) = 1 / (N r) sum_i sum_{j != i} (c_i c_j f_i f_j / <f>^2) T_ij(r)  -  4 pi r rho0

with i over the N = sum_i c_i atoms of one cell (c = occupancy), j over all atoms of the crystal, <f> = sum_i c_i f_i
/ N, rho0 = N / V_cell and T_ij a unit-area Gaussian centred on r_ij with variance

    sigma_ij^2 = (U_i + U_j) (1 - delta1 / r_ij - delta2 / r_ij^2 + qbroad^2 r_ij^2)

(isotropic U projected on the bond is U itself; delta1/delta2 sharpen near neighbours for correlated motion;
pairs whose bracket is <= 0 are dropped, as PDFfit2 does). Then G is multiplied by the resolution envelope
exp(-(qdamp r)^2 / 2) and, for particles, by the characteristic function of a sphere of diameter D,
gamma0(r) = 1 - 3/2 (r / D) + 1/2 (r / D)^3 for r < D, else 0 (PDFgui ``spdiameter``, diffpy.srfit SphericalCF).
With ``qmax`` the result is convolved with sin(Qmax r) / (pi r) (odd extension in r), i.e. its Fourier transform
is cut at Qmax: the termination ripples of a measured G(r). (PDFfit2 cuts by FFT of the one-sided G, without the
odd image, at a Qmax rounded to its FFT grid; it differs from the exact transform by up to ~0.6 % of the
peak-to-peak amplitude for Si at Qmax = 20 1/angstrom, and that is the residual of the validation against it.)
Weights f are Z for X-rays (f(Q = 0), as PDFgui uses) or the coherent neutron scattering lengths.

Written in torch (not calling PDFfit2 or diffpy.srreal) because fits and guidance need gradients with respect to
the lattice, fractional coordinates and U of many structures at once; validated against diffpy.pdffit2.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from xtalsolve.crystal.batch import CrystalBatch
from xtalsolve.errors import XtalsolveError
from xtalsolve.physics.scattering import check_elements, neutron_scattering_length

MEMORY_BUDGET = 4_000_000
"""Largest number of float64 elements (32 MB) of any intermediate array; loops chunk to stay below it."""

GAUSSIAN_REACH = 5.0
"""Peaks are evaluated within +-5 sigma (as PDFfit2); the part beyond holds < 6e-7 of a peak's area."""

QMAX_RIPPLES = 24
"""With ``qmax``, G is computed this many ripples (2 pi / Qmax) beyond the last requested r and tapered to zero
over the last half, so that the cut at Qmax sees no artificial edge (PDFfit2 extends by 6 ripples, untapered).
For a bulk crystal the ripples of reflections close to Qmax converge slowly with that range: with 24 ripples
G agrees with a calculation over 4-8 times the range to about 0.1 % of its peak-to-peak amplitude with qdamp =
0.03 or a 40 angstrom particle, and to 0.7 % for sharp peaks (U = 0.003) with no damping at all."""

GRID_STEP = 0.005
"""With ``qmax``, G is computed on the grid r_k = k h before the cut. A uniform r grid on multiples of its step
(<= 0.01 angstrom) is used as that grid; otherwise h = 0.005 angstrom and G is interpolated linearly onto r
(error < h^2 |G''| / 8: ~5e-4 of a peak of sigma = 0.07 angstrom)."""


# ------------------------------------------------------------------------------------------ inputs


def _as_batch(structures) -> CrystalBatch:
    if isinstance(structures, CrystalBatch):
        return structures
    return CrystalBatch.from_structures(structures)


def _per_site(value, batch: CrystalBatch, name: str) -> torch.Tensor:
    """A displacement parameter as (B, N): scalar, (B,), (B, N) or {element symbol: value}."""
    from pymatgen.core import Element

    dtype, device = batch.lattice.dtype, batch.lattice.device
    if isinstance(value, dict):
        table = torch.full((batch.numbers.max().item() + 1,), float("nan"), dtype=dtype, device=device)
        for symbol, u in value.items():
            try:
                table[Element(symbol).Z] = float(u)
            except (ValueError, KeyError):
                raise XtalsolveError(f"{symbol!r} is not an element", name) from None
        out = torch.where(batch.mask, table[batch.numbers], torch.zeros((), dtype=dtype, device=device))
        missing = batch.mask & torch.isnan(out)
        if missing.any():
            names = sorted({Element.from_Z(int(z)).symbol for z in batch.numbers[missing]})
            raise XtalsolveError(f"no value for {', '.join(names)}", name)
        return out
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.numel() == 1:
        return t.reshape(1, 1).expand(batch.numbers.shape)
    if t.shape == (len(batch),):
        return t.unsqueeze(1).expand(batch.numbers.shape)
    if t.shape == batch.numbers.shape:
        return t
    raise XtalsolveError(
        f"expected a number, one per structure, one per site or a dict; got shape {tuple(t.shape)}", name
    )


def _check_r(r) -> torch.Tensor:
    r = torch.as_tensor(r, dtype=torch.float64).reshape(-1)
    if r.numel() == 0 or not torch.all(torch.isfinite(r)):
        raise XtalsolveError("the r grid is empty or not finite", "r")
    if r.numel() > 1 and not torch.all(torch.diff(r) > 0):
        raise XtalsolveError("the r grid must increase", "r")
    if r[0] < 0 or r[-1] > 500.0:
        raise XtalsolveError(f"r must lie within 0-500 angstrom, got {float(r[0]):g}-{float(r[-1]):g}", "r")
    return r


# ------------------------------------------------------------------------------------ atom pairs


def _pairs_within(lattice: np.ndarray, frac: np.ndarray, r_lo: float, r_hi: float):
    """All ordered pairs (i, j, lattice shift n) with r_lo <= |(f_j + n - f_i) L| <= r_hi and i != j or n != 0.

    Fractional coordinates need not lie in [0, 1): shifts refer to the coordinates as given.
    """
    base = np.floor(frac)
    wrapped = frac - base
    reach = r_hi * np.linalg.norm(np.linalg.inv(lattice), axis=0)
    axes = [np.arange(-math.ceil(reach[k]) - 1, math.ceil(reach[k]) + 2) for k in range(3)]
    shifts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    # keep translations whose cell can hold a partner within r_hi of the home cell
    shifts = shifts[np.linalg.norm(shifts @ lattice, axis=1) <= r_hi + np.linalg.norm(lattice, axis=1).sum()]
    n_sites = len(frac)
    delta = (wrapped[None, :, :] - wrapped[:, None, :]).reshape(-1, 3)  # (N * N, 3): f_j - f_i
    found = []
    step = max(1, MEMORY_BUDGET // (3 * n_sites * n_sites))
    for start in range(0, len(shifts), step):
        n = shifts[start : start + step]
        dist = np.linalg.norm((delta[None, :, :] + n[:, None, :]) @ lattice, axis=-1)  # (T, N * N)
        t_idx, p_idx = np.nonzero((dist >= max(r_lo, 1e-6)) & (dist <= r_hi))
        found.append((p_idx // n_sites, p_idx % n_sites, n[t_idx]))
    i = np.concatenate([f[0] for f in found])
    j = np.concatenate([f[1] for f in found])
    n = np.concatenate([f[2] for f in found]) + base[i] - base[j]
    return i, j, n


# -------------------------------------------------------------------------------------- envelopes


def sphere_envelope(r: torch.Tensor, diameter) -> torch.Tensor:
    """Characteristic function gamma0(r) of a sphere of diameter D (angstrom): 1 - 3x/2 + x^3/2, x = r / D < 1."""
    x = r / diameter
    return torch.where(x < 1.0, 1.0 - 1.5 * x + 0.5 * x**3, torch.zeros_like(x))


def _qmax_cut(g: torch.Tensor, h: float, qmax: float) -> torch.Tensor:
    """Convolve G on the grid r_k = k h (B, K) with sin(Qmax r) / (pi r) after odd extension to -r.

    The integral is summed on the grid (exact to aliasing for a G sampled finely compared with its peaks), by FFT.
    """
    k = g.shape[1]
    odd = torch.cat([-g.flip(1)[:, :-1], g], 1)  # r from -(K-1) h to (K-1) h
    offsets = torch.arange(-(2 * k - 2), 2 * k - 1, dtype=g.dtype, device=g.device) * h
    safe = torch.where(offsets == 0, torch.ones_like(offsets), offsets)
    kernel = torch.where(
        offsets == 0, torch.full_like(offsets, qmax / math.pi), torch.sin(qmax * offsets) / (math.pi * safe)
    )
    n_fft = odd.shape[1] + kernel.numel() - 1
    conv = torch.fft.irfft(torch.fft.rfft(odd, n_fft) * torch.fft.rfft(kernel, n_fft), n_fft) * h
    # conv[m] is at offset m - (K-1) - (2K-2) from r = 0 (in steps of h); r_k = k h sits at index 3K - 3 + k
    return conv[:, 3 * k - 3 : 4 * k - 3]


# --------------------------------------------------------------------------------------------- G(r)


def pdf(
    structures,
    r,
    qmax: float | None = None,
    qdamp: float = 0.0,
    qbroad: float = 0.0,
    delta1: float = 0.0,
    delta2: float = 0.0,
    uiso=0.005,
    biso=None,
    particle_diameter_A: float | None = None,
    radiation: str = "xray",
) -> torch.Tensor:
    """G(r) in 1/angstrom^2 (B, R) of a list of pymatgen Structures or a CrystalBatch on ``r`` (R,) angstrom.

    qmax (1/angstrom, None: no termination), qdamp (1/angstrom), qbroad (1/angstrom), delta1 (angstrom), delta2
    (angstrom^2), uiso (angstrom^2; or biso = 8 pi^2 uiso) as a number, one per structure, (B, N) per site or
    {element: value}, particle_diameter_A (None: bulk), radiation "xray" (weights Z) or "neutron" (weights b).
    Differentiable with respect to the batch's lattice, frac and occupancy and to a tensor uiso.
    """
    batch = _as_batch(structures)
    dtype, device = batch.lattice.dtype, batch.lattice.device
    r = _check_r(r).to(dtype=dtype, device=device)
    if radiation not in ("xray", "neutron"):
        raise XtalsolveError(f"unknown radiation kind {radiation!r}; use xray or neutron", "radiation")
    check_elements(batch.numbers.cpu().numpy(), radiation)
    for name, value in (("qdamp", qdamp), ("qbroad", qbroad), ("delta1", delta1), ("delta2", delta2)):
        if not (math.isfinite(value) and value >= 0):
            raise XtalsolveError(f"{name} must be a number >= 0, got {value!r}", name)
    if qmax is not None and not (math.isfinite(qmax) and 1.0 <= qmax <= 100.0):
        raise XtalsolveError(f"qmax {qmax!r} 1/angstrom is outside 1-100", "qmax")
    if particle_diameter_A is not None and not (math.isfinite(particle_diameter_A) and particle_diameter_A > 0):
        raise XtalsolveError(f"particle diameter {particle_diameter_A!r} must be > 0", "particle_diameter_A")
    if biso is not None:
        u_site = _per_site(biso, batch, "biso") / (8.0 * math.pi**2)
    else:
        u_site = _per_site(uiso, batch, "uiso")
    if torch.any(batch.mask & ~(u_site > 0)):
        raise XtalsolveError("displacement parameters must be > 0 (G(r) peaks need a width)", "uiso")

    # where G is evaluated: r itself, or a uniform grid from 0 extended beyond r for the Qmax convolution
    if qmax is None:
        x, h, r_hi = r, None, float(r[-1])
    else:
        step = float(r[1] - r[0]) if r.numel() > 1 else GRID_STEP
        uniform = r.numel() > 1 and torch.allclose(torch.diff(r), torch.full_like(r[1:], step), rtol=1e-6, atol=1e-9)
        aligned = uniform and step <= 2 * GRID_STEP and abs(float(r[0]) / step - round(float(r[0]) / step)) < 1e-6
        h = step if aligned else GRID_STEP
        extension = QMAX_RIPPLES * 2.0 * math.pi / qmax
        r_hi = float(r[-1]) + extension
        x = torch.arange(math.ceil(r_hi / h) + 2, dtype=dtype, device=device) * h

    # scattering weights and densities per structure
    if radiation == "xray":
        f = batch.numbers.to(dtype)
    else:
        f = torch.nan_to_num(neutron_scattering_length(batch.numbers, dtype=dtype))
    c = batch.occupancy * batch.mask
    n_atoms = c.sum(1)  # (B,)
    f_mean = (c * f).sum(1) / n_atoms
    if torch.any(f_mean.abs() < 1e-6):
        raise XtalsolveError("the average scattering length is zero: G(r) is undefined", "radiation")
    weight = c * f / f_mean.unsqueeze(1)  # c_i f_i / <f>
    rho0 = n_atoms / batch.volume

    # pairs (detached search), then differentiable distances
    u_max = float(u_site.detach()[batch.mask].max())
    sigma_max = math.sqrt(2.0 * u_max * max(1.0, 1.0 + (qbroad * r_hi) ** 2))
    reach = GAUSSIAN_REACH * sigma_max
    b_idx, i_idx, j_idx, shift = [], [], [], []
    lattice_np = batch.lattice.detach().cpu().double().numpy()
    frac_np = batch.frac.detach().cpu().double().numpy()
    mask_np = batch.mask.cpu().numpy()
    for b in range(len(batch)):
        sites = np.nonzero(mask_np[b])[0]
        i, j, n = _pairs_within(lattice_np[b], frac_np[b][sites], float(x[0]) - reach, r_hi + reach)
        b_idx.append(np.full(len(i), b))
        i_idx.append(sites[i])
        j_idx.append(sites[j])
        shift.append(n)
    b_idx, i_idx, j_idx = (
        torch.as_tensor(np.concatenate(a), dtype=torch.long, device=device) for a in (b_idx, i_idx, j_idx)
    )
    shift = torch.as_tensor(np.concatenate(shift), dtype=dtype, device=device)

    # peak window: the grid points within +-reach of each pair distance
    window = int((torch.searchsorted(x, x + 2.0 * reach, right=True) - torch.arange(len(x), device=device)).max())
    offsets = torch.arange(window, device=device)
    n_x = len(x)
    peaks = torch.zeros(len(batch) * n_x, dtype=dtype, device=device)
    chunk = max(1, MEMORY_BUDGET // max(1, window))
    for start in range(0, len(b_idx), chunk):
        b, i, j = b_idx[start : start + chunk], i_idx[start : start + chunk], j_idx[start : start + chunk]
        cart = torch.einsum(
            "pk,pkl->pl", batch.frac[b, j] - batch.frac[b, i] + shift[start : start + chunk], batch.lattice[b]
        )
        dist = torch.linalg.norm(cart, dim=1)
        bracket = 1.0 - delta1 / dist - delta2 / dist**2 + (qbroad * dist) ** 2
        keep = bracket > 0
        sigma2 = (u_site[b, i] + u_site[b, j]) * torch.where(keep, bracket, torch.ones_like(bracket))
        amplitude = weight[b, i] * weight[b, j] * keep
        first = torch.searchsorted(x, (dist - reach).detach().contiguous())
        index = (first.unsqueeze(1) + offsets).clamp(max=n_x - 1)  # (P, W)
        inside = (first.unsqueeze(1) + offsets) < n_x
        z2 = (x[index] - dist.unsqueeze(1)) ** 2 / sigma2.unsqueeze(1)
        inside = inside & (z2.detach() <= GAUSSIAN_REACH**2)  # each peak cut at its own 5 sigma, as PDFfit2
        values = (amplitude / torch.sqrt(2.0 * math.pi * sigma2)).unsqueeze(1) * torch.exp(-0.5 * z2) * inside
        peaks = peaks.index_add(0, (b.unsqueeze(1) * n_x + index).reshape(-1), values.reshape(-1))
    peaks = peaks.view(len(batch), n_x)

    x_safe = torch.where(x > 0, x, torch.ones_like(x))
    g = torch.where(x > 0, peaks / (n_atoms.unsqueeze(1) * x_safe), torch.zeros_like(peaks))
    g = g - 4.0 * math.pi * rho0.unsqueeze(1) * x
    if qdamp > 0:
        g = g * torch.exp(-0.5 * (qdamp * x) ** 2)
    if particle_diameter_A is not None:
        g = g * sphere_envelope(x, particle_diameter_A)
    if qmax is None:
        return g

    # taper to zero over the last half of the extension, cut at Qmax, interpolate onto r
    start_taper = float(r[-1]) + 0.5 * extension
    phase = torch.clamp((x - start_taper) / (r_hi - start_taper), 0.0, 1.0)
    g = _qmax_cut(g * 0.5 * (1.0 + torch.cos(math.pi * phase)), h, qmax)
    position = r / h
    below = torch.floor(position).long().clamp(max=n_x - 2)
    t = position - below
    return g[:, below] * (1.0 - t) + g[:, below + 1] * t


def simulate_pdf(
    structures,
    r_min: float = 1.0,
    r_max: float = 30.0,
    r_step: float = 0.01,
    **settings,
) -> np.ndarray:
    """G(r) (n_structures, n_points) in 1/angstrom^2 of pymatgen Structures on r_min..r_max (angstrom, endpoints
    included) in steps of r_step; ``settings`` as for :func:`pdf` (qmax, qdamp, qbroad, delta1, delta2, uiso or
    biso, particle_diameter_A, radiation)."""
    from pymatgen.core import Structure

    structures = [structures] if isinstance(structures, Structure) else list(structures)
    if not (0.0 <= r_min < r_max and 0.0 < r_step <= r_max - r_min):
        raise XtalsolveError(f"bad r range ({r_min}, {r_max}, {r_step}): need 0 <= min < max and 0 < step", "r")
    n = round((r_max - r_min) / r_step) + 1
    if n > 1_000_000:
        raise XtalsolveError(f"r grid of {n} points is too fine (more than 1,000,000)", "r")
    r = r_min + r_step * np.arange(n)
    out = np.empty((len(structures), n))
    with torch.no_grad():
        for start in range(0, len(structures), 16):
            chunk = structures[start : start + 16]
            out[start : start + len(chunk)] = pdf(chunk, r, **settings).cpu().numpy()
    return out
