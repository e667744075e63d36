"""Spectrum reading and normalisation: synthetic edges with known E0/step, and the shared measured Fe K XDI files."""

from pathlib import Path

import numpy as np
import pytest

from xtalsolve.errors import XtalsolveError
from xtalsolve.io.spectra import XasSpectrum, check_spectrum, normalize, read_spectrum, spectrum_features

XAS = Path(__file__).resolve().parents[2] / "shared" / "data" / "experimental_xas"
DATA = Path(__file__).parent / "data" / "spectra"
needs_xas = pytest.mark.skipif(not XAS.is_dir(), reason=f"shared XAS data not found at {XAS}")


def synthetic(e0=7112.0, step=1.7, slope=-2e-4, offset=0.3, width=1.5, n=600, noise=0.0, seed=0):
    """Arctan edge of known E0 and step on a sloping line (the pre-edge), flat above the edge."""
    e = np.linspace(e0 - 200, e0 + 600, n)
    mu = offset + slope * (e - e0) + step * (0.5 + np.arctan((e - e0) / width) / np.pi)
    mu += np.random.default_rng(seed).normal(0, noise, n)
    return e, mu


def test_synthetic_edge_recovers_e0_and_step():
    e, mu = synthetic()
    n = normalize(XasSpectrum(e, mu, "synthetic"))
    assert abs(n.e0 - 7112.0) < 1.5  # grid spacing 1.34 eV
    # arctan reaches 0.5 + atan(x)/pi: the far post-edge equals the step; polynomial fit over +50..+600
    assert n.edge_step == pytest.approx(1.7, rel=0.03)
    assert np.abs(n.norm[e < 7112 - 40]).max() < 0.03
    assert n.norm[e > 7112 + 100].mean() == pytest.approx(1.0, abs=0.03)


def test_two_column_text_and_features(tmp_path):
    e, mu = synthetic(e0=1839.0, noise=0.002)
    p = tmp_path / "s.txt"
    np.savetxt(p, np.c_[e, mu], header="energy mu")
    spec = read_spectrum(p, "Si", "K")
    f = spectrum_features(spec)
    assert f.shape == (121,) and f[0] < 0.1 and f[-1] == pytest.approx(1.0, abs=0.05)


@needs_xas
@pytest.mark.parametrize("name", ["Fe2O3_rt_01", "FeO_rt_01", "Fe3O4_rt_01"])
def test_shared_fe_xdi(name):
    spec = read_spectrum(XAS / f"{name}.xdi")
    assert spec.element == "Fe" and spec.edge == "K"
    n = normalize(spec)
    # Fe K edge of oxides: 7112 eV (metal) + chemical shift of a few eV
    assert 7115 < n.e0 < 7130
    assert abs(np.median(n.norm[spec.energy < n.e0 - 40])) < 0.02
    assert 0.7 < np.median(n.norm[(spec.energy > n.e0 + 50) & (spec.energy < n.e0 + 300)]) < 1.3


@needs_xas
def test_fe_oxidation_state_shifts_the_edge():
    """Fe2+ (wustite) edge lies below Fe3+ (hematite); mixed-valence magnetite in between."""
    e0 = {k: normalize(read_spectrum(XAS / f"{k}_rt_01.xdi")).e0 for k in ("FeO", "Fe3O4", "Fe2O3")}
    assert e0["FeO"] < e0["Fe3O4"] <= e0["Fe2O3"]


def test_feff_text_file_reads():
    spec = read_spectrum(DATA / "quartz_si_k_feff.txt", "Si", "K")
    n = normalize(spec)
    assert 1835 < n.e0 < 1850  # Si K edge 1839 eV


def test_bad_spectra_errors(tmp_path):
    e, mu = synthetic()
    p = tmp_path / "kev.txt"
    np.savetxt(p, np.c_[e / 1000, mu])
    with pytest.raises(XtalsolveError, match="keV"):
        read_spectrum(p)
    p = tmp_path / "short.txt"
    np.savetxt(p, np.c_[e[:10], mu[:10]])
    with pytest.raises(XtalsolveError, match="too short"):
        read_spectrum(p)
    with pytest.raises(XtalsolveError, match="no absorption edge"):
        normalize(XasSpectrum(e, np.random.default_rng(0).normal(0, 0.01, len(e)), "noise"))
    with pytest.raises(XtalsolveError, match="does not contain"):
        check_spectrum(XasSpectrum(e, mu, "x", "Si", "K"))
    with pytest.raises(XtalsolveError, match="not found"):
        read_spectrum(tmp_path / "missing.txt")
    p = tmp_path / "one.txt"
    p.write_text("1 2\n3 4\n")
    with pytest.raises(XtalsolveError):
        read_spectrum(p)
