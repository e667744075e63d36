"""ELNES (EELS core-loss edges): reading EELS files, the power-law background, FEFF10 ELNES, `xtalsolve local`."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xtalsolve.errors import XtalsolveError
from xtalsolve.io.spectra import (XasSpectrum, normalize, read_spectrum, subtract_power_law, synthetic_eels,
                                  write_eels_msa)

DATA = Path(__file__).parent / "data" / "spectra"
QUARTZ = np.loadtxt(DATA / "quartz_si_k_feff.txt")  # FEFF10 Si K XANES of alpha-quartz (energy eV, mu)
FEFF = __import__("xtalsolve.local.feff", fromlist=["x"]).feff_available()


def test_msa_round_trip_and_power_law_background(tmp_path):
    """Quartz's edge on a power-law background (r = 3, three edge steps at the edge) with counting noise, through
    an MSA file: the fitted r is the true one and the background-free edge normalises to the computed XANES."""
    e, counts = synthetic_eels(QUARTZ[:, 0], QUARTZ[:, 1], 1839.0, r=3.0, background_ratio=3.0, seed=1)
    spec = read_spectrum(write_eels_msa(tmp_path / "q.msa", e, counts), "Si", "K")
    assert spec.meta["kind"] == "eels" and np.allclose(spec.energy, e, atol=1e-6) and np.allclose(spec.mu, counts)
    clean = subtract_power_law(spec)
    assert clean.meta["background"]["r"] == pytest.approx(3.0, abs=0.1)
    grid = np.arange(-10.0, 50.01, 0.5)
    ref = normalize(XasSpectrum(QUARTZ[:, 0], QUARTZ[:, 1], "quartz", "Si", "K")).on_grid(grid)
    got = normalize(clean).on_grid(grid)
    assert np.corrcoef(got, ref)[0, 1] > 0.999 and np.sqrt(np.mean((got - ref) ** 2)) < 0.05


def test_eels_bad_input_one_line_errors(tmp_path):
    e, counts = synthetic_eels(QUARTZ[:, 0], QUARTZ[:, 1], 1839.0, start=-5.0)
    with pytest.raises(XtalsolveError, match="start well before the edge"):
        subtract_power_law(XasSpectrum(e, counts, "late.msa", "Si", "K", {"kind": "eels"}))
    e, counts = synthetic_eels(QUARTZ[:, 0], QUARTZ[:, 1], 1839.0)
    with pytest.raises(XtalsolveError, match="non-positive counts"):
        subtract_power_law(XasSpectrum(e, counts - counts.max(), "sub.msa", "Si", "K", {"kind": "eels"}))
    bad = tmp_path / "garbage.dm3"
    bad.write_bytes(b"not a DigitalMicrograph file at all")
    with pytest.raises(XtalsolveError, match="cannot read as EELS"):
        read_spectrum(bad, "Si", "K")
    with pytest.raises(XtalsolveError, match="unknown spectrum kind"):
        read_spectrum(DATA / "quartz_si_k_feff.txt", "Si", "K", kind="xps")


def test_cli_local_reads_elnes(tmp_path):
    """`xtalsolve local q.msa`: EELS by extension, background removed, quartz's first shell (CN 4, Si-O 1.61 A)."""
    e, counts = synthetic_eels(QUARTZ[:, 0], QUARTZ[:, 1], 1839.0, seed=2)
    msa = write_eels_msa(tmp_path / "q.msa", e, counts)
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "xtalsolve.cli", "local", str(msa), "--absorber", "Si", "--samples",
                        "3", "--method", "template", "--library", str(DATA / "si_k_library_small.npz"), "--out",
                        str(out)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["spectrum_kind"] == "eels" and s["eels_background"]["r"] == pytest.approx(3.0, abs=0.15)
    assert s["coordination_number"] == 4 and abs(s["mean_bond_length_A"] - 1.61) < 0.05


@pytest.mark.skipif(not FEFF, reason="feff10-rs not installed")
def test_feff_elnes_is_the_xanes_in_the_dipole_limit():
    """FEFF10's orientation-averaged ELNES (300 keV, 10 mrad) of a SiO4 cluster with its next Si normalises to the
    same edge as its XANES: the ground on which the XANES-trained models read ELNES."""
    from xtalsolve.local.clusters import Cluster
    from xtalsolve.local.feff import FeffSettings, feff_input, run_feff

    tet = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / np.sqrt(3) * 1.61
    cl = Cluster(("Si",) + ("O",) * 4 + ("Si",) * 4, np.vstack([np.zeros(3), tet, tet * 3.1 / 1.61 * np.array(
        [1, -1, 1])]))
    grid = np.arange(-10.0, 50.01, 0.5)
    spectra = []
    for kind in ("xanes", "elnes"):
        energy, mu, _ = run_feff(feff_input(cl, FeffSettings(spectroscopy=kind)))
        spectra.append(normalize(XasSpectrum(energy, mu, kind, "Si", "K")).on_grid(grid))
    assert np.corrcoef(*spectra)[0, 1] > 0.999
    with pytest.raises(XtalsolveError, match="unknown spectroscopy"):
        FeffSettings(spectroscopy="xes").cards()


def test_low_energy_eels_edge_is_not_taken_for_kev(tmp_path):
    """Li K (55 eV) in EELS ends below 100 eV, which for an X-ray edge would mean keV; with the edge known it reads."""
    e = np.arange(20.0, 90.0, 0.1)
    counts = 1e6 * (e / 20.0) ** -3 + 2e3 / (1 + np.exp(-(e - 55.0) / 0.5))
    path = write_eels_msa(tmp_path / "li.msa", e, counts)
    spec = read_spectrum(path, "Li", "K")
    assert spec.meta["kind"] == "eels"
    assert subtract_power_law(spec).meta["background"]["r"] == pytest.approx(3.0, abs=0.05)
    with pytest.raises(XtalsolveError, match="keV"):
        read_spectrum(path)  # no edge known: the keV check stands
