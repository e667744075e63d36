"""Guidance of the reverse diffusion: by the measured pattern (diffusion posterior sampling) and classifier-free.

Data guidance (DPS, Chung et al., ICLR 2023): at every reverse step the denoiser's estimate of the clean crystal
(Tweedie: x0-hat of the lattice 6-vector, frac + sigma^2 score for coordinates) is put through the differentiable
forward model :func:`xtalsolve.physics.powder.powder_pattern`; the measured pattern is compared after fitting, in
closed form, the free scale and a Chebyshev background (linear least squares, so these nuisances never enter the
gradient as unknowns); the gradient of the residual norm with respect to the *noisy* state (through the
denoiser, by autograd) steers the step. Two changes to plain DPS, explained in :class:`DataGuidance`: the step
length is set in units of the sampler's own noise (gradient direction only), and the comparison is coarse to
fine (both patterns blurred alike, less and less towards t = 0). Crystallite size is given or fitted, per
crystal, by a 1D search over log-size (:func:`fit_size`).

Everything here is a function of callables and tensors; the sampler decides when to call it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from xtalsolve.crystal.batch import CrystalBatch
from xtalsolve.physics.powder import Instrument, powder_pattern


def cfg_combine(cond, uncond, scale: float):
    """Classifier-free guidance: w * cond - (w - 1) * uncond for tensors or tuples of tensors (w = 1: conditional
    only, w = 0: unconditional only)."""
    if isinstance(cond, tuple | list):
        return tuple(cfg_combine(c, u, scale) for c, u in zip(cond, uncond))
    return scale * cond - (scale - 1.0) * uncond


def chebyshev_basis(grid: torch.Tensor, n_terms: int) -> torch.Tensor:
    """(P, n_terms) Chebyshev polynomials T_0..T_{n-1} on the grid mapped to [-1, 1]."""
    t = 2 * (grid - grid[0]) / (grid[-1] - grid[0]) - 1
    terms = [torch.ones_like(t), t][:n_terms]
    while len(terms) < n_terms:
        terms.append(2 * t * terms[-1] - terms[-2])
    return torch.stack(terms, dim=-1)


def gaussian_blur(y: torch.Tensor, sigma_points: float) -> torch.Tensor:
    """Convolve the last axis of ``y`` (..., P) with a unit-area Gaussian of std ``sigma_points`` grid steps,
    truncated at 4 std (zero padding: apply to masked data).

    By FFT, padded to the full linear-convolution length so nothing wraps around: the same numbers as a direct
    convolution, but the blurs of the coarse prescan are wide (kernels of hundreds of points), where the direct
    convolution of a whole batch of candidates took a fifth of a solve."""
    if sigma_points <= 0:
        return y
    half = math.ceil(4 * sigma_points)
    n = y.shape[-1]
    x = torch.arange(-half, half + 1, dtype=y.dtype, device=y.device)
    kernel = torch.exp(-0.5 * (x / sigma_points) ** 2)
    kernel = kernel / kernel.sum()
    length = n + 2 * half
    full = torch.fft.irfft(torch.fft.rfft(y, n=length) * torch.fft.rfft(kernel, n=length), n=length)
    return full[..., half : half + n]


def fit_scale_background(
    calc: torch.Tensor, observed: torch.Tensor, mask: torch.Tensor, basis: torch.Tensor, blur_points: float = 0.0,
    ridge: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best fit s * calc + basis @ c to ``observed`` on ``mask`` by linear least squares (differentiable in calc).

    calc, observed, mask: (B, P); basis: (P, K). With ``blur_points`` > 0 the fit is done after blurring
    observed, calc and every basis column (masked first) by the same Gaussian: blurring is linear, so this is
    the same model seen at lower resolution, whose mismatch is smooth in the lattice when peaks do not yet
    overlap. Returns the (blurred) observed and fitted patterns (B, P) and the coefficients (B, 1 + K), scale
    first. A small ridge keeps the normal equations regular when a pattern is flat.
    """
    m = mask.to(calc.dtype)
    design = torch.cat([calc.unsqueeze(-1), basis.unsqueeze(0).expand(calc.shape[0], -1, -1)], dim=-1) * m[..., None]
    observed = observed * m
    if blur_points > 0:
        design = gaussian_blur(design.transpose(1, 2), blur_points).transpose(1, 2)
        observed = gaussian_blur(observed, blur_points)
    w = m.unsqueeze(-1)
    normal = (design * w).transpose(1, 2) @ design
    normal = normal + ridge * torch.eye(normal.shape[-1], dtype=calc.dtype) * normal.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None]
    rhs = (design * w).transpose(1, 2) @ observed.unsqueeze(-1)
    coef = torch.linalg.solve(normal, rhs)
    return observed, (design @ coef).squeeze(-1), coef.squeeze(-1)


@dataclass
class PatternLoss:
    """Mismatch between crystals and a measured pattern on a uniform Q grid (1/angstrom).

    observed: (B, P) or (P,) normalised intensity; mask: same shape, the measured range; size: crystallite size in
    angstrom (float, (B,) tensor, or None = fit with :func:`fit_size`); biso in angstrom^2; shape: the
    size-broadening model (:data:`xtalsolve.physics.powder.CRYSTALLITE_SHAPES`); pool: each observed point is the
    maximum over ``pool`` equally spaced sub-points of its bin (:attr:`xtalsolve.pattern.Pattern.max_pool`), and
    the calculated pattern is rendered on those sub-points and pooled the same way. ``__call__`` returns the
    per-crystal residual norm sqrt(mean_mask (y - s calc - background)^2) (B,), differentiable in lattice and
    coordinates; with ``size=None`` the first call fits the size and keeps it (the sampler refits it during
    sampling and resets it to None afterwards).

    Two nuisances may be searched per crystal, the residual being the smallest over the trials (its gradient that
    of the best trial): ``biso_trials`` (angstrom^2, replaces ``biso``), an overall displacement parameter, and
    ``shift_trials``, zero offsets of the calculated pattern in whole sub-points (``grid step / pool``), -k..k.
    Both cost one rendering: an overall isotropic B multiplies every intensity by the same smooth envelope
    exp(-B Q^2 / 8 pi^2), so the pattern is rendered at B = 0 and each trial multiplies it (the envelope taken
    at the grid point rather than at each peak's centre: within a peak width of one); the shifts are windows of
    one rendering on a grid extended by k sub-points at either end. Why: a fixed B = 0.5 misweights the
    high-angle peaks of a pattern with another B (the PXRDnet protocol's have none), and a pattern whose zero
    is off by a fraction of a bin (that protocol's even-length convolution moves every peak by +0.002
    1/angstrom) penalises exactly the sharp patterns of the right crystal. The trials are made in the sharp
    comparison only (``blur`` 0): a blurred one cannot see a sub-point's offset and serves to place the cell,
    not to rank, and the blurred fits of the trials made the prescan of :mod:`xtalsolve.polish` 40 % slower.
    """

    grid: torch.Tensor
    observed: torch.Tensor
    mask: torch.Tensor
    instrument: Instrument = field(default_factory=Instrument)
    size: float | torch.Tensor | None = 100.0
    biso: float = 0.5
    n_background: int = 4
    size_candidates: tuple[float, ...] = (10.0, 20.0, 40.0, 80.0, 160.0, 400.0, 1000.0)
    shape: str = "lorentzian"
    pool: int = 1
    biso_trials: tuple[float, ...] | None = None
    shift_trials: int = 0
    _basis: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        self.grid = torch.as_tensor(self.grid, dtype=torch.float64)
        self._basis = chebyshev_basis(self.grid, self.n_background)

    def _targets(self, n: int, dtype):
        observed = torch.as_tensor(self.observed, dtype=dtype)
        mask = torch.as_tensor(self.mask).bool()
        if observed.dim() == 1:
            observed, mask = observed.expand(n, -1), mask.expand(n, -1)
        return observed, mask

    def residual(self, batch: CrystalBatch, size=None, blur: float = 0.0) -> torch.Tensor:
        """Residual norms (B,); ``blur``: Gaussian std (1/angstrom) applied to both patterns before comparing."""
        size = self.size if size is None else size
        if torch.is_tensor(size):
            size = size.to(batch.lattice.dtype)
        grid = self.grid.to(batch.lattice.dtype)
        step = float(self.grid[1] - self.grid[0])
        sub = step / self.pool
        # the sub-points of every bin, in order (P * pool,); they sample it finely enough that the renderer's own
        # oversampling can drop to 4 // pool
        offsets = (torch.arange(self.pool, dtype=grid.dtype) - (self.pool - 1) / 2.0) * sub
        points = (grid.unsqueeze(-1) + offsets).reshape(-1)
        sharp = blur == 0
        k = self.shift_trials if sharp else 0
        ends = torch.arange(1, k + 1, dtype=grid.dtype) * sub
        render = torch.cat([points[0] - ends.flip(0), points, points[-1] + ends])
        trials = self.biso_trials if sharp else None
        biso = self.biso if trials is None else 0.0
        calc = powder_pattern(batch, render, "q", self.instrument, size=size, biso=biso, binned=True,
                              shape=self.shape, oversample=max(1, 4 // self.pool))
        envelopes = [None] if trials is None else \
            [torch.exp(-b * points**2 / (8 * math.pi**2)) for b in trials]
        observed, mask = self._targets(len(batch), calc.dtype)
        basis = self._basis.to(calc.dtype)
        norms = []
        for j in range(-k, k + 1):  # calculated pattern moved by j sub-points
            window = calc[:, k - j : k - j + len(points)]
            for envelope in envelopes:
                trial = window if envelope is None else window * envelope
                if self.pool > 1:
                    trial = trial.reshape(len(batch), -1, self.pool).amax(-1)
                trial = trial / trial.detach().amax(1, keepdim=True).clamp(min=1e-30)
                seen, fitted, _ = fit_scale_background(trial, observed, mask, basis, blur / step)
                sq = ((seen - fitted) ** 2 * mask).sum(1) / mask.sum(1).clamp(min=1)
                norms.append(torch.sqrt(sq + 1e-12))
        return norms[0] if len(norms) == 1 else torch.stack(norms, 1).amin(1)

    def __call__(self, batch: CrystalBatch, blur: float = 0.0) -> torch.Tensor:
        if self.size is None:
            self.size = fit_size(self, batch)
        return self.residual(batch, blur=blur)


def fit_size(loss: PatternLoss, batch: CrystalBatch) -> torch.Tensor:
    """Per-crystal crystallite size (angstrom) minimising the residual over ``loss.size_candidates`` (log spaced),
    refined by one parabola through the best candidate and its neighbours in log size. No gradient."""
    with torch.no_grad():
        cands = torch.tensor(loss.size_candidates, dtype=torch.float64)
        res = torch.stack([loss.residual(batch, size=float(s)) for s in cands], dim=1).double()  # (B, S)
        best = res.argmin(1).clamp(1, len(cands) - 2)
        logs = torch.log(cands)
        y0, y1, y2 = (res.gather(1, (best + d)[:, None])[:, 0] for d in (-1, 0, 1))
        h = logs[1:].diff().mean() if len(cands) > 2 else torch.tensor(1.0, dtype=torch.float64)
        curvature = (y0 - 2 * y1 + y2).clamp(min=1e-12)
        offset = (0.5 * (y0 - y2) / curvature).clamp(-1.0, 1.0) * h
        return torch.exp(logs[best] + offset).to(batch.lattice.dtype)


@dataclass(frozen=True)
class DataGuidance:
    """DPS step settings: loss(CrystalBatch) -> (B,) residual norms. The step moves each field against the
    direction of its gradient by ``zeta`` times the standard deviation of the noise that reverse step injects
    (lattice 6-vector: sqrt(beta); coordinates: sqrt(sigma_t^2 - sigma_s^2)), the gradient normalised to unit
    RMS per crystal. Why not DPS's raw gradient: the mismatch gradient of a powder pattern spans orders of
    magnitude between crystals and times (it vanishes where peaks do not overlap), so a fixed step in units of
    the sampler's own noise is scale free and cannot throw the state out of the prior's typical set.
    ``schedule(t)`` weights the step over time (default: on for t <= t_start, off before, when the clean
    estimate is still meaningless); ``refit_size_every``
    reruns :func:`fit_size` every that many steps when the loss fits its own size. ``blur_max`` (1/angstrom):
    coarse-to-fine comparison, a Gaussian blur of both patterns shrinking linearly from blur_max at t_start to 0
    at t = 0 (sharp peaks of a wrong cell do not overlap the measured ones and give no gradient; blurred ones do)."""

    loss: Callable[[CrystalBatch], torch.Tensor]
    zeta_lattice: float = 1.0
    zeta_frac: float = 0.5
    t_start: float = 0.8
    schedule: Callable[[float], float] | None = None
    refit_size_every: int = 10
    blur_max: float = 0.3

    def blur_at(self, t: float) -> float:
        return self.blur_max * min(max(t / self.t_start, 0.0), 1.0) if self.t_start > 0 else 0.0

    def objective(self, t: float) -> Callable[[CrystalBatch], torch.Tensor]:
        """The loss the step at time t minimises (with the blur of that time, when the loss supports one)."""
        if isinstance(self.loss, PatternLoss):
            blur = self.blur_at(t)
            return lambda batch: self.loss(batch, blur=blur)
        return self.loss

    def weight(self, t: float) -> float:
        if self.schedule is not None:
            return float(self.schedule(t))
        return 1.0 if t <= self.t_start else 0.0


def dps_gradients(
    loss: Callable[[CrystalBatch], torch.Tensor],
    clean_estimate: Callable[[torch.Tensor, torch.Tensor], CrystalBatch],
    lattice_state: torch.Tensor,
    frac_state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum(loss(clean_estimate(lattice_state, frac_state))) w.r.t. the noisy states, and the loss.

    ``clean_estimate`` runs the denoiser and Tweedie's formula (so the gradient flows through the network, as
    DPS prescribes); the states are detached copies here, so the caller's tensors are not modified.
    """
    with torch.enable_grad():
        lat = lattice_state.detach().requires_grad_(True)
        frac = frac_state.detach().requires_grad_(True)
        value = loss(clean_estimate(lat, frac))
        g_lat, g_frac = torch.autograd.grad(value.sum(), [lat, frac], allow_unused=True)
    g_lat = torch.zeros_like(lat) if g_lat is None else torch.nan_to_num(g_lat)
    g_frac = torch.zeros_like(frac) if g_frac is None else torch.nan_to_num(g_frac)
    return g_lat.detach(), g_frac.detach(), value.detach()


def rms_normalise(g: torch.Tensor) -> torch.Tensor:
    """Per-crystal direction of a gradient (B, ...) scaled to unit root-mean-square component (zero stays zero)."""
    rms = g.flatten(1).pow(2).mean(1).sqrt()
    return g / torch.where(rms > 0, rms, torch.ones_like(rms)).view(-1, *([1] * (g.dim() - 1)))


__all__ = [
    "DataGuidance",
    "PatternLoss",
    "cfg_combine",
    "chebyshev_basis",
    "dps_gradients",
    "fit_scale_background",
    "fit_size",
    "gaussian_blur",
    "rms_normalise",
]
