"""Dataset split/sites, library, baselines, metrics, and the `xtalsolve local` / `spectra` CLI end to end."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from xtalsolve.errors import XtalsolveError
from xtalsolve.local.baselines import TemplateMatcher, fit_first_shell, shell_chi
from xtalsolve.local.clusters import Cluster, FirstShell, first_shell
from xtalsolve.local.dataset import absorber_sites, iter_clusters, material_split
from xtalsolve.local.library import SpectrumLibrary
from xtalsolve.local.metrics import score
from xtalsolve.local.predict import DATA_DIR, consensus, site_mixture

DATA = Path(__file__).parent / "data" / "spectra"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def quartz():
    return Structure.from_spacegroup("P3_121", Lattice.hexagonal(4.9134, 5.4052), ["Si", "O"],
                                     [[0.4697, 0, 1 / 3], [0.4135, 0.2669, 0.21423]])


def test_material_split_is_deterministic_and_balanced():
    keys = [f"X{i}O2|{i % 230}" for i in range(3000)]
    splits = [material_split(k) for k in keys]
    assert splits == [material_split(k) for k in keys]
    frac = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert abs(frac["train"] - 0.8) < 0.03 and abs(frac["test"] - 0.1) < 0.03


def test_absorber_sites_unique_by_symmetry():
    s = quartz()
    assert len(absorber_sites(s, "Si")) == 1  # three Si, one orbit
    assert absorber_sites(s, "O") == []  # O's first shell (by the O-O generic cutoff) is not pure O


def test_iter_clusters_on_one_zeolite(tmp_path):
    zeo = tmp_path / "structures" / "zeolites_iza"
    zeo.mkdir(parents=True)
    src = SHARED / "structures" / "zeolites_iza" / "SOD.cif"
    if not src.exists():
        pytest.skip("shared zeolite data not available")
    (zeo / "SOD.cif").write_text(src.read_text())
    cls = list(iter_clusters("Si", sources=("zeolites",), n_perturbed=4, data_dir=tmp_path))
    assert len(cls) == 5  # sodalite: one Si orbit; unperturbed + stretch, bend, rattle, vacancy
    kinds = [c.meta.get("perturbation", [{}])[-1].get("kind") for c in cls]
    assert kinds == [None, "stretch", "bend", "rattle", "vacancy"]
    assert first_shell(cls[0]).coordination_number == 4 and first_shell(cls[-1]).coordination_number == 3
    assert len({c.meta["split"] for c in cls}) == 1 and cls[0].meta["material_key"].startswith("SiO2|")
    again = list(iter_clusters("Si", sources=("zeolites",), n_perturbed=4, data_dir=tmp_path))
    assert all(np.array_equal(a.positions, b.positions) for a, b in zip(cls, again))
    assert list(iter_clusters("Si", sources=("zeolites",), n_perturbed=4, data_dir=tmp_path, min_cn=5)) == []


def test_min_cn_keeps_six_fold_sites(tmp_path):
    """A crystal with four- and six-fold Si (stishovite next to quartz in one source): min_cn=5 keeps the
    six-fold site and its copies, the vacancy copy being five-fold."""
    from pymatgen.core import Lattice, Structure

    zeo = tmp_path / "structures" / "zeolites_iza"
    zeo.mkdir(parents=True)
    stishovite = Structure.from_spacegroup("P4_2/mnm", Lattice.tetragonal(4.1773, 2.6655), ["Si", "O"],
                                           [[0, 0, 0], [0.3062, 0.3062, 0]])
    (zeo / "STI.cif").write_text(stishovite.to(fmt="cif"))
    (zeo / "QTZ.cif").write_text(quartz().to(fmt="cif"))
    cls = list(iter_clusters("Si", sources=("zeolites",), n_perturbed=4, data_dir=tmp_path, min_cn=5))
    assert [first_shell(c).coordination_number for c in cls] == [6, 6, 6, 6, 5]
    assert {c.meta["material_key"] for c in cls} == {"SiO2|136"}
    tetrahedral = list(iter_clusters("Si", sources=("zeolites",), n_perturbed=0, data_dir=tmp_path, max_cn=4))
    assert [first_shell(c).coordination_number for c in tetrahedral] == [4]  # quartz's one Si orbit only
    assert tetrahedral[0].meta["material_key"] != "SiO2|136"


def four_six_pair(lib: SpectrumLibrary) -> tuple[int, int]:
    """Unperturbed cristobalite (four-fold Si) and stishovite (six-fold) entries of the packaged library."""

    def site(key):
        return next(i for i, m in enumerate(lib.meta) if m["material_key"] == key and not m.get("perturbation"))

    four, six = site("SiO2|92"), site("SiO2|136")
    assert [first_shell(lib.cluster(i, "Si")).coordination_number for i in (four, six)] == [4, 6]
    return four, six


def test_linear_combination_fit_recovers_a_two_site_mixture():
    """A 1:2 mixture of cristobalite's four-fold and stishovite's six-fold Si K spectrum (as magnetite mixes
    tetrahedral and octahedral Fe): with both materials in the library the fit is exact; with both left out, other
    materials' templates still give the four-fold and the higher-coordinated fractions to within 0.1 (some of the
    six-fold weight goes to five-fold templates), six-fold the largest."""
    lib = SpectrumLibrary.load(DATA_DIR / "library_Si_K.npz")
    four, six = four_six_pair(lib)
    mixed = lib.features[four] / 3 + 2 * lib.features[six] / 3
    exact = site_mixture(TemplateMatcher(lib), mixed, "Si")
    assert exact["coordination_number_fractions"] == {"4": 0.333, "6": 0.667} and exact["residual"] < 1e-4
    left_out = {lib.meta[four]["material_key"], lib.meta[six]["material_key"]}
    others = lib.subset([i for i in range(len(lib)) if lib.meta[i]["material_key"] not in left_out])
    fit = site_mixture(TemplateMatcher(others), mixed, "Si")
    fractions = {int(k): v for k, v in fit["coordination_number_fractions"].items()}
    assert abs(fractions.get(4, 0) - 1 / 3) < 0.1 and abs(fractions.get(5, 0) + fractions.get(6, 0) - 2 / 3) < 0.1
    assert max(fractions, key=fractions.get) == 6
    assert abs(fit["weight_sum"] - 1) < 0.02 and fit["residual"] > 0
    assert all(c["material_id"] not in {lib.meta[four]["material_id"], lib.meta[six]["material_id"]}
               for c in fit["components"])


def test_library_roundtrip_and_template_self_match(tmp_path):
    lib = SpectrumLibrary.load(DATA / "si_k_library_small.npz")
    lib.save(tmp_path / "l.npz")
    lib2 = SpectrumLibrary.load(tmp_path / "l.npz")
    assert len(lib2) == len(lib) and lib2.meta == lib.meta
    tm = TemplateMatcher(lib)
    for i in (0, 5, 11):
        idx, dist = tm.query(lib.features[i], k=1)
        assert idx[0] == i and dist[0] == 0
    # excluding the material removes every copy of it
    key = lib.meta[0]["material_key"]
    idx, _ = tm.query(lib.features[0], k=len(lib), exclude={key})
    assert all(lib.meta[j]["material_key"] != key for j in idx)


def shell(cn, r, angles=()):
    return FirstShell("O", 2.2, cn, np.full(cn, r), np.array(angles, float))


def test_metrics_against_hand_values():
    pred = [shell(4, 1.62, [109.5] * 6), shell(6, 1.80, [90.0] * 12 + [180.0] * 3)]
    true = [shell(4, 1.60, [109.5] * 6), shell(4, 1.75, [109.5] * 6)]
    s = score(pred, true)
    assert s["first_shell_mae_A"] == pytest.approx((0.02 + 0.05) / 2)
    assert s["cn_accuracy"] == 0.5 and s["cn_relative_error"] == pytest.approx((0 + 2 / 4) / 2)
    assert s["angle_w1_mean_deg"] == pytest.approx((0 + (12 * 19.5 + 3 * 70.5) / 15) / 2)


def test_consensus_of_samples():
    tet = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / np.sqrt(3)
    cl = [Cluster(("Si",) + ("O",) * 4, np.vstack([np.zeros(3), tet * r])) for r in (1.60, 1.62, 1.64)]
    cl.append(Cluster(("Si",) + ("O",) * 3, np.vstack([np.zeros(3), tet[:3] * 1.7])))
    c = consensus(cl)
    assert c["coordination_number"] == 4 and c["mean_bond_length_A"] == pytest.approx(1.62)
    assert c["spread"]["coordination_number_counts"] == {"3": 1, "4": 3} and c["samples"] == 4
    assert c["angles_deg"] == pytest.approx([109.47] * 6, abs=0.01)


def test_first_shell_exafs_fit_recovers_synthetic_shell():
    k = np.linspace(2.0, 12.0, 300)
    amp = 0.6 * np.exp(-((k - 4.0) ** 2) / 30.0)  # smooth, realistic-looking backscattering amplitude
    phase = -1.2 - 0.25 * k
    lam = 1.5 + 0.8 * k
    chi = shell_chi(k, 4.0, 1.61, 0.0025, amp, phase, lam)
    chi += np.random.default_rng(0).normal(0, 0.002, k.size)
    fit = fit_first_shell(k, chi, amp, phase, lam, start=(5.0, 1.7, 0.004))
    assert fit.n == pytest.approx(4.0, rel=0.1) and fit.r_A == pytest.approx(1.61, abs=0.02)
    assert fit.sigma2_A2 == pytest.approx(0.0025, abs=0.0008)


def test_chi_r_peaks_at_the_shell_distance():
    """A pure sine sin(2 k R0) (no phase shift) transforms to a peak at R0; the transform is linear in chi."""
    from xtalsolve.local.baselines import chi_r

    k = np.arange(2.0, 14.0, 0.05)
    r = np.arange(0.0, 4.0, 0.01)
    for r0 in (1.6, 2.0, 3.1):
        assert r[np.argmax(np.abs(chi_r(k, np.sin(2 * k * r0), r)))] == pytest.approx(r0, abs=0.02)
    a, b = np.sin(2 * k * 1.6), 0.3 * np.cos(2 * k * 2.9)
    assert np.allclose(chi_r(k, a + b, r), chi_r(k, a, r) + chi_r(k, b, r))


def _synthetic_path():
    k = np.arange(2.0, 14.0, 0.05)
    return k, 0.6 * np.exp(-((k - 4.0) ** 2) / 30.0), -1.2 - 0.25 * k, 1.5 + 0.8 * k


def test_exafs_reference_is_the_most_regular_unperturbed_shell():
    from xtalsolve.local.evaluate import exafs_reference

    lib = SpectrumLibrary.load(DATA_DIR / "library_Si_K.npz").split("train")
    ref = exafs_reference(lib, "Si")
    shell = first_shell(ref)
    assert shell.coordination_number == 4 and not ref.meta.get("perturbation")
    others = [first_shell(lib.cluster(i, "Si")) for i, m in enumerate(lib.meta) if not m.get("perturbation")]
    assert np.std(shell.bond_lengths_A) <= min(np.std(o.bond_lengths_A) for o in others if o.coordination_number == 4)
    with pytest.raises(XtalsolveError, match="no unperturbed 9-fold"):
        exafs_reference(lib, "Si", cn=9)


def test_r_space_fit_recovers_the_first_shell_beside_a_second_one():
    k, amp, phase, lam = _synthetic_path()
    chi = shell_chi(k, 4.0, 1.61, 0.0025, amp, phase, lam) + shell_chi(k, 4.0, 3.10, 0.005, amp, phase, lam)
    chi += np.random.default_rng(1).normal(0, 0.002, k.size)
    fit = fit_first_shell(k, chi, amp, phase, lam, start=(5.0, 1.7, 0.004), r_window=(1.0, 2.0), kmin=3, kmax=12)
    assert fit.n == pytest.approx(4.0, rel=0.05) and fit.r_A == pytest.approx(1.61, abs=0.01)
    assert fit.sigma2_A2 == pytest.approx(0.0025, abs=0.0005)


def test_exafs_conditions_wrong_s02_scales_the_fitted_n():
    """N and S02 are one product: a sample whose S02 is 0.75 analysed with S02 = 1 gives N = 3 for four O;
    thermal sigma2 is taken up by the fitted sigma2, not by N."""
    from dataclasses import replace

    from xtalsolve.local.baselines import IDEAL_EXAFS, REALISTIC_EXAFS, FeffPath, exafs_first_shell

    k, amp, phase, lam = _synthetic_path()
    chi = np.c_[k, shell_chi(k, 4.0, 1.61, 0.0, amp, phase, lam)]
    ref = FeffPath(k, amp, phase, lam, 4.0, 1.61)
    tet = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / np.sqrt(3) * 1.61
    cl = Cluster(("Si",) + ("O",) * 4, np.vstack([np.zeros(3), tet]))
    assert exafs_first_shell(cl, ref, chi=chi).coordination_number == 4
    low = replace(IDEAL_EXAFS, s02_range=(0.75, 0.75))
    assert exafs_first_shell(cl, ref, conditions=low, chi=chi).coordination_number == 3
    warm = replace(REALISTIC_EXAFS, s02_range=(0.9, 0.9), noise=0.0, sigma2_range=(0.003, 0.003))
    shell = exafs_first_shell(cl, ref, conditions=warm, chi=chi)
    assert shell.coordination_number == 4 and shell.bond_lengths_A == pytest.approx([1.61] * 4, abs=0.01)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "xtalsolve.cli", *args], capture_output=True, text=True, check=False)


def test_cli_local_end_to_end(tmp_path):
    out = tmp_path / "o"
    r = run_cli("local", str(DATA / "quartz_si_k_feff.txt"), "--absorber", "Si", "--edge", "K", "--samples", "5",
                "--library", str(DATA / "si_k_library_small.npz"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["coordination_number"] == 4 and s["samples"] == 5 and s["method"].startswith("template")
    assert abs(s["mean_bond_length_A"] - 1.61) < 0.05 and len(s["bond_lengths_A"]) == 4 and len(s["angles_deg"]) == 6
    assert {"coordination_number_counts", "mean_bond_length_std_A"} <= set(s["spread"])
    assert len(list(out.glob("sample_*.xyz"))) == 5 and (out / "local.png").stat().st_size > 1000


def test_representative_sample_is_the_consensus_shell():
    from xtalsolve.local.predict import representative_sample

    tet = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / np.sqrt(3)
    cl = [Cluster(("Si",) + ("O",) * 4, np.vstack([np.zeros(3), tet * r])) for r in (1.58, 1.62, 1.66)]
    cl.insert(0, Cluster(("Si",) + ("O",) * 3, np.vstack([np.zeros(3), tet[:3] * 1.62])))
    assert representative_sample(cl, consensus(cl)) == 2  # CN 4, bonds 1.62 = the median; not the CN-3 sample


@pytest.mark.skipif(not __import__("xtalsolve.local.feff", fromlist=["x"]).feff_available(),
                    reason="feff10-rs not installed")
def test_cli_local_simulate_compares_the_predicted_shell(tmp_path):
    """--simulate: one FEFF10 run of the predicted SiO4 shell; quartz's edge is mostly its first shell (r > 0.8)."""
    out = tmp_path / "o"
    r = run_cli("local", str(DATA / "quartz_si_k_feff.txt"), "--absorber", "Si", "--samples", "3",
                "--library", str(DATA / "si_k_library_small.npz"), "--method", "template", "--simulate",
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    sim = s["simulated"]
    assert sim["atoms"] == s["coordination_number"] + 1 == 5 and 0.8 < sim["pearson_r"] <= 1.0
    assert "r = " in r.stdout and (out / "local.png").stat().st_size > 1000


def test_cli_bad_spectra_one_line_exit_2(tmp_path):
    lib = str(DATA / "si_k_library_small.npz")
    kev = tmp_path / "kev.txt"
    e = np.linspace(1.80, 1.90, 100)
    np.savetxt(kev, np.c_[e, 1 / (1 + np.exp(-(e - 1.839) * 1000))])
    short = tmp_path / "short.txt"
    short.write_text("1839 0.1\n1840 0.5\n1841 1.0\n")
    flat = tmp_path / "flat.txt"
    np.savetxt(flat, np.c_[np.linspace(1800, 1900, 200), np.random.default_rng(0).normal(1, 0.01, 200)])
    fe = SHARED / "experimental_xas" / "FeO_rt_01.xdi"
    for path, msg in ((kev, "keV"), (short, "too short"), (flat, "no absorption edge"), (fe, "Si K edge")):
        if not path.exists():
            continue
        r = run_cli("local", str(path), "--absorber", "Si", "--library", lib, "--out", str(tmp_path / "x"))
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_cli("local", str(DATA / "quartz_si_k_feff.txt"), "--absorber", "Xx", "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "--absorber" in r.stderr


def test_cli_spectra_evaluate(tmp_path):
    r = run_cli("spectra", "evaluate", "--library", str(DATA / "si_k_library_small.npz"), "--split", "val",
                "--out", str(tmp_path / "t.md"))
    assert r.returncode == 0, r.stderr
    assert "template matching" in r.stdout and (tmp_path / "t.md").exists()


@pytest.mark.skipif(not __import__("xtalsolve.local.feff", fromlist=["x"]).feff_available(),
                    reason="feff10-rs not installed")
def test_cli_spectra_evaluate_with_exafs_rows(tmp_path):
    r = run_cli("spectra", "evaluate", "--library", str(DATA / "si_k_library_small.npz"), "--split", "val",
                "--exafs", "1", "--out", str(tmp_path / "t.md"))
    assert r.returncode == 0, r.stderr
    assert "EXAFS-style fit, ideal (1)" in r.stdout and "EXAFS-style fit, realistic (1)" in r.stdout


@pytest.mark.skipif(not __import__("xtalsolve.local.feff", fromlist=["x"]).feff_available(),
                    reason="feff10-rs not installed")
def test_exafs_fit_of_feff_chi_recovers_the_tetrahedron():
    """FEFF's own chi(k) of an SiO4 tetrahedron, fitted with FEFF's path functions: N = 4, R = 1.61 A."""
    from xtalsolve.local.baselines import first_shell_path

    tet = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / np.sqrt(3) * 1.61
    cl = Cluster(("Si",) + ("O",) * 4, np.vstack([np.zeros(3), tet]))
    path, chi = first_shell_path(cl, kmax=14.0)
    assert path.degeneracy == 4 and path.reff_A == pytest.approx(1.61, abs=1e-3)
    m = (chi[:, 0] >= 3) & (chi[:, 0] <= 12)
    k = chi[m, 0]
    fit = fit_first_shell(k, chi[m, 1], np.interp(k, path.k, path.amp), np.interp(k, path.k, path.phase),
                          np.interp(k, path.k, path.lam), start=(6.0, 1.7, 0.003))
    assert fit.n == pytest.approx(4.0, rel=0.05) and fit.r_A == pytest.approx(1.61, abs=0.01)
    assert fit.sigma2_A2 < 5e-4


def test_library_subset_by_mask_and_indices():
    lib = SpectrumLibrary.load(DATA / "si_k_library_small.npz")
    assert len(lib.subset(range(5))) == 5 and lib.subset([0, 2]).meta == [lib.meta[0], lib.meta[2]]
    mask = np.zeros(len(lib), bool)
    mask[[1, 3]] = True
    assert lib.subset(mask).meta == [lib.meta[1], lib.meta[3]]
    assert all(m["split"] == "val" for m in lib.split("val").meta)


@pytest.mark.skipif(not __import__("xtalsolve.local.feff", fromlist=["x"]).feff_available(),
                    reason="feff10-rs not installed")
def test_exafs_baseline_on_a_library_cluster():
    """EXAFS-style analysis of a 13-atom silicate cluster with an ideal-tetrahedron reference path."""
    from xtalsolve.local.evaluate import evaluate_exafs

    lib = SpectrumLibrary.load(DATA / "si_k_library_small.npz")
    i = next(j for j in range(len(lib)) if first_shell(lib.cluster(j)).coordination_number == 4)
    tet = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]]) / np.sqrt(3) * 1.61
    ref = Cluster(("Si",) + ("O",) * 4, np.vstack([np.zeros(3), tet]))
    s = evaluate_exafs(lib.subset([i]), "Si", ref)
    assert s["n"] == 1 and s["first_shell_mae_A"] < 0.05 and s["cn_relative_error"] <= 0.25


def test_packaged_library_is_the_default(tmp_path):
    from xtalsolve.local.predict import default_library_path

    if not default_library_path("Si", "K").exists():
        pytest.skip("no packaged Si K library")
    r = run_cli("local", str(DATA / "quartz_si_k_feff.txt"), "--absorber", "Si", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["coordination_number"] == 4 and abs(s["mean_bond_length_A"] - 1.61) < 0.05


def test_leave_one_material_out_never_uses_the_query_material():
    from xtalsolve.local.evaluate import evaluate_template_lomo

    lib = SpectrumLibrary.load(DATA / "si_k_library_small.npz")
    s = evaluate_template_lomo(lib, "Si")
    assert s["n"] == len(lib) and 0.0 <= s["cn_error_rate"] <= 1.0 and s["first_shell_mae_A"] < 0.1
    # with the query's own material allowed, the nearest template is the query itself: zero error
    tm = TemplateMatcher(lib)
    assert tm.predict(lib.features[3], 1, "Si")[0].meta["template_index"] == 3
    excl = tm.predict(lib.features[3], 3, "Si", exclude={lib.meta[3]["material_key"]})
    assert all(lib.meta[c.meta["template_index"]]["material_key"] != lib.meta[3]["material_key"] for c in excl)


@pytest.mark.parametrize("name", ["Fe2O3_rt_01.xdi", "FeO_rt_01.xdi"])
def test_measured_fe_oxides_are_six_fold_with_the_packaged_library(tmp_path, name):
    """Measured Fe K XANES (APS 20-BM) of hematite and wustite, the computed templates aligned to each (one
    energy shift, stretch and broadening): six-fold Fe by the nearest templates and by the linear-combination
    fit, Fe-O near 2.0-2.2 A. Unaligned, hematite's nearest templates tie 5 against 6 and its fit puts 45 % of
    the Fe on tetrahedral sites (docs/spectra.md)."""
    from xtalsolve.local.predict import default_library_path

    if not default_library_path("Fe", "K").exists() or not (SHARED / "experimental_xas" / name).exists():
        pytest.skip("no packaged Fe K library or no shared XAS data")
    r = run_cli("local", str(SHARED / "experimental_xas" / name), "--absorber", "Fe", "--samples", "5",
                "--out", str(tmp_path / "o"))  # template matching with the alignment: the defaults
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["coordination_number"] == 6 and 1.95 < s["mean_bond_length_A"] < 2.25
    assert s["mixture"]["coordination_number_fractions"]["6"] > 0.75
    assert s["alignment"]["stretch"] > 1.1 and s["alignment"]["lcf_residual"] < 0.025
    lib = SpectrumLibrary.load(default_library_path("Fe", "K"))
    assert not {"FeO", "Fe2O3", "Fe3O4"} & {m["formula"] for m in lib.meta}  # no copy of the measured materials


def test_aligned_library_moves_features_by_shift_and_stretch():
    """A feature at E - E0 = 10 eV appears at shift + stretch * 10 eV; the identity returns the library itself."""
    grid = np.arange(-10.0, 50.01, 0.5)
    peak = np.exp(-0.5 * ((grid - 10.0) / 1.0) ** 2)
    lib = SpectrumLibrary(grid, peak[None], np.zeros(1), np.zeros((1, 12, 3)), np.zeros((1, 12), int), [{}])
    assert lib.aligned() is lib
    moved = lib.aligned(shift_eV=1.0, stretch=1.2)
    assert grid[np.argmax(moved.features[0])] == pytest.approx(13.0)
    assert moved.features[0].sum() == pytest.approx(1.2 * peak.sum(), rel=1e-2)  # stretched by 1.2 in energy
    with pytest.raises(XtalsolveError, match="stretch"):
        lib.aligned(stretch=0.0)


def test_alignment_fit_recovers_a_known_energy_mapping():
    """A 1:2 four-/six-fold Si K mixture (cristobalite, stishovite) whose computed spectra were shifted by 1 eV,
    stretched by 1.2 and broadened by 2 eV: the fit finds the shift and the stretch on its grid, and the mixture's
    residual falls from the unaligned one by more than five times; with both materials left out of the library the
    aligned fit still gives the site fractions within 0.15."""
    from xtalsolve.local.baselines import fit_alignment

    lib = SpectrumLibrary.load(DATA_DIR / "library_Si_K.npz")
    four, six = four_six_pair(lib)
    moved = lib.aligned(1.0, 1.2, 2.0)
    mixed = moved.features[four] / 3 + 2 * moved.features[six] / 3
    fitted = fit_alignment(lib, mixed)
    assert (fitted.shift_eV, fitted.stretch) == (1.0, 1.2) and abs(fitted.fwhm_eV - 2.0) <= 1.0
    assert fitted.residual < TemplateMatcher(lib).mixture(mixed)[1] / 5
    left_out = {lib.meta[four]["material_key"], lib.meta[six]["material_key"]}
    others = lib.subset([m["material_key"] not in left_out for m in lib.meta])
    a = fit_alignment(others, mixed)
    fractions = site_mixture(TemplateMatcher(others.aligned(a.shift_eV, a.stretch, a.fwhm_eV)), mixed, "Si")
    fractions = {int(k): v for k, v in fractions["coordination_number_fractions"].items()}
    assert abs(fractions.get(4, 0) - 1 / 3) < 0.15 and abs(fractions.get(6, 0) - 2 / 3) < 0.15


def test_broadened_library_smooths_but_keeps_levels():
    lib = SpectrumLibrary.load(DATA / "si_k_library_small.npz")
    b = lib.broadened(3.0)
    assert np.all(b.features.max(axis=1) < lib.features.max(axis=1))  # white lines are lowered
    # a Gaussian with mode="nearest" keeps a constant level: the pre-edge start stays at its value
    np.testing.assert_allclose(b.features[:, 0], lib.features[:, 0], atol=0.02)
    # the integral over the interior is conserved to within the edge effects
    inner = slice(20, -20)
    np.testing.assert_allclose(b.features[:, inner].sum(1), lib.features[:, inner].sum(1), rtol=0.05)
    assert lib.broadened(0.0) is lib


def test_broken_cif_with_overlapping_sites_is_skipped():
    """IZA OSO parses (pymatgen) into Si15O18 with site pairs 0.001 A apart; FEFF would fail on it."""
    from xtalsolve.local.dataset import _parse_cif

    oso, sod = (SHARED / "structures" / "zeolites_iza" / f"{n}.cif" for n in ("OSO", "SOD"))
    if not oso.exists():
        pytest.skip("shared zeolite data not available")
    assert _parse_cif(oso.read_text()) is None
    assert _parse_cif(sod.read_text()).composition.reduced_formula == "SiO2"
