"""Front-door commands: demo and simulate, end to end, and their one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pymatgen.analysis.diffraction.xrd import XRDCalculator

from xtalsolve.io import read_pattern


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "xtalsolve.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_demo_writes_patterns_and_plot(tmp_path):
    result = run("demo", "--sizes", "-o", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr
    files = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert "anatase_sizes.png" in files and len([f for f in files if f.endswith(".xy")]) == 4
    small = read_pattern(tmp_path / "demo" / "anatase_D10A.xy")
    large = read_pattern(tmp_path / "demo" / "anatase_D1000A.xy")
    assert small.wavelength == pytest.approx(1.54184)
    # smaller crystallites: broader peaks, so a lower peak-to-mean ratio
    assert small.y.max() / small.y.mean() < large.y.max() / large.y.mean() / 5


def test_simulate_writes_xy_with_peaks_where_pymatgen_puts_them(tmp_path, rocksalt):
    cif = tmp_path / "NaCl.cif"
    rocksalt.to(filename=str(cif))
    result = run("simulate", str(cif), "--radiation", "CuKa1", "--two-theta", "20", "80", "0.01", "-o", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    pattern = read_pattern(tmp_path / "out" / "NaCl.xy")
    assert pattern.wavelength == pytest.approx(1.54056) and len(pattern) == 6001
    reference = XRDCalculator(wavelength="CuKa1").get_pattern(rocksalt, two_theta_range=(20, 80))
    strongest = reference.x[np.argmax(reference.y)]
    assert pattern.x[np.argmax(pattern.y)] == pytest.approx(strongest, abs=0.01)


@pytest.mark.parametrize(
    "args, message",
    [
        (["simulate", "missing.cif", "-o", "x"], "missing.cif: no such file"),
        (["simulate", "{cif}", "--two-theta", "5", "90", "0.02", "--q", "1", "5", "0.01", "-o", "x"], "not both"),
        (["simulate", "{cif}", "--wavelength", "-1", "-o", "x"], "--wavelength"),
        (["simulate", "{cif}", "--size", "0", "-o", "x"], "--size"),
        (["simulate", "{bad}", "-o", "x"], "cannot read a crystal structure"),
        (["simulate", "{cif}", "--size", "30", "--crystallite-shape", "prism", "-o", "x"], "unknown crystallite shape"),
        (["solve", "{xy}", "--formula", "NaCl", "--crystallite-shape", "prism", "--out", "x"], "--crystallite-shape"),
        (["solve", "{xy}", "--formula", "NaCl", "--rank-by", "chi2", "--out", "x"], "unknown ranking"),
        (["solve", "{xy}", "--formula", "NaCl", "--library", "icsd", "--out", "x"], "unknown prototype library"),
        (["solve", "{xy}", "--formula", "NaCl", "--fit-structure", "maybe", "--out", "x"], "unknown structure fit"),
        (["solve", "{xy}", "--formula", "NaCl", "--max-pool", "8", "--out", "x"], "uniform Q grid"),
        (["solve", "{xy}", "--formula", "NaCl", "--refine", "0", "--out", "x"], "at least one candidate must be refined"),
    ],
)
def test_simulate_bad_input_gives_one_line(tmp_path, rocksalt, args, message):
    cif = tmp_path / "NaCl.cif"
    rocksalt.to(filename=str(cif))
    bad = tmp_path / "bad.cif"
    bad.write_text("data_x\n_cell_length_a 3\nloop_\n_atom_site_label\n")
    xy = Path(__file__).resolve().parents[1] / "src/xtalsolve/resources/examples/NaCl_nano_CuKa1.xy"
    args = [a.format(cif=cif, bad=bad, xy=xy) for a in args]
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr


def test_simulate_pdf_and_debye_write_what_the_library_computes(tmp_path, rocksalt):
    from xtalsolve.physics.debye import simulate_nanoparticle
    from xtalsolve.physics.pdf import simulate_pdf

    cif = tmp_path / "NaCl.cif"
    rocksalt.to(filename=str(cif))
    assert run("simulate", str(cif), "--r", "1", "10", "0.05", "-o", str(tmp_path / "pdf")).returncode == 0
    g = read_pattern(tmp_path / "pdf" / "NaCl.xy")
    assert g.unit == "r" and len(g) == 181
    np.testing.assert_allclose(g.y, simulate_pdf([rocksalt], 1, 10, 0.05, biso=0.5)[0], rtol=1e-6, atol=1e-6)
    args = ("simulate", str(cif), "--debye", "--size", "12", "--two-theta", "20", "60", "0.1", "-o", str(tmp_path / "np"))
    assert run(*args).returncode == 0
    particle = read_pattern(tmp_path / "np" / "NaCl.xy")
    np.testing.assert_allclose(particle.y, simulate_nanoparticle([rocksalt], 12.0, two_theta=(20, 60, 0.1))[0], rtol=1e-6)


def test_demo_solves_the_bundled_nanocrystal_with_the_shipped_model(tmp_path):
    """`xtalsolve demo`: the shipped model + fit + Rietveld find rock-salt NaCl from its 60 A pattern and formula
    alone (Z not given), and the answer is checked against the bundled reference CIF."""
    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.core import Lattice, Structure

    out = tmp_path / "demo"
    result = run("demo", "-o", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "matches the reference" in result.stdout and "NOT" not in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    best = summary["candidates"][0]
    assert best["rank"] == 1 and best["rwp"] < 0.05 and best["space_group"] == "Fm-3m (225)"
    assert abs(best["lattice"]["a"] * 2 ** 0.5 - 5.640) < 0.01 or abs(best["lattice"]["a"] - 5.640) < 0.01
    reference = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.640), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert StructureMatcher().fit(Structure.from_file(out / "rank01.cif"), reference)
    assert (out / "fit.png").is_file() and summary["reference_check"]["verdict"].startswith("matches")
