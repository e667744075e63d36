"""FEFF10 input writing, caching/resume, and one real FEFF10 run on a tiny SiO4 cluster."""

import json

import numpy as np
import pytest

from xtalsolve.io.spectra import XasSpectrum, normalize
from xtalsolve.local.clusters import Cluster
from xtalsolve.local.feff import FeffSettings, SpectrumCache, compute_spectra, feff_available, feff_input, input_key


def sio4(r=1.61):
    v = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / np.sqrt(3) * r
    return Cluster(("Si", "O", "O", "O", "O"), np.vstack([np.zeros(3), v]), {"material_id": "test-sio4"})


def test_feff_input_declares_only_present_potentials():
    text = feff_input(sio4())
    pots = text.split("POTENTIALS")[1].split("ATOMS")[0].split()
    assert pots == ["0", "14", "Si", "1", "8", "O"]  # no potential for Si as a scatterer: it does not recur
    atoms = [ln.split() for ln in text.split("ATOMS")[1].splitlines() if len(ln.split()) == 5]
    assert len(atoms) == 5 and atoms[0][3] == "0" and all(a[3] == "1" for a in atoms[1:])
    for card in ("SCF 3.000", "FMS 4.000", "COREHOLE FSR", "EDGE K", "XANES"):
        assert card in text
    # a recurring absorber element gets its own scatterer potential
    two = Cluster(("Si", "O", "Si"), np.array([[0, 0, 0], [1.6, 0, 0], [3.1, 0, 0]], float))
    assert "  2  14 Si" in feff_input(two)


def test_input_key_changes_with_geometry_and_settings():
    a = feff_input(sio4())
    assert input_key(a) == input_key(feff_input(sio4()))
    assert input_key(a) != input_key(feff_input(sio4(1.62)))
    assert input_key(a) != input_key(feff_input(sio4(), FeffSettings(scf_radius_A=4.0)))


@pytest.mark.skipif(not feff_available(), reason="feff10-rs not installed")
def test_feff_run_cache_and_resume(tmp_path):
    cache = SpectrumCache(tmp_path)
    res = compute_spectra([sio4()], cache, progress=False)
    assert res["computed"] == 1 and res["failed"] == 0
    (key,) = cache.keys()
    energy, mu, rec = cache.get(key)
    assert rec["meta"]["material_id"] == "test-sio4" and rec["versions"]["feff10-rs"] != "missing"
    assert rec["settings"]["fms_radius_A"] == 4.0 and rec["seconds"] > 0
    # Si K edge: tabulated 1839 eV; FEFF's absolute energies must bracket it and the spectrum must show an edge
    assert energy[0] < 1839.0 < energy[-1]
    n = normalize(XasSpectrum(energy, mu, "feff", "Si", "K"))
    assert 1835.0 < n.e0 < 1850.0 and n.norm.max() > 1.0
    # second call: cached, nothing recomputed
    again = compute_spectra([sio4()], cache, progress=False)
    assert again == {"computed": 0, "cached": 1, "failed": 0, "mean_seconds": None}
    json.loads((tmp_path / f"{key}.json").read_text())


@pytest.mark.skipif(not feff_available(), reason="feff10-rs not installed")
def test_cli_generate_resumes(tmp_path):
    """`xtalsolve spectra generate` on one shared zeolite (sodalite): one spectrum, then fully cached."""
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "shared" / "data" / "structures" / "zeolites_iza" / "SOD.cif"
    if not src.exists():
        pytest.skip("shared zeolite data not available")
    data = tmp_path / "data" / "structures" / "zeolites_iza"
    data.mkdir(parents=True)
    (data / "SOD.cif").write_text(src.read_text())
    cmd = [sys.executable, "-m", "xtalsolve.cli", "spectra", "generate", "--out", str(tmp_path / "c"), "--sources",
           "zeolites", "--limit", "1", "--no-progress"]
    env = {**__import__("os").environ, "XTALSOLVE_SHARED_DATA": str(tmp_path / "data")}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout.strip().splitlines()[-1])["computed"] == 1
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert json.loads(second.stdout.strip().splitlines()[-1])["cached"] == 1
    rec = json.loads(next((tmp_path / "c").glob("*.json")).read_text())
    assert rec["meta"]["material_id"] == "iza-SOD" and rec["meta"]["split"] in ("train", "val", "test")
    bad = subprocess.run(cmd[:-1] + ["--sources", "nowhere"], capture_output=True, text=True, env=env, check=False)
    assert bad.returncode == 2 and "--sources" in bad.stderr
    others = ",".join(x for x in ("train", "val", "test") if x != rec["meta"]["split"])
    elsewhere = subprocess.run(cmd + ["--splits", others], capture_output=True, text=True, env=env, check=False)
    assert elsewhere.returncode == 0, elsewhere.stderr  # sodalite's split left out: nothing to compute
    assert json.loads(elsewhere.stdout.strip().splitlines()[-1])["computed"] == 0
    assert json.loads(elsewhere.stdout.strip().splitlines()[-1])["cached"] == 0
    unknown = subprocess.run(cmd + ["--splits", "holdout"], capture_output=True, text=True, env=env, check=False)
    assert unknown.returncode == 2 and "--splits" in unknown.stderr
    library = [sys.executable, "-m", "xtalsolve.cli", "spectra", "library", "--cache", str(tmp_path / "c"),
               "--out", str(tmp_path / "l.npz")]
    kept = subprocess.run(library + ["--min-cn", "4"], capture_output=True, text=True, check=False)
    assert kept.returncode == 0 and json.loads(kept.stdout)["spectra"] == 1  # sodalite's Si is four-fold
    none = subprocess.run(library + ["--min-cn", "5"], capture_output=True, text=True, check=False)
    assert none.returncode == 2 and "no entry has 5 or more O neighbours" in none.stderr


def test_overlapping_atoms_are_rejected_before_feff():
    from xtalsolve.errors import XtalsolveError

    bad = Cluster(("Si", "O", "O"), np.array([[0, 0, 0], [1.6, 0, 0], [1.6, 0.001, 0]], float))
    with pytest.raises(XtalsolveError, match="overlapping"):
        feff_input(bad)
