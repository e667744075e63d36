"""The shipped Si K diffusion checkpoint (src/xtalsolve/local/data/edm_Si_K.pt): loads, is the default of
``xtalsolve local`` for Si K, and recovers the tetrahedral first shell of spectra it never saw in training."""

from pathlib import Path

import numpy as np
import pytest
import torch

from xtalsolve.io.spectra import read_spectrum
from xtalsolve.local.clusters import first_shell
from xtalsolve.local.library import SpectrumLibrary
from xtalsolve.local.model import load_model, sample_clusters
from xtalsolve.local.predict import consensus, default_checkpoint_path, default_library_path, predict_local

DATA = Path(__file__).parent / "data" / "spectra"
CKPT = default_checkpoint_path("Si", "K")

pytestmark = pytest.mark.skipif(not CKPT.exists(), reason="no shipped Si K checkpoint")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_checkpoint_is_small_and_inference_only():
    state = torch.load(CKPT, weights_only=False, map_location="cpu")
    assert CKPT.stat().st_size <= 5 * 2**20
    assert "optimizer" not in state and "generator" not in state
    model, cfg = load_model(CKPT)
    assert cfg["absorber"] == "Si" and cfg["edge"] == "K" and len(cfg["grid"]) == cfg["n_features"]
    assert not model.training


def test_shipped_model_recovers_held_out_first_shells():
    """Test-split spectra (a framework never trained on, split by material): the unperturbed site gives consensus
    CN 4, tetrahedral angles and the FEFF cluster's mean Si-O to 0.02 A; the copy with one O removed (3-fold)
    gives CN 3 -- the spectrum, not a prior, sets the count."""
    lib = SpectrumLibrary.load(default_library_path("Si", "K"))
    test = [i for i, m in enumerate(lib.meta) if m["split"] == "test"]
    cn_of = {i: first_shell(lib.cluster(i, "Si")).coordination_number for i in test}
    four = next(i for i in test if not lib.meta[i].get("perturbation") and cn_of[i] == 4)
    three = next(i for i in test if cn_of[i] == 3)
    model, cfg = load_model(CKPT)
    for i, cn, n in ((four, 4, 8), (three, 3, 4)):
        truth = first_shell(lib.cluster(i, "Si"))
        assert truth.coordination_number == cn
        with torch.no_grad():
            p = torch.softmax(model.count(torch.tensor(lib.features[i][None], dtype=torch.float32)), -1)[0]
        assert p.argmax().item() + 1 == cn and p[cn - 1] > 0.5
        c = consensus(sample_clusters(model, cfg, lib.features[i], n, "Si", seed=0))
        assert c["coordination_number"] == cn
        assert abs(c["mean_bond_length_A"] - truth.mean_bond_length_A) < 0.02
        if cn == 4:
            assert all(100.0 < a < 120.0 for a in c["angles_deg"])  # tetrahedral O-Si-O, not planar or random


def test_local_diffusion_uses_the_shipped_checkpoint_on_quartz():
    """alpha-quartz (FEFF10 spectrum of a 49-atom cluster; quartz is in no library): CN 4, mean Si-O 1.609 A."""
    spec = read_spectrum(DATA / "quartz_si_k_feff.txt", "Si", "K")
    pred = predict_local(spec, "Si", "K", samples=8, method="diffusion")
    s = pred.summary
    assert CKPT.name in s["method"]
    assert s["coordination_number"] == 4 and abs(s["mean_bond_length_A"] - 1.609) < 0.02
    assert np.all(np.abs(np.array(s["bond_lengths_A"]) - 1.609) < 0.1)
    # the default (auto) is the model wherever a checkpoint exists; a template library passed alone selects templates
    auto = predict_local(spec, "Si", "K", samples=3).summary
    assert CKPT.name in auto["method"] and "alignment" not in auto and auto["mixture"]["coordination_number_fractions"]
    small = DATA / "si_k_library_small.npz"
    assert predict_local(spec, "Si", "K", samples=3, library=small).summary["method"].startswith("template")


def test_model_on_a_spectrum_with_a_distorted_energy_axis_needs_the_alignment():
    """Quartz's computed spectrum with its energy axis stretched by 1.25 about the edge (as FEFF's Fe K features
    sit closer to the edge than measured ones): aligned, the model is given it back on the computed axis (the
    fitted stretch within one grid step of 1.25) and finds CN 4 at the true mean Si-O; the alignment's inverse
    mapping puts a feature at E back at (E - shift) / stretch."""
    from xtalsolve.io.spectra import XasSpectrum, normalize
    from xtalsolve.local.baselines import Alignment

    spec = read_spectrum(DATA / "quartz_si_k_feff.txt", "Si", "K")
    e0 = normalize(spec).e0
    stretched = XasSpectrum(e0 + 1.25 * (spec.energy - e0), spec.mu, "stretched quartz", "Si", "K")
    s = predict_local(stretched, "Si", "K", samples=8, align=True).summary
    assert abs(s["alignment"]["stretch"] - 1.25) <= 0.051
    assert s["coordination_number"] == 4 and abs(s["mean_bond_length_A"] - 1.609) < 0.03
    unaligned = predict_local(stretched, "Si", "K", samples=8).summary  # the model's default: no alignment
    assert "alignment" not in unaligned and abs(unaligned["mean_bond_length_A"] - 1.609) > 0.04
    grid = np.arange(-10.0, 50.01, 0.5)
    peak = np.exp(-0.5 * ((grid - 13.0) / 1.0) ** 2)
    back = Alignment(1.0, 1.2, 0.0, 0.0).to_computed_axis(grid, peak)
    assert grid[np.argmax(back)] == pytest.approx(10.0)
