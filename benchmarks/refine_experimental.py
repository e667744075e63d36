"""Rietveld refinement of every measured powder case with a published structure, from a perturbed start.

For each `pxrd` row of ../shared/data/experimental/manifest.csv with a structure file: symmetrise the
published structure, perturb it (free cell parameters +-1 %, each independent site 0.05 angstrom, seed fixed),
refine it in stages against the measured profile, and compare Rwp with the published Rwp where the deposited
*.rtv.combined.cif states one. Multi-phase cases refine the first phase only (said in the table). Wavelength
`unknown` (XRED) is taken as Cu Kalpha1+2, which the manifest's wavelength_check supports for all but graphite.

    nice python benchmarks/refine_experimental.py [--cases id1,id2] [--max-nfev 20]

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
from xtalsolve.refine import instrument_for, perturb, refine, symmetrize
from xtalsolve.refine.recipe import Profile

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "experimental"
OUT = ROOT / "benchmarks" / "results" / "refine_experimental.json"
CU_DOUBLET = "1.54056;1.54439"
PUBLISHED_KEYS = ("_pd_proc_ls_prof_wR_factor", "_refine_ls_wR_factor_all")


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


def run_case(row, max_nfev: int, seed: int = 0) -> dict:
    from pymatgen.core import Structure

    structures = str(row.structure_file).split(";")
    wavelength = str(row.wavelength_A)
    notes = []
    if wavelength == "unknown":
        wavelength = CU_DOUBLET
        notes.append("wavelength unknown: Cu Kalpha1+2 assumed (manifest wavelength_check)")
    if len(structures) > 1:
        notes.append(f"{len(structures)} phases: only the first refined")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        published = Structure.from_file(DATA / structures[0])
        start = perturb(symmetrize(published, 0.05), 0.01, 0.05, seed=seed)
    profile = load(row)
    instrument = instrument_for(wavelength)
    t0 = time.perf_counter()
    result = refine(profile, start, instrument, displacement=instrument.wavelength > 1.0, max_nfev=max_nfev)
    seconds = time.perf_counter() - t0
    pub = published_rwp(row)
    return {
        "case": row.case_id, "formula": row.formula, "space_group": result.space_group,
        "n_points": len(profile.x), "wavelength_A": wavelength,
        "rwp": result.rwp, "rp": result.rp, "gof": result.gof, "r_bragg": result.r_bragg,
        "published_rwp": pub, "ratio": None if pub is None else result.rwp / pub,
        "within_1.5x": None if pub is None else bool(result.rwp <= 1.5 * pub),
        "seconds": round(seconds, 1), "stages": result.stages,
        "cell": result.cell.tolist(), "published_cell": list(published.lattice.parameters),
        "notes": "; ".join(notes),
    }


def table(rows) -> str:
    lines = ["| case | formula | Rwp % | published Rwp % | ratio | GoF | R_Bragg % | time s | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r.get('formula', '')} | failed | | | | | {r.get('seconds', '')} | {r['error']} |")
            continue
        pub = "" if r["published_rwp"] is None else f"{100 * r['published_rwp']:.2f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}" + (" ok" if r["within_1.5x"] else " >1.5")
        rb = "" if r["r_bragg"] is None else f"{100 * r['r_bragg']:.1f}"
        lines.append(f"| {r['case']} | {r['formula']} | {100 * r['rwp']:.2f} | {pub} | {ratio} | {r['gof']:.2f} | "
                     f"{rb} | {r['seconds']:.0f} | {r['notes']} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=None, help="comma-separated case ids (default: all with a structure)")
    parser.add_argument("--max-nfev", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    manifest = pd.read_csv(DATA / "manifest.csv", keep_default_na=False)
    rows = manifest[(manifest.kind == "pxrd") & (manifest.structure_file != "")]
    if args.cases:
        rows = rows[rows.case_id.isin(args.cases.split(","))]
    # cases with a published Rwp first, the big-cell MOF last
    rows = rows.assign(order=[(0 if c.startswith(("iucr", "gsas2")) else 1) + (2 if "MOF" in c else 0)
                              for c in rows.case_id]).sort_values("order", kind="stable")
    results = json.loads(OUT.read_text())["cases"] if OUT.exists() and args.cases else []
    results = [r for r in results if r["case"] not in set(rows.case_id)]
    for row in rows.itertuples():
        t0 = time.perf_counter()
        try:
            record = run_case(row, args.max_nfev)
        except Exception as err:  # noqa: BLE001  (record any failure and go on: the table lists it with why)
            record = {"case": row.case_id, "formula": row.formula, "error": f"{type(err).__name__}: {err}"[:200],
                      "seconds": round(time.perf_counter() - t0, 1)}
            traceback.print_exc()
        results.append(record)
        print(json.dumps({k: v for k, v in record.items() if k not in ("stages", "cell", "published_cell")}), flush=True)
        OUT.write_text(json.dumps({"max_nfev": args.max_nfev, "perturbation": "cell +-1 %, sites 0.05 A, seed 0",
                                   "cases": results}, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
