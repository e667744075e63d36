"""Rietveld refinement of every measured powder case with a published structure, from a perturbed start.

For each `pxrd` row of ../shared/data/experimental/manifest.csv with a structure file: symmetrise the
published structure, perturb it (free cell parameters +-1 %, each independent site 0.05 angstrom, seed fixed),
refine it in stages against the measured profile, and compare Rwp with the published Rwp where the deposited
*.rtv.combined.cif states one. Cases with several structure files are refined as multi-phase mixtures (one
contribution per phase, Hill-Howard weight fractions, cells from a Le Bail fit first). Laboratory data (a tube
line: Cu, Mo, Co, Ag, Cr or Fe Kalpha, whatever the wavelength) get sample displacement and two Berar-Baldinozzi
asymmetry terms (--asymmetry 0 turns them off). After the stages, March-Dollase texture along each low-index
axis is tried and kept where it lowers Rwp by more than 2 % (--texture none turns this off). The background has
the Recipe's default number of Chebyshev terms (one per 5 degrees of range, 8-24). Pseudo-symmetric cells are
started in both orientations (Recipe.refine(orientations=True)). Wavelength `unknown` (XRED) is taken as Cu
Kalpha1+2, which the manifest's wavelength_check supports for all but graphite.

    nice python benchmarks/refine_experimental.py [--cases id1,id2] [--max-nfev 20] [--asymmetry 2] [--texture auto] [--out FILE]

Writes benchmarks/results/refine_experimental.json after every case and prints a table at the end.
"""

from __future__ import annotations

import argparse
import json
import re
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from xtalsolve.errors import XtalsolveError
from xtalsolve.io import read_pattern
from xtalsolve.radiation import tube_line
from xtalsolve.refine import instrument_for, perturb, refine, symmetrize
from xtalsolve.refine.parameters import format_esd
from xtalsolve.refine.recipe import Profile

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "experimental"
OUT = ROOT / "benchmarks" / "results" / "refine_experimental.json"
CU_DOUBLET = "1.54056;1.54439"
PUBLISHED_KEYS = ("_pd_proc_ls_prof_wR_factor", "_refine_ls_wR_factor_all")
PUBLISHED_WEIGHT_FRACTIONS = {"iucr_av5088sup4": [0.575, 0.4248]}
"""Phase mass fractions stated in the deposited CIF's phase table (_pd_phase_mass_%: 57.5(6) and 42.48)."""
IMPURITIES = {"iucr_gw5052Mg2Sn_100K_LTsup23": ["xred/xred_Sn/7040217.cif"]}
"""Second phases not listed in the manifest: the published calculated profile of Mg2Sn has two peaks that
Mg2Sn cannot index, at 9.84 and 10.29 deg (0.49935 A: d = 2.911 and 2.784 A), which are beta-Sn (200) and (101);
the beta-Sn structure file of the shared data (xred_Sn, room temperature) is the start for that phase."""


def published_rwp(row) -> float | None:
    """Rwp stated in the deposited combined CIF (first number after the key), if any."""
    for rel in str(row.other_files).split(";"):
        if not rel.endswith(".cif"):
            continue
        text = (DATA / rel).read_text(errors="replace")
        for key in PUBLISHED_KEYS:
            match = re.search(rf"^{key}\s+([-+0-9.eE]+)", text, flags=re.MULTILINE)
            if match is None:  # value on a following line (looped or split key/value)
                match = re.search(rf"^{key}\s*\n(?:\s*_\S+\s*\n)*\s*([-+0-9.eE]+)", text, flags=re.MULTILINE)
            if match:
                value = float(match.group(1))
                return value / 100.0 if value > 1.0 else value  # some CIFs give percent
    return None


def published_calc_rwp(row, profile) -> float | None:
    """Rwp of the deposited calculated profile (*_published_calc.xy) against the data with the weights used here:
    the like-for-like reference where our weights differ from the authors' (net intensities, no esd's)."""
    calc = [rel for rel in str(row.other_files).split(";") if rel.endswith("_published_calc.xy")]
    if not calc or not (DATA / calc[0]).is_file():
        return None
    data = np.loadtxt(DATA / calc[0], comments="#")
    y_calc = np.interp(profile.x, data[:, 0], data[:, 1])
    w = 1.0 / profile.sigma**2
    return float(np.sqrt((w * (profile.y - y_calc) ** 2).sum() / (w * profile.y**2).sum()))


def load(row):
    path = DATA / row.pattern_file
    try:
        pattern = read_pattern(path, x_unit="2theta")
        x, y, sigma = pattern.x, pattern.y, pattern.sigma
    except XtalsolveError:
        data = np.loadtxt(path, comments="#")
        x, y = data[:, 0], data[:, 1]
        sigma = data[:, 2] if data.shape[1] > 2 else None
    return Profile.from_arrays(x, y, sigma, source=str(path))


def run_case(row, max_nfev: int, asymmetry: int = 2, seed: int = 0, texture="auto") -> dict:
    from pymatgen.core import Structure

    structures = str(row.structure_file).split(";") + IMPURITIES.get(row.case_id, [])
    wavelength = str(row.wavelength_A)
    notes = []
    if wavelength == "unknown":
        wavelength = CU_DOUBLET
        notes.append("wavelength unknown: Cu Kalpha1+2 assumed (manifest wavelength_check)")
    if len(structures) > 1:
        notes.append(f"{len(structures)} phases refined" + (" (beta-Sn impurity added)" if row.case_id in IMPURITIES else ""))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        published = [Structure.from_file(DATA / s) for s in structures]
        starts = [perturb(symmetrize(s, 0.05), 0.01, 0.05, seed=seed + k) for k, s in enumerate(published)]
    profile = load(row)
    instrument = instrument_for(wavelength)
    lab = tube_line(instrument.wavelength) is not None  # a laboratory tube (Cu, Mo, ...): axial divergence
    if lab and asymmetry:
        notes.append("asymmetry")
    names = [f"phase{k + 1}" for k in range(len(starts))] if len(starts) > 1 else None
    t0 = time.perf_counter()
    if len(starts) > 1:  # several phases: cells from a Le Bail fit first, as one would do by hand
        notes.append("Le Bail start")
    result = refine(profile, starts if len(starts) > 1 else starts[0], instrument, displacement=lab,
                    asymmetry=asymmetry if lab else 0, max_nfev=max_nfev, names=names, lebail_start=len(starts) > 1,
                    texture=texture)
    chosen = [s.get("texture") for s in result.stages if s["stage"] == "texture search"]
    if chosen and any(chosen[0].values()):
        notes.append("texture " + ", ".join(f"{k} ({v})" for k, v in chosen[0].items() if v))
    seconds = time.perf_counter() - t0
    pub = published_rwp(row)
    swapped = [s for s in result.stages if s.get("swapped")]
    if swapped:
        notes.append("cell orientation swapped (" + ", ".join(swapped[0]["swapped"]) + ")")
    phases = [{"name": p.name, "formula": p.structure.composition.reduced_formula, "space_group": p.space_group,
               "weight_fraction": p.weight_fraction, "weight_fraction_esd": p.weight_fraction_esd,
               "rwp_contribution": p.rwp_contribution, "r_bragg": p.r_bragg, "cell": p.cell.tolist(),
               "published_cell": list(s.lattice.parameters)} for p, s in zip(result.phases, published)]
    for phase, wf in zip(phases, PUBLISHED_WEIGHT_FRACTIONS.get(row.case_id, [])):
        phase["published_weight_fraction"] = wf
    return {
        "case": row.case_id, "formula": row.formula, "space_group": result.space_group,
        "n_points": len(profile.x), "wavelength_A": wavelength,
        "rwp": result.rwp, "rp": result.rp, "gof": result.gof, "r_bragg": result.r_bragg,
        "published_rwp": pub, "ratio": None if pub is None else result.rwp / pub,
        "published_calc_rwp": published_calc_rwp(row, profile),
        "within_1.5x": None if pub is None else bool(result.rwp <= 1.5 * pub),
        "seconds": round(seconds, 1), "stages": result.stages,
        "cell": result.cell.tolist(), "published_cell": list(published[0].lattice.parameters),
        "phases": phases, "asymmetry": asymmetry if lab else 0,
        "notes": "; ".join(notes),
    }


def table(rows) -> str:
    lines = ["| case | formula | Rwp % | published Rwp % | ratio | published profile, our weights: Rwp % | GoF | R_Bragg % "
             "| time s | notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r.get('formula', '')} | failed | | | | | | {r.get('seconds', '')} | {r['error']} |")
            continue
        pub_rwp = "" if r["published_rwp"] is None else f"{100 * r['published_rwp']:.2f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}" + (" ok" if r["within_1.5x"] else " >1.5")
        rb = "" if r["r_bragg"] is None else f"{100 * r['r_bragg']:.1f}"
        notes = r["notes"]
        calc_ref = "" if r.get("published_calc_rwp") is None else f"{100 * r['published_calc_rwp']:.2f}"
        if len(r.get("phases", [])) > 1:
            wt = "/".join(format_esd(100 * p["weight_fraction"], 100 * p["weight_fraction_esd"]) for p in r["phases"])
            pub = [p.get("published_weight_fraction") for p in r["phases"]]
            notes += f"; wt% {wt}" + ("" if None in pub else " (published " + "/".join(f"{100 * w:.1f}" for w in pub) + ")")
        lines.append(f"| {r['case']} | {r['formula']} | {100 * r['rwp']:.2f} | {pub_rwp} | {ratio} | {calc_ref} | {r['gof']:.2f} | "
                     f"{rb} | {r['seconds']:.0f} | {notes} |")
    return "\n".join(lines)


def summary_line(rows) -> str:
    ok = [r for r in rows if "error" not in r]
    pub = [r for r in ok if r["published_rwp"] is not None]
    passed = [r["case"] for r in pub if r["within_1.5x"]]
    seconds = np.array([r["seconds"] for r in ok])
    return (f"{len(ok)} cases refined; {len(pub)} state a published Rwp, of which {len(passed)} reach Rwp <= 1.5x "
            f"published ({', '.join(passed)}). Time per refinement: median {np.median(seconds):.0f} s, range "
            f"{seconds.min():.0f}-{seconds.max():.0f} s, total {seconds.sum() / 60:.1f} min.")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=None, help="comma-separated case ids (default: all with a structure)")
    parser.add_argument("--max-nfev", type=int, default=20)
    parser.add_argument("--asymmetry", type=int, default=2, help="Berar-Baldinozzi terms for lab data (0, 2, 4)")
    parser.add_argument("--texture", default="auto", help="auto (search the low-index March-Dollase axes) or none")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table-only", action="store_true", help="print the table of the stored results")
    args = parser.parse_args()
    out = args.out
    torch.set_num_threads(1)
    manifest = pd.read_csv(DATA / "manifest.csv", keep_default_na=False)
    rows = manifest[(manifest.kind == "pxrd") & (manifest.structure_file != "")]
    if args.table_only:
        stored = json.loads(out.read_text())
        by_id = {row.case_id: row for row in rows.itertuples()}
        for r in stored["cases"]:  # records written before the reference column existed
            if "published_calc_rwp" not in r and "error" not in r:
                r["published_calc_rwp"] = published_calc_rwp(by_id[r["case"]], load(by_id[r["case"]]))
        out.write_text(json.dumps(stored, indent=1))
        print(table(stored["cases"]))
        print(summary_line(stored["cases"]))
        return
    if args.cases:
        rows = rows[rows.case_id.isin(args.cases.split(","))]
    # cases with a published Rwp first, the big-cell MOF last
    rows = rows.assign(order=[(0 if c.startswith(("iucr", "gsas2")) else 1) + (2 if "MOF" in c else 0)
                              for c in rows.case_id]).sort_values("order", kind="stable")
    results = json.loads(out.read_text())["cases"] if out.exists() and args.cases else []
    for row in rows.itertuples():
        t0 = time.perf_counter()
        try:
            record = run_case(row, args.max_nfev, args.asymmetry, texture=None if args.texture == "none" else "auto")
        except Exception as err:  # noqa: BLE001  (record any failure and go on: the table lists it with why)
            record = {"case": row.case_id, "formula": row.formula, "error": f"{type(err).__name__}: {err}"[:200],
                      "seconds": round(time.perf_counter() - t0, 1)}
            traceback.print_exc()
        position = [i for i, r in enumerate(results) if r["case"] == row.case_id]
        if position:  # a re-run replaces the stored record in place
            results[position[0]] = record
        else:
            results.append(record)
        print(json.dumps({k: v for k, v in record.items() if k not in ("stages", "cell", "published_cell", "phases")}),
              flush=True)
        out.write_text(json.dumps({"max_nfev": args.max_nfev, "perturbation": "cell +-1 %, sites 0.05 A, seed 0",
                                   "asymmetry_lab": args.asymmetry, "texture": args.texture,
                                   "background_terms": "one per 5 degrees of range, 8-24 (Recipe default)",
                                   "cases": results}, indent=1))
    print(table(results))
    print(summary_line(results))


if __name__ == "__main__":
    main()
