"""Diffusion structure solver: corruption processes, denoiser symmetries, encoder, training loop with resume,
sampler validity, classifier-free and data guidance. Small and seeded; the whole file runs in well under 60 s."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pymatgen.core import Composition, Lattice, Structure

from xtalsolve.crystal.batch import CrystalBatch
from xtalsolve.data.structures import StructureTensors
from xtalsolve.diffusion.corruption import (
    LatticeDiffusion,
    TorusDiffusion,
    canonical_cell,
    wrapped_normal_log_density,
    wrapped_normal_score,
)
from xtalsolve.diffusion.denoiser import CSPDenoiser
from xtalsolve.diffusion.encoder import PatternEncoder, cfg_dropout
from xtalsolve.diffusion.guidance import (
    DataGuidance,
    PatternLoss,
    cfg_combine,
    chebyshev_basis,
    fit_scale_background,
    fit_size,
    gaussian_blur,
)
from xtalsolve.diffusion.model import CrystalDiffusion, ModelConfig, conditional_denoiser
from xtalsolve.diffusion.sampler import generate_structures, numbers_of, sample
from xtalsolve.diffusion import train as train_module
from xtalsolve.diffusion.train import (config_from_dict, export_training_data, load_checkpoint, load_config, load_model,
                                       ordered_only, read_log, train, training_data)
from xtalsolve.errors import XtalsolveError
from xtalsolve.physics.powder import Instrument, powder_pattern

ROOT = Path(__file__).resolve().parents[1]
TINY = {"hidden": 32, "layers": 2, "k_max": 4, "time_dim": 16, "cond_dim": 32, "encoder_channels": 8}
GRID = torch.linspace(0.5, 8.0, 512, dtype=torch.float64)


FCC = [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]


def toy_structures(n: int, seed: int = 0) -> list[Structure]:
    """Rock salt, CsCl, perovskite and fluorite prototypes with random cells (some CsCl strained to tetragonal);
    coordinates written out (Structure.from_spacegroup is slow)."""
    rng = np.random.default_rng(seed)
    shift = lambda sites, d: [[(x + dx) % 1 for x, dx in zip(site, d)] for site in sites]
    out = []
    for i in range(n):
        a = rng.uniform(3.8, 6.0)
        kind = i % 4
        if kind == 0:
            s = Structure(Lattice.cubic(a * 1.1), ["Na"] * 4 + ["Cl"] * 4, FCC + shift(FCC, (0.5, 0.5, 0.5)))
        elif kind == 1:
            lattice = Lattice.tetragonal(a * 0.75, a * 0.75 * rng.uniform(0.9, 1.1)) if i % 3 == 0 else Lattice.cubic(a * 0.75)
            s = Structure(lattice, ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
        elif kind == 2:
            s = Structure(Lattice.cubic(a * 0.85), ["Sr", "Ti", "O", "O", "O"],
                          [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
        else:
            s = Structure(Lattice.cubic(a * 1.05), ["Ca"] * 4 + ["F"] * 8,
                          FCC + shift(FCC, (0.25, 0.25, 0.25)) + shift(FCC, (0.75, 0.75, 0.75)))
        out.append(s)
    return out


def wrapped_distance(a, b):
    d = torch.remainder(a - b, 1.0)
    return torch.minimum(d, 1.0 - d)


# ------------------------------------------------------------------------------------------------ corruption


def test_lattice_representation_round_trip_matches_pymatgen_cell_and_is_rotation_invariant():
    structures = toy_structures(6) + [Structure(Lattice.from_parameters(4.1, 5.3, 7.2, 71, 97, 112), ["Si"], [[0, 0, 0]])]
    batch = CrystalBatch.from_structures(structures)
    ld = LatticeDiffusion()
    x = ld.encode(batch.lattice, batch.n_sites)
    cells = ld.decode(x, batch.n_sites)
    for s, cell in zip(structures, cells):
        rebuilt = Lattice(cell.numpy())
        assert np.allclose(rebuilt.abc, s.lattice.abc, atol=1e-8)
        assert np.allclose(rebuilt.angles, s.lattice.angles, atol=1e-6)
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0]
    rotation = rotation * torch.sign(torch.linalg.det(rotation))
    assert torch.allclose(ld.encode(batch.lattice @ rotation.T, batch.n_sites), x, atol=1e-10)
    # a left-handed cell: the canonical form is the same crystal (same Cartesian positions), right-handed
    left = batch.lattice[:1] * torch.tensor([1.0, 1.0, -1.0])[:, None]
    cell, frac = canonical_cell(left, torch.tensor([[[0.1, 0.2, 0.3]]], dtype=torch.float64))
    assert torch.linalg.det(cell) > 0
    cart_original = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64) @ left[0]
    cart_new = frac[0, 0] @ cell[0]
    # equal up to a lattice translation of the new cell
    shift = torch.linalg.solve(cell[0].T, cart_new - cart_original)
    assert torch.allclose(shift, shift.round(), atol=1e-9)


def test_noise_schedules_endpoints_and_t0_returns_x0():
    ld, td = LatticeDiffusion(), TorusDiffusion()
    assert float(ld.alpha_bar(torch.tensor(0.0))) == pytest.approx(1.0)
    assert float(ld.alpha_bar(torch.tensor(1.0))) <= 1e-3
    assert float(td.sigma(torch.tensor(0.0))) == pytest.approx(0.005)
    assert float(td.sigma(torch.tensor(1.0))) == pytest.approx(0.5)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 6, generator=gen)
    x_t, eps = ld.add_noise(x0, torch.zeros(64), gen)
    assert torch.allclose(x_t, x0, atol=1e-6)
    x_1, eps = ld.add_noise(x0, torch.ones(64), gen)  # the prior: nearly all noise
    assert torch.allclose(x_1, eps, atol=0.05)
    f0 = torch.rand(64, 5, 3, generator=gen)
    f_t, _ = td.add_noise(f0, torch.zeros(64), gen)
    assert float(wrapped_distance(f_t, f0).max()) < 6 * 0.005
    f_1, _ = td.add_noise(f0, torch.ones(64), gen)  # sigma 0.5: close to uniform on the torus
    assert abs(float(f_1.mean()) - 0.5) < 0.03 and abs(float(f_1.var()) - 1 / 12) < 0.01


def test_wrapped_normal_score_is_the_derivative_of_its_log_density():
    d = torch.linspace(-0.7, 1.3, 401, dtype=torch.float64)
    for sigma in (0.01, 0.1, 0.3, 0.5):
        s = torch.tensor(sigma, dtype=torch.float64)
        h = 1e-6
        numeric = (wrapped_normal_log_density(d + h, s) - wrapped_normal_log_density(d - h, s)) / (2 * h)
        assert torch.allclose(wrapped_normal_score(d, s), numeric, atol=1e-5 * max(1.0, 1 / sigma**2))
        # density integrates to one over a period
        grid = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
        assert float(torch.exp(wrapped_normal_log_density(grid, s)).mean()) == pytest.approx(1.0, abs=1e-6)
    # more images change nothing at sigma_max
    assert torch.allclose(wrapped_normal_score(d, torch.tensor(0.5)), wrapped_normal_score(d, torch.tensor(0.5), 10),
                          atol=1e-5)


def test_score_normalisation_is_the_mean_squared_score():
    td = TorusDiffusion()
    sigma = torch.tensor([0.005, 0.05, 0.5], dtype=torch.float64)
    norm = td.score_norm(sigma)
    assert float(norm[0]) == pytest.approx(1 / 0.005**2, rel=1e-6)
    gen = torch.Generator().manual_seed(0)
    for i in (1, 2):  # Monte Carlo E[score^2] of samples of the wrapped normal
        d = sigma[i] * torch.randn(200_000, generator=gen, dtype=torch.float64)
        mc = (wrapped_normal_score(d, sigma[i]) ** 2).mean()
        assert float(norm[i]) == pytest.approx(float(mc), rel=0.02)


def test_noisy_lattice_states_always_decode_to_valid_cells():
    ld = LatticeDiffusion()
    x = 3.0 * torch.randn(200, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    n = torch.full((200,), 8)
    cells = ld.decode(x, n)
    assert torch.isfinite(cells).all() and (torch.linalg.det(cells) > 0).all()


# ------------------------------------------------------------------------------------------------ networks


def _random_inputs(gen, bsz=3, n=6):
    numbers = torch.randint(1, 60, (bsz, n), generator=gen)
    numbers[0, 4:] = 0  # padding
    frac = torch.rand(bsz, n, 3, generator=gen) * (numbers > 0)[..., None]
    return numbers, frac, torch.randn(bsz, 6, generator=gen), torch.rand(bsz, generator=gen), torch.randn(bsz, 32, generator=gen)


def test_denoiser_is_permutation_equivariant_translation_and_padding_invariant():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = CSPDenoiser(hidden=32, layers=2, k_max=4, time_dim=16, cond_dim=32).eval()
    numbers, frac, lat, t, cond = _random_inputs(gen)
    with torch.no_grad():
        eps, score = net(numbers, frac, lat, t, cond)
        perm = torch.tensor([3, 1, 5, 0, 2, 4])
        eps_p, score_p = net(numbers[:, perm], frac[:, perm], lat, t, cond)
        shifted = torch.remainder(frac + torch.rand(3, 1, 3, generator=gen), 1.0) * (numbers > 0)[..., None]
        eps_s, score_s = net(numbers, shifted, lat, t, cond)
        padded = net(torch.cat([numbers, torch.zeros(3, 2, dtype=torch.long)], 1), torch.cat([frac, torch.rand(3, 2, 3)], 1),
                     lat, t, cond)
    assert eps.shape == (3, 6) and score.shape == (3, 6, 3)
    assert torch.allclose(eps_p, eps, atol=1e-5) and torch.allclose(score_p, score[:, perm], atol=1e-5)
    mask = (numbers > 0)[..., None]
    assert torch.allclose(eps_s, eps, atol=1e-4) and torch.allclose(score_s * mask, score * mask, atol=1e-4)
    assert torch.allclose(padded[0], eps, atol=1e-5) and torch.allclose(padded[1][:, :6], score, atol=1e-5)
    assert float(score[0, 4:].abs().max()) == 0.0  # padding outputs nothing
    # the condition matters
    with torch.no_grad():
        assert not torch.allclose(net(numbers, frac, lat, t, cond + 1.0)[0], eps)


def test_encoder_shapes_and_classifier_free_dropout():
    torch.manual_seed(0)
    enc = PatternEncoder(n_points=512, channels=8, cond_dim=32)
    gen = torch.Generator().manual_seed(0)
    pattern, mask = torch.rand(4, 512, generator=gen), torch.ones(4, 512, dtype=torch.bool)
    drop = torch.tensor([True, False, True, False])
    with torch.no_grad():
        out = enc(pattern, mask, drop)
    assert out.shape == (4, 32)
    assert torch.equal(out[0], enc.null) and torch.equal(out[2], enc.null) and not torch.equal(out[1], enc.null)
    rate = cfg_dropout(20_000, 0.1, torch.Generator().manual_seed(1)).float().mean()
    assert float(rate) == pytest.approx(0.1, abs=0.01)
    with pytest.raises(ValueError):
        enc(torch.rand(1, 300), torch.ones(1, 300))


def test_cfg_combine():
    cond, uncond = (torch.tensor([2.0]), torch.tensor([4.0])), (torch.tensor([1.0]), torch.tensor([1.0]))
    assert cfg_combine(cond, uncond, 1.0)[0].item() == 2.0
    assert cfg_combine(cond, uncond, 0.0)[1].item() == 1.0
    assert cfg_combine(cond, uncond, 3.0)[0].item() == pytest.approx(3 * 2 - 2 * 1)


# ------------------------------------------------------------------------------------------------ training


def _tensors(structures, prefix):
    return StructureTensors.from_structures([f"{prefix}{i}" for i in range(len(structures))], structures)


def test_training_smoke_decreases_loss_and_resumes_exactly(tmp_path):
    data = (_tensors(toy_structures(32), "t"), _tensors(toy_structures(16, seed=1), "v"))
    options = {"steps": 16, "batch_size": 8, "lr": 2e-3, "warmup": 1, "checkpoint_every": 8, "val_every": 16, "val_batches": 2,
                   "threads": 1, "model": TINY, "seed": 3}
    first = train(config_from_dict({**options, "run_dir": str(tmp_path / "a")}), data=data, progress=False, log=lambda s: None)
    records = read_log(tmp_path / "a")
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0]  # fixed-noise validation loss fell
    assert first["step"] == 16 and (tmp_path / "a" / "best.pt").exists()
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert all(math.isfinite(v) for v in losses.values())
    # checkpoints load safely (weights_only) and carry what a resume needs
    state = load_checkpoint(tmp_path / "a" / "checkpoints" / "step_0000008.pt")
    assert state["step"] == 8 and {"model", "ema", "optimizer", "config", "versions"} <= set(state)
    # resume: a copy of the run interrupted after step 8 continues exactly as the uninterrupted run
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "checkpoints" / "step_0000008.pt", tmp_path / "b" / "checkpoints")
    train(config_from_dict({**options, "run_dir": str(tmp_path / "b"), "steps": 10}), data=data, progress=False,
          log=lambda s: None)
    resumed = {r["step"]: r["loss"] for r in read_log(tmp_path / "b") if "loss" in r}
    assert set(resumed) == {9, 10} and math.isfinite(resumed[10])
    assert resumed[9] == losses[9]  # same batch, noise, weights and optimiser state (later lr differ: steps differ)


def _quiet_train(options: dict, data=None) -> dict:
    return train(config_from_dict(options), data=data, progress=False, log=lambda s: None)


def _training_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(run_dir) if "loss" in r}


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_loader_workers_do_not_change_what_training_sees(tmp_path):
    """Each step's loss inputs are a function of (seed, step): two worker processes (one torch thread each) give
    the in-line run's losses and weights bit for bit, even with two threads in the main process."""
    data = (_tensors(toy_structures(24), "t"), _tensors(toy_structures(8, seed=1), "v"))
    options = {"steps": 5, "batch_size": 8, "lr": 2e-3, "warmup": 1, "checkpoint_every": 100, "val_every": 100,
               "val_batches": 1, "threads": 2, "model": TINY, "seed": 5}
    saved = torch.get_num_threads()
    try:
        inline = _quiet_train({**options, "run_dir": str(tmp_path / "w0"), "loader_workers": 0}, data)
        workers = _quiet_train({**options, "run_dir": str(tmp_path / "w2"), "loader_workers": 2}, data)
    finally:
        torch.set_num_threads(saved)
    assert inline["step"] == workers["step"] == 5 and inline["stopped"] is None and workers["stopped"] is None
    losses = _training_losses(tmp_path / "w0")
    assert sorted(losses) == [1, 2, 3, 4, 5] and len(set(losses.values())) == 5  # distinct batches and noise
    assert _training_losses(tmp_path / "w2") == losses  # exact float equality, step by step
    val = lambda run: [(r["step"], r["val_loss"]) for r in read_log(run) if "val_loss" in r]
    assert val(tmp_path / "w2") == val(tmp_path / "w0")
    a = load_checkpoint(tmp_path / "w0" / "checkpoints" / "step_0000005.pt")
    b = load_checkpoint(tmp_path / "w2" / "checkpoints" / "step_0000005.pt")
    _assert_same_weights(a["ema"], b["ema"])
    _assert_same_weights(a["model"], b["model"])


def test_patterns_simulated_in_line_on_the_device_are_the_loaders_on_a_cpu(tmp_path):
    """simulate_on "device" draws each step from a generator of (seed, step) on the training device: on a CPU the
    same stream as the loader's, so the same losses; a bad value is refused by name."""
    data = (_tensors(toy_structures(24), "t"), _tensors(toy_structures(8, seed=1), "v"))
    options = {"steps": 3, "batch_size": 8, "lr": 2e-3, "warmup": 1, "checkpoint_every": 100, "val_every": 100,
               "val_batches": 1, "threads": 1, "model": TINY, "seed": 9}
    _quiet_train({**options, "run_dir": str(tmp_path / "loader")}, data)
    _quiet_train({**options, "run_dir": str(tmp_path / "device"), "simulate_on": "device"}, data)
    losses = _training_losses(tmp_path / "loader")
    assert sorted(losses) == [1, 2, 3] and _training_losses(tmp_path / "device") == losses
    with pytest.raises(XtalsolveError, match="simulate_on"):
        config_from_dict({**options, "simulate_on": "gpu"})


def test_a_run_started_from_a_checkpoint_begins_at_its_weights(tmp_path):
    """init_from: a new run (fresh optimiser and schedule) starts from another run's best EMA weights, so its
    step-0 validation loss is that run's best; a checkpoint of another model configuration is refused."""
    data = (_tensors(toy_structures(24), "t"), _tensors(toy_structures(8, seed=1), "v"))
    options = {"steps": 8, "batch_size": 8, "lr": 2e-3, "warmup": 1, "checkpoint_every": 100, "val_every": 4,
               "val_batches": 1, "threads": 1, "model": TINY, "seed": 11}
    base = _quiet_train({**options, "run_dir": str(tmp_path / "base")}, data)
    best = tmp_path / "base" / "best.pt"
    tuned = _quiet_train({**options, "run_dir": str(tmp_path / "tuned"), "steps": 4, "init_from": str(best)}, data)
    val = [r["val_loss"] for r in read_log(tmp_path / "tuned") if "val_loss" in r]
    fresh = [r["val_loss"] for r in read_log(tmp_path / "base") if "val_loss" in r]
    assert val[0] == pytest.approx(base["best_val"], rel=1e-6) and val[0] < fresh[0]
    assert tuned["step"] == 4
    other = {**TINY, "hidden": TINY["hidden"] * 2}
    with pytest.raises(XtalsolveError, match="hidden"):
        _quiet_train({**options, "run_dir": str(tmp_path / "bad"), "model": other, "init_from": str(best)}, data)


def test_time_limit_stops_checkpointed_and_the_same_run_resumes_exactly(tmp_path):
    data = (_tensors(toy_structures(24), "t"), _tensors(toy_structures(8, seed=1), "v"))
    options = {"steps": 6, "batch_size": 8, "lr": 2e-3, "warmup": 1, "checkpoint_every": 100, "val_every": 100,
               "val_batches": 1, "threads": 1, "model": TINY, "seed": 7}
    full = _quiet_train({**options, "run_dir": str(tmp_path / "full")}, data)
    assert full["step"] == 6 and full["stopped"] is None
    # a limit of 0 s is exceeded after the first step: stop there, validated and checkpointed (workers shut down)
    cut = {**options, "run_dir": str(tmp_path / "cut"), "loader_workers": 2}
    lines = []
    first = train(config_from_dict({**cut, "time_limit_s": 0.0}), data=data, progress=False, log=lines.append)
    assert first["step"] == 1 and first["stopped"] and "time limit" in first["stopped"]
    assert any("stopped at step 1 of 6" in line for line in lines)
    assert [p.name for p in sorted((tmp_path / "cut" / "checkpoints").glob("*.pt"))] == ["step_0000001.pt"]
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "step_0000001.pt")["step"] == 1
    assert [r["step"] for r in read_log(tmp_path / "cut") if "val_loss" in r] == [0, 1]
    assert sorted(_training_losses(tmp_path / "cut")) == [1]
    # the same config without the limit resumes at step 1 and finishes as the uninterrupted run
    lines.clear()
    second = train(config_from_dict({**cut, "time_limit_s": None}), data=data, progress=False, log=lines.append)
    assert second["step"] == 6 and second["stopped"] is None
    assert any("resumed" in line and "step 1" in line for line in lines)
    steps = [r["step"] for r in read_log(tmp_path / "cut") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # consecutive, no duplicates
    assert _training_losses(tmp_path / "cut") == _training_losses(tmp_path / "full")
    _assert_same_weights(load_checkpoint(tmp_path / "cut" / "checkpoints" / "step_0000006.pt")["ema"],
                         load_checkpoint(tmp_path / "full" / "checkpoints" / "step_0000006.pt")["ema"])


class _Pool:
    """Stands in for a training pool / validation set: ``load`` as the real pools, without parsing CIFs."""

    def __init__(self, tensors):
        self.tensors = tensors

    def load(self, limit=None, workers=1, cache=True):
        return self.tensors.subset(np.arange(min(limit or len(self.tensors), len(self.tensors))))


def _no_pools(config):
    raise AssertionError("training from data_dir must not touch the shared data")


def _export_toy(monkeypatch, folder, **options) -> tuple:
    """Export 16 training and 8 validation toy crystals (a quarter of them fluorites of 12 atoms) with
    max_atoms 8; returns (meta, expected train, expected val)."""
    train_pool, val_pool = _tensors(toy_structures(16), "t"), _tensors(toy_structures(8, seed=1), "v")
    monkeypatch.setattr(train_module, "_pools", lambda config: (_Pool(train_pool), _Pool(val_pool)))
    config = config_from_dict({"max_atoms": 8, "val_limit": 5, **options})
    meta = export_training_data(config, folder)
    monkeypatch.setattr(train_module, "_pools", _no_pools)
    return meta, ordered_only(train_pool, 8), ordered_only(val_pool.subset(np.arange(5)), 8)


def _same_tensors(a, b) -> None:
    for name in ("lattice", "frac", "numbers", "occupancy", "site", "offsets", "ids", "formulas"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_exported_training_data_trains_without_the_pools_and_mismatches_are_refused(tmp_path, monkeypatch):
    folder = tmp_path / "export"
    meta, train_set, val_set = _export_toy(monkeypatch, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["data.json", "train.npz", "val.npz"]
    assert (len(train_set), len(val_set)) == (12, 4)  # fluorites (12 atoms) filtered out; val_limit 5 applied
    assert meta["protocol"] == "mp20" and meta["max_atoms"] == 8 and (meta["n_train"], meta["n_val"]) == (12, 4)
    assert json.loads((folder / "data.json").read_text()) == meta
    options = {"data_dir": str(folder), "max_atoms": 8, "val_limit": 5, "batch_size": 4, "val_batches": 1, "threads": 1,
               "model": TINY, "warmup": 1, "checkpoint_every": 100, "val_every": 100}
    train_read, val_read = training_data(config_from_dict(options))  # _pools now fails if called
    _same_tensors(train_read, train_set)
    _same_tensors(val_read, val_set)
    limited, _ = training_data(config_from_dict({**options, "limit": 5}))
    assert list(limited.ids) == list(train_set.ids[:5])
    summary = _quiet_train({**options, "steps": 2, "run_dir": str(tmp_path / "run")})
    assert summary["step"] == 2 and (summary["n_train"], summary["n_val"]) == (12, 4)
    assert all(math.isfinite(v) for v in _training_losses(tmp_path / "run").values())
    # exported for another protocol, max_atoms or validation size: refused, naming the folder and both settings
    for wrong, words in (({"max_atoms": 20}, ["max_atoms 8", "20"]), ({"protocol": "pxrdnet"}, ["'mp20'", "'pxrdnet'"]),
                         ({"val_limit": 256}, ["val_limit 5", "256"])):
        with pytest.raises(XtalsolveError) as err:
            training_data(config_from_dict({**options, **wrong}))
        assert err.value.source == str(folder) and str(folder) in str(err.value)
        assert all(w in err.value.problem for w in words), err.value.problem
    # not an export folder: no data.json, or data.json without the arrays
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(XtalsolveError, match="not an exported training-data folder") as err:
        training_data(config_from_dict({**options, "data_dir": str(empty)}))
    assert err.value.source == str(empty)
    (empty / "data.json").write_text((folder / "data.json").read_text())
    with pytest.raises(XtalsolveError, match="not an exported training-data folder"):
        training_data(config_from_dict({**options, "data_dir": str(empty)}))
    with pytest.raises(XtalsolveError, match="not an exported training-data folder"):
        training_data(config_from_dict({**options, "data_dir": str(tmp_path / "missing")}))


BLOCK_PYMATGEN = """
import json, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "pymatgen" or name.startswith("pymatgen."):
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
try:
    import pymatgen.core
    raise SystemExit("pymatgen was not blocked")
except ImportError:
    pass
import numpy as np, torch
import xtalsolve.diffusion.train as tr, xtalsolve.data.structures as st, xtalsolve.data.augment as au
torch.set_num_threads(1)
folder, run_dir = sys.argv[1], sys.argv[2]
train_set = st.StructureTensors.load(folder + "/train.npz")
patterns, pmask, _ = au.training_patterns(train_set.batch(np.arange(4), dtype=torch.float32), au.Augmentation(),
                                          torch.Generator().manual_seed(11))
np.save(run_dir + "_patterns.npy", patterns.numpy())
config = tr.config_from_dict({"data_dir": folder, "run_dir": run_dir, "max_atoms": 8, "val_limit": 5,
                              "steps": 2, "batch_size": 4, "val_batches": 1, "threads": 1, "warmup": 1,
                              "model": json.loads(sys.argv[3])})
summary = tr.train(config, progress=False, log=lambda s: None)
print(json.dumps({"step": summary["step"], "pymatgen": sorted(m for m in sys.modules if m.startswith("pymatgen"))}))
"""


def test_training_imports_and_runs_without_pymatgen(tmp_path, monkeypatch):
    """A GPU machine without pymatgen: the training modules import, patterns are simulated and a run from an
    exported folder trains; the patterns equal those simulated here with pymatgen present."""
    from xtalsolve.data.augment import Augmentation, training_patterns

    folder = tmp_path / "export"
    _, train_set, _ = _export_toy(monkeypatch, folder)
    run = subprocess.run([sys.executable, "-c", BLOCK_PYMATGEN, str(folder), str(tmp_path / "run"), json.dumps(TINY)],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out == {"step": 2, "pymatgen": []}
    assert sorted(_training_losses(tmp_path / "run")) == [1, 2]
    blocked = np.load(tmp_path / "run_patterns.npy")
    here, _, _ = training_patterns(train_set.batch(np.arange(4), dtype=torch.float32), Augmentation(),
                                   torch.Generator().manual_seed(11))
    assert blocked.shape == (4, 512) and np.isfinite(blocked).all() and blocked.max() > 0
    np.testing.assert_array_equal(blocked, here.numpy())


def test_train_command_time_limit_stops_and_the_same_command_resumes(tmp_path, monkeypatch):
    folder = tmp_path / "export"
    _export_toy(monkeypatch, folder)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"run_dir": str(tmp_path / "run"), "max_atoms": 8, "val_limit": 5,
                                  "steps": 50, "batch_size": 4, "val_batches": 1, "threads": 1,
                                  "warmup": 1, "model": TINY}))
    command = [sys.executable, "-m", "xtalsolve.cli", "train", "--config", str(config), "--data-dir", str(folder),
               "--time-limit", "0", "--no-progress"]
    for expected in (1, 2):
        run = subprocess.run(command, capture_output=True, text=True, check=False)
        assert run.returncode == 0, run.stderr[-3000:]
        summary = json.loads(run.stdout.strip().splitlines()[-1])
        assert summary["step"] == expected and "time limit" in summary["stopped"] and summary["n_train"] == 12
        assert f"stopped at step {expected} of 50" in run.stderr
    assert "resumed" in run.stderr
    assert [r["step"] for r in read_log(tmp_path / "run") if "loss" in r] == [1, 2]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["time_limit_s"] == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000002.pt")["step"] == 2


def test_budgeted_training_probes_then_fits_the_schedule_to_the_budget(tmp_path, monkeypatch):
    """tools/train_within_budget.py: a probe inside the warm-up, then steps = probe rate x time left; the best
    EMA weights, the log and a summary land in --out."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_within_budget", ROOT / "tools" / "train_within_budget.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    folder = tmp_path / "export"
    _export_toy(monkeypatch, folder)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"max_atoms": 8, "val_limit": 5, "steps": 10**6, "batch_size": 4, "val_batches": 1,
                                  "threads": 1, "warmup": 100, "model": TINY}))
    monkeypatch.setattr(tool, "RESERVE_S", 0.0)
    args = ["--config", str(config), "--data-dir", str(folder), "--run-dir", str(tmp_path / "run"), "--budget", "4",
            "--probe-steps", "3", "--out", str(tmp_path / "out")]
    assert tool.main(args) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["best.pt", "log.jsonl", "summary.json"]
    assert summary["planned_steps"] > 3 and summary["config"]["steps"] == summary["planned_steps"]
    assert 3 < summary["step"] <= summary["planned_steps"] and summary["wall_s"] < 4 + 10
    assert [r["step"] for r in read_log(tmp_path / "out") if "loss" in r] == list(range(1, summary["step"] + 1))
    assert load_model(tmp_path / "out" / "best.pt") is not None
    assert tool.main([*args[:-6], "--budget", "4", "--probe-steps", "100", "--out", str(tmp_path / "o2")]) == 1


def test_config_files_load_and_bad_options_are_reported(tmp_path):
    small = load_config(ROOT / "configs" / "small_cpu.json")
    full = load_config(ROOT / "configs" / "full_gpu.json")
    assert small.protocol == "mp20" and full.protocol == "pxrdnet"
    assert CrystalDiffusion(small.model_config()) is not None
    as_yaml = tmp_path / "small.yaml"
    as_yaml.write_text("steps: 7\nmodel:\n  hidden: 16\n")
    loaded = load_config(as_yaml, run_dir="elsewhere")
    assert loaded.steps == 7 and loaded.model_config().hidden == 16 and loaded.run_dir == "elsewhere"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stpes": 10}))
    with pytest.raises(XtalsolveError, match="stpes"):
        load_config(bad)
    run = subprocess.run([sys.executable, "-m", "xtalsolve.cli", "train", "--config", str(bad)], capture_output=True,
                         text=True, check=False)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "stpes" in run.stderr


# ------------------------------------------------------------------------------------------------ sampling


def _pattern_of(structure, size=100.0):
    y = powder_pattern(CrystalBatch.from_structures([structure]), GRID, "q", Instrument(), size=size, biso=0.5, binned=True)[0]
    return y / y.max()


def test_sampler_gives_valid_structures_with_the_requested_composition():
    torch.manual_seed(0)
    model = CrystalDiffusion(ModelConfig(**TINY)).eval()
    formulas = ["Na4Cl4", "SrTiO3", "CsCl"]
    numbers = numbers_of(formulas)
    target = _pattern_of(toy_structures(3)[2]).float()
    pattern, mask = target.expand(3, -1), torch.ones(3, 512, dtype=torch.bool)
    runs = {
        "prior": conditional_denoiser(model),
        "cfg": conditional_denoiser(model, pattern, mask, cfg_scale=2.0),
    }
    for name, fn in runs.items():
        guidance = DataGuidance(PatternLoss(GRID, target, torch.ones(512, dtype=torch.bool), size=None)) if name == "cfg" else None
        batch = sample(fn, numbers, 6, model.lattice, model.torus, guidance=guidance, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(batch.lattice).all() and torch.isfinite(batch.frac).all()
        assert (batch.volume > 0).all() and ((batch.frac >= 0) & (batch.frac < 1)).all()
        structures = batch.to(dtype=torch.float64).to_structures()
        for formula, s in zip(formulas, structures):
            assert s.composition == Composition(formula)
    with pytest.raises(XtalsolveError):
        numbers_of(["Na0.5Cl"])
    public = generate_structures(model, ["Ti2O4"], n_steps=3, seed=1)  # the public boundary: pymatgen Structures
    assert isinstance(public[0], Structure) and public[0].composition == Composition("Ti2O4")


def _gaussian_prior_denoiser(ld: LatticeDiffusion):
    """The exact denoiser of a known prior: lattice 6-vector ~ N(0, I) (eps-hat = sqrt(1 - abar) x_t) and uniform
    coordinates (score 0). Guidance alone must then find the cell of the measured pattern."""

    def denoise(numbers, frac, lat, t):
        return (1 - ld.alpha_bar(t)[:, None]).sqrt() * lat, torch.zeros_like(frac)

    return denoise


def test_data_guidance_reduces_the_pattern_mismatch():
    truth = Structure(Lattice.cubic(4.12), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    target = _pattern_of(truth)
    loss = PatternLoss(GRID, target, torch.ones(512, dtype=torch.bool), size=100.0)
    ld, td = LatticeDiffusion(scale=0.6), TorusDiffusion()
    numbers = numbers_of(["CsCl"] * 8)
    mismatch = {}
    for name, guidance in (("none", None), ("dps", DataGuidance(loss))):
        batch = sample(_gaussian_prior_denoiser(ld), numbers, 40, ld, td, guidance=guidance,
                       generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            mismatch[name] = loss(batch.to(dtype=torch.float64))
    assert float(mismatch["dps"].mean()) < 0.85 * float(mismatch["none"].mean())
    assert int((mismatch["dps"] < mismatch["none"]).sum()) >= 6


def test_gaussian_blur_is_the_direct_truncated_convolution():
    """The FFT blur against numpy's direct convolution (zero padding, kernel cut at 4 std), narrow to wider
    than the pattern, with the gradient flowing through it."""
    rng = np.random.default_rng(3)
    y = torch.tensor(rng.random((2, 3, 200)), dtype=torch.float64, requires_grad=True)
    for sigma in (0.6, 4.0, 30.0, 90.0):
        half = math.ceil(4 * sigma)
        kernel = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
        kernel /= kernel.sum()
        expected = np.apply_along_axis(lambda row: np.convolve(row, kernel, mode="full")[half : half + 200], -1,
                                       y.detach().numpy())
        np.testing.assert_allclose(gaussian_blur(y, sigma).detach().numpy(), expected, atol=1e-12)
    gaussian_blur(y, 4.0).sum().backward()  # unit-area kernel: interior points pass their whole weight on
    assert abs(float(y.grad[0, 0, 100]) - 1.0) < 1e-9 and float(y.grad[0, 0, 0]) < 0.6
    assert gaussian_blur(y, 0.0) is y


def test_scale_background_and_size_fits_recover_known_values():
    truth = toy_structures(3)[2]
    batch = CrystalBatch.from_structures([truth])
    calc = powder_pattern(batch, GRID, "q", Instrument(), size=40.0, biso=0.5, binned=True)
    calc = calc / calc.max()
    basis = chebyshev_basis(GRID, 3)
    observed = 2.5 * calc + (basis @ torch.tensor([0.3, -0.1, 0.05], dtype=torch.float64))
    mask = torch.ones_like(observed, dtype=torch.bool)
    _, _, coef = fit_scale_background(calc, observed, mask, basis)
    assert torch.allclose(coef[0], torch.tensor([2.5, 0.3, -0.1, 0.05], dtype=torch.float64), atol=1e-6)
    loss = PatternLoss(GRID, observed[0], mask[0], size=None, n_background=3)
    size = fit_size(loss, batch)
    assert 30.0 < float(size) < 55.0
