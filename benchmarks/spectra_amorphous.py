"""Si K spectra -> first shell on the amorphous-silica test set (never trained on), beside the crystalline scores.

Inputs (all committed): the melt-quench glasses ``data/amorphous/glass_s*.cif``, their FEFF10 Si K library
``data/amorphous/library_Si_K_glass.npz`` and the crystalline FEFF10 cache ``data/feff_cache/spectra_si_k.tar.gz``
(unpacked to a temporary folder and read with the same ``build_library`` as the glass spectra).

1. every glass: Si coordination, mean Si-O, O-Si-O / Si-O-Si angles, neutron S(Q) (Q 0.8-20 1/angstrom) and G(r)
   (r 1 - L/2 angstrom, Qmax 20) against the measured ISIS data (``../shared/data/amorphous``);
2. template matching (k = 5) with the crystalline training split as templates: crystalline test split,
   crystalline leave-one-material-out (all materials), amorphous; and with every crystalline spectrum as templates;
3. the EXAFS-style first-shell fit on the crystalline test split and the amorphous set (one FEFF EXAFS run each;
   ``--exafs N`` limits the amorphous entries), under three conditions: FEFF's chi with S02 known and no noise,
   fitted in k-space (optimistic); the same fitted in R-space over the first-shell peak; and realistic data
   (``REALISTIC_EXAFS``: S02 known to +-10 %, thermal sigma2, 5 % noise, R-space fit); the reference path is
   the first shell of the most regular unperturbed four-fold training site (``exafs_reference``);
4. the diffusion model (8 samples per spectrum; amorphous also by true CN): the shipped checkpoint ``src/xtalsolve/local/data/edm_Si_K.pt``
   (trained on the crystalline train split only) unless ``--checkpoint`` names another; ``--no-model`` skips it.
   Template matching and the model are also scored on the crystalline val split (a second held-out material).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/spectra_amorphous.py [--checkpoint X.pt] [--exafs 60]

Prints a table and writes benchmarks/results/spectra_amorphous.json.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GLASS_DIR = ROOT / "data" / "amorphous"
CRYSTAL_CACHE = ROOT / "data" / "feff_cache" / "spectra_si_k.tar.gz"
MEASURED_SQ = ROOT.parent / "shared" / "data" / "amorphous" / "dissolve_NeutronSiO2sq.dat"
OUT = ROOT / "benchmarks" / "results" / "spectra_amorphous.json"
METRICS = ("n", "first_shell_mae_A", "bond_mae_A", "cn_accuracy", "cn_error_rate", "angle_w1_pooled_deg")


def glass_checks(path: Path) -> dict:
    """Network geometry and neutron S(Q) / G(r) agreement of one glass model."""
    from pymatgen.core import Structure

    from xtalsolve.local.amorphous import agreement, gr_to_sq, network_geometry, neutron_gr, read_sq, sq_to_gr

    s = Structure.from_file(path)
    q, y, _ = read_sq(MEASURED_SQ)
    m = (q >= 0.8) & (q <= 20.0)
    r = np.arange(0.01, 0.5 * min(s.lattice.abc), 0.01)
    t0 = time.perf_counter()
    sq = gr_to_sq(r, neutron_gr(s, r, uiso=0.003), q[m])
    rg = r[r >= 1.0]
    gr = agreement(neutron_gr(s, rg, uiso=0.003, qmax=20.0), sq_to_gr(q, y, rg, 20.0))
    return {"glass": path.name, "atoms": len(s), "density_g_cm3": round(s.density, 3),
            **network_geometry(s).summary(), "sq_q0.8_20": agreement(sq, y[m]), "gr_r1_qmax20": gr,
            "scattering_seconds": round(time.perf_counter() - t0, 1)}


def nearest_template_distance(train, test) -> float:
    """Median over ``test`` of the L2 distance (normalised mu, per grid point) to the nearest training spectrum."""
    from xtalsolve.local.baselines import TemplateMatcher

    tm = TemplateMatcher(train)
    return float(np.median([tm.query(test.features[i], 1)[1][0] for i in range(len(test))]))


def by_cn(test, absorber: str) -> dict[int, list[int]]:
    from xtalsolve.local.evaluate import truths

    out: dict[int, list[int]] = {}
    for i, t in enumerate(truths(test, absorber)):
        out.setdefault(t.coordination_number, []).append(i)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="diffusion checkpoint (.pt); default: the shipped src/xtalsolve/local/data/edm_Si_K.pt")
    p.add_argument("--no-model", action="store_true", help="do not score a diffusion model")
    p.add_argument("--exafs", type=int, default=None, help="EXAFS-style fit on this many amorphous entries "
                   "(default all; 0 skips the fit)")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--no-scattering", action="store_true", help="skip the S(Q)/G(r) checks of the glasses")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    warnings.filterwarnings("ignore", message=".*fractional coordinates rounded.*")
    import torch

    torch.set_num_threads(1)
    from xtalsolve.local.evaluate import (evaluate_exafs, evaluate_model, evaluate_template, evaluate_template_lomo,
                                          exafs_chis, exafs_reference)
    from xtalsolve.local.library import SpectrumLibrary, build_library
    from xtalsolve.local.predict import default_checkpoint_path

    absorber = "Si"
    if args.no_model:
        args.checkpoint = None
    elif args.checkpoint is None:
        args.checkpoint = default_checkpoint_path(absorber, "K")
    glasses = sorted(GLASS_DIR.glob("glass_s*.cif"))
    result: dict = {"glasses": [] if args.no_scattering else [glass_checks(g) for g in glasses]}
    amorphous = SpectrumLibrary.load(GLASS_DIR / "library_Si_K_glass.npz")
    with tempfile.TemporaryDirectory(prefix="xtal_cryst_") as tmp:
        with tarfile.open(CRYSTAL_CACHE) as tar:
            tar.extractall(tmp, filter="data")
        crystal = build_library(next(Path(tmp).iterdir()), absorber)
    train, val, test = crystal.split("train"), crystal.split("val"), crystal.split("test")
    result["libraries"] = {"crystalline": len(crystal), "crystalline_train": len(train),
                           "crystalline_val": len(val), "crystalline_test": len(test), "amorphous": len(amorphous),
                           "amorphous_true_cn": {str(k): len(v) for k, v in sorted(by_cn(amorphous, absorber).items())},
                           "crystalline_materials": len({m.get("material_key") for m in crystal.meta})}
    result["median_nearest_template_distance"] = {"crystalline_test": nearest_template_distance(train, test),
                                                  "amorphous": nearest_template_distance(train, amorphous)}
    rows: dict[str, dict] = {}
    t0 = time.perf_counter()
    rows["template k=5 | crystalline test"] = evaluate_template(train, test, absorber)
    rows["template k=5 | crystalline val"] = evaluate_template(train, val, absorber)
    rows["template k=5 | crystalline leave-one-material-out"] = evaluate_template_lomo(crystal, absorber)
    rows["template k=5 | amorphous"] = evaluate_template(train, amorphous, absorber)
    rows["template k=5, all crystalline templates | amorphous"] = evaluate_template(crystal, amorphous, absorber)
    for cn, idx in sorted(by_cn(amorphous, absorber).items()):
        rows[f"template k=5 | amorphous, true CN {cn}"] = evaluate_template(train, amorphous.subset(idx), absorber)
    if args.checkpoint:
        from xtalsolve.local.model import load_model

        model, cfg = load_model(args.checkpoint)
        name = f"diffusion {args.checkpoint.name} ({args.samples} samples)"
        rows[f"{name} | crystalline test"] = evaluate_model(model, cfg, test, absorber, samples=args.samples)
        rows[f"{name} | crystalline val"] = evaluate_model(model, cfg, val, absorber, samples=args.samples)
        result["checkpoint"] = str(args.checkpoint.resolve().relative_to(ROOT)) if args.checkpoint.resolve(
        ).is_relative_to(ROOT) else str(args.checkpoint)
        from xtalsolve.local.evaluate import model_shells, truths
        from xtalsolve.local.metrics import score

        pred = model_shells(model, cfg, amorphous, absorber, samples=args.samples)
        true = truths(amorphous, absorber)
        rows[f"{name} | amorphous"] = score(pred, true)
        for cn, idx in sorted(by_cn(amorphous, absorber).items()):  # the same samples, grouped by the true CN
            rows[f"{name} | amorphous, true CN {cn}"] = score([pred[i] for i in idx], [true[i] for i in idx])
    if args.exafs != 0:
        from dataclasses import replace

        from xtalsolve.local.baselines import IDEAL_EXAFS, REALISTIC_EXAFS

        ref = exafs_reference(train, absorber)
        n = len(amorphous) if args.exafs is None else min(args.exafs, len(amorphous))
        chis = {"crystalline test": exafs_chis(test, absorber), f"amorphous ({n})": exafs_chis(amorphous, absorber, n)}
        conditions = {"EXAFS-style fit": IDEAL_EXAFS,
                      "EXAFS-style fit, R-space": replace(IDEAL_EXAFS, r_window=REALISTIC_EXAFS.r_window),
                      "EXAFS-style fit, realistic": REALISTIC_EXAFS}
        for method, cond in conditions.items():
            for (set_name, set_chis), lib in zip(chis.items(), (test, amorphous)):
                rows[f"{method} | {set_name}"] = evaluate_exafs(lib, absorber, ref, conditions=cond, chis=set_chis)
        result["exafs_reference"] = ref.meta.get("material_key")
        result["exafs_conditions"] = {method: cond.as_dict() for method, cond in conditions.items()}
    result["seconds_scoring"] = round(time.perf_counter() - t0, 1)
    result["scores"] = rows
    # amorphous / crystalline ratios (target: within 1.5x)
    ratios = {}
    exafs_methods = ("EXAFS-style fit", "EXAFS-style fit, R-space", "EXAFS-style fit, realistic")
    for method in ("template k=5",) + exafs_methods + ((name,) if args.checkpoint else ()):
        amo = next((v for k, v in rows.items() if k.startswith(f"{method} | amorphous")), None)
        for ref_set in ("crystalline test", "crystalline val", "crystalline leave-one-material-out"):
            cry = rows.get(f"{method} | {ref_set}")
            if amo and cry:
                ratios[f"{method}: amorphous / {ref_set}"] = {
                    m: (amo[m] / cry[m] if cry[m] else None) for m in ("first_shell_mae_A", "cn_error_rate")}
    result["ratios"] = ratios
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


def table(result: dict) -> str:
    from xtalsolve.local.evaluate import format_cell

    lines = []
    if result["glasses"]:
        head = ("| glass | Si CN counts | 4-fold | mean Si-O (A) | O-Si-O mean (deg) | Si-O-Si mode / mean (deg) | "
                "S(Q) Pearson / R | G(r) Pearson / R |")
        lines += [head, "|---" * 8 + "|"]
        for g in result["glasses"]:
            lines.append(f"| {g['glass']} | {g['cn_counts']} | {g['fraction_fourfold']:.3f} | {g['mean_bond_A']:.4f} | "
                         f"{g['x_a_x_mean_deg']:.1f} | {g['a_x_a_mode_deg']:.1f} / {g['a_x_a_mean_deg']:.1f} | "
                         f"{g['sq_q0.8_20']['pearson']:.3f} / {g['sq_q0.8_20']['r_factor']:.3f} | "
                         f"{g['gr_r1_qmax20']['pearson']:.3f} / {g['gr_r1_qmax20']['r_factor']:.3f} |")
        lines.append("")
    lines += ["| method | set | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    for key, r in result["scores"].items():
        method, dataset = key.split(" | ")
        lines.append(f"| {method} | {dataset} | " + " | ".join(format_cell(r.get(c)) for c in METRICS) + " |")
    lines.append("")
    for k, v in result["ratios"].items():
        lines.append(f"{k}: first-shell MAE x{_ratio(v['first_shell_mae_A'])}, CN error x{_ratio(v['cn_error_rate'])}")
    d = result["median_nearest_template_distance"]
    lines.append(f"median distance to the nearest crystalline training spectrum: crystalline test "
                 f"{d['crystalline_test']:.4f}, amorphous {d['amorphous']:.4f}")
    return "\n".join(lines)


def _ratio(v) -> str:
    return "-- (crystalline value 0)" if v is None else f"{v:.2f}"


if __name__ == "__main__":
    main()
