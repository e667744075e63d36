"""Diffusion model: numerical E(3) equivariance of the EGNN denoiser, masking, a tiny training run, checkpoints."""

import numpy as np
import pytest
import torch

from xtalsolve.errors import XtalsolveError
from xtalsolve.io.spectra import FEATURE_GRID_EV
from xtalsolve.local.clusters import Cluster, first_shell
from xtalsolve.local.library import SpectrumLibrary, cluster_arrays
from xtalsolve.local.model import EDMConfig, LocalEDM, load_model, sample_clusters, train


def random_orthogonal(seed):
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed)))
    return q  # proper or improper: the denoiser must commute with both


def test_denoiser_is_equivariant_and_padding_is_inert():
    torch.manual_seed(0)
    cfg = EDMConfig(n_features=16, max_atoms=6, hidden=32, layers=3, cond_dim=8, steps=20)
    model = LocalEDM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, 3, generator=g)
    h = torch.randn(3, 6, cfg.n_species, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.float32)
    x, h = x * mask[..., None], h * mask[..., None]
    t = torch.tensor([0.1, 0.5, 0.9])
    spec = torch.randn(3, 16, generator=g)
    with torch.no_grad():
        ex, eh = model.denoiser(x, h, mask, t, spec)
        for seed in (2, 3):
            q = random_orthogonal(seed)
            ex_r, eh_r = model.denoiser(x @ q.T, h, mask, t, spec)
            torch.testing.assert_close(ex_r, ex @ q.T, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(eh_r, eh, atol=1e-5, rtol=1e-4)
        # permuting the real atoms permutes the output
        perm = torch.tensor([2, 0, 3, 1, 4, 5])
        ex_p, _ = model.denoiser(x[:, perm], h[:, perm], mask[:, perm] * 0 + mask, t, spec)
        torch.testing.assert_close(ex_p[0], ex[0, perm], atol=1e-5, rtol=1e-4)
        # padding nodes give zero output and garbage in them changes nothing
        assert ex[0, 4:].abs().max() == 0 and eh[2, 2:].abs().max() == 0
        x2 = x.clone()
        x2[0, 4:] = 99.0
        torch.testing.assert_close(model.denoiser(x2, h, mask, t, spec)[0][0, :4], ex[0, :4])


def toy_library():
    """Tetrahedra (CN 4, 1.61 A) and octahedra (CN 6, 1.78 A) with two distinct fake spectra."""
    tet = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / np.sqrt(3)
    octa = np.vstack([np.eye(3), -np.eye(3)])
    grid = FEATURE_GRID_EV
    feats, pos, sp, meta = [], [], [], []
    rng = np.random.default_rng(0)
    for i in range(32):
        six = i % 2 == 1
        v = (octa * 1.78 if six else tet * 1.61) + rng.normal(0, 0.01, (6 if six else 4, 3))
        cl = Cluster(("Si",) + ("O",) * len(v), np.vstack([np.zeros(3), v]))
        p, s = cluster_arrays(cl)
        f = 1 / (1 + np.exp(-(grid - (3.0 if six else 0.0))))  # edge shifted for six-fold
        feats.append(f + rng.normal(0, 0.01, len(grid)))
        pos.append(p), sp.append(s), meta.append({"absorber": "Si", "split": "train"})
    return SpectrumLibrary(grid, np.array(feats), np.zeros(32), np.array(pos), np.array(sp), meta)


def test_tiny_training_learns_counts_and_resumes(tmp_path):
    lib = toy_library()
    cfg = EDMConfig(hidden=32, layers=2, cond_dim=16, steps=30)
    ckpt = tmp_path / "edm.pt"
    losses = []
    train(lib, cfg, epochs=25, batch=32, lr=3e-3, seed=0, checkpoint=ckpt, log=losses.append)
    assert ckpt.exists()
    first, last = float(losses[0].split()[-1]), float(losses[-1].split()[-1])
    assert last < first
    loaded, cfg_d = load_model(ckpt)
    with torch.no_grad():
        probs = torch.softmax(loaded.count(torch.tensor(lib.features[:2], dtype=torch.float32)), -1)
    assert probs[0].argmax().item() + 1 == 4 and probs[1].argmax().item() + 1 == 6
    clusters = sample_clusters(loaded, cfg_d, lib.features[1], 4, "Si", seed=0)
    assert len(clusters) == 4 and all(c.absorber == "Si" and np.allclose(c.positions[0], 0) for c in clusters)
    assert sum(len(c) - 1 == 6 for c in clusters) >= 3
    assert all(first_shell(c).coordination_number <= len(c) - 1 for c in clusters)
    # the held-out scorer runs on the sampled clusters (CN is geometric, so it need not equal the count head)
    from xtalsolve.local.evaluate import evaluate_model

    sc = evaluate_model(loaded, cfg_d, lib.subset([0, 1, 2, 3]), "Si", samples=3)
    assert sc["n"] == 4 and 0.0 <= sc["cn_error_rate"] <= 1.0
    # resume: more epochs continue from the saved epoch (nothing re-done)
    more = []
    train(lib, cfg, epochs=27, batch=32, lr=3e-3, seed=0, checkpoint=ckpt, log=more.append)
    assert len(more) == 1 and more[0].startswith("epoch 26")
    # fine-tuning: a new run started from the trained weights begins where they are (lower loss than from scratch)
    tuned, scratch = [], []
    train(lib, cfg, epochs=1, batch=32, lr=1e-5, seed=1, checkpoint=tmp_path / "tuned.pt", log=tuned.append, init=ckpt)
    train(lib, cfg, epochs=1, batch=32, lr=1e-5, seed=1, checkpoint=tmp_path / "scratch.pt", log=scratch.append)
    assert float(tuned[0].split()[-1]) < float(scratch[0].split()[-1])
    with pytest.raises(XtalsolveError, match="differs in hidden"):
        train(lib, EDMConfig(hidden=16, layers=2, cond_dim=16, steps=30), epochs=1, checkpoint=tmp_path / "x.pt",
              log=None, init=ckpt)
    assert torch.load(ckpt, weights_only=False)["epoch"] == 26
    # same seed, same sampling
    again = sample_clusters(loaded, cfg_d, lib.features[1], 4, "Si", seed=0)
    assert all(np.array_equal(a.positions, b.positions) for a, b in zip(clusters, again))


def test_broadening_augmentation_feeds_each_spectrum_at_drawn_resolutions(monkeypatch):
    """broaden_eV: every spectrum the loss sees is a library spectrum convolved with one of seven Gaussians
    (FWHM 0..3 eV), the level drawn per spectrum and step."""
    lib = toy_library()
    seen = []
    loss = LocalEDM.loss
    monkeypatch.setattr(LocalEDM, "loss", lambda self, x, h, m, spectrum, gen=None: (
        seen.append(spectrum.clone()), loss(self, x, h, m, spectrum, gen))[1])
    train(lib, EDMConfig(hidden=16, layers=2, cond_dim=16, steps=30), epochs=3, batch=32, seed=0, log=None,
          broaden_eV=3.0)
    levels = np.stack([lib.broadened(w).features for w in np.linspace(0.0, 3.0, 7)])  # (L, B, F)
    drawn = set()
    for spectrum in torch.cat(seen).numpy():
        distance = np.abs(levels - spectrum).max(-1)  # (L, B)
        level, _ = np.unravel_index(np.argmin(distance), distance.shape)
        assert distance.min() < 1e-5
        drawn.add(int(level))
    assert len(drawn) >= 5
    with pytest.raises(XtalsolveError, match="broadening augmentation"):
        train(lib, EDMConfig(hidden=16, layers=2, cond_dim=16, steps=30), epochs=1, log=None, broaden_eV=-1.0)
