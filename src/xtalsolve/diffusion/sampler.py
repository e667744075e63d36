"""Reverse diffusion for a fixed composition: predictor-corrector sampling as in DiffCSP, with optional data
guidance at every step.

Per step t -> s: (1) Langevin corrector on the coordinates at t (step ``step_lr (sigma_t / sigma_min)^2``);
(2) predictor: ancestral DDPM step of the lattice 6-vector and the reverse variance-exploding step of the
coordinates, x_s = x_t + (sigma_t^2 - sigma_s^2) score + sqrt(sigma_t^2 - sigma_s^2) z; the last step lands on
the Tweedie estimate (no noise). With :class:`~xtalsolve.diffusion.guidance.DataGuidance`, the predictor's network
evaluation is done under autograd and the DPS gradient of the pattern mismatch is subtracted from the step.
"""

from __future__ import annotations

import torch
from pymatgen.core import Composition, Element

from xtalsolve.crystal.batch import CrystalBatch
from xtalsolve.diffusion.corruption import LatticeDiffusion, TorusDiffusion
from xtalsolve.diffusion.guidance import DataGuidance, PatternLoss, dps_gradients, fit_size, rms_normalise
from xtalsolve.diffusion.model import DenoiserFn
from xtalsolve.errors import XtalsolveError


def numbers_of(compositions) -> torch.Tensor:
    """(B, N) atomic numbers (0-padded, sorted by Z) of cell contents given as pymatgen Compositions or formulas
    of the whole cell (e.g. "Na4Cl4": Z is part of the request)."""
    rows = []
    for comp in compositions:
        try:
            comp = Composition(comp)
        except Exception as err:  # noqa: BLE001 - pymatgen raises several kinds for a bad formula
            raise XtalsolveError(f"not a composition: {comp!r} ({err})", "composition") from None
        amounts = {el: amt for el, amt in comp.element_composition.items()}
        if any(abs(a - round(a)) > 1e-6 for a in amounts.values()) or not amounts:
            raise XtalsolveError(f"cell content {comp.formula!r} must have whole numbers of atoms", "composition")
        rows.append(sorted(Element(str(el)).Z for el, a in amounts.items() for _ in range(round(a))))
    n = max(len(r) for r in rows)
    return torch.tensor([r + [0] * (n - len(r)) for r in rows], dtype=torch.long)


def sample(
    denoiser: DenoiserFn,
    numbers: torch.Tensor,
    n_steps: int,
    lattice: LatticeDiffusion,
    torus: TorusDiffusion,
    guidance: DataGuidance | None = None,
    generator: torch.Generator | None = None,
    corrector_steps: int = 1,
    step_lr: float = 1e-5,
    dtype: torch.dtype = torch.float32,
    lattice_clip: float = 4.0,
    trace: list | None = None,
) -> CrystalBatch:
    """Crystals (B,) with the atoms ``numbers`` (B, N) (0 = padding), by ``n_steps`` reverse steps.

    ``denoiser``: (numbers, frac, lattice 6-vector, t) -> (eps, normalised score), e.g.
    :func:`~xtalsolve.diffusion.model.conditional_denoiser` (prior only / conditioned / classifier-free).
    ``lattice_clip`` bounds the 6-vector where it is decoded (the guidance's clean estimates and the result:
    metric eigenvalues within exp(+-clip * scale) of the reference (N v_ref)^(2/3)). ``trace``, if a list, receives per-step diagnostics.
    """
    if n_steps < 1:
        raise XtalsolveError(f"need at least one reverse step, got {n_steps}", "n_steps")
    numbers = torch.as_tensor(numbers, dtype=torch.long)
    bsz = numbers.shape[0]
    mask = (numbers > 0).to(dtype)
    n_atoms = mask.sum(1)
    if bool((n_atoms == 0).any()):
        raise XtalsolveError("a requested composition has no atoms", "composition")
    lat = lattice.prior(bsz, generator, dtype)
    frac = torus.prior((bsz, numbers.shape[1], 3), generator, dtype) * mask[..., None]
    sigma_1 = torus.sigma(torch.tensor(0.0, dtype=dtype))

    fit_own_size = guidance is not None and isinstance(guidance.loss, PatternLoss) and guidance.loss.size is None
    n_guided = 0

    def clean_batch(lat_x0, frac_x0) -> CrystalBatch:
        cell = lattice.decode(lat_x0.clamp(-lattice_clip, lattice_clip), n_atoms)
        return CrystalBatch(cell, frac_x0, numbers, mask)

    for i in range(n_steps):
        t_val, s_val = 1.0 - i / n_steps, 1.0 - (i + 1) / n_steps
        t = torch.full((bsz,), t_val, dtype=dtype)
        s = torch.full((bsz,), s_val, dtype=dtype)
        sigma_t = torus.sigma(t)[:, None, None]

        for _ in range(corrector_steps if s_val > 0 else 0):
            with torch.no_grad():
                _, score_n = denoiser(numbers, frac, lat, t)
            step = step_lr * (sigma_t / sigma_1) ** 2
            noise = torch.randn(frac.shape, generator=generator, dtype=dtype)
            frac = torch.remainder(frac + step * torus.score(score_n, t) + (2 * step).sqrt() * noise, 1.0) * mask[..., None]

        weight = guidance.weight(t_val) if guidance is not None else 0.0
        if weight > 0:
            outputs = {}

            def clean_estimate(lat_state, frac_state, t=t, outputs=outputs):
                eps, score_n = denoiser(numbers, frac_state, lat_state, t)
                outputs["eps"], outputs["score_n"] = eps.detach(), score_n.detach()
                return clean_batch(lattice.predict_x0(lat_state, eps, t),
                                   torus.predict_x0(frac_state, torus.score(score_n, t), t))

            if fit_own_size and n_guided % max(guidance.refit_size_every, 1) == 0:
                with torch.no_grad():
                    eps, score_n = denoiser(numbers, frac, lat, t)
                    guidance.loss.size = fit_size(guidance.loss, clean_batch(
                        lattice.predict_x0(lat, eps, t), torus.predict_x0(frac, torus.score(score_n, t), t)))
            n_guided += 1
            g_lat, g_frac, value = dps_gradients(guidance.objective(t_val), clean_estimate, lat, frac)
            eps, score_n = outputs["eps"], outputs["score_n"]
            if trace is not None:
                trace.append({"t": t_val, "pattern_loss": value.tolist(), "grad_lattice": g_lat.norm(dim=1).tolist(),
                              "grad_frac": g_frac.flatten(1).norm(dim=1).tolist()})
        else:
            with torch.no_grad():
                eps, score_n = denoiser(numbers, frac, lat, t)

        with torch.no_grad():
            score = torus.score(score_n, t)
            abar_t, abar_s = lattice.alpha_bar(t)[:, None], lattice.alpha_bar(s)[:, None]
            lattice_std = (1.0 - abar_t / abar_s).clamp(min=0).sqrt()
            dvar = sigma_t**2 - (torus.sigma(s)[:, None, None] ** 2 if s_val > 0 else 0.0)
            if s_val > 0:
                lat_new = lattice.reverse_step(lat, eps, t, s, generator)
                noise = torch.randn(frac.shape, generator=generator, dtype=dtype)
                frac_new = frac + dvar * score + dvar.sqrt() * noise
            else:  # last step: the Tweedie estimates, without noise
                lat_new = lattice.predict_x0(lat, eps, t)
                frac_new = torus.predict_x0(frac, score, t)
            if weight > 0:
                lat_new = lat_new - weight * guidance.zeta_lattice * lattice_std * rms_normalise(g_lat)
                frac_new = frac_new - weight * guidance.zeta_frac * dvar.sqrt() * rms_normalise(g_frac * mask[..., None])
            lat = lat_new
            frac = torch.remainder(frac_new, 1.0) * mask[..., None]

    if fit_own_size:  # leave the loss as it came (fit again on the next call)
        guidance.loss.size = None
    cell = lattice.decode(lat.clamp(-lattice_clip, lattice_clip), n_atoms)
    return CrystalBatch(cell.detach(), frac.detach(), numbers, mask)


def generate_structures(model, compositions, n_steps: int = 200, pattern=None, mask=None, cfg_scale: float = 1.0,
                        guidance: DataGuidance | None = None, seed: int = 0, **options):
    """Public entry: pymatgen Structures for cell contents (formulas or Compositions), optionally conditioned on
    a pattern (B, P) on the model's Q grid and guided by the data. Thin wrapper over :func:`sample`."""
    from xtalsolve.diffusion.model import conditional_denoiser

    numbers = numbers_of(compositions)
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    batch = sample(conditional_denoiser(model, pattern, mask, cfg_scale), numbers, n_steps, model.lattice, model.torus,
                   guidance=guidance, generator=generator, **options)
    return batch.to(dtype=torch.float64).to_structures()
