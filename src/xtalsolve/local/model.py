"""Spectrum-conditioned E(3)-equivariant diffusion (EDM, Hoogeboom et al. 2022) over the absorber's first shell.

The absorber sits at the origin and is a fixed node of the graph; the M first-shell atoms carry positions x (M, 3,
angstrom) and one-hot species h (M, S). Both are noised with a variance-preserving schedule and an EGNN
(Satorras et al. 2021) predicts the noise; positions are updated only along difference vectors, so the denoiser is
equivariant under rotations and reflections about the absorber (E(3) with the absorber pinned to the origin). M is
drawn from a categorical p(M | spectrum) learned by a small MLP. The spectrum (normalised mu on an edge-aligned grid)
enters every layer through an MLP embedding. Written by hand (not e3nn) because the graph has < 10 nodes and EGNN
needs only distances and difference vectors.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from xtalsolve.errors import XtalsolveError
from xtalsolve.local.clusters import Cluster, first_shell_indices
from xtalsolve.local.library import SpectrumLibrary

# One-hot species channels of the model; elements not listed share the last channel.
SPECIES = ("O", "Si", "Fe", "Al", "Mg", "Ca", "Na", "K", "other")


def species_index(symbol: str) -> int:
    return SPECIES.index(symbol) if symbol in SPECIES else len(SPECIES) - 1

X0_CLIP_A = 6.0  # predicted clean positions are clipped to this box (angstrom) during sampling
H_SCALE = 0.25  # EDM scales one-hot species by 0.25 so that positions dominate the early denoising


@dataclass
class EDMConfig:
    n_features: int = 121
    max_atoms: int = 8
    n_species: int = len(SPECIES)
    hidden: int = 96
    layers: int = 4
    cond_dim: int = 64
    steps: int = 500
    grid: list = field(default_factory=list)
    absorber: str = "Si"
    ligand: str = "O"
    edge: str = "K"


def noise_schedule(steps: int, s: float = 1e-5, power: float = 2.0) -> torch.Tensor:
    """EDM polynomial schedule: alpha_bar(t) = (1 - (t/T)^2)^2, clipped; returns alpha_bar for t = 0..T."""
    t = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    a = (1 - t**power) ** 2
    a = a.clamp(min=1e-5)
    # clip consecutive ratios for stability (as in EDM)
    ratio = (a[1:] / a[:-1]).clamp(min=1e-3, max=1.0)
    a = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(ratio, 0)])
    return ((1 - 2 * s) * a + s).float()


class EGNNLayer(nn.Module):
    def __init__(self, hidden: int, cond_dim: int):
        super().__init__()
        self.edge = nn.Sequential(nn.Linear(2 * hidden + 1 + cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                  nn.SiLU())
        self.coord = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1, bias=False))
        self.node = nn.Sequential(nn.Linear(2 * hidden + cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        nn.init.xavier_uniform_(self.coord[-1].weight, gain=0.001)

    def forward(self, h, x, mask, move, cond):
        # h (B, N, H), x (B, N, 3), mask (B, N) 1 for real nodes, move (B, N) 1 where x may change, cond (B, C)
        B, N, _ = h.shape
        diff = x[:, :, None, :] - x[:, None, :, :]
        d2 = (diff**2).sum(-1, keepdim=True)
        pair = mask[:, :, None] * mask[:, None, :] * (1 - torch.eye(N, device=h.device))[None]
        c = cond[:, None, None, :].expand(B, N, N, cond.shape[-1])
        m = self.edge(torch.cat([h[:, :, None].expand(B, N, N, h.shape[-1]),
                                 h[:, None].expand(B, N, N, h.shape[-1]), d2, c], -1)) * pair[..., None]
        x = x + move[..., None] * (diff / ((d2 + 1e-8).sqrt() + 1.0) * self.coord(m) * pair[..., None]).sum(2)
        h = h + self.node(torch.cat([h, m.sum(2), cond[:, None].expand(B, N, cond.shape[-1])], -1))
        return h * mask[..., None], x


class Denoiser(nn.Module):
    """EGNN noise predictor: (x_t, h_t, t, spectrum) -> (eps_x, eps_h) for the M ligand nodes."""

    def __init__(self, cfg: EDMConfig):
        super().__init__()
        self.cfg = cfg
        self.spec = nn.Sequential(nn.Linear(cfg.n_features, 128), nn.SiLU(), nn.Linear(128, cfg.cond_dim))
        self.embed = nn.Linear(cfg.n_species + 2, cfg.hidden)  # species, time, absorber flag
        self.layers = nn.ModuleList([EGNNLayer(cfg.hidden, cfg.cond_dim) for _ in range(cfg.layers)])
        self.out_h = nn.Linear(cfg.hidden, cfg.n_species)

    def forward(self, x, h, mask, t, spectrum):
        # x (B, M, 3), h (B, M, S), mask (B, M), t (B,) in [0, 1], spectrum (B, F)
        B, M, S = h.shape
        cond = self.spec(spectrum)
        xa = torch.cat([torch.zeros(B, 1, 3, device=x.device), x], 1)  # absorber node at the origin
        ha = torch.cat([torch.zeros(B, 1, S, device=x.device), h], 1)
        flag = torch.zeros(B, M + 1, 1, device=x.device)
        flag[:, 0] = 1.0
        tt = t[:, None, None].expand(B, M + 1, 1)
        feats = self.embed(torch.cat([ha, tt, flag], -1))
        mask_a = torch.cat([torch.ones(B, 1, device=x.device), mask], 1)
        move = torch.cat([torch.zeros(B, 1, device=x.device), mask], 1)
        xo = xa
        for layer in self.layers:
            feats, xo = layer(feats, xo, mask_a, move, cond)
        eps_x = (xo - xa)[:, 1:] * mask[..., None]
        eps_h = self.out_h(feats)[:, 1:] * mask[..., None]
        return eps_x, eps_h


class CountModel(nn.Module):
    """p(M | spectrum): categorical over M = 1..max_atoms."""

    def __init__(self, cfg: EDMConfig):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cfg.n_features, 128), nn.SiLU(), nn.Linear(128, 64), nn.SiLU(),
                                 nn.Linear(64, cfg.max_atoms))

    def forward(self, spectrum):
        return self.net(spectrum)


class LocalEDM(nn.Module):
    def __init__(self, cfg: EDMConfig):
        super().__init__()
        self.cfg = cfg
        self.denoiser = Denoiser(cfg)
        self.count = CountModel(cfg)
        self.register_buffer("alpha_bar", noise_schedule(cfg.steps))

    def loss(self, x, h, mask, spectrum, generator: torch.Generator | None = None):
        """Noise-prediction loss (positions + scaled species) plus cross-entropy of the atom count."""
        B = x.shape[0]
        t = torch.randint(1, self.cfg.steps + 1, (B,), generator=generator)
        ab = self.alpha_bar[t]
        ex = torch.randn(x.shape, generator=generator) * mask[..., None]
        eh = torch.randn(h.shape, generator=generator) * mask[..., None]
        xt = ab.sqrt()[:, None, None] * x + (1 - ab).sqrt()[:, None, None] * ex
        ht = ab.sqrt()[:, None, None] * h * H_SCALE + (1 - ab).sqrt()[:, None, None] * eh
        px, ph = self.denoiser(xt, ht, mask, t.float() / self.cfg.steps, spectrum)
        n = mask.sum(1).clamp(min=1)
        l_x = (((px - ex) ** 2).sum((1, 2)) / (3 * n)).mean()
        l_h = (((ph - eh) ** 2).sum((1, 2)) / (self.cfg.n_species * n)).mean()
        l_n = nn.functional.cross_entropy(self.count(spectrum), (mask.sum(1).long() - 1).clamp(min=0))
        return l_x + l_h + l_n, {"x": l_x.item(), "h": l_h.item(), "n": l_n.item()}

    @torch.no_grad()
    def sample(self, spectrum: torch.Tensor, n_samples: int, generator: torch.Generator | None = None):
        """Ancestral sampling for one spectrum (F,): returns positions (n, M_max, 3), species (n, M_max), mask."""
        cfg = self.cfg
        spec = spectrum[None].expand(n_samples, -1)
        probs = torch.softmax(self.count(spec[:1]), -1)[0]
        m = torch.multinomial(probs, n_samples, replacement=True, generator=generator) + 1
        mask = (torch.arange(cfg.max_atoms)[None] < m[:, None]).float()
        x = torch.randn(n_samples, cfg.max_atoms, 3, generator=generator) * mask[..., None]
        h = torch.randn(n_samples, cfg.max_atoms, cfg.n_species, generator=generator) * mask[..., None]
        ab = self.alpha_bar
        for t in range(cfg.steps, 0, -1):
            tt = torch.full((n_samples,), t / cfg.steps)
            ex, eh = self.denoiser(x, h, mask, tt, spec)
            a_t, a_s = ab[t], ab[t - 1]
            alpha = a_t / a_s
            # DDPM posterior from the predicted clean sample, clipped to a physical box (stable for few steps)
            x0 = ((x - (1 - a_t).sqrt() * ex) / a_t.sqrt()).clamp(-X0_CLIP_A, X0_CLIP_A)
            h0 = ((h - (1 - a_t).sqrt() * eh) / a_t.sqrt()).clamp(-1.0, 1.0)
            c0 = a_s.sqrt() * (1 - alpha) / (1 - a_t)
            ct = alpha.sqrt() * (1 - a_s) / (1 - a_t)
            x, h = c0 * x0 + ct * x, c0 * h0 + ct * h
            if t > 1:
                sigma = ((1 - a_s) / (1 - a_t) * (1 - alpha)).sqrt()
                x = x + sigma * torch.randn(x.shape, generator=generator)
                h = h + sigma * torch.randn(h.shape, generator=generator)
            x, h = x * mask[..., None], h * mask[..., None]
        species = torch.where(mask > 0, h.argmax(-1), torch.full_like(mask, -1, dtype=torch.long))
        return x * mask[..., None], species, mask


# ------------------------------------------------------------------------------------------------------ training


def training_arrays(lib: SpectrumLibrary, cfg: EDMConfig) -> tuple[torch.Tensor, ...]:
    """Spectra (B, F), first-shell positions (B, M, 3), one-hot species (B, M, S), mask (B, M) from a library."""
    xs, hs, ms = [], [], []
    keep = []
    for i in range(len(lib)):
        cl = lib.cluster(i, cfg.absorber)
        idx = first_shell_indices(cl, cfg.ligand)
        if not 1 <= len(idx) <= cfg.max_atoms:
            continue
        x = np.zeros((cfg.max_atoms, 3))
        h = np.zeros((cfg.max_atoms, cfg.n_species))
        x[: len(idx)] = cl.positions[idx]
        h[np.arange(len(idx)), [species_index(cl.species[j]) for j in idx]] = 1.0
        m = np.zeros(cfg.max_atoms)
        m[: len(idx)] = 1
        xs.append(x), hs.append(h), ms.append(m), keep.append(i)
    if not keep:
        raise XtalsolveError("no training cluster with a first shell", "library")
    f = torch.tensor(lib.features[keep], dtype=torch.float32)
    return (f, torch.tensor(np.array(xs), dtype=torch.float32), torch.tensor(np.array(hs), dtype=torch.float32),
            torch.tensor(np.array(ms), dtype=torch.float32))


def train(lib: SpectrumLibrary, cfg: EDMConfig, epochs: int = 200, batch: int = 64, lr: float = 1e-3, seed: int = 0,
          checkpoint: str | Path | None = None, log=print, ema: float = 0.999,
          lr_final: float | None = None, init: str | Path | None = None, broaden_eV: float = 0.0) -> LocalEDM:
    """Train on ``lib`` (already restricted to the training split) with Adam; seeded. Resumes from ``checkpoint``
    when it exists and saves it after every epoch. No rotation augmentation: the denoiser is equivariant and the
    count model sees only the spectrum.

    ``ema`` > 0 (default) keeps an exponential moving average of the weights (decay per optimiser step, warmed up as
    min(ema, (1 + n) / (10 + n))), saved as ``ema`` in the checkpoint and preferred by :func:`load_model`.
    ``lr_final`` set: cosine decay of the learning rate from ``lr`` to ``lr_final`` over ``epochs``.
    ``init``: start from the weights of a trained (e.g. inference-only) checkpoint of the same architecture, to
    fine-tune on a grown library; ignored when ``checkpoint`` exists (resuming wins).
    ``broaden_eV`` > 0: resolution augmentation, each spectrum of each batch convolved with a Gaussian whose FWHM
    is drawn from 0..``broaden_eV`` (seven levels; measured spectra are broader than FEFF's lifetime width)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg.grid = [float(g) for g in lib.grid]
    cfg.n_features = len(lib.grid)
    f, x, h, m = training_arrays(lib, cfg)
    if broaden_eV < 0:
        raise XtalsolveError(f"the broadening augmentation must be >= 0 eV, not {broaden_eV}", "--broaden-max")
    levels = torch.stack([training_arrays(lib.broadened(w), cfg)[0] for w in np.linspace(0.0, broaden_eV, 7)]) \
        if broaden_eV > 0 else f[None]  # (L, B, F) features at each broadening
    model = LocalEDM(cfg)
    if init is not None and not (checkpoint and Path(checkpoint).exists()):
        start_model, _ = load_model(init)
        start_cfg = asdict(start_model.cfg)
        different = [k for k, v in asdict(cfg).items() if start_cfg.get(k) != v]
        if different:
            raise XtalsolveError(f"the start checkpoint differs in {', '.join(different)}", str(init))
        model.load_state_dict(start_model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = 0
    avg = {k: v.detach().clone() for k, v in model.state_dict().items()} if ema > 0 else None
    n_updates = 0
    if checkpoint and Path(checkpoint).exists():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["epoch"] + 1
        gen.set_state(state["generator"])
        n_updates = state.get("updates", 0)
        if avg is not None and "ema" in state:
            avg = state["ema"]
    for epoch in range(start, epochs):
        if lr_final is not None:
            for g in opt.param_groups:
                g["lr"] = lr_final + 0.5 * (lr - lr_final) * (1 + np.cos(np.pi * epoch / max(1, epochs - 1)))
        perm = torch.randperm(len(f), generator=gen)
        tot = 0.0
        for b in range(0, len(f), batch):
            j = perm[b: b + batch]
            level = torch.randint(len(levels), (len(j),), generator=gen) if len(levels) > 1 else 0
            loss, _ = model.loss(x[j], h[j], m[j], levels[level, j], gen)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            n_updates += 1
            if avg is not None:
                d = min(ema, (1 + n_updates) / (10 + n_updates))
                with torch.no_grad():
                    for k, v in model.state_dict().items():
                        if v.dtype.is_floating_point:
                            avg[k].mul_(d).add_(v.detach(), alpha=1 - d)
                        else:
                            avg[k].copy_(v)
            tot += loss.item() * len(j)
        if log and (epoch % 10 == 0 or epoch == epochs - 1):
            log(f"epoch {epoch}: loss {tot / len(f):.4f}")
        if checkpoint:
            save_model(model, checkpoint, opt, epoch, gen, ema=avg, updates=n_updates)
    return model


def random_rotation(gen: torch.Generator | None = None) -> torch.Tensor:
    """Uniform random proper rotation (3, 3) from the QR decomposition of a Gaussian matrix."""
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen))
    q = q * torch.sign(torch.diagonal(r))[None]
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def save_model(model: LocalEDM, path: str | Path, opt=None, epoch: int = 0, gen: torch.Generator | None = None,
               ema: dict | None = None, updates: int = 0):
    state = {"config": asdict(model.cfg), "model": model.state_dict(), "epoch": epoch, "updates": updates}
    if opt is not None:
        state["optimizer"] = opt.state_dict()
    if gen is not None:
        state["generator"] = gen.get_state()
    if ema is not None:
        state["ema"] = ema
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def strip_checkpoint(path: str | Path, out: str | Path, use_ema: bool = True) -> dict:
    """Inference-only copy of a training checkpoint: config, weights (the EMA weights when present and ``use_ema``),
    epoch and update count; optimiser and generator state dropped (it can no longer be resumed)."""
    state = torch.load(path, weights_only=False, map_location="cpu")
    weights = state["ema"] if use_ema and "ema" in state else state["model"]
    slim = {"config": state["config"], "model": {k: v.float() if v.dtype.is_floating_point else v
                                                 for k, v in weights.items()},
            "epoch": state["epoch"], "updates": state.get("updates", 0),
            "weights": "ema" if use_ema and "ema" in state else "raw"}
    torch.save(slim, out)
    return slim


def load_model(path: str | Path, use_ema: bool = True) -> tuple[LocalEDM, dict]:
    """Model in eval mode and its config (as a dict, JSON-able); the EMA weights when the checkpoint has them."""
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
        cfg = EDMConfig(**state["config"])
    except Exception as exc:  # noqa: BLE001 - torch.load/unpickling errors are many; all mean a bad file
        raise XtalsolveError(f"cannot read diffusion checkpoint ({type(exc).__name__})", path) from None
    model = LocalEDM(cfg)
    model.load_state_dict(state["ema"] if use_ema and "ema" in state else state["model"])
    model.eval()
    return model, json.loads(json.dumps(asdict(cfg)))


def sample_clusters(model: LocalEDM, cfg: dict, features: np.ndarray, n: int, absorber: str,
                    seed: int = 0) -> list[Cluster]:
    """``n`` sampled first shells for one spectrum's feature vector, as clusters (absorber at the origin)."""
    gen = torch.Generator().manual_seed(seed)
    x, sp, mask = model.sample(torch.tensor(features, dtype=torch.float32), n, gen)
    out = []
    for k in range(n):
        keep = mask[k] > 0
        species = [SPECIES[int(s)] if SPECIES[int(s)] != "other" else cfg["ligand"] for s in sp[k][keep]]
        pos = np.vstack([np.zeros(3), x[k][keep].numpy().astype(float)])
        out.append(Cluster((absorber, *species), pos, {"sample": k, "method": "diffusion"}))
    return out


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "EDMConfig",
    "LocalEDM",
    "load_model",
    "noise_schedule",
    "random_rotation",
    "sample_clusters",
    "save_model",
    "strip_checkpoint",
    "train",
]
