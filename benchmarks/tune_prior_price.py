"""Tuning (on mp20_val, never on a test set): how much the prototype prior should weigh in the screening order.

Reads the run folders of a `pxrdnet_protocol.py --set mp20_val --arms prototype` run (atom count given, so the
candidate index is the prototype library's prior rank), matches every screened candidate with its reference
(pymatgen StructureMatcher, strict defaults and the loose 0.5 / 0.3 / 10) and re-orders the screened candidates
by fit score x (1 + beta x prior rank) for several beta: top-1 and top-10 matches per beta.

    python benchmarks/tune_prior_price.py benchmarks/results/mp20_val_runs_s6_tune

Writes benchmarks/results/tune_prior_price.json. The solver's SolveSettings.prior_price comes from this table.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BETAS = (0.0, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="run folder of a --set mp20_val prototype run")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    from pymatgen.analysis.structure_matcher import StructureMatcher
    from pymatgen.core import Structure

    from xtalsolve.data import validation_set
    from xtalsolve.data.structures import Pool

    val = validation_set("mp20")
    folders = sorted(d for d in args.runs.iterdir() if (d / "summary.json").is_file())
    ids = [d.name.split("_D")[0] for d in folders]
    key_of = {key[1]: key for key in val.keys}
    tensors = Pool("mp20", "val", tuple(key_of[i] for i in ids)).load()
    loose, strict = StructureMatcher(ltol=0.3, stol=0.5, angle_tol=10), StructureMatcher()
    materials = []
    for k, folder in enumerate(folders):
        reference = tensors.structure(k)
        rows = []
        for c in json.loads((folder / "summary.json").read_text())["screened"]:
            candidate = Structure.from_file(folder / c["cif"])
            rows.append({"rank": c["index"], "score": c["screen_score"],
                         "loose": bool(loose.fit(candidate, reference)), "strict": bool(strict.fit(candidate, reference))})
        materials.append(rows)
    table = {"materials": len(materials), "truth_among_candidates_loose": sum(any(r["loose"] for r in m) for m in materials)}
    for beta in BETAS:
        orders = [sorted(m, key=lambda r: r["score"] * (1 + beta * r["rank"])) for m in materials]
        table[f"beta={beta:g}"] = {"loose@1": sum(o[0]["loose"] for o in orders if o),
                                   "strict@1": sum(o[0]["strict"] for o in orders if o),
                                   "loose@10": sum(any(r["loose"] for r in o[:10]) for o in orders)}
        print(f"beta {beta:g}: {table[f'beta={beta:g}']}")
    (RESULTS / "tune_prior_price.json").write_text(json.dumps({"runs": str(args.runs), "table": table}, indent=2))


if __name__ == "__main__":
    main()
